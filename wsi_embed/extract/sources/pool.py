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
import os
import queue
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from ...errors import UsageError, describe_error, one_line
from .device_jpeg import DecodeThread
from .host import SourceCache
from .spec import DeviceChunk, HostChunk, ReadResult, ReadTask

log = logging.getLogger(__name__)

READY = ReadResult(-1, None)
CHECK_EVERY = 5.0  # seconds between checks that every reader is alive
MAX_DEATHS = 2  # reader deaths while reading one slide before that slide fails


#: where Linux keeps shared memory (a tmpfs: docker's default is 64 MB)
SHM = "/dev/shm"


def allocate_slots(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """The readers' patch slots, in shared memory when reader processes fill them; a usage
    error saying what to lower when they do not fit (rather than a traceback, or a SIGBUS
    when a full /dev/shm is touched)."""
    need = int(np.prod(shape))
    gib = need / 2**30
    fix = ("lower --batch-size or --num-workers" + (", or give the container more shared "
           "memory (docker run --shm-size=8g)" if shared else ""))
    if shared and os.path.isdir(SHM):
        st = os.statvfs(SHM)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise UsageError(f"the reader slots need {gib:.2f} GiB of shared memory but "
                             f"{SHM} has {free / 2**30:.2f} GiB free: {fix}")
    try:
        slots = torch.empty(shape, dtype=torch.uint8)
        return slots.share_memory_() if shared else slots
    except RuntimeError as e:
        raise UsageError(f"cannot allocate the reader slots ({gib:.2f} GiB"
                         f"{' of shared memory' if shared else ''}: {one_line(e)[:200]}): "
                         f"{fix}") from None


def read_result(sources: SourceCache, task: ReadTask, slots: torch.Tensor, slot: int
                ) -> ReadResult:
    """Fill `slot` with `task`'s patches: a result holding the slot, or one saying why not
    (the slot left for the caller to free)."""
    try:
        sources.read_into(task, slots[slot].numpy())
        return ReadResult(task.task_id, HostChunk(slot))
    except Exception as e:  # noqa: BLE001 - the slide fails, the run goes on
        return ReadResult(task.task_id, None, describe_error(e)[:1000])


def _reader_main(index: int, task_q, done_q, free_q, slots: torch.Tensor,
                 claims: torch.Tensor, began: torch.Tensor,
                 initializer: Callable[[], None] | None) -> None:
    """A reader process: take a task, take a free slot, fill it, say which. `claims[index]`
    holds (task id, slot) while it works on them, and `began[index]` when it took the task,
    for the pool to know if it dies or hangs."""
    if initializer is not None:
        initializer()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    sources = SourceCache()
    claim, began_at = claims[index].numpy(), began[index : index + 1].numpy()
    done_q.put(READY)
    while True:
        task = task_q.get()
        if task is None:
            break
        claim[:] = (task.task_id, -1)
        slot = free_q.get()
        began_at[0] = time.time()
        claim[1] = slot
        result = read_result(sources, task, slots, slot)
        if result.chunk is None:
            free_q.put(slot)
        done_q.put(result)
        claim[:] = -1
        began_at[0] = 0.0
    sources.close()


class ReaderPool:
    """Persistent reader processes sharing a ring of shared-memory slots (or, with
    num_workers == 0, reads in the calling thread for tests and debugging), plus, for tasks
    whose source decodes on the device, a thread decoding JPEG tiles in batches on `device`.
    Results of both come back through one queue as `ReadResult`s."""

    def __init__(self, num_workers: int, chunk: int, patch_size: int, n_slots: int,
                 device: torch.device | None = None,
                 initializer: Callable[[], None] | None = None,
                 task_timeout: float | None = None):
        """`initializer` runs first in every reader process (picklable, as for
        ProcessPoolExecutor); a reader still on one task after `task_timeout` seconds is
        stopped and that task's slide fails (a decoder hung on a damaged file)."""
        self.num_workers, self.device, self.initializer = num_workers, device, initializer
        self.task_timeout = task_timeout
        self.slots = allocate_slots((n_slots, chunk, patch_size, patch_size, 3),
                                    shared=num_workers > 0)
        self.results: queue.Queue[ReadResult] = queue.Queue()
        self.procs: list = []
        self.decoder: DecodeThread | None = None
        if num_workers == 0:
            self.sources = SourceCache()
            self.free = list(range(n_slots))
            return
        self._ctx = torch.multiprocessing.get_context("spawn")
        self.claims = torch.full((num_workers, 2), -1, dtype=torch.int64).share_memory_()
        self.began = torch.zeros(num_workers, dtype=torch.float64).share_memory_()
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
        self.began.zero_()
        self.procs = [ctx.Process(target=_reader_main, daemon=True,
                                  args=(i, self.task_q, self.done_q, self.free_q, self.slots,
                                        self.claims, self.began, self.initializer))
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

    def _deliver(self, item: ReadResult) -> None:
        with self._lock:
            if self._pending.pop(item.task_id, None) is None:
                return  # failed already, when its reader died
            if item.chunk is not None:
                self._out.add(item.chunk.slot)
        self.results.put(item)

    def _kill(self) -> None:
        """Stop the readers and abandon their queues: what is still queued will never be
        read, and a process must not wait at exit to flush it into a full pipe (a Ctrl-C
        with tasks queued would hang there)."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=10)
        for q in (self.task_q, self.done_q, self.free_q):
            q.cancel_join_thread()

    def _restart(self, dead: list, hung: bool = False) -> None:
        """Replace every reader after one died (or hung: then its slide fails at once); see
        the module docstring."""
        # a task counts against its slide only if the reader had begun reading it
        claims = [self.claims[self.procs.index(p)].tolist() for p in dead]
        culprits = {task for task, slot in claims if slot >= 0}
        codes = ("still reading one task after --slide-timeout "
                 f"{self.task_timeout:g} s" if hung else
                 ", ".join(sorted({f"killed by signal {-p.exitcode}" if p.exitcode < 0 else
                                   f"exit code {p.exitcode}" for p in dead})))
        self._stop_forward.set()
        self._forward.join(timeout=10)
        self._kill()
        while True:  # results already on their way count as results
            try:
                self._deliver(self.done_q.get(timeout=0.2))
            except queue.Empty:
                break
        with self._lock:
            slides = {self._pending[t].spec.path for t in culprits & self._pending.keys()}
            for path in slides:
                self._deaths[path] = MAX_DEATHS if hung else self._deaths.get(path, 0) + 1
            bad = {p for p in slides if self._deaths[p] >= MAX_DEATHS}
            failed = sorted(t for t, task in self._pending.items() if task.spec.path in bad)
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
        why = (f"its reader was stopped ({codes}): a decoder hung on this slide, or raise "
               "--slide-timeout" if hung else
               f"a reader process died {MAX_DEATHS} times ({codes}) while reading this slide: "
               "a crash in the slide's decoder, or the system ran out of memory")
        for t in failed:
            self.results.put(ReadResult(t, None, why))
        for task in again:
            self.task_q.put(task)

    def _check_readers(self) -> None:
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHECK_EVERY
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            self._restart(dead)
            return
        if self.task_timeout:
            now = time.time()
            hung = [p for i, p in enumerate(self.procs)
                    if 0 < self.began[i].item() < now - self.task_timeout]
            if hung:
                for p in hung:
                    p.kill()
                    p.join(timeout=10)
                self._restart(hung, hung=True)

    # -- the caller's side ---------------------------------------------------------------
    def can_submit(self) -> bool:
        """Whether a task may be submitted now. Inline reads fill a slot at once, so they
        wait for a free one; reader processes wait for slots themselves."""
        return self.num_workers > 0 or bool(self.free)

    def submit(self, task: ReadTask) -> None:
        if task.spec.on_device:
            if self.decoder is None:
                self.decoder = DecodeThread(self.device or torch.device("cpu"), self.results)
                self.decoder.start()
            self.decoder.tasks.put(task)
        elif self.num_workers == 0:
            slot = self.free.pop()
            result = read_result(self.sources, task, self.slots, slot)
            if result.chunk is None:
                self.free.append(slot)
            self.results.put(result)
        else:
            with self._lock:
                self._pending[task.task_id] = task
            self.task_q.put(task)

    def get(self, timeout: float = 600.0) -> ReadResult:
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

    def release(self, chunk: HostChunk | DeviceChunk) -> None:
        """Give back what a chunk held: a shared-memory slot, or room on the device."""
        if isinstance(chunk, DeviceChunk):
            self.decoder.release()
        elif self.num_workers == 0:
            self.free.append(chunk.slot)
        else:
            with self._lock:
                self._out.discard(chunk.slot)
            self.free_q.put(chunk.slot)

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.stop()
        if self.num_workers == 0:
            self.sources.close()
            return
        for _ in self.procs:
            self.task_q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self._kill()
        self._stop_forward.set()
        self._forward.join(timeout=10)
