"""The run report shared by `tile`, `extract` and `classify`: one row per slide, the counts
that set the exit code, the log line for each slide, and progress (a tqdm bar on a terminal,
periodic log lines otherwise).

Reports survive shards, concurrent runs and interruptions:
- each run writes its own report, `OUT/reports/<name>-<time>-<host>-<pid>.running.csv`, row
  by row; it is renamed `….csv` when the run ends, or `….interrupted.csv` (with a row for
  every slide it did not finish) when it is interrupted or stopped by an error; a killed run
  leaves its `.running.csv` with every slide it finished;
- the report under the command's usual name (`tile_report.csv`, `extract_report_<encoder>.csv`,
  `predictions.csv`) is a merged view, rebuilt from every run's report when a run ends: each
  slide's latest status (a later "skipped" or "interrupted" does not hide an earlier "ok").
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import WsiEmbedError, one_line
from .h5io import atomic_file, remove_stale_tmp

log = logging.getLogger(__name__)

STATUSES = ("ok", "skipped", "failed", "interrupted")
#: seconds between progress lines when there is no terminal to draw a bar on
LOG_EVERY = 30.0
RUNNING, INTERRUPTED = ".running.csv", ".interrupted.csv"


class ReportError(WsiEmbedError):
    """The run report cannot be written: the run stops (what is finished stays)."""


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
    """Rows, counts, logging and progress of one command's run over a batch of slides;
    `merged` is the report's usual path (the merged view of every run)."""

    def __init__(self, merged: Path, columns: list[str], desc: str):
        self.path, self.columns, self.desc = merged, columns, desc
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.run_dir = merged.parent / "reports"
        self.run_path = self.run_dir / (f"{merged.stem}-{stamp}-{socket.gethostname()}-"
                                        f"{os.getpid()}{RUNNING}")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(merged.parent)  # merged views of killed runs
            self._fh = open(self.run_path, "w", newline="")
            self._w = csv.DictWriter(self._fh, columns, extrasaction="ignore")
            self._w.writeheader()
            self._fh.flush()
        except OSError as e:
            raise ReportError(f"cannot write the run report {self.run_path}: {e}") from None
        self.rows: list[dict] = []
        self.counts = dict.fromkeys(STATUSES, 0)
        self._lock = threading.Lock()
        self._expected: list[str] = []  # slide ids, for progress and interrupted rows
        self._bar = None
        self._patches = self._patches_done = 0
        self._t0 = self._next_log = 0.0
        self.closed = False

    # -- progress --------------------------------------------------------------------------
    def expect(self, slide_ids: list[str]) -> None:
        """The slides this run will report on (progress counts them)."""
        self._expected = list(slide_ids)
        self._start_progress()

    def expect_patches(self, patches: int) -> None:
        """Progress counted in patches from now on (extract)."""
        self._patches = patches
        self._start_progress()

    def _start_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._t0 = time.perf_counter()
        self._next_log = self._t0 + LOG_EVERY
        self._bar = progress_bar(self._patches or len(self._expected), self.desc,
                                 unit="patch" if self._patches else "slide")

    def advance(self, patches: int) -> None:
        """`patches` more patches are done (extract's progress)."""
        with self._lock:
            self._patches_done += patches
            if self._bar is not None:
                self._bar.update(patches)
            elif self._patches and time.perf_counter() >= self._next_log:
                self._next_log = time.perf_counter() + LOG_EVERY
                secs = time.perf_counter() - self._t0
                rate = self._patches_done / secs if secs > 0 else 0.0
                left = (self._patches - self._patches_done) / rate if rate > 0 else 0.0
                log.info("%s: %d/%d slides, %d/%d patches, %.1f patches/s, ETA %s", self.desc,
                         self._done(), len(self._expected), self._patches_done, self._patches,
                         rate, clock(left))

    def _done(self) -> int:
        return sum(self.counts.values())

    # -- rows --------------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        """Record one slide's row: CSV, counts, log and progress."""
        with self._lock:
            status = row.get("status", "failed")
            self.counts[status if status in self.counts else "failed"] += 1
            self.rows.append(row)
            try:
                self._w.writerow(row)
                self._fh.flush()
            except OSError as e:
                raise ReportError(f"cannot write the run report {self.run_path} ({e}): the run "
                                  "stops here; finished slides are kept, free space and "
                                  "rerun to do the rest") from None
            sid = row.get("slide_id", "?")
            if status == "failed":
                log.error("%s failed: %s", sid, row.get("error", ""))
            elif row.get("warning"):
                log.warning("%s: %s", sid, row["warning"])
            if self._bar is not None:
                if self._patches:
                    self._bar.set_postfix_str(f"slides {self._done()}/{len(self._expected)}")
                else:
                    self._bar.update(1)
            else:
                took = row.get("seconds", "")
                log.info("[%d/%d] %s %s%s", self._done(),
                         max(len(self._expected), self._done()), sid, status,
                         f" ({took}s)" if took != "" else "")

    def close(self, stopped_by: str | None = None) -> None:
        """End the run's report (with a row for each unfinished slide when the run was
        `stopped_by` something) and rebuild the merged view. Once; later calls do nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if stopped_by:
            done = {r.get("slide_id") for r in self.rows}
            for sid in self._expected:
                if sid not in done:
                    self.add({"slide_id": sid, "status": "interrupted",
                              "error": f"the run was stopped ({stopped_by}) before this "
                                       "slide was done; rerun to resume"})
        self._fh.close()
        if not self.rows and not self._expected:  # refused before any slide: no run to show
            self.run_path.unlink(missing_ok=True)
            return
        final = self.run_path.name[: -len(RUNNING)] + (INTERRUPTED if stopped_by else ".csv")
        os.replace(self.run_path, self.run_path.with_name(final))
        self.run_path = self.run_path.with_name(final)
        write_merged(self.path, self.columns)

    def __enter__(self) -> RunReport:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close(f"stopped by an error: {one_line(exc)[:200]}")

    def summary(self) -> str:
        c = self.counts
        n = self._done()
        empty = sum(1 for r in self.rows
                    if r.get("status") == "ok" and str(r.get("n_patches", "")) == "0")
        return (f"{n} slide{'' if n == 1 else 's'}: {c['ok']} done"
                + (f" ({empty} with no patches: see their warnings)" if empty else "")
                + f", {c['skipped']} already done, {c['failed']} failed; report: {self.path} "
                f"(this run: {self.run_path.name})")


def plural(n: int, word: str) -> str:
    """'1 slide', '2 slides'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def clock(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min: an ETA a person reads at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# -- the merged view -------------------------------------------------------------------------
def run_reports(merged: Path) -> list[Path]:
    """Every run's report behind `merged`, oldest first (names start with their UTC time)."""
    folder = merged.parent / "reports"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{merged.stem}-*.csv")
                  if p.name[len(merged.stem) + 1:][:1].isdigit())


def merge_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Each slide's latest row over the run reports `paths` (oldest first), and the columns
    they hold. A later "skipped" (done before) or "interrupted" does not hide an "ok"."""
    latest: dict[str, dict] = {}
    columns: list[str] = []
    for p in paths:
        try:
            with open(p, newline="") as fh:
                reader = csv.DictReader(fh)
                columns += [c for c in reader.fieldnames or [] if c not in columns]
                rows = list(reader)
        except (OSError, csv.Error):
            continue
        for r in rows:
            sid, status = r.get("slide_id"), r.get("status")
            if not sid or status not in STATUSES:  # a row being written, or damage
                continue
            prev = latest.get(sid)
            if prev is not None and prev["status"] == "ok" and status in ("skipped",
                                                                           "interrupted"):
                continue
            latest[sid] = {**r, "run": p.name}
    return [latest[k] for k in sorted(latest)], columns + ["run"]


def run_state(path: Path) -> str:
    """How a run ended, from its report's name: finished, interrupted, running, or killed (a
    `.running.csv` whose process on this host is gone)."""
    from .claims import pid_alive

    if path.name.endswith(INTERRUPTED):
        return "interrupted"
    if not path.name.endswith(RUNNING):
        return "finished"
    m = re.fullmatch(r".+-\d{8}T\d+Z-(.+)-(\d+)", path.name[: -len(RUNNING)])
    if m and m.group(1) == socket.gethostname() and not pid_alive(int(m.group(2))):
        return "killed"
    return "running"


def status_lines(out: Path) -> list[str]:
    """`wsi-embed status OUT`: for each report, each slide's latest status counted, then
    every run with how it ended."""
    lines = []
    stems = sorted({p.name.split("-")[0] for p in (out / "reports").glob("*.csv")})
    for stem in stems:
        runs = run_reports(out / f"{stem}.csv")
        rows, _ = merge_rows(runs)
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        lines.append(f"{stem}: {len(rows)} slide{'' if len(rows) == 1 else 's'}: " + ", ".join(
            f"{n} {s}" for s, n in counts.items() if n))
        lines += [f"  {run_state(p):11} {p.name}" for p in runs]
    return lines or [f"no run reports in {out / 'reports'}"]


#: rebuilds of the merged view while other runs keep ending (each end renames its report)
MERGE_ATTEMPTS = 20


def write_merged(merged: Path, columns: list[str]) -> None:
    """Rebuild the merged view, atomically, until no run ended while it was being rebuilt.
    Shards of an array often end together: a run that read the run reports before another
    run's final rows, then renamed its view into place after that run's rebuild, would hide
    those rows. A run's report is final once renamed, so an unchanged list of names after the
    write means the view holds every ended run. No file lock: they fail on some cluster file
    systems."""
    runs = run_reports(merged)
    for _ in range(MERGE_ATTEMPTS):
        rows, have = merge_rows(runs)
        cols = columns + [c for c in have if c not in columns]
        try:
            with atomic_file(merged) as tmp, open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        except OSError as e:
            raise ReportError(f"cannot write the merged report {merged}: {e}") from None
        now = run_reports(merged)
        if [p.name for p in now] == [p.name for p in runs]:
            return
        runs = now
