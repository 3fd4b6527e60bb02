"""Patient-level percentile bootstrap. A resample is held as row multiplicities (how often each
row was drawn), so the classification statistics are computed for a whole block of resamples
at once as weighted sums: calling scikit-learn once per resample cost seconds per statistic,
almost all of it input validation. Each weighted statistic equals scikit-learn's on the rows
repeated by their multiplicities (tests/test_bootstrap.py); statistics without a weighted form
(C-index, correlations) are called per resample on the repeated rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

#: bootstrap resamples behind each confidence interval
BOOTSTRAP = 1000
#: resample × row cells held at once (float64): about 64 MB
_BLOCK_CELLS = 8_000_000


def resample_counts(patients: list[str], seed: int, n_boot: int = BOOTSTRAP
                    ) -> Iterator[np.ndarray]:
    """Blocks of (resamples, rows) multiplicities: each resample draws as many patients as
    there are, with replacement, and takes all of a drawn patient's rows."""
    names: dict[str, int] = {}
    of_row = np.array([names.setdefault(p, len(names)) for p in patients], dtype=np.int64)
    n_pat = len(names)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // max(len(patients), 1))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        pick = rng.integers(0, n_pat, (b, n_pat))
        flat = (np.arange(b)[:, None] * n_pat + pick).ravel()
        per_patient = np.bincount(flat, minlength=b * n_pat).reshape(b, n_pat)
        yield per_patient[:, of_row].astype(np.float64)


def percentile_ci(values: np.ndarray, n_boot: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite values; NaN when fewer than a tenth of the resamples
    (at least 10) gave one (e.g. most resamples held one class only)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def weighted_ci(stat: Callable[[np.ndarray], np.ndarray], patients: list[str], seed: int,
                n_boot: int = BOOTSTRAP, level: float = 0.95) -> tuple[float, float]:
    """CI of a statistic that maps a block of row weights (resamples, rows) to one value per
    resample (NaN where undefined)."""
    values = np.concatenate([stat(w) for w in resample_counts(patients, seed, n_boot)])
    return percentile_ci(values, n_boot, level)


def bootstrap_values(stat: Callable[[np.ndarray], object], patients: list[str], seed: int,
                     n_boot: int = BOOTSTRAP) -> list:
    """`stat(rows)` called once per resample on the drawn row indices (repeats included);
    resamples where it raises ValueError are left out."""
    values = []
    rows = np.arange(len(patients))
    for block in resample_counts(patients, seed, n_boot):
        for w in block.astype(np.int64):
            try:
                values.append(stat(np.repeat(rows, w)))
            except ValueError:
                continue
    return values


def bootstrap_ci(stat: Callable[[np.ndarray], float], patients: list[str], seed: int,
                 n_boot: int = BOOTSTRAP, level: float = 0.95) -> tuple[float, float]:
    """CI of a statistic of row indices, called per resample (see bootstrap_values)."""
    return percentile_ci(np.array(bootstrap_values(stat, patients, seed, n_boot), float),
                         n_boot, level)


def _score_groups(score: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row order by score and the start of each run of equal scores in it."""
    order = np.argsort(-score if descending else score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _class_weights(pos: np.ndarray, score: np.ndarray, w: np.ndarray, descending: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per run of equal scores, per resample."""
    order, starts = _score_groups(score, descending)
    ws, ps = w[:, order], pos[order].astype(np.float64)
    return np.add.reduceat(ws * ps, starts, axis=1), np.add.reduceat(ws * (1 - ps), starts,
                                                                      axis=1)


def weighted_auroc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Area under the ROC curve per resample (Mann–Whitney: ties count one half)."""
    p, n = _class_weights(pos, score, w, descending=False)
    below = np.cumsum(n, axis=1) - n
    num = (p * (below + 0.5 * n)).sum(1)
    den = p.sum(1) * n.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(pos: np.ndarray, score: np.ndarray, w: np.ndarray
                               ) -> np.ndarray:
    """scikit-learn's average precision per resample: the precision at each distinct score,
    from the highest down, weighted by the recall it adds; NaN without positives."""
    p, n = _class_weights(pos, score, w, descending=True)
    tp, fp = np.cumsum(p, axis=1), np.cumsum(n, axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return np.where(total[:, 0] > 0, (p / total * precision).sum(1), np.nan)


def weighted_balanced_accuracy(y: np.ndarray, pred: np.ndarray, w: np.ndarray
                               ) -> np.ndarray:
    """Mean recall over the classes present in the resample (scikit-learn's rule)."""
    recalls = []
    for k in np.unique(y):
        true = (y == k).astype(np.float64)
        total = w @ true
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(total > 0, (w @ (true * (pred == k))) / total, np.nan))
    return np.nanmean(np.stack(recalls, axis=1), axis=1)
