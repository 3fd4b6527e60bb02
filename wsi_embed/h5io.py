"""HDF5 coords and features files: schema, atomic writes, validation and tolerant readers.

A file appears under its final name only once complete (written to a hidden temporary name
in the same folder, then renamed), so "the file exists and validates" means "done".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .claims import pid_alive
from .errors import FeatureFileError, OutputError

log = logging.getLogger(__name__)

COORDS_SCHEMA = "wsi-embed/coords/1"
FEATURES_SCHEMA = "wsi-embed/features/1"
#: one embedding per slide (`encode-slides`): `features` (D,), no coords
SLIDE_FEATURES_SCHEMA = "wsi-embed/slide-features/1"
TMP_SUFFIX = ".tmp"
#: How a failed write (a full disk, a file-size limit) surfaces: OSError, or from h5py, when
#: it flushes on close, RuntimeError ("Can't decrement id ref count (file write failed").
WRITE_ERRORS = (OSError, RuntimeError)
#: Keep each HDF5 chunk at or under 1 MiB (DESIGN.md).
CHUNK_BYTES = 1 << 20


def tmp_path(final: Path) -> Path:
    """A hidden name unique to this host and process, so concurrent writers never collide."""
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files that this host's dead processes left behind (killed runs):
    `.<name>.<host>.<pid>.tmp`, with an extension after it for PNGs. Host names may hold
    dots; other hosts' files are left alone (their processes may be alive)."""
    if not folder.is_dir():
        return 0
    mine = re.compile(rf"\.(.+)\.{re.escape(socket.gethostname())}\.(\d+)"
                      rf"{re.escape(TMP_SUFFIX)}(\.\w+)?")
    removed = 0
    for p in folder.glob(f".*{TMP_SUFFIX}*"):
        m = mine.fullmatch(p.name)
        if m and not pid_alive(int(m.group(2))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_file(final: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write `final` to; renamed into place on clean exit, deleted on
    error. `suffix` keeps an extension for writers that choose the format by name (PNG)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final).with_name(tmp_path(final).name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


#: HDF5 files whose close failed (a full disk). They are kept referenced: freeing them, or
#: HDF5 closing them when the process ends, crashes the library (SIGSEGV); the CLI's entry
#: point ends the process without that teardown when this is not empty.
UNCLOSED: list[h5py.File] = []


class AtomicH5:
    """An HDF5 file under a temporary name until `commit()` renames it into place;
    `abort()` (or an exception in a `with` block) deletes it."""

    def __init__(self, final: Path):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path(final)
        self.f = h5py.File(self.tmp, "w")

    def commit(self) -> None:
        try:
            self.f.close()
        except Exception:
            UNCLOSED.append(self.f)
            raise
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - a failed flush (full disk): see UNCLOSED
            UNCLOSED.append(self.f)
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_h5(final: Path) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file; on clean exit flush, fsync and rename it to `final`."""
    a = AtomicH5(final)
    try:
        yield a.f
        a.commit()
    except BaseException:
        a.abort()  # also when the commit failed (a full disk): no temporary is left
        raise


def chunk_rows(row_bytes: int, n: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


def now_attrs() -> dict:
    return {"wsi_embed_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def slide_provenance(slide_path: Path) -> dict:
    st = slide_path.stat()
    return {"slide_path": str(slide_path.resolve()), "slide_size_bytes": int(st.st_size),
            "slide_mtime": float(st.st_mtime), **now_attrs()}


def set_attrs(obj, attrs: dict) -> None:
    """h5py cannot store None: such attributes are left out."""
    for k, v in attrs.items():
        if v is not None:
            obj.attrs[k] = v


def write_coords_dataset(f: h5py.File, coords: np.ndarray, attrs: dict) -> None:
    n = len(coords)
    ds = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(n, 2),
                          chunks=(chunk_rows(16, n), 2) if n else None, maxshape=(n, 2))
    set_attrs(ds, attrs)


def write_coords_file(final: Path, coords: np.ndarray, tissue_fraction: np.ndarray,
                      coords_attrs: dict, root_attrs: dict) -> None:
    with atomic_h5(final) as f:
        f.attrs["schema"] = COORDS_SCHEMA
        set_attrs(f, root_attrs)
        write_coords_dataset(f, coords, coords_attrs)
        f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))


class FeaturesWriter:
    """A features file (schema `FEATURES_SCHEMA`) filled in row blocks as features arrive,
    under a temporary name until `commit`; `abort` deletes it. The one writer of the
    features schema: `extract` streams into it, `write_features_file` writes one at once."""

    def __init__(self, final: Path, n: int, dim: int, dtype, coords: np.ndarray,
                 coords_attrs: dict, root_attrs: dict):
        self._h5 = AtomicH5(final)
        try:
            f = self._h5.f
            f.attrs["schema"] = FEATURES_SCHEMA
            set_attrs(f, {**root_attrs, **now_attrs()})
            rows = chunk_rows(dim * np.dtype(dtype).itemsize, n)
            self.features = f.create_dataset("features", shape=(n, dim), dtype=dtype,
                                             chunks=(rows, dim) if n else None)
            write_coords_dataset(f, coords, coords_attrs)
        except BaseException:
            self._h5.abort()
            raise

    def write(self, row0: int, feats: np.ndarray) -> None:
        self.features[row0 : row0 + len(feats)] = feats

    def commit(self) -> None:
        self.features = None  # no dataset handle may outlive its file (see abort)
        self._h5.commit()

    def abort(self) -> None:
        """Delete the temporary file. The dataset handle goes first: freed after a file
        whose close failed (a full disk), it crashes HDF5."""
        self.features = None
        self._h5.abort()


def write_features_file(final: Path, features: np.ndarray, coords: np.ndarray,
                        coords_attrs: dict, root_attrs: dict) -> None:
    """A whole features file at once (synthetic data, tests)."""
    w = FeaturesWriter(final, len(features), features.shape[1], features.dtype, coords,
                       coords_attrs, root_attrs)
    try:
        w.write(0, features)
    except BaseException:
        w.abort()
        raise
    w.commit()


def resume_status(path: Path, schema: str, expect: dict, overwrite: bool) -> str | None:
    """"skipped" when a finished output made with the same settings exists; None when the
    slide must be (re)done; OutputError when an output made otherwise would be lost."""
    if overwrite:
        return None
    why = check_output(path, schema, expect)
    if why is None:
        return "skipped"
    if why.startswith("made with"):
        raise OutputError(f"{path} exists but was {why}; pass --overwrite to redo it or choose "
                          "another --out")
    if why != "missing":
        log.warning("existing %s is not usable (%s); redoing it", path, why)
    return None


@dataclass
class CoordsFile:
    coords: np.ndarray
    tissue_fraction: np.ndarray | None
    attrs: dict  # attrs of the coords dataset
    root: dict


def _attrs(obj) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}


def read_coords_file(path: Path) -> CoordsFile:
    with h5py.File(path, "r") as f:
        ds = f["coords"]
        tf = f["tissue_fraction"][:] if "tissue_fraction" in f else None
        return CoordsFile(ds[:].astype(np.int64), tf, _attrs(ds), _attrs(f))


#: root attributes added to a schema after files were written without them, and the value
#: those older files were made with (so they are not taken for other settings)
ADDED_ATTRS = {"tiling_pen_filter": True, "tiling_edge": "drop"}


def check_output(path: Path, schema: str, expect: dict | None = None) -> str | None:
    """Why `path` is not a finished output of `schema` made with `expect` root attrs (None if
    it is one). A missing file is "missing"."""
    if not path.exists():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != schema:
                return f"schema {f.attrs.get('schema')!r} is not {schema!r}"
            if schema == SLIDE_FEATURES_SCHEMA:
                if "features" not in f:
                    return "no features dataset"
                f["features"][()]
            elif "coords" not in f:
                return "no coords dataset"
            else:
                n = f["coords"].shape[0]
                for name in ("tissue_fraction", "features"):
                    if name in f and f[name].shape[0] != n:
                        return f"{name} has {f[name].shape[0]} rows, coords {n}"
                if "features" in f and n:
                    f["features"][n - 1]  # the last row must be readable
            for k, v in (expect or {}).items():
                have = f.attrs.get(k, ADDED_ATTRS.get(k))
                if isinstance(have, bytes):
                    have = have.decode()
                if not _same(have, v):
                    return f"made with {k}={_readable(have)}, this run asks {_readable(v)}"
    except OSError as e:
        return f"unreadable ({e})"
    return None


def _readable(v) -> str:
    """256, 'fp32', 0.5: numpy scalars as the plain values a person typed."""
    if isinstance(v, np.generic):
        v = v.item()
    return repr(v)


REDO = "pass --overwrite to redo them, or choose another --out"


def refuse_settings_conflict(path_of, ids: list[str], schema: str, expect, what: str,
                             fix=lambda why: REDO) -> None:
    """One refusal before any work when existing outputs `path_of(id)` were made with other
    settings than `expect` (a dict, or a function of the id for per-slide settings), naming
    how many, the setting, both values and `fix(why)`, rather than a failed row per slide.
    An id whose path cannot be had (outside --out, a bad id) is left to its own slide's
    row."""
    from .errors import UsageError

    found = []
    for i in ids:
        try:
            p = path_of(i)
        except Exception:  # noqa: BLE001 - that slide fails on its own, with its reason
            continue
        want = expect(i) if callable(expect) else expect
        why = check_output(p, schema, want) if p.exists() else None
        if why and why.startswith("made with"):
            found.append((p, why))
    if found:
        path, why = found[0]
        raise UsageError(f"{len(found)} of {len(ids)} slides already have {what} in "
                         f"{path.parent} {why} (e.g. {path.name}); {fix(why)}")


def _same(a, b) -> bool:
    if isinstance(b, float) or isinstance(a, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, np.generic):
        a = a.item()
    return a == b


# -- features files from wsi-embed, CLAM/TRIDENT and STAMP --------------------------------
#: Dataset names that hold per-patch features, in the order they are looked for.
FEATURE_KEYS = ("features", "feats")


@dataclass(frozen=True)
class FeaturesMeta:
    """What a features file holds, read without loading the features."""

    path: Path
    key: str  # the dataset holding the features
    n: int
    dim: int
    encoder: str | None  # None: the file does not say (plain CLAM files)
    weights: str | None
    has_coords: bool


def _features_dataset(f: h5py.File, path: Path) -> h5py.Dataset:
    for key in FEATURE_KEYS:
        if key in f and isinstance(f[key], h5py.Dataset):
            ds = f[key]
            shape = ds.shape[1:] if ds.ndim == 3 and ds.shape[0] == 1 else ds.shape
            slide_embedding = len(shape) == 1 and f.attrs.get("schema") == \
                SLIDE_FEATURES_SCHEMA
            if len(shape) != 2 and not slide_embedding:
                raise FeatureFileError(f"{path}: dataset {key!r} has shape {ds.shape}, "
                                       "expected (patches, dim) or a slide embedding (dim,)")
            if ds.dtype.kind != "f":
                raise FeatureFileError(f"{path}: dataset {key!r} holds {ds.dtype} values, not "
                                       "embeddings (float16/float32); re-extract this slide "
                                       "with `wsi-embed extract`")
            return ds
    raise FeatureFileError(f"{path}: no 'features' (wsi-embed, CLAM, TRIDENT) or 'feats' "
                           "(STAMP) dataset; is this a coords file? Run `wsi-embed extract`.")


def read_features_meta(path: Path) -> FeaturesMeta:
    """Shape and provenance of a features file; accepts CLAM/TRIDENT and STAMP layouts."""
    try:
        with h5py.File(path, "r") as f:
            ds = _features_dataset(f, path)
            root = _attrs(f)
            enc = root.get("encoder") or root.get("extractor") or _attrs(ds).get("encoder")
            weights = root.get("weights")
            n, dim = (1, ds.shape[0]) if ds.ndim == 1 else ds.shape[-2:]  # 1-D: a slide embedding
            return FeaturesMeta(path, ds.name.lstrip("/"), int(n), int(dim),
                                None if enc is None else str(enc),
                                None if weights is None else str(weights), "coords" in f)
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from None


def read_features(path: Path, key: str = "features") -> np.ndarray:
    """The (N, D) features as stored (float16 stays float16 to halve cache memory)."""
    try:
        with h5py.File(path, "r") as f:
            x = f[key][()]
    except (OSError, KeyError) as e:
        raise FeatureFileError(f"{path}: cannot read {key!r} ({e})") from None
    return x[0] if x.ndim == 3 else x[None] if x.ndim == 1 else x


def read_patch_coords(path: Path) -> tuple[np.ndarray, dict]:
    """The coords of a features file and their attrs; (0, 2) and {} when it has none.
    STAMP files say at their root that coords are in µm (`unit`, `tile_size_um`): those
    attrs are passed on, for the caller to convert with the slide's MPP."""
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            return np.zeros((0, 2), np.int64), {}
        ds = f["coords"]
        c = ds[()]
        root = _attrs(f)
        attrs = _attrs(ds) | {k: root[k] for k in ("unit", "tile_size_um") if k in root}
        return (c[0] if c.ndim == 3 else c), attrs
