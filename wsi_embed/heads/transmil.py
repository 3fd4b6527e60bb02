"""TransMIL (Shao et al. 2021): a class token and two Nyström-attention layers with a
convolutional position encoding (PPEG) over the bag laid out as a square. Bags are processed
one at a time (the square layout has no padding); memory is linear in the bag size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import HeadOutput

#: rows per chunk when a long sequence is attended in pieces (bounded memory)
CHUNK = 8192


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore–Penrose pseudo-inverse (Nyströmformer)."""
    absx = x.abs()
    z = x.transpose(-1, -2) / (absx.sum(-1).max() * absx.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def _softmax_rows_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ) v over all keys, in key chunks with a running log-sum-exp."""
    lse = torch.full(q.shape[:-1], float("-inf"), device=q.device, dtype=q.dtype)
    for i in range(0, k.shape[-2], CHUNK):
        lse = torch.logaddexp(lse, torch.logsumexp(q @ k[..., i:i + CHUNK, :].transpose(-1, -2),
                                                    dim=-1))
    out = torch.zeros(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    for i in range(0, k.shape[-2], CHUNK):
        s = q @ k[..., i:i + CHUNK, :].transpose(-1, -2)
        out = out + torch.exp(s - lse.unsqueeze(-1)) @ v[..., i:i + CHUNK, :]
    return out


class NystromAttention(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, landmarks: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.heads, self.landmarks = heads, landmarks
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads,
                                  bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, n, dim) → output and the class token's (row 0) attention (heads, n)."""
        _, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).view(1, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q = q * (d // h) ** -0.5
        cls_attn = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), -1)[0, :, 0]
        m = self.landmarks
        if n <= 2 * m:  # short bags: exact attention is cheaper than the approximation
            o = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        else:
            ql = F.adaptive_avg_pool1d(q[0].transpose(-1, -2), m).transpose(-1, -2)[None]
            kl = F.adaptive_avg_pool1d(k[0].transpose(-1, -2), m).transpose(-1, -2)[None]
            mid = _pinv(torch.softmax(ql @ kl.transpose(-1, -2), -1))
            right = mid @ _softmax_rows_matmul(ql, k, v)  # (1, h, m, d/h)
            o = torch.cat([torch.softmax(q[..., i:i + CHUNK, :] @ kl.transpose(-1, -2), -1)
                           @ right for i in range(0, n, CHUNK)], dim=-2)
        o = o + self.res_conv(v)
        return self.out(o.transpose(1, 2).reshape(1, n, d)), cls_attn


class TransLayer(nn.Module):
    def __init__(self, dim: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, landmarks=dim // 2)

    def forward(self, x):
        o, a = self.attn(self.norm(x))
        return x + o, a


class PPEG(nn.Module):
    """Position encoding: depthwise 7/5/3 convolutions over the square layout."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)
                                   for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]
        f = feat.transpose(1, 2).reshape(1, -1, side, side)
        f = f + sum(c(f) for c in self.convs)
        return torch.cat([cls, f.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, dim: int = 512):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        # unit variance as in the official code: a class token scaled down to 0.02 let the
        # model memorise small cohorts before it found the signal (docs/BENCHMARKS.md)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1, self.layer2 = TransLayer(dim), TransLayer(dim)
        self.ppeg = PPEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        logits, attn = [], torch.zeros(mask.shape, device=x.device, dtype=x.dtype)
        for b in range(len(x)):
            lg, attn[b, mask[b]] = self._one(x[b][mask[b]])
            logits.append(lg)
        return HeadOutput(torch.stack(logits), attn)

    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        if n == 0:
            return self.classifier(self.norm(self.cls_token[0, 0])), x.new_zeros(0)
        side = math.ceil(math.sqrt(n))
        idx = torch.arange(side * side, device=x.device) % n  # fill the square by repetition
        h = torch.cat([self.cls_token, self.proj(x)[idx].unsqueeze(0)], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, a = self.layer2(h)
        # the class token's attention in the last layer, folded back onto the real patches
        a = torch.zeros(n, device=x.device, dtype=a.dtype).index_add_(0, idx, a.mean(0)[1:])
        return self.classifier(self.norm(h[0, 0])), a / a.sum().clamp_min(1e-12)
