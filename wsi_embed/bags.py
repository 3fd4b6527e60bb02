"""Bags of patch features for slide-level work: find them, check they belong together, and
load them lazily through a cache bounded in bytes (feature sets larger than RAM still train).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FeatureFileError
from .h5io import FeaturesMeta, read_features, read_features_meta
from .layout import slide_id_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """The features files of one folder that share one encoder, weights and dim."""

    metas: dict[str, FeaturesMeta]  # by slide id (file stem)
    dim: int
    encoder: str | None
    weights: str | None
    unreadable: dict[str, str] = field(default_factory=dict)  # slide id → why (lenient scan)


def scan_features(folder: Path, lenient: bool = False, mixed: bool = False) -> FeatureSet:
    """Every `<slide_id>.h5` in `folder`; refuses a mix of dims, encoders or weights (unless
    `mixed`: encode-slides checks each slide on its own). A file that cannot be used is an
    error naming it, or with `lenient` (classify: one slide's bad file is its failed row)
    set aside in `unreadable`."""
    if not folder.is_dir():
        raise FeatureFileError(f"--features {folder} is not a folder")
    paths = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if not paths:
        raise FeatureFileError(f"no .h5 features files in {folder}; run `wsi-embed extract` "
                               "and pass OUT/features/<encoder>")
    metas, unreadable = {}, {}
    for p in paths:
        try:
            why = slide_id_problem(p.stem)
            if why:
                raise FeatureFileError(f"{p}: its name cannot be a slide id ({why}); rename it")
            metas[p.stem] = read_features_meta(p)
        except FeatureFileError as e:
            if not lenient:
                raise
            unreadable[p.stem] = str(e)
    if not metas:
        raise FeatureFileError(f"no usable features file in {folder}: "
                               + "; ".join(list(unreadable.values())[:3]))
    for key, what in () if mixed else (("dim", "dims"), ("encoder", "encoders"),
                                           ("weights", "weights")):
        groups: dict[object, list[str]] = {}
        for sid, m in metas.items():
            groups.setdefault(getattr(m, key), []).append(sid)
        if len(groups) > 1:
            parts = "; ".join(f"{v!r}: {len(ids)} files, e.g. {ids[0]}.h5"
                              for v, ids in groups.items())
            raise FeatureFileError(f"{folder} mixes features of different {what} ({parts}). "
                                   "Put each encoder's features in its own folder.")
    m0 = next(iter(metas.values()))
    return FeatureSet(metas, m0.dim, m0.encoder, m0.weights, unreadable)


class BagStore:
    """Loads whole bags on demand and keeps the most recently used ones up to `cache_bytes`.

    Bags keep their stored dtype in the cache (float16 files cost half); callers get float32.
    Every bag is checked for NaN/Inf the first time it is read.
    """

    def __init__(self, metas: dict[str, FeaturesMeta], cache_bytes: int,
                 units: dict[str, list[str]] | None = None):
        self.metas = metas
        #: patient bags: a unit id stands for its slides' patches, concatenated in order
        self.units = units or {}
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._checked: set[str] = set()

    def n_patches(self, slide_id: str) -> int:
        if slide_id in self.units:
            return sum(self.metas[s].n for s in self.units[slide_id])
        return self.metas[slide_id].n

    def get(self, slide_id: str) -> np.ndarray:
        """A slide's bag (float32), or a unit's: its slides' bags one after the other."""
        if slide_id in self.units:
            return np.concatenate([self._slide(s) for s in self.units[slide_id]])
        return self._slide(slide_id)

    def _slide(self, slide_id: str) -> np.ndarray:
        x = self._cache.get(slide_id)
        if x is not None:
            self._cache.move_to_end(slide_id)
            return x.astype(np.float32, copy=False)
        m = self.metas[slide_id]
        x = read_features(m.path, m.key)
        if slide_id not in self._checked:
            if not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).any(axis=1).sum())
                raise FeatureFileError(f"{m.path}: {bad} of {len(x)} patches have NaN/Inf "
                                       "features; re-extract this slide (e.g. with "
                                       "--precision fp32 --overwrite)")
            self._checked.add(slide_id)
        if x.nbytes <= self.cache_bytes:
            self._cache[slide_id] = x
            self.cached_bytes += x.nbytes
            while self.cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self.cached_bytes -= old.nbytes
        return x.astype(np.float32, copy=False)

    def sample(self, slide_id: str, bag_size: int | None, rng: np.random.Generator) -> np.ndarray:
        """All patches, or `bag_size` of them drawn without replacement (training bags)."""
        x = self.get(slide_id)
        if bag_size is None or len(x) <= bag_size:
            return x
        return x[np.sort(rng.choice(len(x), bag_size, replace=False))]

