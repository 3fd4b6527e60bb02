"""PRISM's slide encoder (paige-ai/Prism `image_resampler`): a Perceiver over Virchow tile
embeddings (CLS ⊕ mean, 2560-d).

513 learned latents (the first becomes the slide embedding) cross-attend to the tiles, then
self-attend; the reference shares weights between layers (cross-attention from layer 1 on,
the latent transformer from layer 0 on), so here each shared block exists once and is
applied at every layer that uses it; its keys/values over the tiles are computed once per
cross-attention module, as the reference's cache does. The slide embedding is
`slide_representations(...)["image_embedding"]`: the first latent, normed.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.x_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(context).view(len(context), 2, self.heads, -1).unbind(1)
        return k.transpose(0, 1), v.transpose(0, 1)  # (heads, tiles, head dim)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.to_q(self.x_norm(x)).view(len(x), self.heads, -1).transpose(0, 1)
        a = F.scaled_dot_product_attention(q, *kv)
        return self.to_out(a.transpose(0, 1).reshape(len(x), -1))


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)[None]
        return self.mha(x, x, x, need_weights=False)[0][0]


class CrossBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.xattn = CrossAttention(dim, context_dim, heads)
        self.ff = FeedForward(dim)


class LatentBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mhsa = SelfAttention(dim, heads)
        self.ff = FeedForward(dim)


class PrismSlideEncoder(nn.Module):
    """Perceiver resampler: `depth` layers of (cross-attention, latent transformer); layer 0
    has its own cross-attention, layers ≥ 1 share one; all share one latent transformer."""

    def __init__(self, in_dim: int, dim: int, latents: int, depth: int, tf_depth: int,
                 heads: int = 8, xattn_heads: int = 1):
        super().__init__()
        self.depth = depth
        self.latents = nn.Parameter(torch.zeros(latents + 1, dim))
        self.cross = nn.ModuleList(CrossBlock(dim, in_dim, xattn_heads)
                                   for _ in range(min(depth, 2)))
        self.tf = nn.ModuleList(LatentBlock(dim, heads) for _ in range(tf_depth))
        self.cls_norm = nn.LayerNorm(dim)
        self.img_norm = nn.LayerNorm(dim)  # of the other latents (report generation)

    def encode(self, x: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
        context = x.float()
        kv = [c.xattn.keys_values(context) for c in self.cross]
        z = self.latents
        for i in range(self.depth):
            j = min(i, 1)
            z = self.cross[j].xattn(z, kv[j]) + z
            z = self.cross[j].ff(z) + z
            for block in self.tf:
                z = block.mhsa(z) + z
                z = block.ff(z) + z
        return self.cls_norm(z[0])


_LAYER = re.compile(r"^perceiver\.layers\.(\d+)\.(xattn|tf)\.(.*)$")


def remap_prism(sd: dict) -> dict:
    """paige-ai/Prism `model.safetensors`: the slide encoder is `image_resampler.*`; the
    BioGPT decoder and the contrastive heads are not used. A shared block may be stored
    under each layer that uses it or once: its first owner's copy is taken (layer 0's and
    1's cross-attention, layer 0's transformer)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("image_resampler."):
            continue
        k = k.removeprefix("image_resampler.")
        m = _LAYER.match(k)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if part == "xattn" and i <= 1:
                k = f"cross.{i}.{rest}"
            elif part == "tf" and i == 0:
                k = f"tf.{rest}"
            else:
                continue  # the same tensors as their first owner's
        elif k == "perceiver.latents":
            k = "latents"
        out[k] = v
    return out


def prism_sizes(sd: dict) -> dict:
    """From the weights; the layer count and head counts are not stored once shared: 8
    layers, 8 latent heads and 1 cross-attention head, as published."""
    w = sd["cross.0.xattn.to_kv.weight"]
    return {"in_dim": w.shape[1], "dim": sd["latents"].shape[1],
            "latents": sd["latents"].shape[0] - 1, "depth": 8,
            "tf_depth": len({k.split(".")[1] for k in sd if k.startswith("tf.")})}
