"""A linear probe: logistic regression (softmax) on the mean of the bag. On slide
embeddings (a bag of one) it is the standard linear probe of slide foundation models."""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadOutput, masked_mean


class LinearProbe(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        return HeadOutput(self.fc(self.drop(masked_mean(x, mask))), None,
                          patch_logits=self.fc(x))
