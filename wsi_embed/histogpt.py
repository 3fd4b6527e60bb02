"""HistoGPT (Tran et al., Nat. Commun. 2025): CTransPath patch features → a Perceiver
resampler (Flamingo's: latents attend to patches and to themselves) → an exit projection →
a BioGPT decoder with a gated cross-attention block before each layer → report tokens.

Module and parameter names follow the reference (marrlab/HistoGPT, `HistoGPTForCausalLM`), so
its checkpoints load strictly. Attention runs through `scaled_dot_product_attention`: the
resampler's latents × patches never materialise as a full matrix on fused kernels, and no
patch × patch tensor exists at all. Generation keeps a key/value cache (the reference
recomputes every step); greedy, top-k/top-p sampling and beam search."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EOS = 2  # BioGPT's </s>: starts the prompt (as its tokenizer adds it) and ends a report


@dataclass(frozen=True)
class HistoGPTConfig:
    """BioGPT's sizes (`BioGptConfig` names) and the resampler's (`PerceiverResamplerConfig`)."""

    vocab_size: int = 42384
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 1024
    scale_embedding: bool = True
    pad_token_id: int = 1
    dim_feats: int = 768
    dim_model: int = 1536
    dim_head: int = 96
    num_heads: int = 16
    num_layers: int = 6
    num_latents: int = 640


#: the published models: HistoGPT-1B is BioGptConfig() (BioGPT), HistoGPT-3B BioGPT-Large
#: (its biogpt-large-config.json); both with PerceiverResamplerConfig()'s resampler
SIZES = {
    "histogpt-1b": HistoGPTConfig(),
    "histogpt-3b": HistoGPTConfig(vocab_size=57717, hidden_size=1600, num_hidden_layers=48,
                                  num_attention_heads=25, intermediate_size=6400,
                                  max_position_embeddings=2048),
    # the test fixture's size (tests/fixtures/histogpt)
    "tiny": HistoGPTConfig(vocab_size=249, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=96, dim_model=48, dim_head=8, num_heads=3,
                           num_layers=2, num_latents=6),
}


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Flamingo's feed-forward (keys 0, 1, 3)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class PerceiverAttention(nn.Module):
    """Latents attend to the patches and to themselves (keys/values from both)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = _heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)
        out = F.scaled_dot_product_attention(q, _heads(k, self.heads), _heads(v, self.heads))
        return self.to_out(_merge(out))


class PerceiverResampler(nn.Module):
    def __init__(self, c: HistoGPTConfig):
        super().__init__()
        self.linear = nn.Linear(c.dim_feats, c.dim_model, bias=False)
        self.media_pos = nn.Parameter(torch.randn(1, 1, c.dim_model))
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim_model))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim_model, c.dim_head, c.num_heads),
                           feed_forward(c.dim_model)]) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.dim_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (B, N, dim_feats) → latents (B, num_latents, dim_model)."""
        x = self.linear(x.float()) + self.media_pos[0]
        latents = self.latents.unsqueeze(0).expand(len(x), -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text tokens attend to the slide's latents (one medium: no masking)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        q = _heads(self.to_q(self.norm(x)), self.heads)
        k, v = self.to_kv(media).chunk(2, -1)
        out = F.scaled_dot_product_attention(q, _heads(k, self.heads), _heads(v, self.heads))
        return self.to_out(_merge(out))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim // heads, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class SelfAttention(nn.Module):
    """BioGPT's causal self-attention, with a key/value cache for generation."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        q = _heads(self.q_proj(x), self.heads)
        k, v = _heads(self.k_proj(x), self.heads), _heads(self.v_proj(x), self.heads)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        n_new, n_all = q.shape[2], k.shape[2]
        mask = None
        if n_new > 1:  # new tokens see the cache and the new tokens up to themselves
            mask = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(
                n_all - n_new)
        return self.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class DecoderLayer(nn.Module):
    def __init__(self, c: HistoGPTConfig):
        super().__init__()
        self.self_attn = SelfAttention(c.hidden_size, c.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Body(nn.Module):
    """`HistoGPTModel`: its parameter names."""

    def __init__(self, c: HistoGPTConfig):
        super().__init__()
        self.perceiver_resampler = PerceiverResampler(c)
        self.perceiver_exitgate = nn.Linear(c.dim_model, c.hidden_size, bias=False)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + 2, c.hidden_size)
        self.layers = nn.ModuleList(
            nn.ModuleList([GatedCrossAttentionBlock(c.hidden_size, c.num_attention_heads),
                           DecoderLayer(c)]) for _ in range(c.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(c.hidden_size)


class HistoGPT(nn.Module):
    def __init__(self, config: HistoGPTConfig):
        super().__init__()
        self.config = config
        self.histogpt = Body(config)
        self.output_projection = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def media(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features (B, N, 768) → the latents the text attends to (B, L, hidden)."""
        body = self.histogpt
        return body.perceiver_exitgate(body.perceiver_resampler(features))

    def forward(self, ids: torch.Tensor, media: torch.Tensor, caches: list | None = None
                ) -> torch.Tensor:
        """Next-token logits (B, T, vocab) for token ids (B, T) that follow `caches`' tokens."""
        body, c = self.histogpt, self.config
        past = caches[0][0].shape[2] if caches and caches[0] else 0
        if past + ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"a report longer than the model's {c.max_position_embeddings} "
                             "positions; lower --max-new-tokens")
        scale = math.sqrt(c.hidden_size) if c.scale_embedding else 1.0
        pos = torch.arange(past, past + ids.shape[1], device=ids.device) + 2
        h = body.embed_tokens(ids) * scale + body.embed_positions(pos)
        for i, (xattn, layer) in enumerate(body.layers):
            h = xattn(h, media)
            h = layer(h, None if caches is None else caches[i])
        return self.output_projection(body.layer_norm(h))


# -- loading ------------------------------------------------------------------------------
def config_from_state_dict(sd: dict, base: HistoGPTConfig) -> HistoGPTConfig:
    """Sizes read from the checkpoint; head counts (not in the weights) from `base`."""
    p = "histogpt."
    layers = {int(k.split(".")[2]) for k in sd if k.startswith(p + "layers.")}
    r = p + "perceiver_resampler."
    res_layers = {int(k.split(".")[3]) for k in sd if k.startswith(r + "layers.")}
    inner = sd[p + "perceiver_resampler.layers.0.0.to_q.weight"].shape[0]
    return replace(base, vocab_size=sd[p + "embed_tokens.weight"].shape[0],
                   hidden_size=sd[p + "embed_tokens.weight"].shape[1],
                   num_hidden_layers=len(layers),
                   intermediate_size=sd[p + "layers.0.1.fc1.weight"].shape[0],
                   max_position_embeddings=sd[p + "embed_positions.weight"].shape[0] - 2,
                   dim_feats=sd[p + "perceiver_resampler.linear.weight"].shape[1],
                   dim_model=sd[p + "perceiver_resampler.linear.weight"].shape[0],
                   num_latents=sd[p + "perceiver_resampler.latents"].shape[0],
                   num_layers=len(res_layers), dim_head=inner // base.num_heads)


def read_configs(folder: Path, base: HistoGPTConfig) -> HistoGPTConfig:
    """A BioGPT `config.json` (HF's names) and/or a `resampler.json`
    (PerceiverResamplerConfig's names) beside the checkpoint override `base`."""
    names = {f.name for f in fields(HistoGPTConfig)}
    for name in ("config.json", "resampler.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            base = replace(base, **{k: v for k, v in data.items() if k in names})
    return base


def heads_for(hidden: int) -> int:
    """The head count of the published size with this width (BioGPT 1024 → 16, BioGPT-Large
    1600 → 25); 0 when none has it."""
    return next((c.num_attention_heads for c in SIZES.values() if c.hidden_size == hidden), 0)


# -- generation ---------------------------------------------------------------------------
def top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the `top_k` most likely tokens, then the smallest set whose probability reaches
    `top_p` (at least one); others get -inf (transformers' top-k and top-p warpers)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        order = torch.sort(logits, descending=False)
        cum = order.values.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order.indices, drop), float("-inf"))
    return logits


@dataclass(frozen=True)
class Decoding:
    method: str = "greedy"  # greedy, sample, beam
    max_new_tokens: int = 256
    num_beams: int = 4
    top_k: int = 40
    top_p: float = 0.95
    temperature: float = 0.7
    seed: int = 0


@torch.inference_mode()
def generate(model: HistoGPT, features: torch.Tensor, prompt: list[int], d: Decoding
             ) -> list[int]:
    """The report's token ids after the prompt (without the final </s>)."""
    device = next(model.parameters()).device
    media = model.media(features.to(device).unsqueeze(0))
    if d.method == "beam":
        return _beam(model, media, prompt, d)
    gen = torch.Generator(device=device).manual_seed(d.seed)
    caches: list = [[] for _ in model.histogpt.layers]
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(d.max_new_tokens):
        logits = model(ids, media, caches)[0, -1].float()
        if d.method == "sample":
            logits = top_k_top_p(logits / d.temperature, d.top_k, d.top_p)
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=device)
    return out


def _beam(model: HistoGPT, media: torch.Tensor, prompt: list[int], d: Decoding) -> list[int]:
    """Beam search: `num_beams` running sequences by summed log-probability; a sequence
    that ends (</s>) is finished; the best finished one by mean log-probability per token
    (length penalty 1, as transformers' default)."""
    device = media.device
    beams = [(0.0, [])]  # (log-probability, tokens after the prompt)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(d.max_new_tokens):
        seqs = torch.tensor([prompt + t for _, t in beams], device=device)
        logp = model(seqs, media.expand(len(beams), -1, -1))[:, -1].float().log_softmax(-1)
        cand = []
        for (score, toks), row in zip(beams, logp, strict=True):
            top = torch.topk(row, d.num_beams * 2)
            cand += [(score + float(v), toks + [int(i)]) for v, i in
                     zip(top.values, top.indices, strict=True)]
        cand.sort(key=lambda c: -c[0])
        beams = []
        for score, toks in cand:
            if toks[-1] == EOS:
                finished.append((score / len(toks), toks[:-1]))
            else:
                beams.append((score, toks))
            if len(beams) == d.num_beams:
                break
        best_open = max(s / len(t) for s, t in beams) if beams else -math.inf
        if len(finished) >= d.num_beams and max(f[0] for f in finished) >= best_open:
            break
    finished += [(s / max(len(t), 1), t) for s, t in beams]
    return max(finished, key=lambda f: f[0])[1]
