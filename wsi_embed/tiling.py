"""The patch grid: physical-resolution geometry, tissue fraction per patch, coords files."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import h5io
from .batch import SLIDE_TIMEOUT, SlideJob, run_batch
from .claims import claim
from .errors import SlideError, describe_error, one_line
from .layout import OutputLayout
from .report import RunReport, slide_row
from .slides import MAX_PLAIN_PIXELS, PatchGeometry, Slide, open_slide, read_thumbnail
from .tissue import (
    TissueMask,
    TissueParams,
    detect_tissue,
    full_mask,
    mask_from_file,
    thumbnail_downsample,
)

log = logging.getLogger(__name__)

#: Upsampling a slide by more than this factor to reach the target is refused as an error.
MAX_UPSAMPLE = 2.0
#: A patch whose area is at least this fraction of pen ink is dropped whatever its tissue.
MAX_PEN_FRACTION = 0.5


def magnification_to_mpp(mag: float) -> float:
    """The convention of DESIGN.md: 20× = 0.5 µm/px, 40× = 0.25 µm/px."""
    return 10.0 / mag


@dataclass(frozen=True)
class TileParams:
    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.25
    tissue: str = "auto"  # auto | none | mask (a --tissue-mask was given)
    pen_filter: bool = True  # drop patches mostly covered by pen ink (brightfield)
    edge: str = "drop"  # drop | pad: see choices.Edge

    def __post_init__(self) -> None:
        if self.patch_size <= 0:
            raise ValueError("--patch-size must be positive")
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError("--overlap must be ≥ 0 and smaller than --patch-size")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError("--min-tissue must be between 0 and 1")
        if not self.target_mpp > 0:
            raise ValueError("--target-mpp must be positive")
        if self.edge not in ("drop", "pad"):
            raise ValueError("--edge must be drop or pad")

    def root_attrs(self) -> dict:
        """Tiling parameters stored in (and checked against) every coords file."""
        return {f"tiling_{k}": v for k, v in asdict(self).items()}


def resolve_mpp(slide: Slide, job: SlideJob, slide_mpp: float | None) -> float:
    """The slide list's per-slide MPP, else --slide-mpp, override metadata (with a warning
    when they disagree); else metadata; else a SlideError naming both fixes."""
    if job.mpp is not None:
        override, source = job.mpp, "slide list 'mpp' column"
    elif slide_mpp is not None:
        override, source = slide_mpp, "--slide-mpp"
    else:
        override, source = None, ""
    mpp = slide.set_mpp(override, source)
    meta = slide.metadata_mpp
    if override is not None and meta is not None and abs(meta / override - 1) > 0.02:
        log.warning("%s: using MPP %.4g from %s; the slide's metadata says %.4g",
                    job.slide_id, override, source, meta)
    return mpp


def check_geometry(slide: Slide, target_mpp: float) -> None:
    if slide.mpp > target_mpp * MAX_UPSAMPLE * 1.02:
        raise SlideError(
            f"{slide.path}: level-0 resolution {slide.mpp:.4g} µm/px is more than "
            f"{MAX_UPSAMPLE:g}x coarser than the target {target_mpp:g} µm/px; patches would be "
            "upsampled. Use a coarser --target-mpp, or --slide-mpp if the metadata is wrong.")


def grid_coords(width: int, height: int, ps0: int, step0: int, pad: bool = False
                ) -> np.ndarray:
    """Top-left level-0 corners of every patch lying wholly inside the slide, row-major; with
    `pad`, also one more column and row reaching past the right and bottom edges when the
    slide's last pixels would otherwise lie in no patch."""

    def starts(size: int) -> np.ndarray:
        s = np.arange(0, size - ps0 + 1, step0, dtype=np.int64)
        last_end = int(s[-1]) + ps0 if len(s) else 0
        if pad and last_end < size:
            s = np.append(s, np.int64(int(s[-1]) + step0 if len(s) else 0))
        return s

    xs, ys = starts(width), starts(height)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def box_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray,
                  ps0: int) -> np.ndarray:
    """Fraction of each level-0 box [x, x+ps0) x [y, y+ps0) covered by a low-res `mask`."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    ii[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(int), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(int), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + ps0) / downsample).astype(int), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + ps0) / downsample).astype(int), 0, h)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=w), np.maximum(y1, y0 + 1).clip(max=h)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (s / area).astype(np.float32)


def coords_attrs(slide: Slide, geom: PatchGeometry, params: TileParams, slide_id: str) -> dict:
    """Attributes of the `coords` dataset, in CLAM/TRIDENT's vocabulary plus physical units."""
    return {
        "patch_size": geom.patch_size,
        "patch_size_level0": geom.patch_size_level0,
        "patch_level": geom.level,
        "downsample": geom.downsample,
        "level0_mpp": slide.mpp,
        "target_mpp": geom.target_mpp,
        "target_magnification": 10.0 / geom.target_mpp,
        "overlap": params.overlap,
        "level0_width": slide.width,
        "level0_height": slide.height,
        "name": slide_id,
        "read_size": geom.read_size,
    }


@dataclass
class TileResult:
    coords: np.ndarray
    tissue_fraction: np.ndarray
    geometry: PatchGeometry
    mask: TissueMask
    thumbnail: np.ndarray
    attrs: dict


def tile_open_slide(slide: Slide, slide_id: str, params: TileParams,
                    tissue_mask: Path | None = None,
                    tissue_params: TissueParams | None = None) -> TileResult:
    """Tissue mask and kept grid of an open slide whose MPP is already resolved."""
    check_geometry(slide, params.target_mpp)
    geom = slide.geometry(params.patch_size, params.target_mpp)
    d = thumbnail_downsample(slide.width, slide.height, slide.mpp)
    thumb = read_thumbnail(slide, d)
    d_eff = slide.width / thumb.shape[1]
    if tissue_mask is not None:
        mask = mask_from_file(tissue_mask, thumb.shape[:2], d_eff)
    elif params.tissue == "none":
        mask = full_mask(thumb.shape[:2], d_eff)
    else:
        mask = detect_tissue(thumb, d_eff, slide.mpp,
                             tissue_params or TissueParams(pen_filter=params.pen_filter))
    step0 = (geom.patch_size_level0 if params.overlap == 0
             else round((params.patch_size - params.overlap) * geom.patch_size_level0
                        / params.patch_size))
    grid = grid_coords(slide.width, slide.height, geom.patch_size_level0, step0,
                       pad=params.edge == "pad")
    frac = box_fractions(mask.tissue, d_eff, grid, geom.patch_size_level0)
    keep = frac >= max(params.min_tissue, 1e-6)
    if mask.pen.any():
        keep &= box_fractions(mask.pen, d_eff, grid, geom.patch_size_level0) < MAX_PEN_FRACTION
    attrs = coords_attrs(slide, geom, params, slide_id)
    return TileResult(grid[keep], frac[keep], geom, mask, thumb, attrs)


def coords_root_attrs(slide: Slide, params: TileParams, mpp_source: str) -> dict:
    return {**h5io.slide_provenance(slide.path), **params.root_attrs(),
            "mpp_source": mpp_source}


def write_tile_outputs(layout: OutputLayout, slide_id: str, slide: Slide, res: TileResult,
                       params: TileParams) -> None:
    from .viz import save_tiling_overlay

    # the coords file is the "done" marker, so it is written last
    save_tiling_overlay(layout.thumbnail(slide_id), res)
    h5io.write_coords_file(layout.coords(slide_id), res.coords, res.tissue_fraction,
                           res.attrs, coords_root_attrs(slide, params, slide.mpp_source))


TILE_COLUMNS = ["slide_id", "path", "status", "n_patches", "tissue_area_mm2", "level0_mpp",
                "read_level", "seconds", "error", "warning"]


@dataclass(frozen=True)
class TileConfig:
    """Everything a tile worker needs (picklable: it crosses process boundaries)."""

    out: Path
    params: TileParams
    slide_mpp: float | None = None
    tissue_mask: Path | None = None  # a file (one slide) or a folder of <slide_id>.png/.geojson
    overwrite: bool = False
    max_plain_pixels: int | None = MAX_PLAIN_PIXELS

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.out)

    def params_for(self, job: SlideJob) -> TileParams:
        """The run's tiling settings with the slide list's `tissue` choice for this slide."""
        if job.tissue_mask is not None:
            return replace(self.params, tissue="mask")
        if job.tissue == "no-pen":
            return replace(self.params, tissue="auto", pen_filter=False)
        if job.tissue is not None:
            return replace(self.params, tissue=job.tissue)
        return self.params

    def mask_for(self, job: SlideJob) -> Path | None:
        if job.tissue_mask is not None or job.tissue is not None:
            return job.tissue_mask
        if self.tissue_mask is None or self.tissue_mask.is_file():
            return self.tissue_mask
        for ext in (".geojson", ".json", ".png"):
            p = self.tissue_mask / f"{job.slide_id}{ext}"
            if p.is_file():
                return p
        raise SlideError(f"no tissue mask for {job.slide_id} in {self.tissue_mask} "
                         "(expected <slide_id>.geojson or .png)")


def run_tile_job(cfg: TileConfig, job: SlideJob) -> dict:
    """Tile one slide into cfg.out; every error becomes a failed report row."""
    t0 = time.perf_counter()
    try:
        coords_file = cfg.layout.coords(job.slide_id)
        params = cfg.params_for(job)
        status = h5io.resume_status(coords_file, h5io.COORDS_SCHEMA, params.root_attrs(),
                                    cfg.overwrite)
        if status:
            return slide_row(job, status, t0)
        held = claim(coords_file)
        if isinstance(held, str):
            return slide_row(job, "skipped", t0, warning=held)
        try:
            if h5io.resume_status(coords_file, h5io.COORDS_SCHEMA, params.root_attrs(),
                                  cfg.overwrite):  # finished by another run meanwhile
                return slide_row(job, "skipped", t0)
            with open_slide(job.path, cfg.max_plain_pixels) as slide:
                resolve_mpp(slide, job, cfg.slide_mpp)
                res = tile_open_slide(slide, job.slide_id, params, cfg.mask_for(job))
                write_tile_outputs(cfg.layout, job.slide_id, slide, res, params)
        finally:
            held.release()
        warning = res.mask.warning
        if len(res.coords) == 0:
            warning = (warning + "; " if warning else "") + (
                "no tissue patches: empty coords file; if the slide has tissue, check its "
                "thumbnail and use --tissue none, a --tissue-mask, --no-pen-filter, or a "
                "lower --min-tissue (or a per-slide 'tissue' column in a --slide-list)")
        return slide_row(job, "ok", t0, n_patches=len(res.coords),
                         tissue_area_mm2=round(res.mask.area_mm2(slide.mpp), 3),
                         level0_mpp=round(slide.mpp, 5), read_level=res.geometry.level,
                         warning=warning)
    except (SlideError, OSError, ValueError) as e:
        return slide_row(job, "failed", t0, error=one_line(e))
    except Exception as e:  # a batch must outlive any single slide's surprise
        log.debug("unexpected error on %s", job.slide_id, exc_info=True)
        return slide_row(job, "failed", t0, error=describe_error(e))


def tile_slides(jobs: list[SlideJob], cfg: TileConfig, num_workers: int,
                timeout: float | None = SLIDE_TIMEOUT) -> RunReport:
    """Tile `jobs` into cfg.out (coords, thumbnails, tile_report.csv): the `tile` command's
    work, also run by `extract` for slides that have no coords yet."""
    layout = cfg.layout
    if not cfg.overwrite:
        by_id = {j.slide_id: j for j in jobs}
        h5io.refuse_settings_conflict(layout.coords, list(by_id), h5io.COORDS_SCHEMA,
                                      lambda sid: cfg.params_for(by_id[sid]).root_attrs(),
                                      "coords")
    for folder in (layout.coords_dir, layout.thumbnails_dir):
        h5io.remove_stale_tmp(folder)
    with RunReport(layout.tile_report, TILE_COLUMNS, "tile") as report:
        run_batch(jobs, functools.partial(run_tile_job, cfg), report, num_workers, timeout)
    return report
