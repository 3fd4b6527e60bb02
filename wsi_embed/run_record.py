"""`OUT/runs/<command>-<time>.json`: what each run was (resolved options, versions, host,
devices, times, exit code, counts, command line), so a result can be reproduced and
audited. Written when a command that has an output folder ends, however it ends."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import socket
import sys
from enum import Enum
from pathlib import Path

from . import __version__
from .h5io import atomic_file

log = logging.getLogger(__name__)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"wsi_embed": __version__,
                                  "python": platform.python_version()}
    for name in ("torch", "timm", "openslide"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod else None
    torch = sys.modules.get("torch")
    out["cuda"] = getattr(torch.version, "cuda", None) if torch else None
    ops = sys.modules.get("openslide")
    out["openslide_library"] = getattr(ops, "__library_version__", None) if ops else None
    return out


def devices() -> list[str]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return ["cpu"]
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _plain(v):
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def write_run_record(command: str, options: dict, started: dt.datetime, exit_code: int,
                     counts: dict | None, config: str | None) -> Path | None:
    """The record in options['out']/runs/, if the command has an output folder that
    exists by now (a run refused before it wrote anything leaves no folder behind)."""
    out = options.get("out")
    if out is None or not Path(out).is_dir():
        return None
    ended = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%S%fZ")
    path = Path(out) / "runs" / f"{command}-{stamp}-{os.getpid()}.json"
    record = {"command": command, "argv": sys.argv, "config": config,
              "options": {k: _plain(v) for k, v in options.items()},
              "versions": versions(), "host": socket.gethostname(), "devices": devices(),
              "started": started.isoformat(), "ended": ended.isoformat(),
              "seconds": round((ended - started).total_seconds(), 3), "exit_code": exit_code,
              "counts": counts}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    except OSError as e:  # a full disk must not turn a finished run into a failed one
        log.warning("could not write the run record %s: %s", path, e)
        return None
    return path
