"""Perceiver-style resampler head: a few learnable latents cross-attend to the patch
embeddings, then self-attend; their mean is classified. Its cross-attention to patches,
averaged over heads and latents, is the heatmap.

HistoGPT's resampler (`histogpt.py`, Flamingo's) differs in more than sizes, so the two are
not one module: there the latents attend to the patches and to themselves in one step, with
no self-attention blocks, no padding mask (one slide at a time) and no dropout; here padded
batches are masked and the attention is returned for maps."""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadOutput, masked_softmax


class CrossAttention(nn.Module):
    """Latents (queries) attend to patches (keys/values); returns the output and the
    attention weights (B, heads, L, N), padded patches exactly 0."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, lat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor):
        b, n, d = x.shape
        h = self.heads
        q = self.q(lat).view(b, -1, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * (d // h) ** -0.5
        a = masked_softmax(scores, mask[:, None, None, :])
        o = (a @ v).transpose(1, 2).reshape(b, -1, d)
        return self.out(o), a


class Resampler(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, dim: int = 256,
                 n_latents: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), nn.Dropout(dropout))
        # unit-variance latents (as in Flamingo): diverse queries from the start; with
        # near-zero ones every latent attends alike and small cohorts overfit before they split
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.norm_lat = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        h = self.proj(x)
        lat = self.latents.unsqueeze(0).expand(len(x), -1, -1)
        o, a = self.cross(self.norm_lat(lat), h, mask)
        lat = lat + o
        lat = lat + self.ff(lat)
        for blk in self.blocks:
            lat = blk(lat)
        slide = self.norm(lat).mean(1)
        return HeadOutput(self.classifier(slide), a.mean(dim=(1, 2)))
