"""Batch runs: finding slides, slide lists, shards, and a run loop that survives bad slides.

Every per-slide failure becomes a report row; a worker process that dies (a segfault in a
slide library on a corrupt file) costs only the slide it was on.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .h5io import tmp_path
from .layout import check_slide_id
from .report import RunReport, slide_row
from .slides import SLIDE_EXTENSIONS, dicom_series_uid, mpp_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch: where it is, its id, and a per-slide MPP from the slide list."""

    path: Path
    slide_id: str
    mpp: float | None = None
    size: int = 0
    #: the slide list's per-slide tissue choice: auto, none, no-pen (auto without the pen
    #: filter); or a mask file in `tissue_mask`
    tissue: str | None = None
    tissue_mask: Path | None = None


def parse_extensions(ext: str | None) -> tuple[str, ...]:
    if not ext:
        return SLIDE_EXTENSIONS
    return tuple("." + e.strip().lower().lstrip(".") for e in ext.split(",") if e.strip())


def discover(inputs: Iterable[Path], slide_list: Path | None = None, recursive: bool = False,
             extensions: tuple[str, ...] = SLIDE_EXTENSIONS) -> list[SlideJob]:
    """Slides from files, folders and a CSV slide list; ids are file stems and must be unique."""
    jobs: list[SlideJob] = []
    for p in inputs:
        p = Path(p)
        if p.is_file():
            jobs.append(SlideJob(p, check_slide_id(p.stem, str(p)), size=p.stat().st_size))
        elif p.is_dir():
            found = sorted(p.rglob("*") if recursive else p.iterdir())
            # a link that leads nowhere (broken, or a loop) is kept: its slide fails with a
            # row saying so, rather than vanishing from the batch
            files = [f for f in found if (f.is_file() or _dead_link(f))
                     and not f.name.startswith(".") and f.suffix.lower() in extensions]
            if not files:
                raise UsageError(f"no slides ({', '.join(extensions)}) found in folder {p}"
                                 + ("" if recursive else "; use --recursive for subfolders"))
            jobs += [SlideJob(f, check_slide_id(f.stem, str(f)),
                              size=0 if _dead_link(f) else f.stat().st_size) for f in files]
        else:
            raise UsageError(f"no such file or folder: {p}")
    jobs = one_job_per_dicom_series(jobs)
    if slide_list is not None:
        jobs += read_slide_list(slide_list)
    if not jobs:
        raise UsageError("no slides given: pass files, folders or --slide-list CSV")
    seen: dict[str, Path] = {}
    for j in jobs:
        if j.slide_id in seen:
            raise UsageError(f"duplicate slide id {j.slide_id!r}: {seen[j.slide_id]} and "
                             f"{j.path}. Give distinct 'slide_id' values in a --slide-list CSV.")
        seen[j.slide_id] = j.path
    return jobs


def one_job_per_dicom_series(jobs: list[SlideJob]) -> list[SlideJob]:
    """Fold the .dcm files of one DICOM slide into one job. Without this a slide stored as a
    series (a file per level) would be done once per file, under as many ids, since OpenSlide
    opens the whole series from any of its files. The job reads the largest file (level 0)
    and, slide ids being file stems, takes that file's stem as its id."""
    by_dir: dict[Path, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        if j.path.suffix.lower() == ".dcm":
            by_dir[j.path.parent.resolve()].append(i)
    folded: set[int] = set()
    merged: dict[int, SlideJob] = {}  # at its first file's place
    for folder, idx in by_dir.items():
        if len(idx) < 2:
            continue
        series: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            uid = dicom_series_uid(jobs[i].path)
            if uid is not None:  # else left as it is: tiling it says why it cannot be read
                series[uid].append(i)
        for uid, members in series.items():
            if len(members) < 2:
                continue
            level0 = jobs[max(members, key=lambda i: (jobs[i].size, -i))]
            merged[members[0]] = SlideJob(level0.path, level0.slide_id,
                                          size=sum(jobs[i].size for i in members))
            folded.update(members)
            log.info("%s: %d DICOM files of one slide (series %s) done as one, %r", folder,
                     len(members), uid, merged[members[0]].slide_id)
    return [merged.get(i, j) for i, j in enumerate(jobs) if i not in folded or i in merged]


#: values of a slide list's `tissue` column, besides a mask file
TISSUE_CHOICES = ("auto", "none", "no-pen")
MASK_SUFFIXES = (".png", ".geojson", ".json")


def read_slide_list(path: Path) -> list[SlideJob]:
    """CSV with a `path` column and optional `slide_id`, `mpp` and `tissue` (auto, none,
    no-pen, or a mask file); relative paths are taken from the CSV's folder."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
            cols = [c.strip() for c in (rows[0].keys() if rows else [])]
    except OSError as e:
        raise UsageError(f"cannot read slide list {path}: {e}") from e
    if "path" not in cols:
        have = ", ".join(cols) or "none"
        raise UsageError(f"slide list {path} has no 'path' column (columns: {have}); "
                         "expected path[,slide_id][,mpp][,tissue]")
    jobs = []
    for i, r in enumerate(rows, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
        p = Path(r["path"])
        if not p.is_absolute():
            p = path.parent / p
        if not p.is_file():
            raise UsageError(f"slide list {path}, line {i}: no such file {p}")
        mpp = None
        if r.get("mpp"):
            try:
                mpp = float(r["mpp"])
            except ValueError:
                raise UsageError(f"slide list {path}, line {i}: mpp {r['mpp']!r} is not a "
                                 "number") from None
            why = mpp_problem(mpp)
            if why:
                raise UsageError(f"slide list {path}, line {i}: mpp {mpp:g} {why}")
        sid = check_slide_id(r.get("slide_id") or p.stem, f"slide list {path}, line {i}")
        tissue, mask = _tissue_cell(r.get("tissue", ""), path, i)
        jobs.append(SlideJob(p, sid, mpp, p.stat().st_size, tissue, mask))
    return jobs


def _tissue_cell(cell: str, csv_path: Path, line: int) -> tuple[str | None, Path | None]:
    """A `tissue` cell: (choice, None), (None, mask file) or (None, None) when empty."""
    if not cell:
        return None, None
    if cell.lower() in TISSUE_CHOICES:
        return cell.lower(), None
    mask = Path(cell) if Path(cell).is_absolute() else csv_path.parent / cell
    if mask.suffix.lower() in MASK_SUFFIXES and mask.is_file():
        return None, mask
    raise UsageError(f"slide list {csv_path}, line {line}: tissue {cell!r} is neither "
                     f"{', '.join(TISSUE_CHOICES)} nor a mask file ({', '.join(MASK_SUFFIXES)})"
                     + ("" if mask.suffix.lower() not in MASK_SUFFIXES else f": no file {mask}"))


def _dead_link(f: Path) -> bool:
    """A symbolic link whose target does not exist (or a loop of links)."""
    return f.is_symlink() and not f.exists()


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def take_shard(jobs: list[SlideJob], shard: tuple[int, int]) -> list[SlideJob]:
    """A deterministic share: every n-th slide in slide-id order, from the i-th."""
    i, n = shard
    return sorted(jobs, key=lambda j: j.slide_id)[i::n]


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tmp_path(out / "write-test")
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output folder {out} cannot be written: {e}") from e


#: default per-slide time limit (seconds): generous, it only catches a slide that hangs
SLIDE_TIMEOUT = 1800.0


def run_batch(jobs: list[SlideJob], fn: Callable[[SlideJob], dict], report: RunReport,
              num_workers: int = 1, timeout: float | None = SLIDE_TIMEOUT) -> None:
    """Run `fn` on each slide (in `num_workers` processes; 0 = in this process) and record one
    row per slide. `fn` turns its own errors into rows; a crashed worker is retried alone; a
    slide still running after `timeout` seconds fails and its worker is replaced (in worker
    processes: an in-process call cannot be stopped)."""
    report.expect([j.slide_id for j in jobs])
    if num_workers <= 0:
        for job in jobs:
            report.add(fn(job))
        return
    crashed = _run_pool(jobs, fn, num_workers, report.add, timeout)
    for job in crashed:  # alone, so a second crash can only be this slide's fault
        for j in _run_pool([job], fn, 1, report.add, timeout):
            report.add(slide_row(j, "failed", time.perf_counter(), error="the worker "
                                 "process crashed reading this slide (corrupt file or a "
                                 "bug in the slide library)"))


def _run_pool(jobs: list[SlideJob], fn, num_workers: int, record,
              timeout: float | None) -> list[SlideJob]:
    """`fn` over `jobs` in a pebble process pool; the jobs whose worker crashed."""
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures import as_completed

    from pebble import ProcessExpired, ProcessPool

    crashed: list[SlideJob] = []
    pool = ProcessPool(max_workers=min(num_workers, len(jobs)),
                       context=mp.get_context("spawn"), initializer=_init_worker,
                       initargs=(logging.getLogger().level, os.getpid()))
    try:
        futures = {pool.schedule(fn, args=(j,), timeout=timeout): j for j in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                record(fut.result())
            except FutureTimeout:
                record(slide_row(job, "failed", time.perf_counter(), seconds=timeout,
                                 error=f"still running after --slide-timeout {timeout:g} s: "
                                 "stopped (its worker was replaced); a file that lies about "
                                 "its size, or raise --slide-timeout for huge slides"))
            except ProcessExpired:
                crashed.append(job)
    except BaseException:
        pool.stop()  # interrupted: no worker goes on with its slide
        pool.join()
        raise
    pool.close()
    pool.join()
    return crashed


def _init_worker(level: int, parent: int) -> None:
    become_worker(parent)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


#: seconds between a worker's checks that its parent is alive
PARENT_POLL = 0.5


def become_worker(parent: int) -> None:
    """In a worker process (tile workers, readers, device processes) started by process
    `parent`: leave Ctrl-C to the parent, and end as soon as that parent is gone.

    Ctrl-C signals the whole process group; the parent stops the workers and writes the
    reports, so a worker's own KeyboardInterrupt would only print a traceback per worker.
    A main process killed with SIGKILL runs no cleanup, and its workers would otherwise live
    on (holding memory and shared-memory slots) with nobody to serve. A thread polls the
    parent's pid, which works whatever thread started the worker; the pid comes from the
    parent, since the parent may already be gone while a worker is still importing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

