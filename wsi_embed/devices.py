"""Which torch device(s) a command runs on."""

from __future__ import annotations

import torch


def pick_device(device: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
