"""TITAN's slide encoder (MahmoodLab/TITAN, `vision_encoder`), memory-safe.

TITAN lays a slide's CONCH v1.5 features on their patch grid, drops empty cells, and runs a
ViT whose attention is biased by 2-D ALiBi: -slope(head) × the Euclidean grid distance
between two patches (none for the class token). The reference builds that bias densely,
(heads × tokens²) floats plus a float64 distance matrix, which exhausts memory on large
slides (TITAN issue #33). Here the bias is made per block of query rows and attention runs
per block with torch's scaled-dot-product attention: the same sums, with memory linear in
the number of patches. The slide embedding is the contrastive attentional pooler's output
(`encode_slide_from_patch_features`, no projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

#: the bias block's size cap (floats): heads × query rows × tokens
BIAS_BLOCK = 1 << 24


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.), with its rule for head counts that are not a
    power of two."""
    if math.log2(heads).is_integer():
        p = 2 ** (-(2 ** -(math.log2(heads) - 3)))
        return [p * p**i for i in range(heads)]
    lower = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: heads - lower]


def grid_tokens(x: torch.Tensor, coords: torch.Tensor, patch_size_level0: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features summed per grid cell (overlapping patches share one), cells in row-major
    order of (x, y) grid index, empty (all-zero) cells dropped: (tokens (n, D), positions
    (n, 2) in grid units), as TITAN's `preprocess_features` and background mask."""
    g = torch.div(coords - coords.min(0).values, patch_size_level0, rounding_mode="floor")
    width = int(g[:, 1].max()) + 1
    cell = g[:, 0] * width + g[:, 1]
    cells, inverse = torch.unique(cell, return_inverse=True)
    summed = torch.zeros(len(cells), x.shape[1], dtype=torch.float32, device=x.device)
    summed.index_add_(0, inverse, x.float())
    keep = (summed != 0).any(1)
    cells = cells[keep]
    pos = torch.stack([cells // width, cells % width], 1)
    return summed[keep], pos


class TitanAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        t, dim = x.shape
        q, k, v = self.qkv(x).reshape(t, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        rows = max(1, BIAS_BLOCK // (self.heads * t))
        out = torch.empty_like(q)
        pos = pos.double()
        for s in range(0, t, rows):
            e = min(s + rows, t)
            dist = torch.zeros(e - s, t, dtype=torch.float64, device=x.device)
            first = max(s, 1)  # token 0 is the class token: no bias to or from it
            if first < e:
                dist[first - s:, 1:] = torch.cdist(
                    pos[first - 1:e - 1], pos, compute_mode="donot_use_mm_for_euclid_dist")
            bias = (dist.float()[None] * -slopes[:, None, None]).to(q.dtype)
            out[:, s:e] = F.scaled_dot_product_attention(q[:, s:e], k, v, attn_mask=bias)
        return self.proj(out.transpose(0, 1).reshape(t, dim))


class TitanBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TitanAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), pos, slopes)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The reference's `CustomSequential` (its key names: `blocks.modules_list.<i>`)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class AttentionalPooler(nn.Module):
    """Learned queries attending over the tokens (CoCa's pooler)."""

    def __init__(self, dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(x)[:, None]  # (tokens, batch 1, dim)
        out, _ = self.attn(self.ln_q(self.query)[:, None], kv, kv, need_weights=False)
        return out[:, 0]


class TitanSlideEncoder(nn.Module):
    """TITAN's `vision_encoder`; `attn_pool` (128 queries, for report generation) and `proj`
    are kept so the official weights load strictly, and not used by the embedding."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, pool_heads: int,
                 pool_queries: int):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = Blocks([TitanBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = AttentionalPooler(dim, pool_heads, pool_queries)
        self.attn_pool_contrastive = AttentionalPooler(dim, pool_heads, 1)
        self.proj = nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("slopes", torch.tensor(alibi_slopes(heads)), persistent=False)

    def encode(self, x: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
        feats, pos = grid_tokens(x, coords.long(), int(patch_size))
        tokens = torch.cat([self.cls_token[0], self.patch_embed(feats)])
        for block in self.blocks.modules_list:
            tokens = block(tokens, pos, self.slopes)
        return self.attn_pool_contrastive(self.norm(tokens))[0]


# -- the official checkpoint ----------------------------------------------------------------
def remap_titan(sd: dict) -> dict:
    """MahmoodLab/TITAN `model.safetensors`: the slide encoder is `vision_encoder.*`; the text
    tower and the rest of the CoCa model are not used."""
    return {k.removeprefix("vision_encoder."): v for k, v in sd.items()
            if k.startswith("vision_encoder.")}


def titan_sizes(sd: dict) -> dict:
    """From the weights; head counts are not stored in them: 64-wide heads as published
    (768 → 12) and the pooler's 8 heads."""
    w = sd["patch_embed.0.weight"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("blocks.modules_list.")})
    return {"in_dim": w.shape[1], "dim": w.shape[0], "depth": depth,
            "heads": w.shape[0] // 64, "pool_heads": 8,
            "pool_queries": sd["attn_pool.query"].shape[0]}
