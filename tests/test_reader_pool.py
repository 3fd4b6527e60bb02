"""The reader pool when a reader process dies: one more try for the slide it was reading."""

import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from wsi_embed.extract.sources import MAX_DEATHS, ReaderPool, ReadTask, SourceKind, SourceSpec
from wsi_embed.slides import open_slide

from .conftest import CMU, copy


def _kill_while_reading(pool: ReaderPool, task_id: int, times: int, killed: list) -> None:
    """SIGKILL the reader each time it has taken a slot for `task_id`, `times` times."""
    deadline = time.time() + 120
    while len(killed) < times and time.time() < deadline:
        proc = pool.procs[0] if pool.procs else None
        task, slot = pool.claims[0].tolist()
        if proc is not None and proc.pid not in killed and task == task_id and slot >= 0:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
        time.sleep(0.001)


@pytest.mark.parametrize("deaths", [1, MAX_DEATHS])
def test_a_slide_whose_reader_died_is_read_again_once(tmp_path, deaths, quick_checks):
    """Killed once (the OOM killer picking an innocent reader), the task is read again and
    its patches are right; killed a second time on that slide, every task of the slide fails
    with the reason, and the other slide's task is still read."""
    other = copy(CMU, tmp_path / "other.svs")
    coords = np.array([(x, y) for y in range(0, 1500, 200) for x in range(0, 1800, 200)])
    cmu, oth = (SourceSpec(SourceKind.OPENSLIDE, str(p), 0, 512, 128) for p in (CMU, other))
    tasks = [ReadTask(7, cmu, coords[:64], 0),  # ≈ 1 s of OpenSlide reads
             ReadTask(9, cmu, coords[64:70], 64),
             ReadTask(10, oth, coords[:6], 0)]
    pool = ReaderPool(1, 64, 128, 3)
    killed: list[int] = []
    try:
        killer = threading.Thread(target=_kill_while_reading, args=(pool, 7, deaths, killed))
        killer.start()
        for t in tasks:
            pool.submit(t)
        got = {}
        for _ in tasks:
            tid, chunk, err = pool.get(timeout=120)
            got[tid] = (chunk, err)
        killer.join()
        assert len(killed) == deaths
        errors = {tid: err for tid, (_, err) in got.items() if err is not None}
        if deaths < MAX_DEATHS:
            assert not errors, errors
            with open_slide(CMU) as sl:  # each patch is the one asked for
                ref = np.stack([cv2.resize(sl.read_region(int(x), int(y), 0, 512, 512),
                                           (128, 128), interpolation=cv2.INTER_AREA)
                                for x, y in tasks[0].coords])
            assert np.array_equal(pool.slots[got[7][0].slot, :64].numpy(), ref)
        else:
            assert sorted(errors) == [7, 9]  # the whole slide, 9 without being read
            assert all(f"died {MAX_DEATHS} times" in e for e in errors.values())
        assert got[10][1] is None
    finally:
        pool.close()


def test_a_reader_stuck_on_one_task_is_stopped_and_only_its_slide_fails(tmp_path,
                                                                        monkeypatch):
    """--slide-timeout for reads: a reader still on one task after the limit (a decoder
    hung on a damaged file; here 64 reads of 3000 px) is killed, the readers restart, that
    slide fails saying why, and the next slide's task is read."""
    import wsi_embed.extract.sources.pool as pool_module

    monkeypatch.setattr(pool_module, "CHECK_EVERY", 0.2)
    other = copy(CMU, tmp_path / "other.svs")
    coords = np.array([(x, y) for y in range(0, 1500, 200) for x in range(0, 1800, 200)])
    slow = SourceSpec(SourceKind.OPENSLIDE, str(CMU), 0, 3000, 128)
    quick = SourceSpec(SourceKind.OPENSLIDE, str(other), 0, 256, 128)
    pool = ReaderPool(1, 64, 128, 3, task_timeout=0.5)
    try:
        pool.submit(ReadTask(1, slow, coords[:64], 0))
        pool.submit(ReadTask(2, quick, coords[:4], 0))
        got = {}
        for _ in range(2):
            tid, chunk, err = pool.get(timeout=120)
            got[tid] = (chunk, err)
        assert got[1][0] is None and "--slide-timeout 0.5" in got[1][1]
        assert got[2][1] is None and got[2][0] is not None
    finally:
        pool.close()


def test_a_process_whose_pool_closed_with_tasks_still_queued_exits(tmp_path):
    """Ctrl-C while tasks wait in the queue (its reader stopped, none read): closing the pool
    must not leave the process waiting at exit to flush them into a pipe nobody reads."""
    script = (
        "from wsi_embed.extract.sources import ReaderPool\n"
        "pool = ReaderPool(1, 1, 8, 1)\n"
        "pool.procs[0].kill(); pool.procs[0].join()\n"
        "for _ in range(200): pool.task_q.put(bytes(10_000))  # 2 MB: more than a pipe holds\n"
        "pool.close()\n"
        "print('closed', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr
