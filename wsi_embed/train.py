"""`wsi-embed train`: slide-level heads on features files, with patient-level stratified
cross-validation, early stopping, and a final model trained on every labelled slide.

Reproducible: the same seed, data and device give the same metrics.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold

from .bags import BagStore, FeatureSet
from .choices import FeatureNorm, RegressionLoss, SurvivalLoss, Task
from .devices import pick_device
from .errors import TrainError, TrainingDiverged
from .feature_norm import feature_quantiles, feature_stats
from .h5io import atomic_file, remove_stale_tmp, tmp_path
from .heads import HEADS, default_bag_size
from .labels import LabelTable, TargetSpec, read_labels
from .report import clock, progress_bar
from .slide_model import Ensemble, ModelSpec, SlideModel, bag_logits, predict_bag, save_model
from .tasks import (
    HEADLINE,
    SUMMARY_KEYS,
    Objective,
    label_cells,
    label_columns,
    n_outputs,
    output_cells,
    output_columns,
    segments,
    task_metrics,
)

log = logging.getLogger(__name__)

#: below this many labelled slides each fold trains a 5-seed ensemble by default
SMALL_COHORT = 300


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    head: str = "abmil"
    folds: int = 5
    epochs: int = 200  # the most; early stopping decides
    lr: float = 2e-4
    weight_decay: float = 1e-2
    bag_size: int | str | None = "head"  # "head": the head's own (heads.BAG_SIZE); None: all
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    patience: int = 20
    dropout: float = 0.25
    cache_gb: float = 8.0
    seeds: int = 1  # members of each fold's ensemble (the CLI picks 5 for small cohorts)
    tune: bool = False
    tune_bag_size: bool | None = None  # --tune searches bag size; None: unless bag_size given
    warmup_epochs: float = 0.0  # 0: min(5, max(1, epochs / 20))
    task: Task = Task.CLASSIFICATION
    targets: tuple[str, ...] = ("label",)  # several: one model per target, shared splits
    time: str | None = None  # survival columns
    event: str | None = None
    survival_loss: SurvivalLoss = SurvivalLoss.COX
    bins: int = 4  # intervals of the discrete-time survival loss
    regression_loss: RegressionLoss = RegressionLoss.MSE
    patient_bags: bool = False  # a patient's slides form one bag; patients are predicted
    multi_head: bool = False  # several --targets: one model with a head per target
    bootstrap: int | None = None  # CI resamples of statistics/ (None: stats.BOOTSTRAP)
    feature_norm: FeatureNorm = FeatureNorm.ZSCORE_CLIP

    def __post_init__(self):
        """The head's bag size resolved once, so every fit and config.json see the number;
        `--tune` searches bag size only when none was given (decided here, before resolving,
        so copies made with `replace` keep the decision)."""
        if self.tune_bag_size is None:
            object.__setattr__(self, "tune_bag_size", self.bag_size == "head")
        if self.bag_size == "head":
            object.__setattr__(self, "bag_size", default_bag_size(self.head))

    def target_spec(self, target: str | None = None) -> TargetSpec:
        return TargetSpec(self.task, target or self.targets[0], self.time, self.event)

    @property
    def loss(self) -> str | None:
        return {Task.SURVIVAL: str(self.survival_loss),
                Task.REGRESSION: str(self.regression_loss)}.get(self.task)


def _group_split(idx: np.ndarray, t: LabelTable, n_splits: int, seed: int):
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    groups = [t.patients[i] for i in idx]
    return [(idx[a], idx[b]) for a, b in sgkf.split(idx, t.strata[idx], groups)]


def _strata_names(t: LabelTable) -> list[str]:
    if t.task == Task.CLASSIFICATION:
        return [f"class {c!r}" for c in t.classes]
    if t.task == Task.SURVIVAL:
        return ["censored", "events"]
    return [f"value quartile {q + 1}" for q in range(4)]


def _patients_per_class(idx: np.ndarray, t: LabelTable) -> dict[str, int]:
    names = _strata_names(t)
    present = sorted(set(t.strata.tolist()))
    return {names[k] if k < len(names) else "units without the first target":
            len({t.patients[i] for i in idx if t.strata[i] == k}) for k in present}


def _train_val(idx: np.ndarray, t: LabelTable, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about 1/5 of `idx` (by patient, stratified) for early stopping."""
    fewest = min(_patients_per_class(idx, t).values())
    if fewest < 2:
        raise TrainError("a class (or survival/regression stratum) has fewer than 2 patients "
                         "in a training split, too few to hold out validation slides; use "
                         "fewer --folds or more slides")
    return _group_split(idx, t, min(5, fewest), seed + 1)[0]


def make_splits(t: LabelTable, folds: int, seed: int) -> list[dict[str, list[str]]]:
    """train/val/test slide ids per fold: the CSV's split column, or patient-level
    stratified k-fold with a validation part carved from each training part."""
    ids = np.array(t.slide_ids)
    if t.splits is not None:
        parts = {p: ids[[s == p for s in t.splits]].tolist() for p in ("train", "val", "test")}
        if not parts["train"] or not parts["val"]:
            raise TrainError("the split column needs 'train' and 'val' slides")
        return [parts]
    if folds < 2:
        raise TrainError("--folds must be at least 2 (or give a split column in the CSV)")
    per_class = _patients_per_class(np.arange(len(ids)), t)
    if min(per_class.values()) < folds:
        raise TrainError(f"too few patients for {folds} stratified folds: "
                         + ", ".join(f"{c} has {n}" for c, n in per_class.items())
                         + f"; use --folds {max(2, min(per_class.values()))} or fewer")
    out = []
    for rest, test in _group_split(np.arange(len(ids)), t, folds, seed):
        tr, va = _train_val(rest, t, seed)
        out.append({"train": ids[tr].tolist(), "val": ids[va].tolist(),
                    "test": ids[test].tolist()})
    return out


# -- fitting ------------------------------------------------------------------------------
def pad_bags(bags: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(b) for b in bags)
    x = torch.zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = torch.from_numpy(b)
        mask[i, : len(b)] = True
    return x.to(device), mask.to(device)


def predict_ids(model, store: BagStore, ids: list[str], device) -> np.ndarray:
    return np.stack([predict_bag(model, store.get(s), device)[0] for s in ids])


def warmup_cosine(epoch: float, warmup: float, horizon: float) -> float:
    """LR factor: linear warm-up, then a cosine decay that reaches 0 at `horizon` epochs."""
    if epoch < warmup:
        return (epoch + 1e-3) / warmup
    span = max(horizon - warmup, 1e-6)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))


#: the temperature's range: below, a member's probabilities would be all 0 or 1; above, flat
T_BOUNDS = (0.05, 20.0)


def fit_calibration(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Temperature scaling (Guo et al. 2017) with a class bias: the T and b minimising the
    NLL of logits / T + b on held-out data. Training weighs classes equally, so the bias
    brings back the cohort's class priors and 0.5 means an even chance. (1, 0) when the data
    cannot tell (one class, or fewer than 4 slides). SciPy's L-BFGS-B keeps T within its
    bounds during the search: separable held-out logits pull T towards 0, where an
    unbounded search overflows."""
    n_classes = logits.shape[1]
    if len(y) < 4 or len(torch.unique(y)) < 2:
        return 1.0, torch.zeros(n_classes)
    z = logits.detach().double()

    def nll(p: np.ndarray) -> tuple[float, np.ndarray]:
        q = torch.tensor(p, requires_grad=True)
        loss = F.cross_entropy(z / q[0].exp() + q[1:], y) + 1e-3 * q[1:].square().sum()
        loss.backward()
        return float(loss.detach()), q.grad.numpy()

    with torch.enable_grad():
        res = minimize(nll, np.zeros(1 + n_classes), jac=True, method="L-BFGS-B",
                       options={"gtol": 1e-9, "ftol": 1e-12},
                       bounds=[tuple(map(math.log, T_BOUNDS))] + [(None, None)] * n_classes)
    t, b = math.exp(res.x[0]), torch.tensor(res.x[1:], dtype=torch.float32)
    before = float(F.cross_entropy(logits, y))
    after = float(F.cross_entropy(logits / t + b, y))
    if not (math.isfinite(after) and torch.isfinite(b).all() and after <= before):
        return 1.0, torch.zeros(n_classes)  # a failed fit leaves the model as trained
    return t, b - b.mean()


def youden_threshold(y: np.ndarray, p1: np.ndarray) -> float | None:
    """The probability of class 1 maximising sensitivity + specificity - 1 on validation
    data (the midpoint between neighbouring scores); None when it holds one class."""
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thr = roc_curve(y, p1)
    i = int(np.argmax(tpr - fpr))
    if not np.isfinite(thr[i]):
        return 0.5
    below = p1[p1 < thr[i]]
    return float((thr[i] + below.max()) / 2) if len(below) else float(thr[i])


def fit(store: BagStore, split: dict[str, list[str]], t: LabelTable, spec: ModelSpec,
        cfg: TrainConfig, seed: int, device: torch.device, desc: str) -> tuple[SlideModel, dict]:
    """Train on split['train'] until the validation loss stops improving for `patience`
    epochs after the warm-up (or `epochs` are done); returns the best epoch's model (the
    best from the warm-up's last epoch on), calibrated on the validation part, and how
    training went. The LR warms up, then decays along a cosine whose end follows the epoch
    training is expected to stop at (twice the best epoch, at least best + 2 × patience, at
    most --epochs), so the decay fits the epochs run."""
    label = dict(zip(t.slide_ids, t.y.tolist(), strict=True))
    train_ids, val_ids = split["train"], split["val"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if spec.feature_norm == FeatureNorm.QUANTILE:
        model = SlideModel(spec, quantiles=feature_quantiles(store, train_ids)).to(device)
    else:
        model = SlideModel(spec, *feature_stats(store, train_ids)).to(device)
    objective = Objective(spec, np.array([label[s] for s in train_ids]))
    if t.task == Task.REGRESSION:  # the head predicts standardised values; the model reports
        model.target_mean.fill_(objective.mean)  # them in the target's units
        model.target_std.fill_(objective.std)
    y_val = objective.targets([label[s] for s in val_ids], "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train_ids) / cfg.batch_size)
    warmup = cfg.warmup_epochs if cfg.warmup_epochs else min(5.0, max(1.0, cfg.epochs / 20))
    best = {"val_loss": math.inf, "epoch": -1, "state": None}
    # the model is judged once the LR has warmed up: an untrained network's validation loss
    # can be lower by chance than the rising loss of its first epochs of learning
    first = min(cfg.epochs, math.ceil(warmup)) - 1
    history = []
    bar = progress_bar(cfg.epochs, desc, unit="epoch", leave=False)
    t_start = time.perf_counter()
    stop = f"reached --epochs {cfg.epochs}"
    for epoch in range(cfg.epochs):
        model.train()
        b = max(best["epoch"], 0)  # the decay ends where training is expected to stop
        horizon = min(cfg.epochs, max(2 * (b + 1), b + 2 * cfg.patience))
        order = rng.permutation(len(train_ids))
        total = 0.0
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warmup_cosine(epoch + s / steps, warmup, horizon)
            ids = [train_ids[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            x, mask = pad_bags([store.sample(i, cfg.bag_size, rng) for i in ids], device)
            y = objective.targets([label[i] for i in ids], device)
            single = t.task == Task.CLASSIFICATION and t.groups is None
            out = model(x, mask, y if single else None)
            loss = objective(out.logits, y)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ids)
        val_loss = float(objective(_raw_logits(model, store, val_ids, device), y_val))
        history.append({"epoch": epoch, **{k: v if math.isfinite(v) else None for k, v in (
            ("train_loss", total / len(train_ids)), ("val_loss", val_loss))}})
        if bar is None:  # batch logs: a line per epoch (a terminal shows the bar instead)
            per_epoch = (time.perf_counter() - t_start) / (epoch + 1)
            log.info("%s epoch %d/%d: train loss %.4f, val loss %.4f, best epoch %s; at most "
                     "%s left", desc, epoch + 1, cfg.epochs, total / len(train_ids), val_loss,
                     best["epoch"] + 1 if best["epoch"] >= 0 else "- (warming up)",
                     clock(per_epoch * (cfg.epochs - epoch - 1)))
        if not (math.isfinite(total) and math.isfinite(val_loss)):
            # NaN weights never recover: keep the best epoch if one was judged, else say why
            if best["epoch"] < 0:
                raise TrainingDiverged(
                    f"{desc}: training diverged (a non-finite loss at epoch {epoch + 1}) "
                    f"before any epoch could be kept: lower --lr (now {cfg.lr:g})")
            stop = f"diverged at epoch {epoch + 1} (a non-finite loss); lower --lr"
            log.warning("%s: %s; the best epoch (%d) is kept", desc, stop, best["epoch"] + 1)
            break
        if bar is not None:
            bar.set_postfix(train=f"{total / len(train_ids):.3f}", val=f"{val_loss:.3f}")
            bar.update()
        # better by a margin: on separable data the loss creeps towards 0 for ever
        margin = max(1e-3, 1e-2 * best["val_loss"]) if best["epoch"] >= 0 else 0.0
        if epoch >= first and val_loss < best["val_loss"] - margin:
            best = {"val_loss": val_loss, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        elif best["epoch"] >= 0 and epoch - best["epoch"] >= cfg.patience:
            stop = f"early stop: no better validation loss for {cfg.patience} epochs"
            break
    if bar is not None:
        bar.close()
    model.load_state_dict(best["state"])
    # early stopping never triggered and the validation loss still fell over the last
    # quarter of the epochs: not converged
    losses = [h["val_loss"] for h in history]
    quarter = losses[(3 * len(losses)) // 4]
    still = stop.startswith("reached") and losses[-1] < quarter - max(1e-4, 2e-3 * quarter)
    if still:
        log.warning("%s: the validation loss was still falling at the last epochs (best "
                    "epoch %d of %d, no early stop): raise --epochs", desc, best["epoch"],
                    cfg.epochs)
    if t.task == Task.CLASSIFICATION and t.groups is None:
        temperature, bias = fit_calibration(_raw_logits(model, store, val_ids, device), y_val)
        model.temperature.fill_(temperature)
        model.class_bias.copy_(bias)
    log.info("%s: %s; best epoch %d, temperature %.2f", desc, stop, best["epoch"],
             float(model.temperature))
    return model.eval(), {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                          "epochs_run": len(history), "stop_reason": stop,
                          "still_improving": still, "temperature": float(model.temperature),
                          "history": history}


def _raw_logits(model: SlideModel, store: BagStore, ids: list[str], device) -> torch.Tensor:
    """The member's uncalibrated logits (n, k) for whole bags, on the CPU."""
    return torch.cat([bag_logits(model, store.get(s), device).logits.float().cpu()
                      for s in ids])


#: the small search of `--tune`: what matters most for MIL heads, judged on validation only.
#: Bag size is the patches drawn per training bag (smaller bags are never subsampled).
TUNE_GRID = {"lr": (1e-4, 5e-4, 2e-3), "weight_decay": (1e-4, 1e-2), "dropout": (0.1, 0.25),
             "bag_size": (128, 512)}


def tune_settings(largest_bag: int | None = None, bag_size: bool = True) -> list[dict]:
    """Every setting of `TUNE_GRID`, as keyword dicts (without bag size when it is not
    searched: the user chose it). Bag sizes of at least `largest_bag` patches all mean whole
    bags: only the first of such otherwise equal settings is kept, so cohorts of small bags
    do not fit the same model twice."""
    grid = {k: v for k, v in TUNE_GRID.items() if bag_size or k != "bag_size"}
    out, seen = [], set()
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values, strict=True))
        whole = largest_bag is not None and setting.get("bag_size", 0) >= largest_bag
        key = tuple(setting.items()) if not whole else (
            *((k, v) for k, v in setting.items() if k != "bag_size"), ("bag_size", "all"))
        if key not in seen:
            seen.add(key)
            out.append(setting)
    return out


def tuned(store: BagStore, split: dict[str, list[str]], t: LabelTable, spec: ModelSpec,
          cfg: TrainConfig, seed: int, device, desc: str) -> tuple[TrainConfig, ModelSpec, dict]:
    """The grid setting with the lowest validation loss on this split's validation part
    (its test part is never seen)."""
    best = (math.inf, cfg, spec, {})
    largest = max(store.n_patches(s) for s in split["train"])
    for setting in tune_settings(largest, cfg.tune_bag_size):
        c = replace(cfg, **setting)
        sp = replace(spec, dropout=setting["dropout"])
        try:
            _, info = fit(store, split, t, sp, c, seed, device, f"{desc} tune")
        except TrainingDiverged as e:  # too high an lr for these data: not a candidate
            log.warning("%s: setting %s skipped: %s", desc, setting, e)
            continue
        if info["best_val_loss"] < best[0]:
            best = (info["best_val_loss"], c, sp, setting)
    if not best[3]:
        raise TrainingDiverged(f"{desc}: every --tune setting diverged: check the features "
                               "for extreme values")
    log.info("%s: tuned on validation: %s", desc, best[3])
    return best[1], best[2], best[3]


def member_splits(split: dict[str, list[str]], t: LabelTable, seeds: int, seed: int
                  ) -> list[dict[str, list[str]]]:
    """Each ensemble member its own validation part (cross-fitting): the split's train and
    validation slides cut into min(seeds, 5) patient-level stratified parts, member j holding
    out part j mod that, so the ensemble learns from every slide and each member still stops
    and calibrates on slides it never trained on. A CSV's own split column is kept as it is."""
    if seeds < 2 or t.splits is not None:
        return [split]
    pos = {s: i for i, s in enumerate(t.slide_ids)}
    rest = np.array(sorted(pos[s] for s in split["train"] + split["val"]))
    fewest = min(_patients_per_class(rest, t).values())
    k = min(seeds, 5, fewest)
    if k < 2:
        return [split]
    ids = np.array(t.slide_ids)
    return [{**split, "train": ids[tr].tolist(), "val": ids[va].tolist()}
            for tr, va in _group_split(rest, t, k, seed + 7)]


def fit_members(store: BagStore, split: dict[str, list[str]], t: LabelTable, spec: ModelSpec,
                cfg: TrainConfig, seed: int, device, desc: str) -> tuple[Ensemble, dict]:
    """`seeds` members on one split (an ensemble), each with its own validation part
    (`member_splits`); the binary decision threshold chosen (Youden) on the validation
    probabilities of the members that held each slide out."""
    chosen = {}
    if cfg.tune:
        cfg, spec, chosen = tuned(store, split, t, spec, cfg, seed, device, desc)
    members, infos = [], []
    parts = member_splits(split, t, cfg.seeds, seed)
    oof: dict[str, list[np.ndarray]] = {}
    for j in range(cfg.seeds):
        part = parts[j % len(parts)]
        m, info = fit(store, part, t, spec, cfg, seed + 1000 * j, device,
                      desc if cfg.seeds == 1 else f"{desc} seed {j}")
        members.append(m)
        infos.append(info | {"val_slides": part["val"]})
        if t.task == Task.CLASSIFICATION and t.groups is None and len(t.classes) == 2:
            for s, p in zip(part["val"], predict_ids(m, store, part["val"], device),
                            strict=True):
                oof.setdefault(s, []).append(p)
    model = Ensemble(members)
    if oof:
        label = dict(zip(t.slide_ids, t.y.tolist(), strict=True))
        held = sorted(oof)
        p1 = np.array([np.mean(oof[s], 0)[1] for s in held])
        model.threshold = youden_threshold(np.array([label[s] for s in held]), p1)
    return model, {"members": infos, "tuned": chosen, "threshold": model.threshold}


# -- metrics and outputs ------------------------------------------------------------------
def summarise(per_fold: list[dict], task: Task = Task.CLASSIFICATION
              ) -> dict[str, dict[str, float]]:
    out = {}
    for k in SUMMARY_KEYS[task]:
        v = np.array([m.get(k, np.nan) for m in per_fold], dtype=np.float64)
        out[k] = {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                  "sd": float(np.nanstd(v)) if np.isfinite(v).any() else float("nan")}
    return out


def _write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_predictions(path: Path, ids: list[str], y: np.ndarray | None, out: np.ndarray,
                      classes: list[str], extra: dict | None = None,
                      task: Task = Task.CLASSIFICATION, unit: str = "slide_id",
                      groups=None) -> None:
    """One row per slide (or patient): its id, [extra], [its label(s)], the output columns
    of the task (prediction and prob_<class>..., risk, or prediction). Atomic."""
    extra = extra or {}
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([unit, *extra, *(label_columns(task, groups=groups) if y is not None
                                    else []), *output_columns(task, classes, groups)])
        for i, sid in enumerate(ids):
            w.writerow([sid, *(v[i] for v in extra.values()),
                        *(label_cells(task, classes, y[i], groups) if y is not None else []),
                        *output_cells(task, classes, out[i], groups=groups)])


def _check_head(cfg: TrainConfig) -> None:
    if cfg.head not in HEADS:
        raise TrainError(f"unknown --head {cfg.head!r}; choose one of {', '.join(HEADS)}")
    if cfg.task == Task.SURVIVAL and cfg.survival_loss == SurvivalLoss.NLL and cfg.bins < 2:
        raise TrainError("--bins must be at least 2 for --survival-loss nll")
    if len(set(cfg.targets)) != len(cfg.targets):
        raise TrainError(f"--targets names a column twice: {','.join(cfg.targets)}")
    if cfg.task == Task.SURVIVAL and len(cfg.targets) > 1:
        raise TrainError("--targets is for classification and regression; survival takes "
                         "--time and --event")
    if cfg.multi_head and (cfg.task != Task.CLASSIFICATION or len(cfg.targets) < 2):
        raise TrainError("--multi-head trains one model for several classification "
                         "--targets (give two or more)")


def run_train(fs: FeatureSet, labels: Path, cfg: TrainConfig) -> dict:
    """Cross-validate, write per-fold models and predictions, metrics, statistics and
    model.pt; with several --targets one such folder per target, on shared splits."""
    _check_head(cfg)
    tables = {target: read_labels(labels, fs, cfg.target_spec(target), cfg.patient_bags)
              for target in cfg.targets}
    union = _union(list(tables.values()))
    if not cfg.seeds:
        cfg = replace(cfg, seeds=5 if len(union.slide_ids) < SMALL_COHORT else 1)
    splits = make_splits(union, cfg.folds, cfg.seed)
    final = None
    if union.splits is None:
        tr, va = _train_val(np.arange(len(union.slide_ids)), union, cfg.seed + len(splits))
        ids = np.array(union.slide_ids)
        final = {"train": ids[tr].tolist(), "val": ids[va].tolist()}
    device = pick_device(cfg.device)
    with model_folder(cfg.out) as work:
        if len(tables) == 1 or cfg.multi_head:
            t = _multi(tables, union) if cfg.multi_head else union
            return _train_into(work, fs, labels, cfg, t, splits, final, device)
        _write_json(work / "splits.json", {f"fold_{k}": s for k, s in enumerate(splits)})
        results = {}
        for target, t in tables.items():
            log.info("target %s: %d labelled", target, len(t.slide_ids))
            results[target] = _train_into(work / "targets" / target, fs, labels,
                                          replace(cfg, targets=(target,)), t,
                                          [_restrict(s, t) for s in splits],
                                          None if final is None else _restrict(final, t),
                                          device)
        summary = {k: r["summary"] for k, r in results.items()}
        _write_json(work / "metrics.json", {"targets": summary})
        return {"targets": results, "summary": summary}


def _union(tables: list[LabelTable]) -> LabelTable:
    """Every unit labelled for any target, stratified by the first target (units without it
    form their own stratum): the shared splits of a multi-target run."""
    if len(tables) == 1:
        return tables[0]
    first = tables[0]
    info: dict[str, tuple[str, str | None, int]] = {}
    for t in reversed(tables):  # the first table's strata win
        extra = int(first.strata.max()) + 1
        for i, sid in enumerate(t.slide_ids):
            stratum = int(t.strata[i]) if t is first else extra
            info[sid] = (t.patients[i], None if t.splits is None else t.splits[i], stratum)
    ids = sorted(info)
    splits = None if first.splits is None else [info[s][1] or "train" for s in ids]
    strata = np.array([info[s][2] for s in ids])
    return LabelTable(ids, strata, [info[s][0] for s in ids], splits, first.classes, strata,
                      first.task)


def _multi(tables: dict[str, LabelTable], union: LabelTable) -> LabelTable:
    """One table for a multi-head model: y (units, targets), -1 where a target is missing."""
    row = {s: i for i, s in enumerate(union.slide_ids)}
    y = np.full((len(union.slide_ids), len(tables)), -1, dtype=np.int64)
    members = {}
    for k, t in enumerate(tables.values()):
        for sid, v in zip(t.slide_ids, t.y, strict=True):
            y[row[sid], k] = v
        members |= t.members or {}
    groups = [(name, t.classes) for name, t in tables.items()]
    return replace(union, y=y, classes=[f"{n}:{c}" for n, cl in groups for c in cl],
                   groups=groups, members=members or None)


def _restrict(split: dict[str, list[str]], t: LabelTable) -> dict[str, list[str]]:
    """A shared split's units that have this target."""
    have = set(t.slide_ids)
    return {part: [s for s in ids if s in have] for part, ids in split.items()}


@contextlib.contextmanager
def model_folder(final: Path) -> Iterator[Path]:
    """A hidden temporary folder beside `final`, renamed to `final` once everything is in it:
    `classify` never finds a model folder with a model.pt but no metrics (a run that died in
    between), and a rerun redoes a half-written folder. A folder already at `final` (only
    there with --overwrite, or without a model.pt) is replaced."""
    final = final.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final.parent)  # folders of killed runs
    work = tmp_path(final)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = tmp_path(final).with_name(tmp_path(final).name + ".old")
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _train_into(out: Path, fs: FeatureSet, labels: Path, cfg: TrainConfig, t: LabelTable,
                splits: list[dict[str, list[str]]], final: dict[str, list[str]] | None,
                device) -> dict:
    from .stats import write_statistics

    spec = ModelSpec(cfg.head, fs.dim, t.classes, fs.encoder, fs.weights, cfg.dropout,
                     str(cfg.task), cfg.loss, n_outputs(cfg.task, len(t.classes), cfg.loss,
                                                        cfg.bins), t.groups,
                     str(cfg.feature_norm))
    metas = {s: fs.metas[s] for s in (t.slide_ids if t.members is None else
                                      [m for ms in t.members.values() for m in ms])}
    store = BagStore(metas, int(cfg.cache_gb * 2**30), t.members)
    label = dict(zip(t.slide_ids, t.y, strict=True))
    unit = "patient_id" if t.members is not None else "slide_id"
    out.mkdir(parents=True, exist_ok=True)
    features = str(next(iter(metas.values())).path.parent.absolute())
    _write_json(out / "config.json", {**asdict(cfg), "labels": str(labels), "features": features,
                                      "model": asdict(spec), "n_slides": len(metas),
                                      "n_units": len(t.slide_ids), "unit": unit})
    _write_json(out / "splits.json", {f"fold_{k}": s for k, s in enumerate(splits)})
    if t.members is not None:
        _write_json(out / "patients.json", t.members)
    log.info("%d %ss, %s %s, %d fold(s), head %s on %s", len(t.slide_ids), unit[:-3],
             "classes" if cfg.task == Task.CLASSIFICATION else "task",
             t.classes if cfg.task == Task.CLASSIFICATION else cfg.task, len(splits),
             cfg.head, device)
    per_fold, fits, oof = [], [], []
    headline = HEADLINE[cfg.task]
    for k, split in enumerate(splits):
        model, info = fit_members(store, split, t, spec, cfg, cfg.seed + k, device,
                                  f"fold {k}")
        fold_dir = out / "folds" / f"fold_{k}"
        save_model(fold_dir / "model.pt", model, {"fold": k})
        eval_ids = split["test"] or split["val"]
        pred = predict_ids(model, store, eval_ids, device)
        y = np.array([label[s] for s in eval_ids])
        write_predictions(fold_dir / "predictions.csv", eval_ids, y, pred, t.classes,
                          task=cfg.task, unit=unit, groups=t.groups)
        oof += [(k, s, y[i], pred[i]) for i, s in enumerate(eval_ids)]
        first = info["members"][0]
        m = task_metrics(cfg.task, y, pred, len(t.classes), model.threshold, t.groups) | {
            "fold": k, "evaluated_on": "test" if split["test"] else "val",
            "best_epoch": first["best_epoch"], "stop_reason": first["stop_reason"],
            "still_improving": any(i["still_improving"] for i in info["members"]),
            "temperature": [i["temperature"] for i in info["members"]],
            "member_val_slides": [i["val_slides"] for i in info["members"]],
            "tuned": info["tuned"]}
        per_fold.append(m)
        fits.append(first)
        log.info("fold %d: %s %.3f (best epoch %d, %s)", k, headline, m[headline],
                 first["best_epoch"], first["stop_reason"])
    oof_ids, oof_y = [o[1] for o in oof], np.array([o[2] for o in oof])
    oof_pred = np.stack([o[3] for o in oof])
    write_predictions(out / "oof_predictions.csv", oof_ids, oof_y, oof_pred, t.classes,
                      {"fold": [o[0] for o in oof]}, cfg.task, unit, t.groups)
    result = {"folds": per_fold, "summary": summarise(per_fold, cfg.task),
              "classes": t.classes, "task": str(cfg.task),
              "history": [f["history"] for f in fits]}
    patient = dict(zip(t.slide_ids, t.patients, strict=True))
    patients = np.array([patient[s] for s in oof_ids])
    if t.groups:  # a multi-head model: per target, on its labelled slides
        result["per_target"] = {name: summarise([f["per_target"][name] for f in per_fold])
                                for name, _ in t.groups}
        result["statistics"] = {
            name: write_statistics(out / "statistics" / name, cfg.task, oof_y[have, k],
                                   oof_pred[have][:, s], cl, patients[have].tolist(),
                                   cfg.seed, cfg.bootstrap)
            for k, (name, s, cl) in enumerate(segments(t.groups))
            if (have := oof_y[:, k] >= 0).any()}
    else:
        result["statistics"] = write_statistics(
            out / "statistics", cfg.task, oof_y, oof_pred, t.classes, patients.tolist(),
            cfg.seed, cfg.bootstrap)
    if final is not None:  # with a fixed split the one fold's model is the model
        model, _ = fit_members(store, final, t, spec, cfg, cfg.seed + len(splits), device,
                               "final")
    save_model(out / "model.pt", model)
    _write_json(out / "metrics.json", result)
    return result
