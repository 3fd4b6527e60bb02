"""The hot loop of `extract` on one device: read tasks out to the reader pool, finished chunks
packed into batches on the device, the encoder on each batch, features to the writer.

Chunks of the next slide are queued while the current one finishes, so the device never
waits at slide boundaries. Host memory is bounded by the slots and a short queue, whatever
the slide size.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..batch import SlideJob, become_worker
from ..claims import claim
from ..errors import WsiEmbedError, describe_error
from ..report import RunReport, slide_row
from ..tiling import TileParams
from .config import ExtractConfig
from .device import BatchFeeder, DeviceRunner
from .plan import plan_slide
from .sources import ReaderPool, ReadTask
from .writer import FeatureWriter, SlideOutput, resume_status

log = logging.getLogger(__name__)

HELD_BATCHES = 2  # batches whose slots may wait for their copy to the device to finish


@dataclass
class _Pending:
    chunks: list = field(default_factory=list)  # (output, row0, n, chunk)
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


def pipeline(todo: Iterable[tuple[SlideJob, Path]], cfg: ExtractConfig, params: TileParams,
             runner: DeviceRunner, batch: int, attrs: dict, report: RunReport) -> SteadyRate:
    """Features of every (slide job, coords path) in `todo` on `runner`'s device."""
    chunk = min(cfg.chunk, batch)
    per_batch = math.ceil(batch / chunk)
    n_slots = max(8, 3 * cfg.num_workers) + (2 + HELD_BATCHES) * per_batch
    pool = ReaderPool(cfg.num_workers, chunk, params.patch_size, n_slots, runner.device,
                      initializer=functools.partial(become_worker, os.getpid()),
                      task_timeout=cfg.slide_timeout)
    try:
        feeder = BatchFeeder(pool, runner, batch, HELD_BATCHES)
    except BaseException:
        pool.close()
        raise
    writer = FeatureWriter(cfg, runner.cfg.dim, attrs, report, str(runner.device))
    writer.start()
    tasks = _task_stream(todo, chunk, batch, params, cfg, runner, writer)
    inflight: dict[int, tuple[SlideOutput, int, int]] = {}
    ahead = n_slots + cfg.num_workers  # queued tasks: enough to keep every reader busy
    pend, exhausted = _Pending(), False
    waits = {"readers": 0.0, "device": 0.0}
    try:
        while True:
            while not exhausted and len(inflight) < ahead and pool.can_submit():
                t = next(tasks, None)
                if t is None:
                    exhausted = True
                    break
                task, out = t
                inflight[task.task_id] = (out, task.row0, len(task.coords))
                pool.submit(task)
            if not inflight and not pend.n:
                break
            if inflight:
                t0 = time.perf_counter()
                res = pool.get()
                waits["readers"] += time.perf_counter() - t0
                out, row0, n = inflight.pop(res.task_id)
                if res.chunk is None:
                    writer.q.put(("fail", out, f"reading patches: {res.error}"))
                elif out.failed:
                    pool.release(res.chunk)
                else:
                    pend.chunks.append((out, row0, n, res.chunk))
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
        writer.abort_unfinished()
    _check_writer(writer)
    rate = SteadyRate(writer.patches - writer.first_n, writer.last_at - writer.first_at,
                      waits["readers"], waits["device"])
    if rate.n:
        log.info("steady rate: %d patches in %.2f s after the first batch = %.1f patches/s; "
                 "main thread waited %.1f s for readers, %.1f s for the device", rate.n,
                 rate.secs, rate.per_s, rate.wait_readers, rate.wait_device)
    return rate


def _check_writer(writer: FeatureWriter) -> None:
    if isinstance(writer.error, WsiEmbedError):  # the report cannot be written
        raise writer.error
    if writer.error is not None:
        raise RuntimeError(f"writing features failed: {writer.error}") from writer.error


def _task_stream(todo: Iterable[tuple[SlideJob, Path]], chunk: int, batch: int,
                 params: TileParams, cfg: ExtractConfig, runner: DeviceRunner,
                 writer: FeatureWriter) -> Iterator[tuple[ReadTask, SlideOutput]]:
    """Read tasks for every slide in order; a slide is planned when it is reached."""
    task_id = 0
    for job, coords_file in todo:
        t0 = time.perf_counter()
        features = cfg.layout.features(cfg.encoder, job.slide_id)
        held = claim(features)
        if isinstance(held, str):
            writer.report.add(slide_row(job, "skipped", t0, warning=held))
            continue
        try:
            if resume_status(features, writer.attrs, cfg.overwrite):
                held.release()  # finished by another run meanwhile
                writer.report.add(slide_row(job, "skipped", t0))
                continue
            plan = plan_slide(job, coords_file, params, cfg.reader, cfg.decode, runner.device,
                              cfg.max_plain_pixels)
        except Exception as e:  # noqa: BLE001 - the slide fails, the run goes on
            held.release()
            writer.report.add(slide_row(job, "failed", t0,
                                        error=f"before reading: {describe_error(e)}"))
            continue
        out = writer.begin(plan, t0, held)
        if plan.source is None:
            writer.q.put(("empty", out, None))
            continue
        size = plan.source.task_size(chunk, batch)
        for row0 in range(0, plan.n, size):
            if out.failed:
                break
            yield ReadTask(task_id, plan.source, plan.coords[row0 : row0 + size], row0), out
            task_id += 1
