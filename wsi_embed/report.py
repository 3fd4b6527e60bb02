"""The run report shared by `tile`, `extract` and `classify`: one row per slide, the counts
that set the exit code, the log line for each slide, and progress (a tqdm bar on a terminal,
periodic log lines otherwise).

The CSV is written row by row to a hidden temporary file and renamed into place by `close`,
so a report under its final name is always a finished one.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import threading
import time
from pathlib import Path

from .h5io import tmp_path

log = logging.getLogger(__name__)

STATUSES = ("ok", "skipped", "failed")
#: seconds between progress lines when there is no terminal to draw a bar on
LOG_EVERY = 30.0


def progress_bar(total: int, desc: str, unit: str = "slide", leave: bool = True):
    """A tqdm bar on a terminal; None otherwise (batch logs stay plain lines)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, unit_scale=unit != "slide")
    return None


def slide_row(job, status: str, t0: float, **kw) -> dict:
    """A report row for one slide job (`batch.SlideJob`) begun at `t0` (perf_counter)."""
    return {"slide_id": job.slide_id, "path": str(job.path), "status": status,
            "seconds": round(time.perf_counter() - t0, 3), "error": "", "warning": "", **kw}


class RunReport:
    """Rows, counts, logging and progress of one command's run over a batch of slides."""

    def __init__(self, path: Path, columns: list[str], desc: str):
        self.path, self.columns, self.desc = path, columns, desc
        self.tmp = tmp_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "w", newline="")
        self._w = csv.DictWriter(self._fh, columns, extrasaction="ignore")
        self._w.writeheader()
        self.rows: list[dict] = []
        self.counts = dict.fromkeys(STATUSES, 0)
        self._lock = threading.Lock()
        self._slides = 0  # expected rows, for progress
        self._bar = None
        self._patches = self._patches_done = 0
        self._t0 = self._next_log = 0.0

    # -- progress --------------------------------------------------------------------------
    def expect(self, slides: int, patches: int = 0) -> None:
        """Start progress over `slides` slides, counted in patches when `patches` > 0."""
        self._slides, self._patches = slides, patches
        self._t0 = time.perf_counter()
        self._next_log = self._t0 + LOG_EVERY
        self._bar = progress_bar(patches or slides, self.desc,
                                 unit="patch" if patches else "slide")

    def advance(self, patches: int) -> None:
        """`patches` more patches are done (extract's progress)."""
        with self._lock:
            self._patches_done += patches
            if self._bar is not None:
                self._bar.update(patches)
            elif self._patches and time.perf_counter() >= self._next_log:
                self._next_log = time.perf_counter() + LOG_EVERY
                secs = time.perf_counter() - self._t0
                log.info("%s: %d/%d slides, %d/%d patches, %.0f patches/s", self.desc,
                         self._done(), self._slides, self._patches_done, self._patches,
                         self._patches_done / secs if secs > 0 else 0.0)

    def _done(self) -> int:
        return sum(self.counts.values())

    # -- rows --------------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        """Record one slide's row: CSV, counts, log and progress."""
        with self._lock:
            status = row.get("status", "failed")
            self.counts[status if status in self.counts else "failed"] += 1
            self.rows.append(row)
            self._w.writerow(row)
            self._fh.flush()
            sid = row.get("slide_id", "?")
            if status == "failed":
                log.error("%s failed: %s", sid, row.get("error", ""))
            elif row.get("warning"):
                log.warning("%s: %s", sid, row["warning"])
            if self._bar is not None:
                if self._patches:
                    self._bar.set_postfix_str(f"slides {self._done()}/{self._slides}")
                else:
                    self._bar.update(1)
            else:
                log.info("[%d/%d] %s %s (%ss)", self._done(), self._slides or self._done(),
                         sid, status, row.get("seconds", ""))

    def close(self) -> None:
        """Rename the finished report into place (once; later calls do nothing)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if not self._fh.closed:
                self._fh.close()
                os.replace(self.tmp, self.path)

    def __enter__(self) -> RunReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> str:
        c = self.counts
        return (f"{self._done()} slides: {c['ok']} done, {c['skipped']} already done, "
                f"{c['failed']} failed; report: {self.path}")
