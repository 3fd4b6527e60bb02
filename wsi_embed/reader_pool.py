"""Reading patches for `extract`: persistent reader processes filling shared-memory slots.

Why it survives a dead reader: a native crash while decoding one odd slide (OpenSlide or a
codec hitting a corrupt tile) or the kernel's OOM killer ends a reader process. Without care
that would stall or end the whole run, and a rerun would die on the same slide again. Here
each reader notes in shared memory which task and slot it holds; when one dies the pool
kills the others, rebuilds its queues (a process killed inside a queue call can leave the
queue's lock held), frees every slot the main process does not hold, and queues again every
task that had no result yet. The slide the dead reader was reading gets one more try (the
OOM killer may have picked a reader whose slide was innocent); a slide whose reads kill a
reader a second time fails, with all its tasks at once, so a slide that crashes its decoder
costs two restarts, not one per queued task.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .fast_reader import TiffTileReader
from .gpu_decode import DecodeThread
from .slides import Slide, open_slide
from .tiling import describe_error

log = logging.getLogger(__name__)

READY = (-1, None, None)
CHECK_EVERY = 5.0  # seconds between checks that every reader is alive
MAX_DEATHS = 2  # reader deaths while reading one slide before that slide fails


@dataclass(frozen=True)
class ReadTask:
    task_id: int
    path: str
    level: int
    read_size: int
    patch_size: int
    coords: np.ndarray  # (n, 2) level-0
    row0: int
    page: int = -1  # ≥ 0: read raw tiles of this TIFF page (fast reader); else OpenSlide
    downsample: float = 1.0  # of `level`, for the fast reader's level-0 → level mapping
    gpu: bool = False  # decode the page's JPEG tiles in batches on the device


class PatchReader:
    """Reads patches at a level (OpenSlide, or raw TIFF tiles) and resizes them to
    patch_size; keeps a few slides open."""

    def __init__(self, max_open: int = 4):
        self._open: OrderedDict[tuple, Slide | TiffTileReader] = OrderedDict()
        self.max_open = max_open

    def _handle(self, t: ReadTask) -> Slide | TiffTileReader:
        key = (t.path, t.page)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        h = TiffTileReader(t.path, t.page) if t.page >= 0 else open_slide(t.path)
        self._open[key] = h
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return h

    def read_into(self, t: ReadTask, out: np.ndarray) -> None:
        """Patches of `t` into `out` (n, P, P, 3); the fast reader and the resize write
        straight into it."""
        h = self._handle(t)
        native = t.read_size == t.patch_size
        for i, (x, y) in enumerate(t.coords):
            if t.page >= 0:
                region = h.read_level0(int(x), int(y), t.downsample, t.read_size,
                                       t.read_size, out[i] if native else None)
            else:
                region = h.read_region(int(x), int(y), t.level, t.read_size, t.read_size)
            if not native:
                cv2.resize(region, (t.patch_size, t.patch_size), dst=out[i],
                           interpolation=cv2.INTER_AREA)
            elif t.page < 0:
                out[i] = region

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()


def read_result(reader: PatchReader, task: ReadTask, slots: torch.Tensor, slot: int
                ) -> tuple[int, int | None, str | None]:
    """Fill `slot` with `task`'s patches: (task id, slot, None), or (task id, None, why) with
    the slot left for the caller to free."""
    try:
        reader.read_into(task, slots[slot].numpy())
        return task.task_id, slot, None
    except Exception as e:  # noqa: BLE001 - the slide fails, the run goes on
        return task.task_id, None, describe_error(e)[:1000]


def _reader_main(index: int, task_q, done_q, free_q, slots: torch.Tensor,
                 claims: torch.Tensor) -> None:
    """A reader process: take a task, take a free slot, fill it, say which. `claims[index]`
    holds (task id, slot) while it works on them, for the pool to know if it dies."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    reader = PatchReader()
    claim = claims[index].numpy()
    done_q.put(READY)
    while True:
        task = task_q.get()
        if task is None:
            break
        claim[:] = (task.task_id, -1)
        slot = free_q.get()
        claim[1] = slot
        result = read_result(reader, task, slots, slot)
        if result[1] is None:
            free_q.put(slot)
        done_q.put(result)
        claim[:] = -1
    reader.close()


class ReaderPool:
    """Persistent reader processes sharing a ring of shared-memory slots (or, with
    num_workers == 0, reads in the calling thread for tests and debugging), plus, for tasks
    marked `gpu`, a thread decoding JPEG tiles in batches on `device`. Results of both come
    back through one queue as (task_id, slot | (patches, event) | None, error | None)."""

    def __init__(self, num_workers: int, chunk: int, patch_size: int, n_slots: int,
                 device: torch.device | None = None):
        self.num_workers, self.device = num_workers, device
        self.slots = torch.empty((n_slots, chunk, patch_size, patch_size, 3), dtype=torch.uint8)
        self.results: queue.Queue = queue.Queue()
        self.procs: list = []
        self.decoder: DecodeThread | None = None
        if num_workers == 0:
            self.reader = PatchReader()
            self.free = list(range(n_slots))
            return
        self._ctx = torch.multiprocessing.get_context("spawn")
        self.slots.share_memory_()
        self.claims = torch.full((num_workers, 2), -1, dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self._pending: dict[int, ReadTask] = {}  # submitted to the readers, no result yet
        self._out: set[int] = set()  # slots handed to the caller and not released
        self._deaths: dict[str, int] = {}  # slide path → readers that died reading it
        self._next_check = 0.0
        self._start(set(range(n_slots)))

    # -- reader processes and the thread forwarding their results --------------------------
    def _start(self, free: set[int]) -> None:
        ctx = self._ctx
        self.task_q, self.done_q, self.free_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        for s in sorted(free):
            self.free_q.put(s)
        self.claims.fill_(-1)
        self.procs = [ctx.Process(target=_reader_main, daemon=True,
                                  args=(i, self.task_q, self.done_q, self.free_q, self.slots,
                                        self.claims))
                      for i in range(self.num_workers)]
        for p in self.procs:
            p.start()
        started = 0
        while started < self.num_workers:  # imports take seconds: not counted as slide time
            try:
                started += self.done_q.get(timeout=5.0) == READY
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    self._kill()
                    raise RuntimeError("a reader process died while starting") from None
        self._stop_forward = threading.Event()
        self._forward = threading.Thread(target=self._forward_main, daemon=True,
                                         args=(self.done_q, self._stop_forward))
        self._forward.start()

    def _forward_main(self, done_q, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = done_q.get(timeout=0.2)
            except queue.Empty:
                continue
            self._deliver(item)

    def _deliver(self, item: tuple) -> None:
        task_id, slot, _ = item
        with self._lock:
            if self._pending.pop(task_id, None) is None:
                return  # failed already, when its reader died
            if slot is not None:
                self._out.add(slot)
        self.results.put(item)

    def _kill(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=10)

    def _restart(self, dead: list) -> None:
        """Replace every reader after one died; see the module docstring."""
        # a task counts against its slide only if the reader had begun reading it
        claims = [self.claims[self.procs.index(p)].tolist() for p in dead]
        culprits = {task for task, slot in claims if slot >= 0}
        codes = ", ".join(sorted({f"killed by signal {-p.exitcode}" if p.exitcode < 0 else
                                  f"exit code {p.exitcode}" for p in dead}))
        self._stop_forward.set()
        self._forward.join(timeout=10)
        self._kill()
        while True:  # results already on their way count as results
            try:
                self._deliver(self.done_q.get(timeout=0.2))
            except queue.Empty:
                break
        with self._lock:
            slides = {self._pending[t].path for t in culprits & self._pending.keys()}
            for path in slides:
                self._deaths[path] = self._deaths.get(path, 0) + 1
            bad = {p for p in slides if self._deaths[p] >= MAX_DEATHS}
            failed = sorted(t for t, task in self._pending.items() if task.path in bad)
            for t in failed:
                del self._pending[t]
            again = [self._pending[t] for t in sorted(self._pending)]
            free = set(range(len(self.slots))) - self._out
        log.warning("%d reader process(es) died (%s) reading %s; restarting the readers and "
                    "reading %d task(s) again%s", len(dead), codes,
                    ", ".join(sorted(slides)) or "nothing", len(again),
                    f"; failing {', '.join(sorted(bad))}: a reader died reading it "
                    f"{MAX_DEATHS} times" if bad else "")
        self._start(free)
        for t in failed:
            self.results.put((t, None, f"a reader process died {MAX_DEATHS} times ({codes}) "
                                       "while reading this slide: a crash in the slide's "
                                       "decoder, or the system ran out of memory"))
        for task in again:
            self.task_q.put(task)

    def _check_readers(self) -> None:
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHECK_EVERY
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            self._restart(dead)

    # -- the caller's side ---------------------------------------------------------------
    def submit(self, task: ReadTask) -> None:
        if task.gpu:
            if self.decoder is None:
                self.decoder = DecodeThread(self.device or torch.device("cpu"), self.results)
                self.decoder.start()
            self.decoder.tasks.put(task)
        elif self.num_workers == 0:
            slot = self.free.pop()
            result = read_result(self.reader, task, self.slots, slot)
            if result[1] is None:
                self.free.append(slot)
            self.results.put(result)
        else:
            with self._lock:
                self._pending[task.task_id] = task
            self.task_q.put(task)

    def get(self, timeout: float = 600.0) -> tuple[int, int | tuple | None, str | None]:
        while True:
            if self.procs:
                self._check_readers()
            try:
                return self.results.get(timeout=CHECK_EVERY)
            except queue.Empty:
                if self.decoder is not None and not self.decoder.is_alive():
                    raise RuntimeError("the decode thread died") from None
                timeout -= CHECK_EVERY
                if timeout <= 0:
                    raise RuntimeError("reader processes stalled for 10 minutes") from None

    def release(self, got: int | tuple) -> None:
        """Give back what a result held: a shared-memory slot, or room on the device."""
        if isinstance(got, tuple):
            self.decoder.release()
        elif self.num_workers == 0:
            self.free.append(got)
        else:
            with self._lock:
                self._out.discard(got)
            self.free_q.put(got)

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.stop()
        if self.num_workers == 0:
            self.reader.close()
            return
        for _ in self.procs:
            self.task_q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self._kill()
        self._stop_forward.set()
        self._forward.join(timeout=10)
