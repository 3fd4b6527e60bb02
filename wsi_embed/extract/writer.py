"""The writer thread of `extract`: moves features to the host and streams them into each
slide's temporary features file at their row offsets, then renames the finished file into
place and reports the slide. `SlideOutput` is the only mutable per-slide state."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import h5io
from ..claims import Claim
from ..errors import one_line
from ..report import RunReport, slide_row
from .config import ExtractConfig
from .plan import SlidePlan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SlideOutput:
    """A slide between its first read and its report row."""

    plan: SlidePlan
    t0: float
    remaining: int
    claim: Claim | None = None  # on the features file, released when the slide ends
    file: h5io.FeaturesWriter | None = None
    failed: str = ""
    done: bool = False

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def row(self, status: str, **kw) -> dict:
        return slide_row(self.plan.job, status, self.t0, **kw)


#: what travels on the writer's queue: ("feats", features on the device, segments of
#: (output, first row, rows, offset in the batch)), ("fail", output, error) or ("empty",
#: output, None); None ends the thread

#: the attrs of a features file that must match this run's for it to count as done
PROVENANCE = ("encoder", "weights", "precision", "feature_dtype")


def resume_status(path, attrs: dict, overwrite: bool) -> str | None:
    """`h5io.resume_status` for a features file of a run recording `attrs`."""
    return h5io.resume_status(path, h5io.FEATURES_SCHEMA, {k: attrs[k] for k in PROVENANCE},
                              overwrite)


class FeatureWriter(threading.Thread):
    """Streams features into each slide's temporary HDF5 and finalises it when complete."""

    def __init__(self, cfg: ExtractConfig, dim: int, attrs: dict, report: RunReport,
                 device: str = ""):
        super().__init__(daemon=True)
        self.cfg, self.dim, self.attrs, self.report, self.device = cfg, dim, attrs, report, device
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.outputs: list[SlideOutput] = []  # every slide begun, to clean up after an error
        # for the steady rate after the first batch (its time includes warm-up)
        self.patches = self.first_n = 0
        self.first_at = self.last_at = 0.0

    def begin(self, plan: SlidePlan, t0: float, held: Claim | None = None) -> SlideOutput:
        out = SlideOutput(plan, t0, plan.n, held)
        self.outputs.append(out)
        return out

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
            self.fail(payload, segments)
            return
        if kind == "empty":
            try:
                self._open(payload)
                self._finish(payload)
            except h5io.WRITE_ERRORS as e:
                self.fail(payload, self._write_error(payload, e))
            return
        feats = payload.float().cpu().numpy()
        self._count(len(feats))
        if not np.isfinite(feats).all():
            for out, _, n, off in segments:  # fail records each slide once
                if not np.isfinite(feats[off : off + n]).all():
                    self.fail(out, "non-finite features (NaN/Inf): try --precision fp32")
        for out, row0, n, off in segments:
            if out.failed:
                continue
            try:
                if out.file is None:
                    self._open(out)
                out.file.write(row0, feats[off : off + n])
                out.remaining -= n
                if out.remaining == 0:
                    self._finish(out)
            except h5io.WRITE_ERRORS as e:  # a full disk or a file-size limit: this slide
                self.fail(out, self._write_error(out, e))
        self.report.advance(len(feats))

    def _write_error(self, out: SlideOutput, e: Exception) -> str:
        path = self.cfg.layout.features(self.cfg.encoder, out.plan.job.slide_id)
        return (f"cannot write {path} ({one_line(e)[:300]}): free disk space (or raise the "
                "file-size limit) and rerun")

    def _count(self, n: int) -> None:
        self.last_at = time.perf_counter()
        if not self.patches:
            self.first_at, self.first_n = self.last_at, n
        self.patches += n

    def _open(self, out: SlideOutput) -> None:
        p = out.plan
        out.file = h5io.FeaturesWriter(
            self.cfg.layout.features(self.cfg.encoder, p.job.slide_id), p.n, self.dim,
            self.cfg.dtype.numpy_dtype, p.coords, p.coords_attrs, {**p.root_attrs, **self.attrs})

    def _finish(self, out: SlideOutput) -> None:
        out.file.commit()
        out.done = True
        out.release()
        secs = time.perf_counter() - out.t0
        n = out.plan.n
        self.report.add(out.row("ok", n_patches=n, reader=_reader(out), device=self.device,
                                patches_per_s=round(n / secs, 1) if secs > 0 else "",
                                warning=out.plan.warning))

    def fail(self, out: SlideOutput, error: str) -> None:
        if out.failed or out.done:
            return
        out.failed = error
        if out.file is not None:
            out.file.abort()
        out.release()
        self.report.add(out.row("failed", error=error, reader=_reader(out)))

    def abort_unfinished(self) -> None:
        """After an error: no temporary file is left behind."""
        for out in self.outputs:
            if out.file is not None and not out.done:
                out.file.abort()
            out.release()


def _reader(out: SlideOutput) -> str:
    src = out.plan.source
    return src.describe() if src is not None else ""
