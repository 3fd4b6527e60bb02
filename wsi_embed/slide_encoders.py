"""Slide-encoder registry: pretrained models that turn a slide's patch features into one
slide embedding. Presets are data (one table) as for patch encoders; each official checkpoint
is mapped onto our module's keys by the preset's remap and loaded strictly, its sizes read
from the checkpoint itself.

Every module's `encode(x (N, D), coords (N, 2) level-0 px, patch_size_level0)` gives (dim,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EncoderError
from .heads.abmil import ABMIL, GatedAttention
from .slide_gigapath import GigaPathSlideEncoder, gigapath_sizes, remap_gigapath
from .slide_prism import PrismSlideEncoder, prism_sizes, remap_prism
from .slide_titan import TitanSlideEncoder, remap_titan, titan_sizes


# -- modules -----------------------------------------------------------------------------
class AbmilSlideEncoder(nn.Module):
    """Gated-attention pooling (heads/abmil.py): CHIEF pools the input patch features with
    the attention, FEATHER the embedded ones."""

    def __init__(self, in_dim: int, hidden: int, attn_dim: int, n_classes: int,
                 pool_input: bool):
        super().__init__()
        self.abmil = ABMIL(in_dim, n_classes, dropout=0.0, hidden=hidden, attn_dim=attn_dim)
        self.pool_input = pool_input

    def encode(self, x: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
        mask = torch.ones(1, len(x), dtype=torch.bool, device=x.device)
        h, a, _ = self.abmil.pool(x[None], mask)
        return (a @ (x[None] if self.pool_input else h)).squeeze(1)[0]


class MadeleineEncoder(nn.Module):
    """MADELEINE's H&E slide embedding: a 3-layer pre-attention MLP whose output is split
    into `heads` interleaved channel groups, gated attention per group (softmax over
    patches), the attention-weighted sums flattened and projected."""

    def __init__(self, in_dim: int, hidden: int, heads: int, attn_hidden: int, dim: int):
        super().__init__()
        blocks: list[nn.Module] = []
        widths = [in_dim, hidden, hidden, hidden * heads]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(0.0)]
        self.pre_attn = nn.Sequential(*blocks)
        self.attn = nn.ModuleList(GatedAttention(hidden, attn_hidden, 0.0) for _ in range(heads))
        self.projector = nn.Linear(hidden * heads, dim)
        self.heads = heads

    def encode(self, x: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
        e = self.pre_attn(x).unflatten(-1, (-1, self.heads))  # (N, hidden, heads): e outer
        pooled = torch.stack([(torch.softmax(att(e[:, :, i]), dim=0) * e[:, :, i]).sum(0)
                              for i, att in enumerate(self.attn)], dim=-1)
        return self.projector(pooled.flatten())


# -- official layouts → ours ---------------------------------------------------------------
def _renamed(sd: dict, renames: dict[str, str], unused: tuple[str, ...]) -> dict:
    """Keys renamed by prefix; `unused` prefixes (parts of the official model the slide
    embedding does not use) dropped; anything else kept, for the strict load to name."""
    out = {}
    for k, v in sd.items():
        if k.startswith(unused):
            continue
        for old, new in renames.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


_GATED = {"attention_a.0.": "v.0.", "attention_b.0.": "u.0.", "attention_c.": "w."}


def remap_chief(sd: dict) -> dict:
    """hms-dbmi/CHIEF `CHIEF_pretraining.pth`: attention_net = [Linear, ReLU, Dropout,
    gated attention]; the classifiers, text fusion and organ embeddings are not used."""
    renames = {"attention_net.0.": "abmil.proj.0.", "classifiers.": "abmil.classifier."}
    renames |= {f"attention_net.3.{a}": f"abmil.attn.{b}" for a, b in _GATED.items()}
    return _renamed(sd, renames, ("instance_classifiers.", "att_head.", "text_to_vision.",
                                  "organ_embedding"))


def remap_feather(sd: dict) -> dict:
    """MIL-Lab's ABMILModel (FEATHER on the hub): `model.patch_embed/global_attn/classifier`."""
    renames = {"model.patch_embed.0.": "abmil.proj.0.", "model.classifier.": "abmil.classifier."}
    renames |= {f"model.global_attn.{a}": f"abmil.attn.{b}" for a, b in _GATED.items()}
    return _renamed(sd, renames, ())


def remap_madeleine(sd: dict) -> dict:
    """mahmoodlab/MADELEINE `model.pt`: `wsi_embedders.{pre_attn,attn.i}`, `projector`; the
    token projector is for training only."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    renames = {"wsi_embedders.pre_attn.": "pre_attn."}
    out = _renamed(sd, renames, ("token_projector.",))
    for k in list(out):
        if k.startswith("wsi_embedders.attn."):
            i, rest = k[len("wsi_embedders.attn."):].split(".", 1)
            for a, b in _GATED.items():
                if rest.startswith(a):
                    out[f"attn.{i}.{b}{rest[len(a):]}"] = out.pop(k)
    return out


# -- sizes from a (remapped) checkpoint ------------------------------------------------------
def abmil_sizes(sd: dict) -> dict:
    w = sd["abmil.proj.0.weight"]
    return {"in_dim": w.shape[1], "hidden": w.shape[0],
            "attn_dim": sd["abmil.attn.v.0.weight"].shape[0],
            "n_classes": sd["abmil.classifier.weight"].shape[0]}


def madeleine_sizes(sd: dict) -> dict:
    heads = len({k.split(".")[1] for k in sd if k.startswith("attn.")})
    return {"in_dim": sd["pre_attn.0.weight"].shape[1], "hidden": sd["pre_attn.0.weight"].shape[0],
            "heads": heads, "attn_hidden": sd["attn.0.v.0.weight"].shape[0],
            "dim": sd["projector.weight"].shape[0]}


@dataclass(frozen=True)
class SlideEncoderConfig:
    """One slide-encoder preset. `build(**sizes)` makes the module; `sizes` reads them from a
    remapped checkpoint; `default_sizes` are the published ones (`--weights random`)."""

    build: Callable[..., nn.Module]
    remap: Callable[[dict], dict]
    sizes: Callable[[dict], dict]
    default_sizes: dict
    patch_encoder: str  # the patch-encoder preset whose features it takes
    patch_px: int
    mpp: float
    needs_coords: bool
    dim: int
    hf_repo: str = ""
    hf_file: str = "model.safetensors"
    licence: str = ""
    gated: bool = False
    note: str = ""


def _chief(**s) -> nn.Module:
    return AbmilSlideEncoder(**s, pool_input=True)


def _feather(**s) -> nn.Module:
    return AbmilSlideEncoder(**s, pool_input=False)


_FEATHER = {"remap": remap_feather, "sizes": abmil_sizes, "needs_coords": False, "dim": 512,
            "licence": "CC-BY-NC-ND-4.0", "gated": True}

SLIDE_PRESETS: dict[str, SlideEncoderConfig] = {
    "chief": SlideEncoderConfig(
        _chief, remap_chief, abmil_sizes,
        {"in_dim": 768, "hidden": 512, "attn_dim": 256, "n_classes": 2},
        "chief_ctranspath", 256, 1.0, False, 768, hf_file="CHIEF_pretraining.pth",
        licence="AGPL-3.0 (code); weights: CHIEF's terms",
        note="CHIEF (hms-dbmi/CHIEF): gated attention over CHIEF-CTransPath features; the "
        "embedding is the attention-weighted mean of the input features (WSI_feature)"),
    "feather_conch15": SlideEncoderConfig(
        _feather, default_sizes={"in_dim": 768, "hidden": 512, "attn_dim": 384,
                                 "n_classes": 108},
        patch_encoder="conch_v1_5", patch_px=512, mpp=0.5,
        hf_repo="MahmoodLab/abmil.base.conch_v15.pc108-24k",
        note="FEATHER-24K (MIL-Lab ABMIL, supervised on 108 classes); embedding: the "
        "attention-pooled embedded features", **_FEATHER),
    "feather_uni2": SlideEncoderConfig(
        _feather, default_sizes={"in_dim": 1536, "hidden": 512, "attn_dim": 384,
                                 "n_classes": 108},
        patch_encoder="uni_v2", patch_px=256, mpp=0.5,
        hf_repo="MahmoodLab/abmil.base.uni_v2.pc108-24k", note="FEATHER-24K on UNI2-h features",
        **_FEATHER),
    "madeleine": SlideEncoderConfig(
        MadeleineEncoder, remap_madeleine, madeleine_sizes,
        {"in_dim": 512, "hidden": 512, "heads": 4, "attn_hidden": 512, "dim": 512},
        "conch_v1", 256, 1.0, False, 512, hf_repo="MahmoodLab/madeleine", hf_file="model.pt",
        licence="CC-BY-NC-ND-4.0", gated=True,
        note="MADELEINE (multi-head ABMIL over CONCH features at 10x; the H&E embedding)"),
    "gigapath_slide": SlideEncoderConfig(
        GigaPathSlideEncoder, remap_gigapath, gigapath_sizes,
        {"in_dim": 1536, "dim": 768, "depth": 12, "heads": 16, "hidden": 3072},
        "gigapath", 256, 0.5, True, 768, hf_repo="prov-gigapath/prov-gigapath",
        hf_file="slide_encoder.pth", licence="Apache-2.0 (code and weights; gated)",
        gated=True,
        note="Prov-GigaPath slide encoder (LongNet, dilated attention) as TRIDENT calls it: "
        "the state before the last layer, mean over patches; plain-torch attention in "
        "blocks (no flash-attn, any device)"),
    "prism": SlideEncoderConfig(
        PrismSlideEncoder, remap_prism, prism_sizes,
        {"in_dim": 2560, "dim": 1280, "latents": 512, "depth": 8, "tf_depth": 6},
        "virchow", 224, 0.5, False, 1280, hf_repo="paige-ai/Prism",
        licence="CC-BY-NC-ND-4.0", gated=True,
        note="PRISM (Perceiver over Virchow CLS ⊕ mean tile embeddings; "
        "slide_representations()['image_embedding'])"),
    "titan": SlideEncoderConfig(
        TitanSlideEncoder, remap_titan, titan_sizes,
        {"in_dim": 768, "dim": 768, "depth": 6, "heads": 12, "pool_heads": 8,
         "pool_queries": 128},
        "conch_v1_5", 512, 0.5, True, 768, hf_repo="MahmoodLab/TITAN",
        licence="CC-BY-NC-ND-4.0", gated=True,
        note="TITAN (ViT with 2-D ALiBi over the CONCH v1.5 feature grid; the contrastive "
        "pooler's embedding, as encode_slide_from_patch_features); attention in blocks: "
        "memory linear in the patch count"),
}


def get_slide_config(name: str) -> SlideEncoderConfig:
    try:
        return SLIDE_PRESETS[name]
    except KeyError:
        raise EncoderError(f"unknown slide encoder {name!r}; valid: "
                           f"{', '.join(sorted(SLIDE_PRESETS))}") from None


def load_slide_encoder(name: str, weights: str | None) -> tuple[nn.Module, str]:
    """The preset with its official weights (strict keys), or untrained at the published
    sizes with `weights="random"`; returns (module in eval mode, weights id)."""
    from .encoders import load_state_file, resolve_weights_for, unwrap_state_dict

    cfg = get_slide_config(name)
    res = resolve_weights_for(name, cfg.hf_repo, cfg.hf_file, cfg.gated, weights)
    if res.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cfg.build(**cfg.default_sizes)
        return model.eval().requires_grad_(False), res.ident
    sd = cfg.remap(unwrap_state_dict(load_state_file(res.path)))
    try:
        sizes = cfg.sizes(sd)
    except (KeyError, IndexError) as e:
        raise EncoderError(f"{res.path} is not a {name} checkpoint (no {e} in its keys)") \
            from None
    model = cfg.build(**sizes)
    want, have = set(model.state_dict()), set(sd)
    if want != have:
        raise EncoderError(
            f"{res.path} does not fit slide encoder {name!r}: missing "
            f"{sorted(want - have)[:6]}, unexpected {sorted(have - want)[:6]}. Is it the "
            "checkpoint of another model?")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval().requires_grad_(False), res.ident


@dataclass
class SlidePresetRow:
    """What `wsi-embed slide-encoders` lists."""

    name: str
    architecture: str
    patch_encoder: str
    patch_px: int
    mpp: float
    needs_coords: bool
    dim: int
    weights: str
    licence: str
    note: str


def _architecture(c: SlideEncoderConfig) -> str:
    with torch.device("meta"):  # the class name, without allocating the weights
        return type(c.build(**c.default_sizes)).__name__


def slide_registry_table() -> list[SlidePresetRow]:
    return [SlidePresetRow(n, _architecture(c), c.patch_encoder,
                           c.patch_px, c.mpp, c.needs_coords, c.dim,
                           f"hf:{c.hf_repo}" if c.hf_repo else "manual download (see note)",
                           c.licence, c.note)
            for n, c in sorted(SLIDE_PRESETS.items())]
