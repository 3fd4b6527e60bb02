"""Gated attention MIL (Ilse et al. 2018): the standard yardstick."""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadOutput, masked_softmax


class GatedAttention(nn.Module):
    """One score per patch: w · (tanh(V h) ⊙ sigmoid(U h))."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.25, n_out: int = 1):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.v(h) * self.u(h))  # (B, N, n_out)


class ABMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, hidden: int = 512,
                 attn_dim: int = 256):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn = GatedAttention(hidden, attn_dim, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def pool(self, x: torch.Tensor, mask: torch.Tensor):
        """Patch embeddings h (B, N, hidden), attention (B, N) and the slide logits."""
        h = self.proj(x)
        a = masked_softmax(self.attn(h).squeeze(-1), mask)
        slide = torch.bmm(a.unsqueeze(1), h).squeeze(1)
        return h, a, self.classifier(slide)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        h, a, logits = self.pool(x, mask)
        return HeadOutput(logits, a, patch_logits=self.classifier(h))
