"""Claims on outputs, so that two live runs on the same `--out` (SLURM array tasks, a rerun
started while the first still runs) never make the same slide twice.

A claim is a small hidden file beside the output (`.<name>.claim`) created with O_EXCL and
holding the claimant's host, pid and start time; it is removed when the slide is done or
failed. A claim whose process is gone (same host, pid not alive) or, for another host, older
than `stale_after` seconds, is taken over: a killed run never blocks its slides.
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
#: a claim file still empty after this long was left by a process killed while writing it
EMPTY_GRACE = 60.0


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
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or _stale(holder, path, stale_after):
                path.unlink(missing_ok=True)  # taken over
                continue
            since = dt.datetime.fromtimestamp(holder["started"], dt.UTC)
            return (f"being made by another run ({holder['host']} pid {holder['pid']}, "
                    f"since {since.isoformat(timespec='seconds')})")
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return Claim(path)
    return f"{path}: claimed and released by other runs repeatedly; rerun to retry"


def _holder(path: Path) -> dict | None:
    """The claim's content; {} while its writer has not written it yet; None when gone or
    unreadable for good."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    if not text:
        return {} if age < EMPTY_GRACE else None
    try:
        h = json.loads(text)
        return {"host": str(h["host"]), "pid": int(h["pid"]), "started": float(h["started"])}
    except (ValueError, KeyError, TypeError):
        return None


def _stale(holder: dict, path: Path, stale_after: float) -> bool:
    if not holder:
        return False  # being written right now
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
