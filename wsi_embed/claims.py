"""Claims on outputs, so that two live runs on the same `--out` (SLURM array tasks, a rerun
started while the first still runs) never make the same slide twice.

A claim is a small hidden file beside the output (`.<name>.claim`) holding the claimant's
host, pid and start time, created whole in one step (written under a temporary name, then
hard-linked to the claim's name, which fails if the claim exists); it is removed when the
slide is done or failed. A claim whose process is gone (same host, pid not alive), for
another host one older than `stale_after` seconds, or one that cannot be read, is taken over:
a killed run never blocks its slides.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

#: a claim of another host older than this is taken over (its process cannot be checked)
STALE_AFTER = 6 * 3600.0


@dataclass
class Claim:
    """This process's claim on one output."""

    path: Path

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def claim_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.claim")


def claim(output: Path, stale_after: float = STALE_AFTER) -> Claim | str:
    """Claim `output` for this process: a `Claim`, or a line saying which live run holds it."""
    path = claim_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    draft = path.with_name(f"{path.name}.{host}.{pid}.tmp")
    draft.write_text(json.dumps({"host": host, "pid": pid, "started": time.time()}))
    try:
        for _ in range(3):
            try:
                os.link(draft, path)
                return Claim(path)
            except FileExistsError:
                holder = _holder(path)
                if holder is None or _stale(holder, stale_after):
                    path.unlink(missing_ok=True)  # taken over
                    continue
                since = dt.datetime.fromtimestamp(holder["started"], dt.UTC)
                return (f"being made by another run ({holder['host']} pid {holder['pid']}, "
                        f"since {since.isoformat(timespec='seconds')})")
        return f"{path}: claimed and released by other runs repeatedly; rerun to retry"
    finally:
        draft.unlink(missing_ok=True)


def _holder(path: Path) -> dict | None:
    """The claim's content; None when it is gone or cannot be read (claims are written
    whole, so such a file is not a live run's)."""
    try:
        h = json.loads(path.read_text())
        return {"host": str(h["host"]), "pid": int(h["pid"]), "started": float(h["started"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale(holder: dict, stale_after: float) -> bool:
    if holder["host"] == socket.gethostname():
        return not pid_alive(holder["pid"])
    return time.time() - holder["started"] > stale_after


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
