"""`wsi-embed encode-slides`: one embedding per slide from its stored patch features with a
pretrained slide encoder, into `OUT/slide_features/<slide_encoder>/<slide_id>.h5`.

A slide whose features come from another patch encoder, patch size or resolution than the
slide encoder was trained on is a failed row naming the `extract` command that makes the
right ones; a finished output with the same settings is kept (resume).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bags import BagStore, scan_features
from .devices import pick_device
from .errors import FeatureFileError, describe_error, one_line
from .extract.config import Precision
from .h5io import (
    SLIDE_FEATURES_SCHEMA,
    WRITE_ERRORS,
    atomic_h5,
    now_attrs,
    read_patch_coords,
    remove_stale_tmp,
    resume_status,
    set_attrs,
)
from .layout import OutputLayout
from .report import RunReport
from .slide_encoders import SlideEncoderConfig, get_slide_config, load_slide_encoder

log = logging.getLogger(__name__)

ENCODE_SLIDES_COLUMNS = ["slide_id", "status", "n_patches", "seconds", "error"]
MPP_TOLERANCE = 0.05  # relative: 0.5 vs 0.499 µm/px is the same resolution


@dataclass(frozen=True)
class EncodeSlidesConfig:
    features: Path
    slide_encoder: str
    out: Path
    weights: str | None = None
    device: str = "auto"
    precision: Precision | None = None  # CUDA autocast; CPU runs fp32
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)


def extract_hint(cfg: SlideEncoderConfig) -> str:
    return (f"wsi-embed extract SLIDES --out OUT --encoder {cfg.patch_encoder} --patch-size "
            f"{cfg.patch_px} --target-mpp {cfg.mpp:g}")


def input_problem(name: str, cfg: SlideEncoderConfig, encoder: str | None, attrs: dict,
                  n_coords: int) -> str | None:
    """Why these features cannot go into this slide encoder (None: they can). What a file
    does not record (features from other tools) is not held against it."""
    want = f"{name} takes {cfg.patch_encoder} features of {cfg.patch_px} px patches at " \
           f"{cfg.mpp:g} µm/px: {extract_hint(cfg)}"
    if encoder is not None and encoder != cfg.patch_encoder:
        return f"features of patch encoder {encoder!r}; {want}"
    px = attrs.get("patch_size")
    if px is not None and int(px) != cfg.patch_px:
        return f"{int(px)} px patches; {want}"
    mpp = attrs.get("target_mpp")
    if mpp is not None and abs(float(mpp) / cfg.mpp - 1) > MPP_TOLERANCE:
        return f"patches at {float(mpp):g} µm/px; {want}"
    if cfg.needs_coords and not n_coords:
        return f"no patch coords, which {name} needs; {want}"
    return None


def run_encode_slides(cfg: EncodeSlidesConfig) -> RunReport:
    scfg = get_slide_config(cfg.slide_encoder)
    fs = scan_features(cfg.features, lenient=True, mixed=True)
    model, weights_id = load_slide_encoder(cfg.slide_encoder, cfg.weights)
    device = pick_device(cfg.device)
    model = model.to(device)
    dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(
        cfg.precision) if device.type == "cuda" else None
    layout = OutputLayout(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ids = sorted({*fs.metas, *fs.unreadable})[cfg.shard[0]::cfg.shard[1]]
    store = BagStore(fs.metas, cache_bytes=0)
    remove_stale_tmp(layout.slide_features_dir(cfg.slide_encoder))
    with RunReport(layout.encode_slides_report(cfg.slide_encoder), ENCODE_SLIDES_COLUMNS,
                   f"encode-slides {cfg.slide_encoder}") as report:
        report.expect(ids)
        for sid in ids:
            row: dict = {"slide_id": sid}
            try:
                if sid in fs.unreadable:
                    raise FeatureFileError(fs.unreadable[sid])
                meta = fs.metas[sid]
                row["n_patches"] = meta.n
                out = layout.slide_features(cfg.slide_encoder, sid)
                expect = {"encoder": cfg.slide_encoder, "weights": weights_id,
                          "patch_encoder_weights": meta.weights or ""}
                if resume_status(out, SLIDE_FEATURES_SCHEMA, expect, cfg.overwrite):
                    row |= {"status": "skipped", "error": ""}
                    report.add(row)
                    continue
                coords, attrs = read_patch_coords(meta.path)
                why = input_problem(cfg.slide_encoder, scfg, meta.encoder, attrs, len(coords))
                if why:
                    raise FeatureFileError(f"{meta.path}: {why}")
                if meta.n == 0:
                    raise FeatureFileError(f"{meta.path}: no patches (no tissue found)")
                t0 = time.perf_counter()
                x = torch.from_numpy(store.get(sid)).to(device)
                c = torch.from_numpy(np.asarray(coords, np.int64)).to(device)
                size0 = int(attrs.get("patch_size_level0", scfg.patch_px))
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                            enabled=dtype is not None):
                    z = model.encode(x, c, size0).float().cpu().numpy()
                with atomic_h5(out) as f:
                    f.attrs["schema"] = SLIDE_FEATURES_SCHEMA
                    set_attrs(f, {**expect, **now_attrs(), "slide_encoder": cfg.slide_encoder,
                                  "patch_encoder": meta.encoder or "",
                                  "patch_size": int(attrs.get("patch_size", 0)),
                                  "target_mpp": float(attrs.get("target_mpp", 0.0)),
                                  "n_patches": meta.n, "embed_dim": len(z)})
                    f.create_dataset("features", data=z.astype(np.float32))
                row |= {"status": "ok", "seconds": f"{time.perf_counter() - t0:.3f}",
                        "error": ""}
            except WRITE_ERRORS as e:
                row |= {"status": "failed", "error": f"cannot write in {cfg.out} "
                        f"({one_line(e)[:300]}): free disk space and rerun"}
            except Exception as e:  # noqa: BLE001 - one slide never stops the run
                row |= {"status": "failed", "error": describe_error(e)}
            report.add(row)
    return report
