"""Which torch device(s) a command runs on."""

from __future__ import annotations

import torch

from .errors import UsageError


def pick_device(device: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu, cuda or "
                         "cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {device}: this machine has no usable CUDA device "
                             "(`wsi-embed doctor` says why); use --device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: this machine has {n} CUDA device"
                             f"{'' if n == 1 else 's'} (cuda:0..cuda:{n - 1})")
    return dev


def parse_devices(spec: str | None, device: str = "auto") -> tuple[str, ...]:
    """`--devices`: a comma-separated list (cuda:0,cuda:1; cpu,cpu for tests), or 'all' for
    every visible CUDA device. Not given: all visible GPUs when `--device auto` and there are
    several, else empty (one device, `--device`)."""
    if not spec:
        return parse_devices("all") if device == "auto" and torch.cuda.device_count() > 1 else ()
    if spec == "all":
        n = torch.cuda.device_count()
        return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)
    out = tuple(d.strip() for d in spec.split(",") if d.strip())
    for d in out:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ValueError(f"--devices: {d!r} is not a device (cuda:0, cuda:1, cpu)") from None
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--devices: {d} is not visible here "
                             f"({torch.cuda.device_count()} CUDA devices)")
    return out
