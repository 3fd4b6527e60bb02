"""`wsi-embed plan`: what a run over these slides will do, before it runs: per slide whether
it opens, its MPP and where it came from, the level patches would be read from and how many
patches (the same tissue detection as `tile`, at thumbnail scale, nothing written); totals
with the features' size on disk and device hours from rates measured in docs/BENCHMARKS.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .batch import SlideJob
from .errors import SlideError, describe_error, one_line
from .slides import open_slide
from .tiling import TileConfig, resolve_mpp, tile_open_slide

log = logging.getLogger(__name__)

#: end-to-end patches/s of `extract` (bf16, batch 512, 16 reader processes) by encoder and
#: device kind, as measured (docs/BENCHMARKS.md); a pair not here is "unknown"
MEASURED_RATES: dict[tuple[str, str], float] = {
    ("kaiko_vitb16", "nvidia-h100"): 7098.0,  # 2026-11-23, H100 80GB, decode on CPU
    ("uni_v1", "nvidia-h100"): 2913.0,  # 2026-11-23, one slide alone, warm-up included
    ("kaiko_vits16", "cpu"): 10.9,  # 2026-11-22, the 2-core dev VM
}


def device_kind(name: str | None = None) -> str:
    """A device name as the rates table spells it: 'NVIDIA H100 80GB HBM3' → nvidia-h100."""
    if name is None:
        try:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001 - no CUDA, no guess
            name = "cpu"
    words = name.lower().replace("nvidia ", "nvidia-").split()
    return words[0] if words else "unknown"


@dataclass
class SlidePlan:
    slide_id: str
    path: str
    status: str  # ok | failed
    n_patches: int = 0
    mpp: float | None = None
    mpp_source: str = ""
    read_level: int | None = None
    width: int = 0
    height: int = 0
    error: str = ""


def plan_slide(job: SlideJob, cfg: TileConfig) -> SlidePlan:
    """One slide's plan; a slide that cannot be tiled is a failed row saying why."""
    row = SlidePlan(job.slide_id, str(job.path), "failed")
    try:
        with open_slide(job.path, cfg.max_plain_pixels) as slide:
            row.width, row.height = slide.width, slide.height
            row.mpp = round(resolve_mpp(slide, job, cfg.slide_mpp), 5)
            row.mpp_source = slide.mpp_source
            res = tile_open_slide(slide, job.slide_id, cfg.params_for(job), cfg.mask_for(job))
            row.n_patches, row.read_level = len(res.coords), res.geometry.level
            row.status = "ok"
            if res.mask.warning:
                row.error = res.mask.warning
    except (SlideError, OSError, ValueError) as e:
        row.error = one_line(e)
    except Exception as e:  # noqa: BLE001 - a plan lists every slide
        row.error = describe_error(e)
    return row


def totals(rows: list[SlidePlan], encoder: str | None, dim: int | None, itemsize: int,
           kind: str) -> dict:
    n = int(sum(r.n_patches for r in rows))
    out = {"slides": len(rows), "slides_failed": sum(r.status != "ok" for r in rows),
           "patches": n, "encoder": encoder, "device_kind": kind}
    if dim:
        out["features_gb"] = round(n * dim * itemsize / 1e9, 4)
    rate = MEASURED_RATES.get((encoder, kind)) if encoder else None
    out["patches_per_s"] = rate if rate else "unknown"
    out["device_hours"] = round(n / rate / 3600, 3) if rate else "unknown"
    return out


def plan_slides(jobs: list[SlideJob], cfg: TileConfig) -> list[SlidePlan]:
    """Every slide's plan (`cfg.out` is not written to)."""
    rows = []
    for job in jobs:
        rows.append(plan_slide(job, cfg))
        log.info("%s: %s, %d patches", job.slide_id, rows[-1].status, rows[-1].n_patches)
    return rows
