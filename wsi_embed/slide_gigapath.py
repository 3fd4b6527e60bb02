"""Prov-GigaPath's slide encoder (LongNet over GigaPath tile features), on any device.

The reference (prov-gigapath `gigapath/slide_encoder.py` with its copy of torchscale) runs
LongNet's dilated attention through flash-attn, so it needs a recent NVIDIA GPU, and keeps a
fixed 2-D sin-cos table for a 1000 × 1000 grid (3 GB at 768 dims). Here the same math runs
with plain torch: each (segment length, dilation) branch splits the sequence into segments
(zero-padded at the end), lets head group j attend among the positions ≡ j (mod dilation) of
its segment (padded zeros included, as the kernel sees them), and the branches are mixed per
position and head with weights softmax(log-sum-exp) as LongNet does; scores are made in row
blocks, so memory stays bounded. Sin-cos positions are computed only for the patches there.

The slide embedding follows TRIDENT and the authors' fine-tuning default: grid step =
the features' patch size at level 0, the hidden states after all but the last layer
(`all_layer_embed=True`, index 11 of 12), mean over the patch tokens, then the final norm.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: the sin-cos grid's side (the reference's `slide_ngrids`)
GRID = 1000
#: the dilation ratios and the segment lengths LongNetViT derives from its defaults
#: (max_wsi_size 262144, tile_size 256)
RATIOS = (1, 2, 4, 8, 16)
#: score block cap (floats) per attention call
SCORE_BLOCK = 1 << 24


def segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> tuple[int, ...]:
    """LongNetViT.get_optimal_segment_length: 5 lengths log-spaced from 1024 to the longest
    sequence."""
    longest = (max_wsi_size // tile_size) ** 2
    exps = np.linspace(np.log2(1024), int(np.log2(longest)), 5)
    return tuple(int(v) for v in np.power(2, exps).astype(int))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega
    return torch.cat([out.sin(), out.cos()], 1)


def sincos_positions(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows `pos` of the reference's table get_2d_sincos_pos_embed(dim, GRID, cls_token=True):
    row 0 is zeros; row k + 1 encodes (k mod GRID) in its first half, k // GRID in its
    second."""
    k = pos - 1
    emb = torch.cat([sincos_1d(dim // 2, k % GRID), sincos_1d(dim // 2, k // GRID)], 1)
    emb[pos == 0] = 0
    return emb.float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (..., m, d) with its log-sum-exp (..., m), in row blocks."""
    scale = q.shape[-1] ** -0.5
    lead = math.prod(q.shape[:-2])
    rows = max(1, SCORE_BLOCK // max(1, lead * k.shape[-2]))
    outs, lses = [], []
    for s in range(0, q.shape[-2], rows):
        scores = (q[..., s:s + rows, :] @ k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, -1)
        outs.append(torch.exp(scores - lse[..., None]) @ v)
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def dilated_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int,
                   ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LongNet branch for (tokens T, heads H, d) inputs: outputs (T, H, d) and
    log-sum-exps (T, H), -1e8 where a head's group does not hold the position."""
    t, h, d = q.shape
    seg = min(segment, t)
    n = -(-t // seg)
    g = -(-seg // ratio) * ratio  # each segment padded to a multiple of the ratio
    per = -(-h // ratio)  # heads per group (the last groups padded with absent heads)

    def split(x: torch.Tensor) -> torch.Tensor:  # (T, H, d) -> (n, g // r, r, H, d)
        x = F.pad(x, (0, 0, 0, 0, 0, n * seg - t)).view(n, seg, h, d)
        return F.pad(x, (0, 0, 0, 0, 0, g - seg)).view(n, g // ratio, ratio, h, d)

    qs, ks, vs = split(q), split(k), split(v)
    out = torch.zeros(n, g // ratio, ratio, h, d, dtype=q.dtype, device=q.device)
    lse = torch.full((n, g // ratio, ratio, h), -1e8, dtype=q.dtype, device=q.device)
    for j in range(ratio):
        heads = slice(j * per, min((j + 1) * per, h))
        if heads.start >= h:
            break
        sub = [x[:, :, j, heads].transpose(1, 2) for x in (qs, ks, vs)]  # (n, hg, m, d)
        o, s = _attend(*sub)
        out[:, :, j, heads] = o.transpose(1, 2)
        lse[:, :, j, heads] = s.transpose(1, 2)
    out = out.view(n, g, h, d)[:, :seg].reshape(n * seg, h, d)[:t]
    lse = lse.view(n, g, h)[:, :seg].reshape(n * seg, h)[:t]
    return out, lse


class DilatedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, segments: tuple[int, ...], ratios: tuple[int, ...]):
        super().__init__()
        self.heads, self.segments, self.ratios = heads, segments, ratios
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, dim = x.shape
        q, k, v = (p(x).view(t, self.heads, dim // self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        outs, lses = zip(*(dilated_branch(q, k, v, s, r)
                           for s, r in zip(self.segments, self.ratios, strict=True)),
                         strict=True)
        weights = torch.softmax(torch.stack(lses), 0)  # (branches, T, H)
        out = (torch.stack(outs) * weights[..., None]).sum(0).reshape(t, dim)
        return self.out_proj(self.inner_attn_ln(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class LongNetLayer(nn.Module):
    """torchscale's pre-norm EncoderLayer with sub-LN (LongNet's setting)."""

    def __init__(self, dim: int, heads: int, hidden: int, segments, ratios):
        super().__init__()
        self.self_attn = DilatedAttention(dim, heads, segments, ratios)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class LongNetEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int, segments, ratios):
        super().__init__()
        self.layers = nn.ModuleList(LongNetLayer(dim, heads, hidden, segments, ratios)
                                    for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim)  # on the last layer's output; not used here


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)


class GigaPathSlideEncoder(nn.Module):
    """LongNetViT (`gigapath_slide_enc12l768d`: 12 layers, 768 dims, 16 heads)."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int = 16,
                 hidden: int | None = None, segments: tuple[int, ...] | None = None,
                 ratios: tuple[int, ...] = RATIOS):
        super().__init__()
        self.patch_embed = PatchEmbed(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = LongNetEncoder(dim, depth, heads, hidden or 4 * dim,
                                      segments or segment_lengths(), ratios)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def encode(self, x: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
        grid = torch.floor(coords.double() / patch_size).long()
        pos = grid[:, 0] * GRID + grid[:, 1] + 1
        dim = self.cls_token.shape[-1]
        tokens = self.patch_embed.proj(x.float()) + sincos_positions(pos, dim)
        tokens = torch.cat([self.cls_token[0], tokens])
        for layer in self.encoder.layers[:-1]:
            tokens = layer(tokens)
        return self.norm(tokens[1:].mean(0))


def remap_gigapath(sd: dict) -> dict:
    """prov-gigapath `slide_encoder.pth` (its "model" entry, unwrapped by the loader): our
    names are the reference's; the sin-cos table, if a file holds it, is recomputed."""
    return {k: v for k, v in sd.items() if k != "pos_embed"}


def gigapath_sizes(sd: dict) -> dict:
    """From the weights; the head count is not stored: 16, as every LongNet config."""
    w = sd["patch_embed.proj.weight"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    return {"in_dim": w.shape[1], "dim": w.shape[0], "depth": depth, "heads": 16,
            "hidden": sd["encoder.layers.0.ffn.fc1.weight"].shape[0]}
