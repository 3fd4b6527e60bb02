"""CLAM single-branch (Lu et al. 2021): gated attention plus an instance-level clustering
loss on the most and least attended patches. Bags smaller than 2·k use k = n // 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .abmil import ABMIL
from .base import HeadOutput

#: CLAM weighs the bag loss 0.7 and the instance loss 0.3; relative to a bag loss of 1:
INSTANCE_WEIGHT = 0.3 / 0.7


class CLAMSB(ABMIL):
    """ABMIL's gated attention pooling plus one instance classifier per class."""

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, hidden: int = 512,
                 attn_dim: int = 256, k_sample: int = 8):
        super().__init__(in_dim, n_classes, dropout, hidden, attn_dim)
        self.k_sample = k_sample
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        h, a, logits = self.pool(x, mask)
        aux = None if labels is None else INSTANCE_WEIGHT * self._instance_loss(h, a, mask,
                                                                                labels)
        return HeadOutput(logits, a, patch_logits=self.classifier(h), aux_loss=aux)

    def _instance_loss(self, h, a, mask, labels) -> torch.Tensor:
        """Top-k attended patches of the true class are its positives, bottom-k its negatives;
        for every other class the top-k are negatives (CLAM with subtyping)."""
        losses = []
        for hb, ab, mb, yb in zip(h, a, mask, labels, strict=True):
            hb, ab = hb[mb], ab[mb]
            k = min(self.k_sample, len(ab) // 2)
            if k < 1:
                continue
            top = torch.topk(ab, k).indices
            bottom = torch.topk(-ab, k).indices
            for c, clf in enumerate(self.instance_classifiers):
                if c == int(yb):
                    idx = torch.cat([top, bottom])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long()
                else:
                    idx, target = top, torch.zeros(k, dtype=torch.long)
                losses.append(F.cross_entropy(clf(hb[idx]), target.to(hb.device)))
        if not losses:
            return h.sum() * 0.0
        return torch.stack(losses).mean()
