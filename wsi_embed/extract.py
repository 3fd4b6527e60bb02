"""Patch embeddings: persistent reader processes → shared-memory slots → device → HDF5.

Shape of the pipeline (one process per device):
- reader processes (started once for the whole run, each with its own slide handles) read
  chunks of patches as uint8 into shared-memory slots (`reader_pool`); chunks of the next
  slide are queued while the current one finishes, so the device never waits at slide
  boundaries;
- the main thread packs chunks into batches: each chunk is copied from its (page-locked)
  slot straight to the device on a feed stream, which also resizes and normalises, while
  the encoder runs the previous batch in the preset's precision (`device_side`);
- a writer thread moves features to the host and streams them into each slide's temporary
  HDF5 file at their row offsets, then renames the finished file into place. Host memory is
  bounded by the slots and a short queue, whatever the slide size.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from . import h5io
from .batch import Report, tile_slides
from .device_side import BatchFeeder, DeviceRunner
from .devices import pick_device
from .encoders import EncoderConfig, load_encoder
from .fast_reader import choose_reader
from .gpu_decode import choose_decode
from .reader_pool import ReaderPool, ReadTask
from .slides import open_slide
from .tiling import (
    SlideJob,
    TileConfig,
    TileParams,
    coords_path,
    existing_output_status,
    report_row,
)

log = logging.getLogger(__name__)

EXTRACT_COLUMNS = ["slide_id", "path", "status", "n_patches", "seconds", "patches_per_s",
                   "reader", "device", "error", "warning"]
DTYPES = {"float32": np.float32, "float16": np.float16}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HELD_BATCHES = 2  # batches whose slots may wait for their copy to the device to finish


@dataclass(frozen=True)
class ExtractConfig:
    out: Path
    encoder: str
    weights: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    num_workers: int = 4
    precision: str | None = None  # None: the preset's on CUDA, fp32 on CPU
    dtype: str = "float32"
    compile: bool = False
    overwrite: bool = False
    chunk: int = 64  # patches per read task
    devices: tuple[str, ...] = ()  # several: one process per device
    reader: str = "auto"  # auto, fast (raw TIFF tiles) or openslide
    decode: str = "auto"  # fast reader's JPEG tiles: auto, cpu (workers) or gpu (batched)


def features_path(out: Path, encoder: str, slide_id: str) -> Path:
    return out / "features" / encoder / f"{slide_id}.h5"


def default_batch_size(cfg: EncoderConfig, device: torch.device) -> int:
    if device.type != "cuda":
        return 32
    big = cfg.dim >= 1536 or cfg.input_size > 224
    return 128 if big else 512


# -- per-slide state and the writer thread -------------------------------------------------
@dataclass
class SlideState:
    job: SlideJob
    coords: np.ndarray
    coords_attrs: dict
    root_attrs: dict
    remaining: int
    t0: float = 0.0
    writer: h5io.AtomicH5 | None = None
    failed: str = ""
    warning: str = ""
    done: bool = False
    reader: str = ""  # the reader and why, for the report
    level: int = 0
    read_size: int = 0
    page: int = -1
    downsample: float = 1.0
    gpu: bool = False


class FeatureWriter(threading.Thread):
    """Streams features into each slide's temporary HDF5 and finalises it when complete."""

    def __init__(self, cfg: ExtractConfig, dim: int, attrs: dict, report: Report,
                 counts: dict[str, int], device: str = ""):
        super().__init__(daemon=True)
        self.device = device
        self.cfg, self.dim, self.attrs, self.report, self.counts = cfg, dim, attrs, report, counts
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        # for the steady rate after the first batch (its time includes warm-up)
        self.patches = self.first_n = 0
        self.first_at = self.last_at = 0.0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                self._handle(*item)
            except BaseException as e:  # surfaced to the main thread
                self.error = e
                return

    def _handle(self, kind: str, payload, segments) -> None:
        if kind == "fail":
            self._fail(payload, segments)
            return
        if kind == "empty":
            self._open(payload)
            self._finish(payload)
            return
        feats = payload.float().cpu().numpy()
        self.last_at = time.perf_counter()
        if not self.patches:
            self.first_at, self.first_n = self.last_at, len(feats)
        self.patches += len(feats)
        if not np.isfinite(feats).all():
            for st, _, n, off in segments:  # _fail records each slide once
                if not np.isfinite(feats[off : off + n]).all():
                    self._fail(st, "non-finite features (NaN/Inf): try --precision fp32")
        for st, row0, n, off in segments:
            if st.failed:
                continue
            if st.writer is None:
                self._open(st)
            st.writer.f["features"][row0 : row0 + n] = feats[off : off + n]
            st.remaining -= n
            if st.remaining == 0:
                self._finish(st)

    def _open(self, st: SlideState) -> None:
        n = len(st.coords)
        path = features_path(self.cfg.out, self.cfg.encoder, st.job.slide_id)
        st.writer = w = h5io.AtomicH5(path)
        w.f.attrs["schema"] = h5io.FEATURES_SCHEMA
        h5io.set_attrs(w.f, {**st.root_attrs, **self.attrs, **h5io.now_attrs()})
        dt = DTYPES[self.cfg.dtype]
        rows = h5io.chunk_rows(self.dim * np.dtype(dt).itemsize, n)
        w.f.create_dataset("features", shape=(n, self.dim), dtype=dt,
                           chunks=(rows, self.dim) if n else None)
        h5io.write_coords_dataset(w.f, st.coords, st.coords_attrs)

    def _finish(self, st: SlideState) -> None:
        st.writer.commit()
        st.done = True
        secs = time.perf_counter() - st.t0
        n = len(st.coords)
        self.counts["ok"] += 1
        self.report.add(report_row(st.job, "ok", st.t0, n_patches=n, reader=st.reader,
                                   device=self.device,
                                   patches_per_s=round(n / secs, 1) if secs > 0 else "",
                                   warning=st.warning))
        log.info("%s: %d patches in %.1f s (%.0f patches/s)", st.job.slide_id, n, secs,
                 n / secs if secs > 0 else 0)

    def _fail(self, st: SlideState, error: str) -> None:
        if st.failed or st.done:
            return
        st.failed = error
        if st.writer is not None:
            st.writer.abort()
        self.counts["failed"] += 1
        self.report.add(report_row(st.job, "failed", st.t0, error=error))
        log.error("%s failed: %s", st.job.slide_id, error)


# -- the run -------------------------------------------------------------------------------
def ensure_coords(jobs: list[SlideJob], tile_cfg: TileConfig, coords_dir: Path | None,
                  report: Report, counts: dict[str, int], num_workers: int,
                  ) -> list[tuple[SlideJob, Path]]:
    """Coords for every slide: from --coords, OUT/coords, or tiled now with the same options.
    Slides that cannot be tiled are recorded as failed."""
    have, need = [], []
    for j in jobs:
        p = coords_path(coords_dir, j.slide_id) if coords_dir else None
        if p is not None and not p.exists() and (coords_dir / f"{j.slide_id}.h5").exists():
            p = coords_dir / f"{j.slide_id}.h5"
        if p is None or not p.exists():
            p = coords_path(tile_cfg.out, j.slide_id)
        (have if p.exists() else need).append((j, p))
    if need:
        log.info("tiling %d slides without coords first", len(need))
        _, tile_report = tile_slides([j for j, _ in need], tile_cfg, num_workers)
        failed = set()
        for row in tile_report.rows:
            if row["status"] == "failed":
                failed.add(row["slide_id"])
                counts["failed"] += 1
                report.add({**row, "error": f"tiling: {row['error']}"})
        have += [(j, p) for j, p in need if j.slide_id not in failed]
    return have


def run_precision(requested: str | None, ecfg: EncoderConfig, device: torch.device) -> str:
    """fp32 on CPU; on CUDA `--precision`, else the preset's."""
    return "fp32" if device.type == "cpu" else (requested or ecfg.precision)


def encoder_setup(cfg: ExtractConfig, device: torch.device, run: bool = True):
    """The encoder on `device` (None unless `run`), what the features files record, and the
    batch size."""
    model, ecfg, weights_id = load_encoder(cfg.encoder, cfg.weights, "cpu")
    precision = run_precision(cfg.precision, ecfg, device)
    batch = cfg.batch_size or default_batch_size(ecfg, device)
    attrs = {"encoder": cfg.encoder, "embed_dim": ecfg.dim, "weights": weights_id,
             "input_size": ecfg.input_size, "resize_size": ecfg.resize,
             "interpolation": ecfg.interpolation, "mean": list(ecfg.mean_std[0]),
             "std": list(ecfg.mean_std[1]), "precision": precision,
             "feature_dtype": cfg.dtype}
    if not run:
        return None, attrs, batch
    runner = DeviceRunner(model, ecfg, device, PRECISIONS[precision], batch, cfg.compile)
    return runner, attrs, batch


def run_extract(jobs: list[SlideJob], cfg: ExtractConfig, tile_cfg: TileConfig,
                coords_dir: Path | None, report: Report) -> dict[str, int]:
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    devices = cfg.devices or (str(pick_device(cfg.device)),)
    first = torch.device(devices[0])
    runner, attrs, batch = encoder_setup(cfg, first, run=len(devices) == 1)
    expect = {k: attrs[k] for k in ("encoder", "weights", "precision")}
    todo: list[tuple[SlideJob, Path]] = []
    for job, cpath in ensure_coords(jobs, tile_cfg, coords_dir, report, counts,
                                    cfg.num_workers):
        t0 = time.perf_counter()
        out = features_path(cfg.out, cfg.encoder, job.slide_id)
        try:
            status = existing_output_status(out, h5io.FEATURES_SCHEMA, expect, cfg.overwrite,
                                            job.slide_id)
        except Exception as e:
            counts["failed"] += 1
            report.add(report_row(job, "failed", t0, error=str(e)))
            continue
        if status == "skipped":
            counts["skipped"] += 1
            report.add(report_row(job, "skipped", t0))
        else:
            todo.append((job, cpath))
    if not todo:
        return counts
    if len(devices) > 1:
        _run_devices(todo, devices, cfg, tile_cfg, report, counts)
        return counts
    log.info("extracting %d slides with %s (%s, %s weights) on %s, batch %d, %d readers",
             len(todo), cfg.encoder, attrs["precision"], attrs["weights"][:20], first, batch,
             cfg.num_workers)
    pipeline(todo, cfg, tile_cfg, runner, batch, attrs, report, counts)
    return counts


# -- several devices: one process each, pulling slides from a shared queue ----------------
class _QueueReport:
    """Stands in for the Report inside a device process: rows go to the parent."""

    def __init__(self, q):
        self.q = q

    def add(self, row: dict) -> None:
        self.q.put(row)


def _device_main(device: str, cfg: ExtractConfig, tile_cfg: TileConfig, job_q, row_q) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, len(cfg.devices))))
    runner, attrs, batch = encoder_setup(cfg, torch.device(device))

    def pull():
        while (item := job_q.get()) is not None:
            yield item

    pipeline(pull(), cfg, tile_cfg, runner, batch, attrs, _QueueReport(row_q),
              {"ok": 0, "skipped": 0, "failed": 0})


def _n_patches(cpath: Path) -> int:
    try:
        with h5py.File(cpath, "r") as f:
            return int(f["coords"].shape[0])
    except (OSError, KeyError):
        return 0


def _run_devices(todo, devices, cfg: ExtractConfig, tile_cfg: TileConfig, report: Report,
                 counts: dict[str, int]) -> None:
    """Largest slides first, so the last slide to finish is a small one."""
    ctx = torch.multiprocessing.get_context("spawn")
    job_q, row_q = ctx.Queue(), ctx.Queue()
    for item in sorted(todo, key=lambda t: -_n_patches(t[1])):
        job_q.put(item)
    for _ in devices:
        job_q.put(None)
    sub = replace(cfg, num_workers=cfg.num_workers // len(devices))
    log.info("extracting %d slides on %d devices (%s), %d readers each", len(todo),
             len(devices), ", ".join(devices), sub.num_workers)
    procs = [ctx.Process(target=_device_main, args=(d, sub, tile_cfg, job_q, row_q))
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
        counts[row["status"] if row["status"] in counts else "failed"] += 1
        report.add(row)
    for p in procs:
        p.join()
    for job, _ in todo:  # slides a crashed device process took with it
        if job.slide_id not in seen:
            counts["failed"] += 1
            report.add(report_row(job, "failed", time.perf_counter(),
                                  error="device process died; rerun to retry"))


def prepare_slide(job: SlideJob, cpath: Path, patch: int, reader: str, decode: str = "cpu",
                  device: torch.device | None = None, target_mpp: float | None = None,
                  ) -> SlideState:
    """A slide's coords, the level and size to read, and the reader (and, for the fast
    reader, the JPEG decoder) that reads them. Coords tiled at another patch size or
    resolution than this run's are refused, not silently used."""
    c = h5io.read_coords_file(cpath)
    root = {k: v for k, v in c.root.items() if k != "schema"}
    root.setdefault("slide_path", str(job.path.resolve()))
    warning = "" if len(c.coords) else "no patches in the coords file: empty features file"
    st = SlideState(job, c.coords, c.attrs, root, len(c.coords), warning=warning)
    geom = c.attrs
    if int(geom["patch_size"]) != patch:
        raise ValueError(f"coords file {cpath} has patch_size {geom['patch_size']}, "
                         f"this run {patch}: re-tile or pass --patch-size")
    tiled_at = geom.get("target_mpp")
    if (target_mpp is not None and tiled_at is not None
            and not math.isclose(float(tiled_at), target_mpp, rel_tol=1e-6)):
        raise ValueError(f"coords file {cpath} was tiled at {tiled_at:g} µm/px, this run asks "
                         f"for {target_mpp:g}: pass --target-mpp {tiled_at:g} to use it, or "
                         f"re-tile at {target_mpp:g} with `wsi-embed tile --overwrite`")
    st.level = int(geom["patch_level"])
    st.read_size = int(geom.get("read_size") or round(geom["patch_size_level0"]
                                                      / geom["downsample"]))
    if len(c.coords):
        with open_slide(job.path) as slide:
            choice = choose_reader(slide, st.level, reader)
            st.downsample = slide.level_downsamples[st.level]
        st.reader, st.page = f"{choice.kind} ({choice.reason})", choice.page
        if choice.kind == "fast":
            st.gpu, why = choose_decode(str(job.path), choice.page, decode,
                                        device or torch.device("cpu"))
            st.reader = f"fast ({choice.reason}; {why})"
    return st


def task_size(st: SlideState, chunk: int, batch: int) -> int:
    """Patches per read task: a whole batch for device decode (one batched nvJPEG call and
    one gather per batch), `chunk` for the reader processes."""
    return max(chunk, batch) if st.gpu else chunk


def read_tasks(st: SlideState, chunk: int, patch: int, first_id: int = 0):
    """The slide's read tasks, `chunk` patches each, ids counting from `first_id`."""
    for i, row0 in enumerate(range(0, len(st.coords), chunk)):
        yield ReadTask(first_id + i, str(st.job.path), st.level, st.read_size, patch,
                       st.coords[row0 : row0 + chunk], row0, st.page, st.downsample, st.gpu)


@dataclass
class _Pending:
    chunks: list = field(default_factory=list)  # (state, row0, n, slot)
    n: int = 0


@dataclass(frozen=True)
class SteadyRate:
    """Whether the device was fed: patches after the first (warm-up) batch over the time
    since, and how long the main thread waited for reads (the device starved) or for the
    device (as it should)."""

    n: int
    secs: float
    wait_readers: float
    wait_device: float

    @property
    def per_s(self) -> float:
        return self.n / self.secs if self.secs > 0 else 0.0


def pipeline(todo, cfg: ExtractConfig, tile_cfg: TileConfig, runner: DeviceRunner,
             batch: int, attrs: dict, report: Report, counts: dict[str, int]) -> SteadyRate:
    """Features of every (slide job, coords path) in `todo` on `runner`'s device."""
    chunk = min(cfg.chunk, batch)
    patch = tile_cfg.params.patch_size
    per_batch = math.ceil(batch / chunk)
    n_slots = max(8, 3 * cfg.num_workers) + (2 + HELD_BATCHES) * per_batch
    pool = ReaderPool(cfg.num_workers, chunk, patch, n_slots, runner.device)
    try:
        feeder = BatchFeeder(pool, runner, batch, HELD_BATCHES)
    except BaseException:
        pool.close()
        raise
    writer = FeatureWriter(cfg, runner.cfg.dim, attrs, report, counts, str(runner.device))
    writer.start()
    states: list[SlideState] = []
    tasks = _task_stream(todo, chunk, batch, tile_cfg.params, cfg, runner.device, writer,
                         states)
    inflight: dict[int, tuple[SlideState, int, int]] = {}
    ahead = n_slots + cfg.num_workers  # queued tasks: enough to keep every reader busy
    pend, exhausted = _Pending(), False
    waits = {"readers": 0.0, "device": 0.0}
    try:
        while True:
            while not exhausted and len(inflight) < ahead and (cfg.num_workers > 0 or len(
                    inflight) + len(pend.chunks) + feeder.held_slots() < n_slots):
                t = next(tasks, None)
                if t is None:
                    exhausted = True
                    break
                task, st = t
                inflight[task.task_id] = (st, task.row0, len(task.coords))
                pool.submit(task)
            if not inflight and not pend.n:
                break
            if inflight:
                t0 = time.perf_counter()
                tid, got, err = pool.get()
                waits["readers"] += time.perf_counter() - t0
                st, row0, n = inflight.pop(tid)
                if err is not None or st.failed:
                    if got is not None:
                        pool.release(got)
                    if err is not None:
                        writer.q.put(("fail", st, f"reading patches: {err}"))
                else:
                    pend.chunks.append((st, row0, n, got))
                    pend.n += n
            if pend.n and (pend.n + chunk > batch or not inflight):
                x, segments = feeder(pend.chunks)
                pend = _Pending()
                feats = runner(x)
                _check_writer(writer)
                t0 = time.perf_counter()
                writer.q.put(("feats", feats, segments))  # blocks while the device is behind
                waits["device"] += time.perf_counter() - t0
    finally:
        if writer.is_alive():
            writer.q.put(None)
            writer.join()
        feeder.close()
        pool.close()
        for st in states:  # after an error: no temporary file is left behind
            if st.writer is not None and not st.done:
                st.writer.abort()
    _check_writer(writer)
    rate = SteadyRate(writer.patches - writer.first_n, writer.last_at - writer.first_at,
                      waits["readers"], waits["device"])
    if rate.n:
        log.info("steady rate: %d patches in %.2f s after the first batch = %.1f patches/s; "
                 "main thread waited %.1f s for readers, %.1f s for the device", rate.n,
                 rate.secs, rate.per_s, rate.wait_readers, rate.wait_device)
    return rate


def _check_writer(writer: FeatureWriter) -> None:
    if writer.error is not None:
        raise RuntimeError(f"writing features failed: {writer.error}") from writer.error


def _task_stream(todo, chunk: int, batch: int, params: TileParams, cfg: ExtractConfig,
                 device: torch.device, writer: FeatureWriter, states: list[SlideState]):
    """Read tasks for every slide in order; a slide's coords are loaded when it is reached."""
    task_id = 0
    for job, cpath in todo:
        t0 = time.perf_counter()
        try:
            st = prepare_slide(job, cpath, params.patch_size, cfg.reader, cfg.decode, device,
                               params.target_mpp)
            st.t0 = t0
            states.append(st)
        except Exception as e:
            st = SlideState(job, np.zeros((0, 2), np.int64), {}, {}, 0, t0=t0)
            writer.q.put(("fail", st, f"before reading: {e}"))
            continue
        if len(st.coords) == 0:
            writer.q.put(("empty", st, None))
            continue
        for task in read_tasks(st, task_size(st, chunk, batch), params.patch_size, task_id):
            if st.failed:
                break
            yield task, st
            task_id += 1
