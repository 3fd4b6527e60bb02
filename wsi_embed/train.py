"""`wsi-embed train`: slide-level heads on features files, with patient-level stratified
cross-validation, early stopping, and a final model trained on every labelled slide.

Reproducible: the same seed, data and device give the same metrics.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import StratifiedGroupKFold

from .bags import BagStore, FeatureSet, feature_stats
from .devices import pick_device
from .errors import TrainError
from .h5io import atomic_file, remove_stale_tmp, tmp_path
from .heads import HEADS
from .layout import slide_id_problem
from .report import progress_bar
from .slide_model import (
    Ensemble,
    ModelSpec,
    SlideModel,
    bag_logits,
    decide,
    predict_bag,
    save_model,
)

log = logging.getLogger(__name__)

#: below this many labelled slides each fold trains a 5-seed ensemble by default
SMALL_COHORT = 300
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test"}


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    head: str = "abmil"
    folds: int = 5
    epochs: int = 200  # the most; early stopping decides
    lr: float = 2e-4
    weight_decay: float = 1e-2
    bag_size: int | None = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    patience: int = 20
    dropout: float = 0.25
    cache_gb: float = 8.0
    seeds: int = 1  # members of each fold's ensemble (the CLI picks 5 for small cohorts)
    tune: bool = False
    warmup_epochs: float = 0.0  # 0: min(5, max(1, epochs / 20))


@dataclass
class LabelTable:
    slide_ids: list[str]
    y: np.ndarray  # class index per slide
    patients: list[str]
    splits: list[str] | None  # train/val/test per slide when the CSV has a split column
    classes: list[str]


# -- labels and splits --------------------------------------------------------------------
def _class_order(labels: list[str]) -> list[str]:
    """Numeric labels sort as numbers (0, 1, 2, 10), others alphabetically."""
    uniq = sorted(set(labels))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


#: cells that mean "no value" in the CSVs people export (pandas' default NA strings)
MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
           "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def normalise_label(label: str) -> str:
    """Numbers are compared as numbers: "0", "0.0" and "+0" are one class, "0"."""
    try:
        x = float(label)
    except ValueError:
        return label
    if not math.isfinite(x):
        return label
    return str(int(x)) if x.is_integer() else repr(x)


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                         "UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`") from None
    except csv.Error as e:
        raise TrainError(f"{path}: not a readable CSV ({e})") from None
    return cols, rows


def read_labels(path: Path, fs: FeatureSet) -> LabelTable:
    """The labelled slides that have features (with non-empty bags). Slides without features
    are listed in a warning and skipped; features without labels are counted and ignored;
    missing labels (empty, NA, NaN, ...) are dropped with a warning naming their lines."""
    if not path.is_file():
        raise TrainError(f"--labels {path}: no such file")
    cols, rows = _read_csv_rows(path)
    missing = [c for c in ("slide_id", "label") if c not in cols]
    if missing:
        raise TrainError(f"{path}: no {' or '.join(repr(c) for c in missing)} column "
                         f"(columns: {', '.join(cols) or 'none'}); expected "
                         "slide_id,label[,patient_id][,split]")
    has_split = "split" in cols
    seen: dict[str, str] = {}
    no_features, empty, kept, unlabelled_rows = [], [], [], []
    for i, r in enumerate(rows, start=2):
        sid = r["slide_id"]
        if not sid:
            raise TrainError(f"{path} line {i}: empty slide_id")
        why = slide_id_problem(sid)
        if why:
            raise TrainError(f"{path} line {i}: slide id {sid!r} is not usable: {why}")
        if r["label"] in MISSING:
            unlabelled_rows.append(i)
            continue
        label = r["label"] = normalise_label(r["label"])
        if sid in seen:
            if seen[sid] != label:
                raise TrainError(f"{path}: slide {sid!r} has two labels "
                                 f"({seen[sid]!r}, {label!r})")
            continue
        seen[sid] = label
        if sid not in fs.metas:
            no_features.append(sid)
        elif fs.metas[sid].n == 0:
            empty.append(sid)
        else:
            kept.append(r)
    if unlabelled_rows:
        log.warning("%s: %d rows have no label (empty or NA) and are left out: lines %s%s",
                    path, len(unlabelled_rows), ", ".join(map(str, unlabelled_rows[:10])),
                    " ..." if len(unlabelled_rows) > 10 else "")
    if no_features:
        log.warning("%d labelled slides have no features file and are skipped: %s%s",
                    len(no_features), ", ".join(no_features[:10]),
                    " ..." if len(no_features) > 10 else "")
    if empty:
        log.warning("%d labelled slides have no patches (no tissue) and are skipped: %s",
                    len(empty), ", ".join(empty[:10]))
    unlabelled = len(set(fs.metas) - set(seen))
    if unlabelled:
        log.info("%d features files have no label and are ignored", unlabelled)
    if not kept:
        raise TrainError(f"none of the slide ids in {path} has a features file; ids are the "
                         "features files' names without .h5")
    labels = [r["label"] for r in kept]
    classes = _class_order(labels)
    if len(classes) < 2:
        raise TrainError(f"{path}: only one class ({classes[0]!r}) among the slides with "
                         "features; a classifier needs at least two")
    splits = None
    if has_split:
        bad = sorted({r["split"] for r in kept if r["split"].lower() not in SPLIT_NAMES})
        if bad:
            raise TrainError(f"{path}: split values must be train, val or test; found "
                             f"{', '.join(map(repr, bad))}")
        splits = [SPLIT_NAMES[r["split"].lower()] for r in kept]
    index = {c: i for i, c in enumerate(classes)}
    return LabelTable([r["slide_id"] for r in kept], np.array([index[c] for c in labels]),
                      [r.get("patient_id") or r["slide_id"] for r in kept], splits, classes)


def _group_split(idx: np.ndarray, t: LabelTable, n_splits: int, seed: int):
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    groups = [t.patients[i] for i in idx]
    return [(idx[a], idx[b]) for a, b in sgkf.split(idx, t.y[idx], groups)]


def _patients_per_class(idx: np.ndarray, t: LabelTable) -> dict[str, int]:
    return {c: len({t.patients[i] for i in idx if t.y[i] == k})
            for k, c in enumerate(t.classes)}


def _train_val(idx: np.ndarray, t: LabelTable, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about 1/5 of `idx` (by patient, stratified) for early stopping."""
    fewest = min(_patients_per_class(idx, t).values())
    if fewest < 2:
        raise TrainError("a class has fewer than 2 patients in a training split, too few to "
                         "hold out validation slides; use fewer --folds or more slides")
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
                         + ", ".join(f"class {c!r} has {n}" for c, n in per_class.items())
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


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def predict_ids(model, store: BagStore, ids: list[str], device) -> np.ndarray:
    return np.stack([predict_bag(model, store.get(s), device)[0] for s in ids])


def warmup_cosine(epoch: float, warmup: float, horizon: float) -> float:
    """LR factor: linear warm-up, then a cosine decay that reaches 0 at `horizon` epochs."""
    if epoch < warmup:
        return (epoch + 1e-3) / warmup
    span = max(horizon - warmup, 1e-6)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))


def fit_calibration(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Temperature scaling (Guo et al. 2017) with a class bias: the T and b minimising the
    NLL of logits / T + b on held-out data. Training weighs classes equally, so the bias
    brings back the cohort's class priors and 0.5 means an even chance. (1, 0) when the data
    cannot tell (one class, or fewer than 4 slides)."""
    n_classes = logits.shape[1]
    if len(y) < 4 or len(torch.unique(y)) < 2:
        return 1.0, torch.zeros(n_classes)
    log_t = torch.zeros((), requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp() + bias, y) + 1e-3 * bias.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        before = float(F.cross_entropy(logits, y))
        opt.step(closure)
    t, b = log_t.detach().exp().clamp(0.05, 20.0), bias.detach()
    after = float(F.cross_entropy(logits / t + b, y))
    if not (math.isfinite(after) and torch.isfinite(b).all() and after <= before):
        return 1.0, torch.zeros(n_classes)  # a failed fit leaves the model as trained
    return float(t), b - b.mean()


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
    epochs (or `epochs` are done); returns the best epoch's model, calibrated on the
    validation part, and how training went. The LR warms up, then decays along a cosine
    whose end follows the epoch training is expected to stop at (twice the best epoch, at
    least best + 2 × patience, at most --epochs), so the decay fits the epochs run."""
    label = dict(zip(t.slide_ids, t.y.tolist(), strict=True))
    train_ids, val_ids = split["train"], split["val"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, std = feature_stats(store, train_ids)
    model = SlideModel(spec, mean, std).to(device)
    y_train = np.array([label[s] for s in train_ids])
    cw = class_weights(y_train, len(t.classes)).to(device)
    y_val = torch.tensor([label[s] for s in val_ids])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train_ids) / cfg.batch_size)
    warmup = cfg.warmup_epochs if cfg.warmup_epochs else min(5.0, max(1.0, cfg.epochs / 20))
    best = {"val_loss": math.inf, "epoch": -1, "state": None}
    history = []
    bar = progress_bar(cfg.epochs, desc, unit="epoch", leave=False)
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
            y = torch.tensor([label[i] for i in ids], device=device)
            out = model(x, mask, y)
            loss = F.cross_entropy(out.logits, y, weight=cw)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ids)
        probs = torch.from_numpy(predict_ids(model, store, val_ids, device))
        val_loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), y_val, weight=cw.cpu()))
        history.append({"epoch": epoch, "train_loss": total / len(train_ids),
                        "val_loss": val_loss})
        log.debug("%s epoch %d: train loss %.4f, val loss %.4f", desc, epoch,
                  total / len(train_ids), val_loss)
        if bar is not None:
            bar.set_postfix(train=f"{total / len(train_ids):.3f}", val=f"{val_loss:.3f}")
            bar.update()
        # better by a margin: on separable data the loss creeps towards 0 for ever
        margin = max(1e-3, 1e-2 * best["val_loss"]) if best["epoch"] >= 0 else 0.0
        if val_loss < best["val_loss"] - margin:
            best = {"val_loss": val_loss, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        elif epoch - best["epoch"] >= cfg.patience:
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
    logits = torch.cat([bag_logits(model, store.get(s), device).logits.float().cpu()
                        for s in val_ids])
    temperature, bias = fit_calibration(logits, y_val)
    model.temperature.fill_(temperature)
    model.class_bias.copy_(bias)
    log.info("%s: %s; best epoch %d, temperature %.2f", desc, stop, best["epoch"],
             float(model.temperature))
    return model.eval(), {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                          "epochs_run": len(history), "stop_reason": stop,
                          "still_improving": still, "temperature": float(model.temperature),
                          "history": history}


#: the small search of `--tune`: what matters most for MIL heads, judged on validation only
TUNE_GRID = {"lr": (1e-4, 5e-4, 2e-3), "weight_decay": (1e-4, 1e-2), "dropout": (0.1, 0.25)}


def tuned(store: BagStore, split: dict[str, list[str]], t: LabelTable, spec: ModelSpec,
          cfg: TrainConfig, seed: int, device, desc: str) -> tuple[TrainConfig, ModelSpec, dict]:
    """The grid setting with the lowest validation loss on this split's validation part
    (its test part is never seen)."""
    import itertools

    best = (math.inf, cfg, spec, {})
    for lr, wd, drop in itertools.product(*TUNE_GRID.values()):
        c = replace(cfg, lr=lr, weight_decay=wd, dropout=drop)
        sp = replace(spec, dropout=drop)
        _, info = fit(store, split, t, sp, c, seed, device, f"{desc} tune")
        if info["best_val_loss"] < best[0]:
            best = (info["best_val_loss"], c, sp, {"lr": lr, "weight_decay": wd,
                                                   "dropout": drop})
    log.info("%s: tuned on validation: %s", desc, best[3])
    return best[1], best[2], best[3]


def fit_members(store: BagStore, split: dict[str, list[str]], t: LabelTable, spec: ModelSpec,
                cfg: TrainConfig, seed: int, device, desc: str) -> tuple[Ensemble, dict]:
    """`seeds` members on one split (an ensemble), the binary decision threshold chosen on
    the ensemble's validation probabilities (Youden)."""
    chosen = {}
    if cfg.tune:
        cfg, spec, chosen = tuned(store, split, t, spec, cfg, seed, device, desc)
    members, infos = [], []
    for j in range(cfg.seeds):
        m, info = fit(store, split, t, spec, cfg, seed + 1000 * j, device,
                      desc if cfg.seeds == 1 else f"{desc} seed {j}")
        members.append(m)
        infos.append(info)
    model = Ensemble(members)
    if len(t.classes) == 2:
        label = dict(zip(t.slide_ids, t.y.tolist(), strict=True))
        p = predict_ids(model, store, split["val"], device)
        model.threshold = youden_threshold(np.array([label[s] for s in split["val"]]),
                                           p[:, 1])
    return model, {"members": infos, "tuned": chosen, "threshold": model.threshold}


# -- metrics and outputs ------------------------------------------------------------------
def metrics(y: np.ndarray, probs: np.ndarray, n_classes: int,
            threshold: float | None = None) -> dict[str, float]:
    """AUC (macro one-vs-rest for ≥3 classes; NaN when y has one class), and at the argmax
    balanced accuracy, macro F1 and Cohen's kappa; with a binary `threshold` (chosen on
    validation data) the same three at that threshold."""
    out = _metrics(y, probs, n_classes)
    if threshold is not None and n_classes == 2:
        at = _metrics(y, probs, n_classes, threshold)
        out |= {f"{k}_at_val_threshold": at[k] for k in ("balanced_accuracy", "f1", "kappa")}
        out["val_threshold"] = float(threshold)
    return out


def _metrics(y: np.ndarray, probs: np.ndarray, n_classes: int,
             threshold: float | None = None) -> dict[str, float]:
    pred = np.array([decide(p, threshold) for p in probs])
    try:
        auc = (roc_auc_score(y, probs[:, 1]) if n_classes == 2 else
               roc_auc_score(y, probs, multi_class="ovr", average="macro",
                             labels=list(range(n_classes))))
    except ValueError:
        auc = float("nan")
    return {"auc": float(auc), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred, average="macro")),
            "kappa": float(cohen_kappa_score(y, pred)), "n": int(len(y))}


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in ("auc", "balanced_accuracy", "f1", "kappa"):
        v = np.array([m[k] for m in per_fold], dtype=np.float64)
        out[k] = {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                  "sd": float(np.nanstd(v)) if np.isfinite(v).any() else float("nan")}
    return out


def _write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_predictions(path: Path, ids: list[str], y: np.ndarray | None, probs: np.ndarray,
                      classes: list[str], extra: dict | None = None) -> None:
    """One row per slide: slide_id, [label], prediction, prob_<class>... (atomic)."""
    extra = extra or {}
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", *extra, *(["label"] if y is not None else []),
                    "prediction", *(f"prob_{c}" for c in classes)])
        for i, sid in enumerate(ids):
            w.writerow([sid, *(v[i] for v in extra.values()),
                        *([classes[y[i]]] if y is not None else []),
                        classes[int(probs[i].argmax())], *(f"{p:.6f}" for p in probs[i])])


def run_train(fs: FeatureSet, labels: Path, cfg: TrainConfig) -> dict:
    """Cross-validate, write per-fold models and predictions, metrics, and model.pt."""
    if cfg.head not in HEADS:
        raise TrainError(f"unknown --head {cfg.head!r}; choose one of {', '.join(HEADS)}")
    t = read_labels(labels, fs)
    if not cfg.seeds:
        cfg = replace(cfg, seeds=5 if len(t.slide_ids) < SMALL_COHORT else 1)
    splits = make_splits(t, cfg.folds, cfg.seed)
    device = pick_device(cfg.device)
    with model_folder(cfg.out) as work:
        return _train_into(work, fs, labels, cfg, t, splits, device)


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
                splits: list[dict[str, list[str]]], device) -> dict:
    spec = ModelSpec(cfg.head, fs.dim, t.classes, fs.encoder, fs.weights, cfg.dropout)
    store = BagStore({s: fs.metas[s] for s in t.slide_ids}, int(cfg.cache_gb * 2**30))
    label = dict(zip(t.slide_ids, t.y.tolist(), strict=True))
    _write_json(out / "config.json", {**asdict(cfg), "labels": str(labels),
                                          "model": asdict(spec),
                                          "n_slides": len(t.slide_ids)})
    _write_json(out / "splits.json", {f"fold_{k}": s for k, s in enumerate(splits)})
    log.info("%d slides, classes %s, %d fold(s), head %s on %s", len(t.slide_ids),
             t.classes, len(splits), cfg.head, device)
    per_fold, fits, oof = [], [], []
    for k, split in enumerate(splits):
        model, info = fit_members(store, split, t, spec, cfg, cfg.seed + k, device,
                                  f"fold {k}")
        fold_dir = out / "folds" / f"fold_{k}"
        save_model(fold_dir / "model.pt", model, {"fold": k})
        eval_ids = split["test"] or split["val"]
        probs = predict_ids(model, store, eval_ids, device)
        y = np.array([label[s] for s in eval_ids])
        write_predictions(fold_dir / "predictions.csv", eval_ids, y, probs, t.classes)
        oof += [(k, s, y[i], probs[i]) for i, s in enumerate(eval_ids)]
        first = info["members"][0]
        m = metrics(y, probs, len(t.classes), model.threshold) | {
            "fold": k, "evaluated_on": "test" if split["test"] else "val",
            "best_epoch": first["best_epoch"], "stop_reason": first["stop_reason"],
            "still_improving": any(i["still_improving"] for i in info["members"]),
            "temperature": [i["temperature"] for i in info["members"]],
            "tuned": info["tuned"]}
        per_fold.append(m)
        fits.append(first)
        log.info("fold %d: AUC %.3f, balanced accuracy %.3f (best epoch %d, %s)", k, m["auc"],
                 m["balanced_accuracy"], first["best_epoch"], first["stop_reason"])
    write_predictions(out / "oof_predictions.csv", [o[1] for o in oof],
                      np.array([o[2] for o in oof]), np.stack([o[3] for o in oof]), t.classes,
                      {"fold": [o[0] for o in oof]})
    result = {"folds": per_fold, "summary": summarise(per_fold), "classes": t.classes,
              "history": [f["history"] for f in fits]}
    if t.splits is None:  # with a fixed split the one fold's model is the model
        tr, va = _train_val(np.arange(len(t.slide_ids)), t, cfg.seed + len(splits))
        ids = np.array(t.slide_ids)
        model, _ = fit_members(store, {"train": ids[tr].tolist(), "val": ids[va].tolist()}, t,
                               spec, cfg, cfg.seed + len(splits), device, "final")
    save_model(out / "model.pt", model)
    _write_json(out / "metrics.json", result)
    return result
