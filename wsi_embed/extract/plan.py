"""What `extract` will do with one slide, decided before its first patch is read: its coords,
what its features file will record, and how its patches are read. Frozen: the mutable state
of a slide being written lives in `writer.SlideOutput` alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import h5io
from ..batch import SlideJob
from ..errors import SlideError
from ..slides import open_slide
from ..tiling import TileParams
from .sources import Decode, Reader, SourceSpec, choose_source


@dataclass(frozen=True, eq=False)
class SlidePlan:
    job: SlideJob
    coords: np.ndarray  # (N, 2) level-0 top-lefts, in the coords file's order
    coords_attrs: dict
    root_attrs: dict  # slide provenance and tiling parameters, from the coords file
    source: SourceSpec | None  # None: no patches to read
    warning: str = ""

    @property
    def n(self) -> int:
        return len(self.coords)


def plan_slide(job: SlideJob, coords_file: Path, params: TileParams, reader: Reader,
               decode: Decode, device: torch.device,
               max_plain_pixels: int | None = None) -> SlidePlan:
    """The plan of one slide. Coords tiled at another patch size or resolution than this
    run's are refused (SlideError naming the file and both fixes), not silently used."""
    c = h5io.read_coords_file(coords_file)
    root = {k: v for k, v in c.root.items() if k != "schema"}
    root.setdefault("slide_path", str(job.path.resolve()))
    geom = c.attrs
    if int(geom["patch_size"]) != params.patch_size:
        raise SlideError(f"coords file {coords_file} has patch_size {geom['patch_size']}, "
                         f"this run {params.patch_size}: re-tile or pass --patch-size")
    tiled_at, target = geom.get("target_mpp"), params.target_mpp
    if tiled_at is not None and not math.isclose(float(tiled_at), target, rel_tol=1e-6):
        raise SlideError(f"coords file {coords_file} was tiled at {tiled_at:g} µm/px, this run "
                         f"asks for {target:g}: pass --target-mpp {tiled_at:g} to use it, or "
                         f"re-tile at {target:g} with `wsi-embed tile --overwrite`")
    if not len(c.coords):
        return SlidePlan(job, c.coords, c.attrs, root, None,
                         "no patches in the coords file: empty features file")
    level = int(geom["patch_level"])
    read_size = int(geom.get("read_size") or round(geom["patch_size_level0"]
                                                   / geom["downsample"]))
    with open_slide(job.path, max_plain_pixels) as slide:
        source = choose_source(slide, level, read_size, params.patch_size, reader, decode,
                               device)
    return SlidePlan(job, c.coords, c.attrs, root, source)
