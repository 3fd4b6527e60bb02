"""The reader pool when a reader process dies: one more try for the task it was reading."""

import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from wsi_embed.reader_pool import MAX_DEATHS, ReaderPool, ReadTask
from wsi_embed.slides import open_slide

from .conftest import CMU


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
def test_a_task_whose_reader_died_is_read_again_once(deaths):
    """Killed once (the OOM killer picking an innocent reader), the task is read again and
    its patches are right; killed every time, it fails with the reason and the pool still
    reads the next task."""
    coords = np.array([(x, y) for y in range(0, 1500, 200) for x in range(0, 1800, 200)])
    task = ReadTask(7, str(CMU), 0, 512, 128, coords[:64], 0)  # ≈ 1 s of OpenSlide reads
    pool = ReaderPool(1, 64, 128, 2)
    killed: list[int] = []
    try:
        killer = threading.Thread(target=_kill_while_reading, args=(pool, 7, deaths, killed))
        killer.start()
        pool.submit(task)
        tid, got, err = pool.get(timeout=120)
        killer.join()
        assert tid == 7 and len(killed) == deaths
        if deaths < MAX_DEATHS:
            assert err is None, err
            with open_slide(CMU) as sl:  # each patch is the one asked for
                ref = [sl.read_region(int(x), int(y), 0, 512, 512) for x, y in task.coords]

            ref = np.stack([cv2.resize(r, (128, 128), interpolation=cv2.INTER_AREA)
                            for r in ref])
            assert np.array_equal(pool.slots[got, :64].numpy(), ref)
            pool.release(got)
        else:
            assert got is None and f"died {MAX_DEATHS} times" in err
        pool.submit(ReadTask(8, str(CMU), 0, 512, 128, coords[64:70], 0))
        tid, got, err = pool.get(timeout=120)
        assert (tid, err) == (8, None)
    finally:
        pool.close()
