"""How patch features are put on one scale before a head, fitted on the training split's
patches only and stored in the model so that `classify` and heatmaps apply the same map.

`zscore`: per-dimension mean and std. `zscore-clip`: the same, clipped to ±Z_CLIP σ, so the
rare patches that lie tens of σ out in a dimension do not dominate a head. `quantile`: each
dimension mapped through its training quantiles to a standard normal (scikit-learn's
QuantileTransformer, in torch so it runs on the model's device), which brings heavy-tailed
dimensions back into range and ignores any monotone rescaling of a dimension."""

from __future__ import annotations

import math

import numpy as np
import torch

from .bags import BagStore

__all__ = ["N_QUANTILES", "QUANTILE_SAMPLE", "Z_CLIP", "feature_quantiles", "feature_stats",
           "to_normal"]

Z_CLIP = 5.0  # zscore-clip's bound in σ: a Gaussian dimension is clipped with p ≈ 6e-7

N_QUANTILES = 1000  # scikit-learn's default
QUANTILE_SAMPLE = 20_000  # patches the quantiles are computed from; a random subset beyond
BOUND = 1e-7  # probabilities are kept in [BOUND, 1 - BOUND] (±5.2 σ), as scikit-learn does


def feature_stats(store: BagStore, slide_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every patch of `slide_ids` (the training split only)."""
    dim = next(iter(store.metas.values())).dim  # units' slides share it
    s, ss, n = np.zeros(dim), np.zeros(dim), 0
    for sid in slide_ids:
        x = store.get(sid).astype(np.float64)
        s += x.sum(0)
        ss += (x * x).sum(0)
        n += len(x)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    return mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def feature_quantiles(store: BagStore, slide_ids: list[str], n_quantiles: int = N_QUANTILES,
                      sample: int = QUANTILE_SAMPLE) -> np.ndarray:
    """Per dimension (D, Q), the quantiles at levels 0, 1/(Q-1), ..., 1 of the patches of
    `slide_ids` (one increasing row per dimension, as `torch.searchsorted` wants it), from
    all of them or, in larger cohorts, `sample` drawn in proportion to each slide's count (a
    fixed draw: the same split gives the same table). Q is at most the number of patches."""
    sizes = np.array([store.n_patches(s) for s in slide_ids])
    share = min(1.0, sample / max(int(sizes.sum()), 1))
    rng = np.random.default_rng(0)
    parts = []
    for sid, n in zip(slide_ids, sizes, strict=True):
        x = store.get(sid)
        k = min(n, max(1, round(n * share)))
        parts.append(x if k == n else x[rng.choice(n, k, replace=False)])
    x = np.concatenate(parts)
    levels = np.linspace(0.0, 1.0, max(2, min(n_quantiles, len(x))))
    q = np.quantile(x.astype(np.float64), levels, axis=0)
    return np.ascontiguousarray(np.maximum.accumulate(q, axis=0).T, dtype=np.float32)


def to_normal(x: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """x (..., D) mapped per dimension through `quantiles` (D, Q) to a standard normal:
    piecewise-linear between the quantiles to a probability, averaged over the interpolation
    from the last equal quantile and from the first, so a run of equal quantiles maps to its
    middle (scikit-learn does this too, except at the minimum, which it sends to -5.2 σ), then
    the normal's inverse CDF. Values beyond the training range land at ±5.2 σ."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).T.contiguous()  # (D, M), as the table's rows
    q = quantiles.to(flat.dtype)
    p = 0.5 * (_levels(flat, q, last=True) + _levels(flat, q, last=False))
    wide = p.double() if p.device.type != "mps" else p  # 1 - BOUND needs more than float32
    z = math.sqrt(2.0) * torch.erfinv(2.0 * wide.clamp(BOUND, 1.0 - BOUND) - 1.0)
    return z.to(x.dtype).T.reshape(shape)


def _levels(x: torch.Tensor, q: torch.Tensor, last: bool) -> torch.Tensor:
    """Each row of x (D, M) against its row of increasing nodes q (D, Q) at levels
    k/(Q-1), linear between neighbouring nodes, 0 below, 1 above; a value equal to a run of
    nodes takes the run's last level (`last`) or its first."""
    n = q.shape[-1]
    i = torch.searchsorted(q, x, right=last).clamp(1, n - 1)
    lo, hi = q.gather(-1, i - 1), q.gather(-1, i)
    t = ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    t = torch.where(x >= hi, 1.0, t) if last else torch.where(x <= lo, 0.0, t)
    return (i - 1 + t) / (n - 1)
