"""Orchestration of `extract`: coords for every slide (tiling those without), resume, the
encoder set up once, and one pipeline per device."""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import replace
from pathlib import Path

import h5py
import torch

from .. import h5io
from ..batch import SlideJob, become_worker
from ..devices import pick_device
from ..encoders import EncoderConfig, get_config, load_encoder
from ..errors import describe_error
from ..layout import coords_in
from ..report import RunReport, plural, slide_row
from ..tiling import TileConfig, TileParams, tile_slides
from .config import ExtractConfig, Precision
from .device import DeviceRunner
from .pipeline import pipeline
from .writer import PROVENANCE, resume_status

log = logging.getLogger(__name__)

#: a run's µm/px further than this from the preset's recommended one is worth a warning
MPP_ADVICE_TOLERANCE = 0.05
EXTRACT_COLUMNS = ["slide_id", "path", "status", "n_patches", "seconds", "patches_per_s",
                   "reader", "device", "error", "warning"]


def default_batch_size(cfg: EncoderConfig, device: torch.device) -> int:
    if device.type != "cuda":
        return 32
    big = cfg.dim >= 1536 or cfg.input_size > 224
    return 128 if big else 512


def run_precision(requested: Precision | None, ecfg: EncoderConfig,
                  device: torch.device) -> Precision:
    """fp32 on CPU; on CUDA `--precision`, else the preset's."""
    if device.type == "cpu":
        return Precision.FP32
    return Precision(requested or ecfg.precision)


def encoder_setup(cfg: ExtractConfig, device: torch.device, run: bool = True):
    """The encoder on `device` (None unless `run`), what the features files record, and the
    batch size."""
    model, ecfg, weights_id = load_encoder(cfg.encoder, cfg.weights, "cpu")
    precision = run_precision(cfg.precision, ecfg, device)
    batch = cfg.batch_size or default_batch_size(ecfg, device)
    attrs = {"encoder": cfg.encoder, "embed_dim": ecfg.dim, "weights": weights_id,
             "input_size": ecfg.input_size, "resize_size": ecfg.resize,
             "interpolation": ecfg.interpolation, "mean": list(ecfg.mean_std[0]),
             "std": list(ecfg.mean_std[1]), "precision": str(precision),
             "feature_dtype": str(cfg.dtype)}
    if not run:
        return None, attrs, batch
    runner = DeviceRunner(model, ecfg, device, precision.torch_dtype, batch, cfg.compile)
    return runner, attrs, batch


def advise_resolution(ecfg: EncoderConfig, encoder: str, target_mpp: float) -> None:
    """Say so when the run's resolution is not the one the preset was trained at."""
    if abs(target_mpp / ecfg.target_mpp - 1) > MPP_ADVICE_TOLERANCE:
        log.warning("%s was trained on patches at %g µm/px; this run tiles at %g µm/px "
                    "(--target-mpp %g to follow the authors)", encoder, ecfg.target_mpp,
                    target_mpp, ecfg.target_mpp)


def refuse_settings_conflicts(jobs: list[SlideJob], cfg: ExtractConfig, tile_cfg: TileConfig,
                              coords_dir: Path | None, attrs: dict) -> None:
    """Outputs already in --out made with other settings: one refusal before any work
    (naming the setting, both values and the fix), not a failed row per slide."""
    layout = cfg.layout
    # existing coords are used as they are, at this run's patch size and resolution
    tiling = {k: v for k, v in tile_cfg.params.root_attrs().items()
              if k in ("tiling_patch_size", "tiling_target_mpp")}

    def coords_of(sid: str) -> Path:
        found = coords_in(coords_dir, sid) if coords_dir else None
        return found if found is not None and found.exists() else layout.coords(sid)

    def use_them(why: str) -> str:
        option = "--target-mpp" if "tiling_target_mpp" in why else "--patch-size"
        was = why.split("=", 1)[1].split(",", 1)[0]
        return (f"pass {option} {was} to use them, re-tile with `wsi-embed tile ... "
                "--overwrite`, or choose another --out")

    ids = [j.slide_id for j in jobs]
    h5io.refuse_settings_conflict(coords_of, ids, h5io.COORDS_SCHEMA, tiling, "coords",
                                  use_them)
    if not cfg.overwrite:
        h5io.refuse_settings_conflict(lambda sid: layout.features(cfg.encoder, sid), ids,
                                      h5io.FEATURES_SCHEMA, {k: attrs[k] for k in PROVENANCE},
                                      "features")


def ensure_coords(jobs: list[SlideJob], tile_cfg: TileConfig, coords_dir: Path | None,
                  report: RunReport, num_workers: int, timeout: float | None = None,
                  ) -> list[tuple[SlideJob, Path]]:
    """Coords for every slide: from --coords, OUT/coords, or tiled now with the same options.
    Slides that cannot be tiled are recorded as failed."""
    have, need = [], []
    layout = tile_cfg.layout
    for j in jobs:
        p = coords_in(coords_dir, j.slide_id) if coords_dir else None
        if p is None or not p.exists():
            p = layout.coords(j.slide_id)
        (have if p.exists() else need).append((j, p))
    if need:
        log.info("tiling %s without coords first", plural(len(need), "slide"))
        tile_report = tile_slides([j for j, _ in need], tile_cfg, num_workers, timeout)
        failed = set()
        for row in tile_report.rows:
            if row["status"] == "failed":
                failed.add(row["slide_id"])
                report.add({**row, "error": f"tiling: {row['error']}"})
        have += [(j, p) for j, p in need if j.slide_id not in failed]
    return have


def _n_patches(coords_file: Path) -> int:
    try:
        with h5py.File(coords_file, "r") as f:
            return int(f["coords"].shape[0])
    except (OSError, KeyError):
        return 0


def run_extract(jobs: list[SlideJob], cfg: ExtractConfig, tile_cfg: TileConfig,
                coords_dir: Path | None, report: RunReport) -> None:
    """Features of every slide in `jobs` into `cfg.out`; every slide gets a row in `report`."""
    devices = cfg.devices or (str(pick_device(cfg.device)),)
    first = torch.device(devices[0])
    runner, attrs, batch = encoder_setup(cfg, first, run=len(devices) == 1)
    advise_resolution(get_config(cfg.encoder), cfg.encoder, tile_cfg.params.target_mpp)
    refuse_settings_conflicts(jobs, cfg, tile_cfg, coords_dir, attrs)  # before any row
    report.expect([j.slide_id for j in jobs])
    todo: list[tuple[SlideJob, Path]] = []
    for job, coords_file in ensure_coords(jobs, tile_cfg, coords_dir, report,
                                          cfg.num_workers, cfg.slide_timeout):
        t0 = time.perf_counter()
        try:
            out = cfg.layout.features(cfg.encoder, job.slide_id)
            status = resume_status(out, attrs, cfg.overwrite)
        except Exception as e:  # noqa: BLE001 - the slide fails, the run goes on
            report.add(slide_row(job, "failed", t0, error=describe_error(e)))
            continue
        if status == "skipped":
            report.add(slide_row(job, "skipped", t0))
        else:
            todo.append((job, coords_file))
    if not todo:
        return
    sizes = {j.slide_id: _n_patches(c) for j, c in todo}
    report.expect_patches(sum(sizes.values()))
    if len(devices) > 1:
        todo.sort(key=lambda t: -sizes[t[0].slide_id])  # the last to finish is a small one
        _run_devices(todo, devices, cfg, tile_cfg.params, report)
        return
    log.info("extracting %s with %s (%s, %s weights) on %s, batch %d, %d readers",
             plural(len(todo), "slide"), cfg.encoder, attrs["precision"], attrs["weights"][:20],
             first, batch,
             cfg.num_workers)
    pipeline(todo, cfg, tile_cfg.params, runner, batch, attrs, report)


# -- several devices: one process each, pulling slides from a shared queue ----------------
class _QueueReport:
    """Stands in for the run report inside a device process: rows go to the parent, which
    counts their patches as progress."""

    def __init__(self, q):
        self.q = q

    def add(self, row: dict) -> None:
        self.q.put(row)

    def advance(self, patches: int) -> None:
        pass


def _device_main(device: str, cfg: ExtractConfig, preset: EncoderConfig, params: TileParams,
                 job_q, row_q, parent: int) -> None:
    """One device's process. It gets the parent's preset, so each process builds the model
    the parent resolved (a preset registered at run time included)."""
    from ..encoders import PRESETS

    become_worker(parent)
    PRESETS[cfg.encoder] = preset
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, len(cfg.devices))))
    runner, attrs, batch = encoder_setup(cfg, torch.device(device))

    def pull():
        while (item := job_q.get()) is not None:
            yield item

    pipeline(pull(), cfg, params, runner, batch, attrs, _QueueReport(row_q))


def _run_devices(todo: list[tuple[SlideJob, Path]], devices: tuple[str, ...],
                 cfg: ExtractConfig, params: TileParams, report: RunReport) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    job_q, row_q = ctx.Queue(), ctx.Queue()
    for item in todo:
        job_q.put(item)
    for _ in devices:
        job_q.put(None)
    sub = replace(cfg, num_workers=cfg.num_workers // len(devices))
    log.info("extracting %s on %d devices (%s), %d readers each", plural(len(todo), "slide"),
             len(devices), ", ".join(devices), sub.num_workers)
    preset = get_config(cfg.encoder)
    procs = [ctx.Process(target=_device_main,
                         args=(d, sub, preset, params, job_q, row_q, os.getpid()))
             for d in devices]
    for p in procs:
        p.start()
    seen: set[str] = set()
    while len(seen) < len(todo):
        try:
            row = row_q.get(timeout=2.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        seen.add(row["slide_id"])
        report.add(row)
        report.advance(int(row.get("n_patches") or 0))
    for p in procs:
        p.join()
    for job, _ in todo:  # slides a crashed device process took with it
        if job.slide_id not in seen:
            report.add(slide_row(job, "failed", time.perf_counter(),
                                 error="device process died; rerun to retry"))
