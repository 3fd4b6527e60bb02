"""What each task learns and how it is judged: the training loss on a batch, the validation
loss early stopping watches, the model output a prediction reports (class probabilities, a
risk, a value), its CSV columns, and the metrics. One implementation per task; `train`,
`classify`, `deploy` and `statistics` all go through these."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

from .choices import RegressionLoss, SurvivalLoss, Task


# -- losses -------------------------------------------------------------------------------
def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties) per event; 0 without events."""
    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(r, 0)
    # tied times share one risk set: everyone with time ≥ t, i.e. up to the tie's last row
    last = torch.searchsorted(-t.contiguous(), -t.contiguous(), right=True) - 1
    n_events = e.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((r - log_risk_set[last]) * e).sum() / n_events


def discrete_nll(logits: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor
                 ) -> torch.Tensor:
    """Discrete-time survival NLL (Zadeh & Schmid 2021, as CLAM/PORPOISE): logits are
    per-interval hazards; an event in interval k scores S(k-1)·h(k), a censoring S(k)."""
    h = torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)
    s = torch.cat([torch.ones_like(h[:, :1]), torch.cumprod(1 - h, 1)], 1)  # S(-1)=1, S(k)
    k = bin_index.long().unsqueeze(1)
    observed = torch.log(s.gather(1, k)) + torch.log(h.gather(1, k))
    censored = torch.log(s.gather(1, k + 1))
    return -(event * observed.squeeze(1) + (1 - event) * censored.squeeze(1)).mean()


def discrete_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk from interval hazards: minus the expected number of intervals survived."""
    return -torch.cumprod(1 - torch.sigmoid(logits), -1).sum(-1, keepdim=True)


def segments(groups) -> list[tuple[str, slice, list[str]]]:
    """A multi-head model's targets: name, its slice of the outputs, its classes."""
    out, start = [], 0
    for name, classes in groups:
        out.append((name, slice(start, start + len(classes)), list(classes)))
        start += len(classes)
    return out


def is_multi(groups) -> bool:
    return bool(groups) and len(groups) > 1


class Objective:
    """The loss of one model's training run; fitted to its training targets (class weights,
    target scale, time intervals), which never come from validation or test slides."""

    def __init__(self, spec, y_train: np.ndarray):
        self.spec = spec
        task = Task(spec.task)
        self.task = task
        self.segments = segments(spec.groups) if is_multi(spec.groups) else None
        if self.segments:  # per target: class weights over the slides that have it
            self.weights = []
            for k, (_, _, classes) in enumerate(self.segments):
                yk = y_train[:, k][y_train[:, k] >= 0].astype(int)
                counts = np.bincount(yk, minlength=len(classes)).astype(np.float64)
                self.weights.append(torch.tensor(
                    max(len(yk), 1) / (len(classes) * np.maximum(counts, 1)),
                    dtype=torch.float32))
        elif task == Task.CLASSIFICATION:
            n = len(spec.classes)
            counts = np.bincount(y_train.astype(int), minlength=n).astype(np.float64)
            self.weights = torch.tensor(len(y_train) / (n * np.maximum(counts, 1)),
                                        dtype=torch.float32)
        elif task == Task.REGRESSION:
            self.mean = float(np.mean(y_train))
            self.std = float(np.std(y_train)) or 1.0
        elif spec.loss == SurvivalLoss.NLL:
            times = y_train[y_train[:, 1] > 0, 0]
            k = spec.n_out
            self.edges = torch.tensor(np.quantile(times, np.arange(1, k) / k),
                                      dtype=torch.float64)

    def targets(self, rows: list, device) -> torch.Tensor:
        if self.task == Task.CLASSIFICATION:
            return torch.tensor(np.asarray(rows, dtype=np.int64), device=device)
        return torch.tensor(np.asarray(rows, dtype=np.float64), dtype=torch.float32,
                            device=device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.segments:  # each target's loss over the slides labelled for it
            losses = [F.cross_entropy(logits[:, s], y[:, k], weight=w.to(logits.device),
                                      ignore_index=-1)
                      for k, ((_, s, _), w) in enumerate(zip(self.segments, self.weights,
                                                             strict=True))
                      if (y[:, k] >= 0).any()]
            return torch.stack(losses).sum() if losses else logits.sum() * 0.0
        if self.task == Task.CLASSIFICATION:
            return F.cross_entropy(logits, y, weight=self.weights.to(logits.device))
        if self.task == Task.REGRESSION:
            z = (y - self.mean) / self.std
            if self.spec.loss == RegressionLoss.HUBER:
                return F.huber_loss(logits[:, 0], z)
            return F.mse_loss(logits[:, 0], z)
        time, event = y[:, 0], y[:, 1]
        if self.spec.loss == SurvivalLoss.NLL:
            k = torch.bucketize(time.double().cpu(), self.edges, right=True).to(logits.device)
            return discrete_nll(logits, k, event)
        return cox_loss(logits[:, 0], time, event)


def n_outputs(task: Task, n_classes: int, loss: str | None, bins: int) -> int:
    if task == Task.CLASSIFICATION:
        return n_classes
    if task == Task.SURVIVAL and loss == SurvivalLoss.NLL:
        return bins
    return 1


def outputs(spec, logits: torch.Tensor, temperature, class_bias, target_mean, target_std
            ) -> torch.Tensor:
    """A member's reported output from its logits (..., k): calibrated class probabilities,
    a risk (higher = earlier event), or a value in the target's units."""
    logits = logits.float()
    task = Task(spec.task)
    if is_multi(getattr(spec, "groups", None)):  # a softmax per target
        z = logits / temperature + class_bias
        return torch.cat([torch.softmax(z[..., s], -1) for _, s, _ in segments(spec.groups)],
                         -1)
    if task == Task.CLASSIFICATION:
        return torch.softmax(logits / temperature + class_bias, -1)
    if task == Task.REGRESSION:
        return logits[..., :1] * target_std + target_mean
    if spec.loss == SurvivalLoss.NLL:
        return discrete_risk(logits)
    return logits[..., :1]


# -- predictions tables -------------------------------------------------------------------
def output_columns(task: Task, classes: list[str], groups=None) -> list[str]:
    if is_multi(groups):
        return [c for name, _, cl in segments(groups)
                for c in (f"prediction_{name}", *(f"prob_{name}:{k}" for k in cl))]
    if task == Task.CLASSIFICATION:
        return ["prediction", *(f"prob_{c}" for c in classes)]
    if task == Task.SURVIVAL:
        return ["risk"]
    return ["prediction"]


def output_cells(task: Task, classes: list[str], out: np.ndarray, decision: int | None = None,
                 groups=None) -> list[str]:
    """The output columns' values for one unit; `decision` the class (argmax or threshold)."""
    if is_multi(groups):
        return [c for _, s, cl in segments(groups)
                for c in (cl[int(np.argmax(out[s]))], *(f"{p:.6f}" for p in out[s]))]
    if task == Task.CLASSIFICATION:
        pred = int(np.argmax(out)) if decision is None else decision
        return [classes[pred], *(f"{p:.6f}" for p in out)]
    return [f"{float(out[0]):.6g}"]


def label_columns(task: Task, groups=None) -> list[str]:
    if is_multi(groups):
        return [f"label_{name}" for name, _ in groups]
    return ["time", "event"] if task == Task.SURVIVAL else ["label"]


def label_cells(task: Task, classes: list[str], y, groups=None) -> list[str]:
    if is_multi(groups):  # -1: no label for that target
        return [cl[int(k)] if k >= 0 else "" for (_, cl), k in zip(groups, y, strict=True)]
    if task == Task.CLASSIFICATION:
        return [classes[int(y)]]
    if task == Task.SURVIVAL:
        return [f"{float(y[0]):.6g}", str(int(y[1]))]
    return [f"{float(y):.6g}"]


# -- metrics ------------------------------------------------------------------------------
def classification_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int,
                           threshold: float | None = None) -> dict[str, float]:
    """AUC (macro one-vs-rest for ≥3 classes; NaN when y has one class), and at the argmax
    balanced accuracy, macro F1 and Cohen's kappa; with a binary `threshold` (chosen on
    validation data) the same three at that threshold."""
    out = _classification(y, probs, n_classes)
    if threshold is not None and n_classes == 2:
        at = _classification(y, probs, n_classes, threshold)
        out |= {f"{k}_at_val_threshold": at[k] for k in ("balanced_accuracy", "f1", "kappa")}
        out["val_threshold"] = float(threshold)
    return out


def decide(probs: np.ndarray, threshold: float | None) -> int:
    """The predicted class: argmax, or for a binary model with a threshold, class 1 when its
    probability reaches it."""
    if threshold is not None and len(probs) == 2:
        return int(probs[1] >= threshold)
    return int(np.argmax(probs))


def _classification(y, probs, n_classes, threshold=None) -> dict[str, float]:
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


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C (lifelines; a higher risk should mean an earlier event); NaN when no pair
    is comparable."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(time, -np.asarray(risk), np.asarray(event, bool)))
    except (ValueError, ZeroDivisionError, AssertionError):
        return float("nan")


def time_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, t: float) -> float:
    """Cumulative/dynamic AUC at time t (Heagerty et al. 2000): cases had their event by t,
    controls were still event-free after t; scikit-learn's AUC of the risk between them
    (no censoring weights: censored before t are left out)."""
    case = (time <= t) & event
    control = time > t
    if not case.any() or not control.any():
        return float("nan")
    keep = case | control
    return float(roc_auc_score(case[keep], risk[keep]))


def survival_metrics(y: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    """Harrell's C-index, and the cumulative/dynamic time-dependent AUC at the quartiles of
    the event times with its mean."""
    time, event = y[:, 0], y[:, 1].astype(bool)
    out = {"c_index": c_index(time, event, risk), "n": int(len(y)), "events": int(event.sum())}
    times = np.unique(np.quantile(time[event], [0.25, 0.5, 0.75])) if event.any() else []
    aucs = {f"{t:.6g}": time_auc(time, event, risk, t) for t in times}
    finite = [a for a in aucs.values() if np.isfinite(a)]
    out |= {"td_auc": float(np.mean(finite)) if finite else float("nan"), "td_auc_at": aucs}
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman ρ, R² and MAE; NaN correlations for constant inputs."""
    const = np.ptp(y) == 0 or np.ptp(pred) == 0
    return {"pearson_r": float("nan") if const else float(scipy_stats.pearsonr(y, pred)[0]),
            "spearman_rho": float("nan") if const else
            float(scipy_stats.spearmanr(y, pred)[0]),
            "r2": float(r2_score(y, pred)) if len(y) > 1 else float("nan"),
            "mae": float(mean_absolute_error(y, pred)), "n": int(len(y))}


def task_metrics(task: Task, y: np.ndarray, out: np.ndarray, n_classes: int,
                 threshold: float | None = None, groups=None) -> dict:
    if is_multi(groups):  # per target on its labelled slides; their mean leads
        per = {}
        for k, (name, s, cl) in enumerate(segments(groups)):
            have = y[:, k] >= 0
            per[name] = classification_metrics(y[have, k], out[have][:, s], len(cl))
        keys = SUMMARY_KEYS[Task.CLASSIFICATION]
        return {k: float(np.nanmean([m[k] for m in per.values()])) for k in keys} | {
            "n": int(len(y)), "per_target": per}
    if task == Task.CLASSIFICATION:
        return classification_metrics(y, out, n_classes, threshold)
    if task == Task.SURVIVAL:
        return survival_metrics(y, out[:, 0])
    return regression_metrics(y, out[:, 0])


#: the metrics summarised over folds (mean ± sd) per task
SUMMARY_KEYS = {Task.CLASSIFICATION: ("auc", "balanced_accuracy", "f1", "kappa"),
                Task.SURVIVAL: ("c_index", "td_auc"),
                Task.REGRESSION: ("pearson_r", "spearman_rho", "r2", "mae")}

#: the metric a log line leads with
HEADLINE = {Task.CLASSIFICATION: "auc", Task.SURVIVAL: "c_index", Task.REGRESSION: "pearson_r"}
