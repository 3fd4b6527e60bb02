"""Mean-pool + MLP: the baseline every attention head has to beat."""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadOutput, masked_mean


class MeanMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        # the MLP is applied to the pooled bag; applied per patch it gives instance scores
        return HeadOutput(self.mlp(masked_mean(x, mask)), None, patch_logits=self.mlp(x))
