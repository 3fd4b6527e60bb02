"""CONCH's contrastive space: its text tower, the image tower's contrastive projection and
the logit scale, loaded from the official CoCa checkpoint (`MahmoodLab/CONCH`
pytorch_model.bin) with strict keys.

`extract --encoder conch_v1` stores the image tower's pooled features before the projection
(TRIDENT's convention); the contrastive space is `normalise(features @ proj_contrast)`. Text
follows CoCa as CONCH runs it: 127 tokens (start, text, end, padding), a learned class token
appended, causal attention except that the class token sees the non-padding tokens, then the
final norm and the text projection.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import EncoderError, UsageError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "conch_byte_level_bpe_uncased.json"
HEAD_DIM = 64  # CONCH's text tower: 768 wide, 12 heads
OFFICIAL = {"vocab": 32007, "width": 768, "layers": 12, "dim": 512, "context": 128}
SPECIAL = {"bos": "<start_of_text>", "eos": "<end_of_text>", "pad": "<pad>"}


class TextBlock(nn.Module):
    """Pre-norm residual block (open_clip's ResidualAttentionBlock names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Blocks(nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(width, width // HEAD_DIM) for _ in range(layers))


class TextTower(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, dim: int, context: int,
                 pad_id: int = 0):
        super().__init__()
        self.heads, self.pad_id = width // HEAD_DIM, pad_id
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.cls_emb = nn.Parameter(torch.zeros(width))
        self.transformer = _Blocks(width, layers)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, context) as `Tokenizer.encode` makes them → (B, dim), not normalised."""
        ids = ids[:, :-1]  # the last place is the class token's
        b, n = ids.shape
        x = torch.cat([self.token_embedding(ids), self.cls_emb.expand(b, 1, -1)], dim=1)
        x = x + self.positional_embedding[: n + 1]
        mask = self._mask(ids)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x[:, -1]) @ self.text_projection

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Additive (B*heads, L, L): causal, and the class token's row open to column 0 and
        to column j+1 for each non-padding token j (open_clip's class mask, as CONCH runs)."""
        b, n = ids.shape
        size = n + 1
        causal = torch.full((size, size), float("-inf"), device=ids.device).triu_(1)
        keep = F.pad(ids != self.pad_id, (1, 0), value=True)
        mask = causal.expand(b, size, size).clone()
        mask[:, -1] = torch.where(keep, 0.0, float("-inf"))
        return mask.repeat_interleave(self.heads, dim=0)


class ConchContrastive(nn.Module):
    """Text tower + the image side's contrastive projection + logit scale."""

    def __init__(self, vocab: int, width: int, layers: int, dim: int, context: int,
                 image_dim: int | None = None):
        super().__init__()
        self.text = TextTower(vocab, width, layers, dim, context)
        self.proj_contrast = nn.Parameter(torch.zeros(image_dim or dim, dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.context = context

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """Stored conch_v1 features → the contrastive space (normalised)."""
        return F.normalize(pooled @ self.proj_contrast, dim=-1)


class Tokenizer:
    """CONCH's tokenisation with HF `tokenizers` (the library under CONCH's
    PreTrainedTokenizerFast): start/end tokens, truncated and padded to context - 1, one
    padding place added for the class token."""

    def __init__(self, path: Path, context: int):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's errors are untyped
            raise UsageError(f"{path}: not a tokenizers JSON file ({e})") from None
        self.pad_id = self.tok.token_to_id(SPECIAL["pad"])
        if self.pad_id is None or self.tok.token_to_id(SPECIAL["bos"]) is None:
            raise UsageError(f"{path}: no {SPECIAL['pad']} / {SPECIAL['bos']} token; is it "
                             f"CONCH's {TOKENIZER_FILE}?")
        self.length = context - 1
        self.tok.enable_truncation(self.length)
        self.tok.enable_padding(length=self.length, pad_id=self.pad_id, pad_token=SPECIAL["pad"])

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for text, enc in zip(texts, self.tok.encode_batch(texts), strict=True):
            if enc.overflowing:
                log.warning("prompt truncated to %d tokens (CONCH's context): %.80s...",
                            self.length, text)
            out.append(enc.ids + [self.pad_id])
        return torch.tensor(out, dtype=torch.long)


@dataclass
class ConchText:
    model: ConchContrastive
    tokenizer: Tokenizer
    weights_id: str  # "random" or "sha256:..." of the checkpoint

    @torch.inference_mode()
    def class_embeddings(self, classes: dict[str, list[str]], templates: list[str]
                         ) -> torch.Tensor:
        """(C, dim): per class, the mean over its names and templates of the normalised text
        embeddings, normalised (CONCH's prompt ensembling)."""
        rows = []
        for names in classes.values():
            per_name = [self.model.encode_text(self.tokenizer.encode(
                [t.replace("CLASSNAME", n) for t in templates])) for n in names]
            rows.append(F.normalize(torch.stack(per_name).mean(dim=(0, 1)), dim=-1))
        return torch.stack(rows)

    @torch.inference_mode()
    def text_embedding(self, text: str) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer.encode([text]))[0]


def _contrastive_keys(sd: dict) -> dict:
    """The official CoCa file → our keys: `text.*`, `visual.proj_contrast`, `logit_scale`;
    the image tower and the captioning decoder are not needed here."""
    out = {k: v for k, v in sd.items() if k.startswith("text.")}
    if "visual.proj_contrast" in sd:
        out["proj_contrast"] = sd["visual.proj_contrast"]
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


def _sizes(sd: dict) -> dict:
    emb = sd["text.token_embedding.weight"]
    layers = len({k.split(".")[3] for k in sd if k.startswith("text.transformer.resblocks.")})
    return {"vocab": emb.shape[0], "width": emb.shape[1], "layers": layers,
            "dim": sd["text.text_projection"].shape[1],
            "context": sd["text.positional_embedding"].shape[0]}


def find_tokenizer(tokenizer: Path | None, weights: Path | None,
                   env: dict[str, str] | None = None) -> Path:
    """--tokenizer, else beside the checkpoint, else $WSI_EMBED_WEIGHTS/conch_v1/."""
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise UsageError(f"--tokenizer {tokenizer}: no such file")
        return tokenizer
    env = os.environ if env is None else env
    places = [weights.parent / TOKENIZER_FILE] if weights is not None else []
    if env.get("WSI_EMBED_WEIGHTS"):
        places.append(Path(env["WSI_EMBED_WEIGHTS"]) / "conch_v1" / TOKENIZER_FILE)
    for p in places:
        if p.is_file():
            return p
    looked = ", ".join(map(str, places)) or "(nowhere: pass --tokenizer)"
    raise UsageError(
        f"no CONCH tokenizer: looked for {TOKENIZER_FILE} in {looked}. It ships with CONCH's "
        f"code (github.com/mahmoodlab/CONCH, conch/open_clip_custom/tokenizers/"
        f"{TOKENIZER_FILE}); pass --tokenizer PATH or put it beside the checkpoint")


def load_conch_text(weights: str | None, tokenizer: Path | None = None) -> ConchText:
    """The contrastive model from the official checkpoint (strict keys), or untrained at
    CONCH's sizes with `weights="random"` (tests)."""
    from .encoders import load_state_file, resolve_weights, unwrap_state_dict

    res = resolve_weights("conch_v1", weights)
    if res.path is None:
        model = ConchContrastive(**OFFICIAL)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for p in model.parameters():
                nn.init.normal_(p, std=0.02)
    else:
        sd = unwrap_state_dict(load_state_file(res.path))
        mine = _contrastive_keys(sd)
        if "text.token_embedding.weight" not in mine:
            raise EncoderError(f"{res.path} has no CONCH text tower (no text.* keys): zero-shot "
                               "needs the full CONCH checkpoint (MahmoodLab/CONCH "
                               "pytorch_model.bin), not the image tower alone")
        unused = sorted({k.split(".")[0] for k in sd if k not in mine})
        if unused:  # the image tower (its features are stored), the captioning decoder
            log.info("%s: parts not used for text and the contrastive space: %s", res.path,
                     ", ".join(unused))
        sizes = _sizes(mine)
        image_dim = mine["proj_contrast"].shape[0] if "proj_contrast" in mine else None
        model = ConchContrastive(**sizes, image_dim=image_dim)
        missing = sorted(set(model.state_dict()) - set(mine))
        unexpected = sorted(set(mine) - set(model.state_dict()))
        if missing or unexpected:
            raise EncoderError(f"{res.path} does not fit CONCH's text tower: missing "
                               f"{missing[:6]}, unexpected {unexpected[:6]}")
        model.load_state_dict({k: v.float() for k, v in mine.items()}, strict=True)
    tok = Tokenizer(find_tokenizer(tokenizer, res.path), model.context)
    return ConchText(model.eval().requires_grad_(False), tok, res.ident)
