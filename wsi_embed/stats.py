"""Statistics of predictions against labels, with confidence intervals and plots: AUROC and
AUPRC per class, balanced accuracy, F1, kappa and the confusion matrix (scikit-learn);
Harrell's C-index, Kaplan–Meier curves by predicted risk group and the log-rank test
(lifelines), time-dependent AUC; Pearson/Spearman correlation, R² and MAE (SciPy,
scikit-learn). CIs are percentile bootstraps that resample patients (all of a patient's
rows together), seeded. Plots are PNG and SVG (matplotlib). `train` writes these for its
out-of-fold predictions; `wsi-embed statistics` for any predictions file."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .bootstrap import (
    BOOTSTRAP,
    bootstrap_ci,
    bootstrap_values,
    percentile_ci,
    weighted_auroc,
    weighted_average_precision,
    weighted_balanced_accuracy,
    weighted_ci,
)
from .choices import Task
from .h5io import atomic_file
from .tasks import c_index, regression_metrics, survival_metrics

log = logging.getLogger(__name__)


def _with_ci(stat, patients, seed, n_boot) -> dict[str, float]:
    every = np.arange(len(patients))
    try:
        point = float(stat(every))
    except ValueError:
        point = float("nan")
    lo, hi = bootstrap_ci(stat, patients, seed, n_boot)
    return {"value": point, "ci_low": lo, "ci_high": hi}


def _value_ci(point: float, weighted: Callable[[np.ndarray], np.ndarray], patients, seed,
              n_boot) -> dict[str, float]:
    lo, hi = weighted_ci(weighted, patients, seed, n_boot)
    return {"value": float(point), "ci_low": lo, "ci_high": hi}


def classification_statistics(y: np.ndarray, probs: np.ndarray, classes: list[str],
                              patients: list[str], seed: int = 0, n_boot: int = BOOTSTRAP
                              ) -> dict:
    pred = probs.argmax(1)
    per_class = {}
    for k, c in enumerate(classes):
        pos = (y == k).astype(int)
        auroc = roc_auc_score(pos, probs[:, k]) if 0 < pos.sum() < len(pos) else np.nan
        auprc = average_precision_score(pos, probs[:, k]) if pos.any() else np.nan
        per_class[c] = {
            "auroc": _value_ci(auroc, lambda w, k=k, pos=pos:
                               weighted_auroc(pos, probs[:, k], w), patients, seed, n_boot),
            "auprc": _value_ci(auprc, lambda w, k=k, pos=pos:
                               weighted_average_precision(pos, probs[:, k], w),
                               patients, seed, n_boot),
            "n_positive": int(pos.sum())}
    return {"task": "classification", "n": int(len(y)), "per_class": per_class,
            "balanced_accuracy": _value_ci(balanced_accuracy_score(y, pred),
                                           lambda w: weighted_balanced_accuracy(y, pred, w),
                                           patients, seed, n_boot),
            "f1_macro": float(f1_score(y, pred, average="macro")),
            "kappa": float(cohen_kappa_score(y, pred)),
            "confusion_matrix": {"classes": classes, "rows_true_columns_predicted":
                                 confusion_matrix(y, pred,
                                                  labels=range(len(classes))).tolist()}}


def km_groups(risk: np.ndarray) -> np.ndarray:
    """High-risk (1) above the median predicted risk, low-risk (0) at or below."""
    return (risk > np.median(risk)).astype(int)


def survival_statistics(y: np.ndarray, risk: np.ndarray, patients: list[str], seed: int = 0,
                        n_boot: int = BOOTSTRAP) -> dict:
    from lifelines.statistics import logrank_test

    time, event = y[:, 0], y[:, 1].astype(bool)
    out = {"task": "survival", **survival_metrics(y, risk),
           "c_index": _with_ci(lambda i: c_index(time[i], event[i], risk[i]), patients, seed,
                               n_boot)}
    group = km_groups(risk)
    if group.all() or not group.any():
        out["logrank"] = {"error": "one risk group only"}
    else:
        test = logrank_test(time[group == 1], time[group == 0], event[group == 1],
                            event[group == 0])
        out["logrank"] = {"groups": "predicted risk above vs at or below the median",
                          "chi2": float(test.test_statistic), "p_value": float(test.p_value)}
    return out


def regression_statistics(y: np.ndarray, pred: np.ndarray, patients: list[str], seed: int = 0,
                          n_boot: int = BOOTSTRAP) -> dict:
    out = {"task": "regression", **regression_metrics(y, pred)}
    draws = bootstrap_values(lambda i: regression_metrics(y[i], pred[i]), patients, seed,
                             n_boot)
    for key in ("pearson_r", "spearman_rho", "r2", "mae"):
        lo, hi = percentile_ci(np.array([d[key] for d in draws], float), n_boot)
        out[key] = {"value": out[key], "ci_low": lo, "ci_high": hi}
    return out


# -- plots --------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    return plt, fig, ax


def _save(plt, fig, folder: Path, name: str) -> list[str]:
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        path = folder / f"{name}.{ext}"
        with atomic_file(path, f".{ext}") as tmp:
            fig.savefig(tmp, format=ext)
        written.append(path.name)
    plt.close(fig)
    return written


def _classification_plots(folder, y, probs, classes, stats) -> list[str]:
    from sklearn.calibration import calibration_curve

    shown = [1] if len(classes) == 2 else range(len(classes))  # binary: the positive class
    def roc(pos, p):
        fpr, tpr, _ = roc_curve(pos, p)
        return fpr, tpr, ([0, 1], [0, 1])

    def pr(pos, p):
        prec, rec, _ = precision_recall_curve(pos, p)
        return rec, prec, ([0, 1], [pos.mean()] * 2)  # chance: the prevalence

    files = []
    for name, metric, curve, (xlabel, ylabel, title, where) in (
            ("roc", "auroc", roc, ("1 - specificity", "sensitivity", "ROC", "lower right")),
            ("pr", "auprc", pr, ("recall", "precision", "Precision-recall", "lower left"))):
        plt, fig, ax = _figure()
        for k in shown:
            x, yy, chance = curve(y == k, probs[:, k])
            a = stats["per_class"][classes[k]][metric]
            ax.plot(x, yy, label=f"{classes[k]}: {metric.upper()} {a['value']:.3f} "
                                 f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
            ax.plot(*chance, ":", color="grey")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc=where, fontsize=8)
        files += _save(plt, fig, folder, name)
    plt, fig, ax = _figure()
    for k in shown:
        frac, mean_p = calibration_curve(y == k, probs[:, k], n_bins=10, strategy="quantile")
        ax.plot(mean_p, frac, "o-", label=classes[k])
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="predicted probability", ylabel="observed fraction",
           title="Calibration (reliability)")
    ax.legend(loc="upper left", fontsize=8)
    files += _save(plt, fig, folder, "calibration")
    return files


def _survival_plots(folder, y, risk, stats) -> list[str]:
    from lifelines import KaplanMeierFitter

    time, event = y[:, 0], y[:, 1].astype(bool)
    group = km_groups(risk)
    plt, fig, ax = _figure()
    for g, name in ((0, "low predicted risk"), (1, "high predicted risk")):
        sel = group == g
        if sel.any():
            KaplanMeierFitter().fit(time[sel], event[sel], label=f"{name} (n={sel.sum()})"
                                    ).plot_survival_function(ax=ax, ci_show=True)
    p = stats.get("logrank", {}).get("p_value")
    c = stats["c_index"]
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
           title=f"Kaplan–Meier; C-index {c['value']:.3f}"
                 + (f", log-rank p = {p:.2g}" if p is not None else ""))
    ax.legend(loc="lower left", fontsize=8)
    return _save(plt, fig, folder, "kaplan_meier")


def _regression_plots(folder, y, pred, stats) -> list[str]:
    plt, fig, ax = _figure()
    ax.scatter(y, pred, s=10, alpha=0.7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], ":", color="grey")
    r = stats["pearson_r"]
    ax.set(xlabel="target", ylabel="prediction",
           title=f"r = {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    return _save(plt, fig, folder, "scatter")


def write_statistics(folder: Path, task: Task, y: np.ndarray, out: np.ndarray,
                     classes: list[str], patients: list[str], seed: int = 0,
                     n_boot: int | None = None) -> dict:
    """statistics.json and the task's plots in `folder`; returns the statistics."""
    n_boot = BOOTSTRAP if n_boot is None else n_boot
    folder.mkdir(parents=True, exist_ok=True)
    if task == Task.CLASSIFICATION:
        stats = classification_statistics(y, out, classes, patients, seed, n_boot)
        plots = _classification_plots
    elif task == Task.SURVIVAL:
        stats = survival_statistics(y, out[:, 0], patients, seed, n_boot)
        plots = _survival_plots
        out = out[:, 0]
    else:
        stats = regression_statistics(y, out[:, 0], patients, seed, n_boot)
        plots = _regression_plots
        out = out[:, 0]
    stats |= {"bootstrap": {"resamples": n_boot, "unit": "patient", "seed": seed,
                            "level": 0.95}}
    try:
        stats["plots"] = (plots(folder, y, out, classes, stats) if task == Task.CLASSIFICATION
                          else plots(folder, y, out, stats))
    except ValueError as e:  # e.g. one class only: no curve to draw
        log.warning("%s: no plots (%s)", folder, e)
    with atomic_file(folder / "statistics.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# -- `wsi-embed statistics` ---------------------------------------------------------------
def read_predictions(path: Path, target: str = "label"
                     ) -> tuple[str, list[str], Task, list[str], np.ndarray]:
    """A predictions CSV of train/classify/deploy: its unit column, ids, task (from its
    columns: prob_<class>..., risk, or a numeric prediction), class names and outputs. A
    multi-head model's file has prob_<target>:<class> columns: `target` picks one."""
    from .errors import UsageError
    from .labels import read_csv_rows

    cols, rows = read_csv_rows(path)
    unit = next((c for c in ("slide_id", "patient_id") if c in cols), None)
    if unit is None:
        raise UsageError(f"{path}: no slide_id or patient_id column; give a predictions.csv "
                         "of train, classify or deploy")
    rows = [r for r in rows if r.get("status", "ok") in ("ok", "")]
    probs = [c for c in cols if c.startswith("prob_")]
    if any(":" in c for c in probs):  # a multi-head model's
        heads = sorted({c[5:].split(":")[0] for c in probs})
        if target not in heads:
            raise UsageError(f"{path} holds several targets ({', '.join(heads)}); name one "
                             "with --target")
        keys = [c for c in probs if c.startswith(f"prob_{target}:")]
        task, classes = Task.CLASSIFICATION, [c.split(":", 1)[1] for c in keys]
    elif probs:
        task, classes, keys = Task.CLASSIFICATION, [c[5:] for c in probs], probs
    elif "risk" in cols:
        task, classes, keys = Task.SURVIVAL, ["risk"], ["risk"]
    elif "prediction" in cols:
        task, classes, keys = Task.REGRESSION, ["prediction"], ["prediction"]
    else:
        raise UsageError(f"{path}: no prob_<class>, risk or prediction columns")
    try:
        out = np.array([[float(r[k]) for k in keys] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise UsageError(f"{path}: a prediction is not a number ({e})") from None
    return unit, [r[unit] for r in rows], task, classes, out.reshape(len(rows), len(keys))


def run_statistics(predictions: list[Path], labels: Path, out: Path, target: str = "label",
                   time: str | None = None, event: str | None = None, seed: int = 0,
                   n_boot: int | None = None) -> dict[str, dict]:
    """Statistics of each predictions file against the labels, in `out` (one file) or
    `out/<name>/` (several)."""
    from .errors import UsageError
    from .labels import TargetSpec, read_labels

    results = {}
    names = _names(predictions)
    for path, name in zip(predictions, names, strict=True):
        unit, ids, task, classes, outputs = read_predictions(path, target)
        table = read_labels(labels, None, TargetSpec(task, target, time, event),
                            patient_bags=unit == "patient_id")
        row = {s: i for i, s in enumerate(table.slide_ids)}
        have = [i for i, s in enumerate(ids) if s in row]
        if len(have) < len(ids):
            log.warning("%s: %d of %d predicted %ss have no label in %s and are left out",
                        path, len(ids) - len(have), len(ids), unit[:-3], labels)
        if len(have) < 2:
            raise UsageError(f"{path}: fewer than 2 predictions have labels in {labels}; "
                             f"are the ids ({unit}) the same?")
        y = table.y[[row[ids[i]] for i in have]]
        if task == Task.CLASSIFICATION:
            index = {c: k for k, c in enumerate(classes)}
            unknown = sorted({table.classes[k] for k in y} - set(index))
            if unknown:
                raise UsageError(f"{labels}: labels {', '.join(map(repr, unknown))} are not "
                                 f"classes of {path} ({', '.join(classes)})")
            y = np.array([index[table.classes[k]] for k in y])
        patients = [table.patients[row[ids[i]]] for i in have]
        folder = out if len(predictions) == 1 else out / name
        results[name] = write_statistics(folder, task, y, outputs[have], classes, patients,
                                         seed, n_boot)
    return results


def _names(paths: list[Path]) -> list[str]:
    """Short distinct names: the file stem, or parent_stem when stems repeat."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
