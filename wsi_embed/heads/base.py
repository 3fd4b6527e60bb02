"""What every head returns, and the masked operations they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C)
    #: per-patch attention (B, N), summing to 1 over real patches; None if the head has
    #: none. Padded positions are 0.
    attention: torch.Tensor | None = None
    #: per-patch class logits (B, N, C) where the head has an instance-level classifier
    patch_logits: torch.Tensor | None = None
    #: an extra training loss (CLAM's instance clustering), already weighted
    aux_loss: torch.Tensor | None = None


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives padded positions exactly 0 (and an all-padded
    row all zeros rather than NaN)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over patches (B, N, D) → (B, D), ignoring padding."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
