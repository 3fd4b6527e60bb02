"""Patch-encoder registry: presets are data (one table), built by one builder with timm.

Facts per model (architecture keywords, output, preprocessing, hub ids, licences) come from
`shared/ENCODERS.md`. Every preset is an `Encoder`: a timm trunk plus a pooling head, whose
state dict is `trunk.*` / `head.*`. Official checkpoints are mapped onto that layout by the
preset's `remap` before a strict load, so a wrong or partial checkpoint fails loudly.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import EncoderError

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))


Remap = Callable[[dict, nn.Module], dict]


def remap_timm(sd: dict, model: nn.Module) -> dict:
    """A plain timm checkpoint: every key belongs to the trunk."""
    return {"trunk." + k: v for k, v in sd.items()}


@dataclass(frozen=True)
class EncoderConfig:
    """One preset. `arch` is a timm architecture name (or a callable for test encoders).
    Per-model quirks travel with it as small functions, as timm's `pretrained_filter_fn`:
    `head` builds the module that pools the trunk's tokens (None: the trunk's own pooling),
    `adapt` changes the built trunk, `remap` maps an official checkpoint onto the
    `trunk.*` / `head.*` layout."""

    arch: str | Callable[..., nn.Module]
    kwargs: dict
    dim: int
    head: Callable[[nn.Module], nn.Module] | None = None
    input_size: int = 224
    resize: int = 224  # resize the patch to this, then centre-crop to input_size
    interpolation: str = "bilinear"
    mean_std: tuple = IMAGENET
    precision: str = "bf16"  # on CUDA; CPU always runs fp32
    hf_repo: str = ""
    hf_file: str = "pytorch_model.bin"
    remap: Remap = remap_timm
    adapt: Callable[[nn.Module], None] | None = None
    licence: str = ""
    gated: bool = False
    target_mpp: float = 0.5  # the resolution the authors trained at (a warning otherwise)
    output: str = "CLS token"  # what the embedding is
    note: str = ""
    #: how a stored position embedding of another grid is resampled at load (the reference's)
    pos_embed_fit: tuple[str, bool] = ("bicubic", True)  # (interpolation, antialias)

    @property
    def arch_name(self) -> str:
        return self.arch if isinstance(self.arch, str) else getattr(self.arch, "__name__", "?")


def _swiglu() -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


_VIT_L = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
          "dynamic_img_size": True}

# -- pooling heads and custom stems (the parts that are not stock timm) ----------------------
class ConchV1Pooler(nn.Module):
    """CONCH v1 `attn_pool_contrast` + `ln_contrast`: one learned query attends to all tokens."""

    def __init__(self, dim: int = 512, context_dim: int = 768, heads: int = 8):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(tokens).permute(1, 0, 2)  # (N, B, D) as nn.MultiheadAttention wants
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        out = self.attn(q, x, x, need_weights=False)[0]
        return self.ln_out(out[0])


class ConchV15Pooler(nn.Module):
    """CONCH v1.5 einops-style attentional pooler (no biases) + `ln_contrast`."""

    def __init__(self, dim: int = 768, context_dim: int = 1024, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        h = self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).reshape(b, 1, -1))
        return self.ln_out(out[:, 0])


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convs + 1x1, LayerNorm, NHWC output."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 **_: object):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, c = [], in_chans
        for out in (embed_dim // 8, embed_dim // 4):
            layers += [nn.Conv2d(c, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            c = out
        layers.append(nn.Conv2d(c, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClsMean(nn.Module):
    """Virchow's embedding: the class token ⊕ the mean of the patch tokens (registers out)."""

    def __init__(self, num_prefix: int):
        super().__init__()
        self.num_prefix = num_prefix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix:].mean(1)], dim=-1)


class ClsProjection(nn.Module):
    """CLIP's image embedding: the class token (after the final norm) times the bias-free
    visual projection."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens[:, 0])


def clip_projection_head(trunk: nn.Module) -> nn.Module:
    return ClsProjection(trunk.embed_dim, 512)


def cls_mean_head(trunk: nn.Module) -> nn.Module:
    return ClsMean(getattr(trunk, "num_prefix_tokens", 1))


def conch_v1_head(trunk: nn.Module) -> nn.Module:
    return ConchV1Pooler(512, trunk.embed_dim)


def conch_v1_5_head(trunk: nn.Module) -> nn.Module:
    return ConchV15Pooler(768, trunk.embed_dim)


def ibot_position_interpolation(trunk: nn.Module) -> None:
    """CONCH v1.5 (iBOT/DINO code) interpolates its 14x14 position grid to the input's at run
    time by a scale factor with DINO's +0.1 offset, not to a size as timm does; the two differ
    slightly, so the trunk does it the reference's way."""
    import math

    def pos_embed(x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        pos = trunk.pos_embed
        n = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[:, 1:]
        if (h, w) != (n, n):
            grid = nn.functional.interpolate(
                grid.reshape(1, n, n, c).permute(0, 3, 1, 2),
                scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
            grid = grid.permute(0, 2, 3, 1).reshape(1, -1, c)
        return torch.cat([trunk.cls_token.expand(b, -1, -1) + pos[:, :1],
                          x.reshape(b, -1, c) + grid], dim=1)

    trunk._pos_embed = pos_embed


def truncate_after_layer3(trunk: nn.Module) -> None:
    """CLAM's ResNet-50 baseline stops after layer3 (1024-d)."""
    trunk.layer4 = nn.Identity()


# -- checkpoints ---------------------------------------------------------------------------
def unwrap_state_dict(sd: dict) -> dict:
    """Strip the containers and prefixes that training frameworks add."""
    for key in ("state_dict", "model", "module"):
        if key in sd and isinstance(sd[key], dict) and not isinstance(sd[key], torch.Tensor):
            sd = sd[key]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _prefix(sd: dict, old: str, new: str) -> dict:
    return {new + k[len(old):]: v for k, v in sd.items() if k.startswith(old)}


#: transformers ≥ 5 names Dinov2's attention q/k/v/o_proj; the hub files keep the 4.x names
_HF5_ATTENTION = {"attention.q_proj": "attention.attention.query",
                  "attention.k_proj": "attention.attention.key",
                  "attention.v_proj": "attention.attention.value",
                  "attention.o_proj": "attention.output.dense"}


def _hf_vit(sd: dict) -> dict:
    """HF transformers ViTModel (ENCODERS.md §3.1) or Dinov2Model (§3.2) keys, in 4.x names as
    on the hub or 5.x, → timm ViT keys. They differ in a few names only: ViT's
    `layernorm_before/after`, `intermediate.dense` and the MLP's `output.dense`."""
    out: dict[str, torch.Tensor] = {}
    sd = {k.removeprefix("dinov2.").removeprefix("vit."): v for k, v in sd.items()}
    # transformers ≥ 5 names ViT blocks `layers.N` (4.x and the hub files: `encoder.layer.N`)
    sd = {("encoder.layer." + k[len("layers."):] if k.startswith("layers.") else k): v
          for k, v in sd.items()}
    for new, old in _HF5_ATTENTION.items():
        sd = {k.replace(new, old): v for k, v in sd.items()}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    glu: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("embeddings.mask_token") or k.startswith("pooler"):
            continue
        k2 = (k.replace("embeddings.cls_token", "cls_token")
              .replace("embeddings.position_embeddings", "pos_embed")
              .replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
              .replace("encoder.layer.", "blocks.")
              .replace("layer_scale1.lambda1", "ls1.gamma")
              .replace("layer_scale2.lambda1", "ls2.gamma")
              .replace("attention.output.dense", "attn.proj")
              .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
              .replace("intermediate.dense", "mlp.fc1").replace(".output.dense", ".mlp.fc2")
              .replace("mlp.weights_in", "mlp.fc1").replace("mlp.weights_out", "mlp.fc2"))
        if k2.startswith("layernorm."):
            k2 = "norm." + k2[len("layernorm."):]
        if ".attention.attention." in k2:
            block, rest = k2.split(".attention.attention.")
            part, kind = rest.split(".")
            qkv.setdefault(f"{block}.attn.qkv.{kind}", {})[part] = v
            continue
        if ".mlp.gate_proj." in k2 or ".mlp.up_proj." in k2:  # transformers 5 SwiGLU
            block, rest = k2.split(".mlp.")
            part, kind = rest.split(".")
            glu.setdefault(f"{block}.mlp.fc1.{kind}", {})[part] = v
            continue
        out[k2.replace(".mlp.down_proj.", ".mlp.fc2.")] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    for k, parts in glu.items():  # packed as 4.x `weights_in`: gate first, then up
        out[k] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)
    return out


def remap_conch_v1(sd: dict, model: nn.Module) -> dict:
    """open_clip's CoCa: the image tower under `visual.`; the pooler's parameter names
    match ours, the text tower and projections are dropped."""
    return {**_prefix(sd, "visual.trunk.", "trunk."),
            **_prefix(sd, "visual.attn_pool_contrast.", "head."),
            **_prefix(sd, "visual.ln_contrast.", "head.ln_out.")}


def remap_conch_v1_5(sd: dict, model: nn.Module) -> dict:
    """The CONCH v1.5 vision checkpoint: `trunk.*`, `attn_pool_contrast.*`, `ln_contrast.*`."""
    return {**_prefix(sd, "trunk.", "trunk."),
            **_prefix(sd, "attn_pool_contrast.", "head."),
            **_prefix(sd, "ln_contrast.", "head.ln_out.")}


def remap_hf_vit(sd: dict, model: nn.Module) -> dict:
    return remap_timm(_hf_vit(sd), model)


def remap_hf_dinov2_registers(sd: dict, model: nn.Module) -> dict:
    """HF Dinov2 with registers (Hibou) → timm `*_reg4_dinov2` (ENCODERS.md §3.3): the HF
    position embedding covers the class token, timm's (no_embed_class) does not, so the
    class token's position is folded into the token, as timm's own DINOv2-reg filter does."""
    sd = _hf_vit(sd)
    pos = sd["pos_embed"]
    sd["cls_token"] = sd["cls_token"].float() + pos[:, :1].float()  # fp16 files: add in fp32
    sd["pos_embed"] = pos[:, 1:]
    sd["reg_token"] = sd.pop("embeddings.register_tokens")
    return remap_timm(sd, model)


#: HF CLIP vision tower → timm CLIP ViT names (the q/k/v projections are packed apart)
_HF_CLIP = (("embeddings.patch_embedding.", "patch_embed.proj."), ("pre_layrnorm.", "norm_pre."),
            ("post_layernorm.", "norm."), ("encoder.layers.", "blocks."),
            (".self_attn.out_proj.", ".attn.proj."), (".layer_norm1.", ".norm1."),
            (".layer_norm2.", ".norm2."))


def remap_hf_clip(sd: dict, model: nn.Module) -> dict:
    """transformers CLIPModel (PLIP) → trunk (timm CLIP ViT) + `ClsProjection`; the text
    tower is dropped."""
    out = {"head.proj.weight": sd["visual_projection.weight"]}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith("vision_model.") or k.endswith("position_ids"):
            continue
        k = k[len("vision_model."):]
        if k == "embeddings.class_embedding":
            out["trunk.cls_token"] = v.reshape(1, 1, -1)
            continue
        if k == "embeddings.position_embedding.weight":
            out["trunk.pos_embed"] = v.unsqueeze(0)
            continue
        for old, new in _HF_CLIP:
            k = k.replace(old, new)
        if ".self_attn." in k:
            block, rest = k.split(".self_attn.")
            part, kind = rest.split(".")
            qkv.setdefault(f"trunk.{block}.attn.qkv.{kind}", {})[part] = v
            continue
        out["trunk." + k] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def remap_ctranspath(sd: dict, model: nn.Module) -> dict:
    """timm 0.5.4 Swin (the TransPath and CHIEF files) → timm 1.0, by timm's own filter."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    sd = checkpoint_filter_fn({k: v for k, v in sd.items() if not k.startswith("head")},
                              model.trunk)
    return remap_timm(sd, model)


def remap_resnet_trunc(sd: dict, model: nn.Module) -> dict:
    return remap_timm({k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))},
                      model)


def _kaiko(arch: str, dim: int, port: str = "", note: str = "", **kwargs) -> EncoderConfig:
    """kaiko.ai's ViTs ("Towards large-scale training of pathology FMs") as 1aurent's timm
    ports: one row shape, mean = std = 0.5, CLS."""
    return EncoderConfig(
        arch, {"img_size": 224, "num_classes": 0, **kwargs}, dim, mean_std=HALF,
        precision="fp32", hf_repo=f"1aurent/{port or arch}.kaiko_ai_towards_large_pathology_fms",
        hf_file="model.safetensors", licence="kaiko non-commercial (HF tag)", note=note)


def _hibou(arch: str, dim: int, mlp_ratio: float, repo: str, gated: bool = False,
           note: str = "") -> EncoderConfig:
    """HistAI's Hibou: HF Dinov2 with 4 registers and SwiGLU; the embedding is the
    pooler_output (the CLS token after the final norm)."""
    return EncoderConfig(
        arch, {"img_size": 224, "init_values": 1e-5, "mlp_ratio": mlp_ratio, "num_classes": 0,
               "global_pool": "token", "swiglu": True},
        dim, output="CLS token (pooler_output)", interpolation="bicubic", mean_std=HIBOU,
        precision="fp32", hf_repo=repo, hf_file="model.safetensors",
        remap=remap_hf_dinov2_registers, licence="Apache-2.0", gated=gated, note=note)


#: The registry. Keys are preset names as used by `--encoder`.
PRESETS: dict[str, EncoderConfig] = {
    "uni_v1": EncoderConfig(
        "vit_large_patch16_224", _VIT_L, 1024, hf_repo="MahmoodLab/UNI",
        licence="CC-BY-NC-ND-4.0", gated=True),
    "uni_v2": EncoderConfig(
        "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "init_values": 1e-5, "no_embed_class": True,
         "reg_tokens": 8, "num_classes": 0, "dynamic_img_size": True, "swiglu": True},
        1536, hf_repo="MahmoodLab/UNI2-h", licence="CC-BY-NC-ND-4.0", gated=True),
    "conch_v1": EncoderConfig(
        "vit_base_patch16_224", {"img_size": 448, "num_classes": 0, "dynamic_img_size": True,
                                 "global_pool": ""},
        512, head=conch_v1_head, output="attention-pooled (1 query) + LayerNorm",
        input_size=448, resize=448, interpolation="bicubic",
        mean_std=CLIP, precision="fp32", hf_repo="MahmoodLab/CONCH", remap=remap_conch_v1,
        licence="CC-BY-NC-ND-4.0", gated=True, note="image tower: attention-pooled, no proj"),
    "conch_v1_5": EncoderConfig(
        "vit_large_patch16_224", {"img_size": 224, "init_values": 1.0, "num_classes": 0,
                                  "dynamic_img_size": True, "global_pool": ""},
        768, head=conch_v1_5_head, output="attention-pooled (1 query) + LayerNorm",
        input_size=448, resize=448, hf_repo="MahmoodLab/conchv1_5",
        hf_file="pytorch_model_vision.bin", remap=remap_conch_v1_5, licence="CC-BY-NC-ND-4.0",
        gated=True, adapt=ibot_position_interpolation, pos_embed_fit=("bilinear", False),
        note="trunk on a 14x14 grid as the reference (TRIDENT/CONCH) builds it: a 28x28 "
        "stored grid is resampled at load, 448 px input interpolated at run time"),
    "virchow": EncoderConfig(
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
         "num_classes": 0, "dynamic_img_size": True, "swiglu": True},
        2560, head=cls_mean_head, output="CLS ⊕ mean of patch tokens",
        interpolation="bicubic", precision="fp16", hf_repo="paige-ai/Virchow",
        licence="Apache-2.0 (config field; gated, HF access terms)", gated=True,
        note="Virchow v1, ViT-H/14 SwiGLU"),
    "virchow2": EncoderConfig(
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
         "num_classes": 0, "reg_tokens": 4, "dynamic_img_size": True, "swiglu": True},
        2560, head=cls_mean_head, output="CLS ⊕ mean of patch tokens",
        interpolation="bicubic", hf_repo="paige-ai/Virchow2",
        licence="CC-BY-NC-ND-4.0", gated=True, note="CLS ⊕ mean of patch tokens"),
    "h_optimus_0": EncoderConfig(
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
         "dynamic_img_size": False},
        1536, mean_std=HOPTIMUS, hf_repo="bioptimus/H-optimus-0",
        licence="Apache-2.0"),
    "h_optimus_1": EncoderConfig(
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
         "dynamic_img_size": False},
        1536, mean_std=HOPTIMUS, hf_repo="bioptimus/H-optimus-1",
        licence="CC-BY-NC-ND-4.0", gated=True),
    "gigapath": EncoderConfig(
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
         "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        1536, resize=256, interpolation="bicubic",
        hf_repo="prov-gigapath/prov-gigapath", licence="prov-gigapath licence (see HF page)",
        gated=True, note="Resize 256 + CenterCrop 224"),
    "phikon_v2": EncoderConfig(
        "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0},
        1024, precision="fp32", hf_repo="owkin/phikon-v2", hf_file="model.safetensors",
        remap=remap_hf_vit, licence="Owkin non-commercial"),
    "midnight": EncoderConfig(
        "vit_giant_patch14_dinov2", {"img_size": 224, "num_classes": 0, "global_pool": ""},
        3072, head=cls_mean_head, output="CLS ⊕ mean of patch tokens", mean_std=HALF,
        hf_repo="kaiko-ai/midnight", hf_file="model.safetensors", remap=remap_hf_vit,
        licence="MIT", note="Midnight-12k, DINOv2 ViT-g/14 (HF Dinov2Model), trained at "
        "0.25-2 µm/px; the card's CLS ⊕ mean (TRIDENT's default is CLS only, 1536)"),
    "phikon": EncoderConfig(
        "vit_base_patch16_224", {"img_size": 224, "num_classes": 0}, 768, precision="fp32",
        hf_repo="owkin/phikon", hf_file="pytorch_model.bin", remap=remap_hf_vit,
        licence="Owkin non-commercial", note="iBOT ViT-B/16, HF ViTModel: CLS of "
        "last_hidden_state"),
    "ctranspath": EncoderConfig(
        "swin_tiny_patch4_window7_224", {"num_classes": 0, "convstem": True}, 768,
        output="mean of final tokens",
        precision="fp32", hf_repo="1aurent/swin_tiny_patch4_window7_224.CTransPath",
        hf_file="model.safetensors", remap=remap_ctranspath, licence="GPL-3.0", target_mpp=1.0,
        note="Swin-T with ConvStem; authors recommend 1.0 µm/px"),
    "resnet50_trunc": EncoderConfig(
        "resnet50", {"num_classes": 0}, 1024, precision="fp32", adapt=truncate_after_layer3,
        output="layer3 features, averaged",
        hf_repo="timm/resnet50.tv_in1k", hf_file="model.safetensors", remap=remap_resnet_trunc,
        licence="BSD-3-Clause", note="ImageNet ResNet-50 cut after layer3 (CLAM baseline)"),
    "chief_ctranspath": EncoderConfig(
        "swin_tiny_patch4_window7_224", {"num_classes": 0, "convstem": True}, 768,
        output="mean of final tokens", precision="fp32", hf_file="CHIEF_CTransPath.pth",
        remap=remap_ctranspath, licence="GPL-3.0 (CTransPath); weights: hest-bench terms",
        gated=True, target_mpp=1.0,
        note="CHIEF's re-trained CTransPath (TRIDENT's 'ctranspath'): dataset "
        "MahmoodLab/hest-bench, fm_v1/ctranspath/CHIEF_CTransPath.pth"),
    "hibou_b": _hibou("vit_base_patch14_reg4_dinov2", 768, 5.33334, "histai/hibou-b",
                      note="DINOv2 ViT-B/14, 4 registers, SwiGLU"),
    "hibou_l": _hibou("vit_large_patch14_reg4_dinov2", 1024, 5.34375, "histai/hibou-L",
                      gated=True, note="DINOv2 ViT-L/14, 4 registers, SwiGLU (packed width "
                      "5472: HF's SwiGLU sizing, not 2 x 2.66667)"),
    "gpfm": EncoderConfig(
        "vit_large_patch14_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        1024, interpolation="bicubic", precision="fp16", hf_repo="majiabo/GPFM",
        hf_file="GPFM.pth", licence="CC-BY-NC-ND-4.0", note="GPFM, DINOv2 ViT-L/14"),
    "lunit_vits8": EncoderConfig(
        "vit_small_patch8_224", {"img_size": 224, "num_classes": 0}, 384,
        interpolation="bicubic", mean_std=LUNIT, precision="fp32",
        hf_repo="1aurent/vit_small_patch8_224.lunit_dino", hf_file="model.safetensors",
        licence="Lunit non-commercial", note="Lunit DINO ViT-S/8 (trained at 20x and 40x)"),
    "plip": EncoderConfig(
        "vit_base_patch32_clip_quickgelu_224", {"img_size": 224, "num_classes": 0,
                                                 "global_pool": ""},
        512, head=clip_projection_head, output="CLS projected (CLIP image embedding)",
        interpolation="bicubic", mean_std=CLIP, precision="fp32", hf_repo="vinid/plip",
        remap=remap_hf_clip, licence="see the vinid/plip card (research use)",
        note="PLIP: CLIP ViT-B/32 image tower (transformers CLIPModel)"),
    "kaiko_vits8": _kaiko("vit_small_patch8_224", 384),
    "kaiko_vits16": _kaiko("vit_small_patch16_224", 384),
    "kaiko_vitb8": _kaiko("vit_base_patch8_224", 768),
    "kaiko_vitb16": _kaiko("vit_base_patch16_224", 768),
    "kaiko_vitl14": _kaiko(
        "vit_large_patch14_reg4_dinov2", 1024, port="vit_large_patch14_reg4_224", img_size=518,
        dynamic_img_size=True,
        note="checkpoint grid 37x37 (518 px), run at 224 with timm's dynamic resampling"),
}


def get_config(name: str) -> EncoderConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r}; valid: {', '.join(sorted(PRESETS))}") \
            from None


class Encoder(nn.Module):
    """trunk (timm) + head (pooling of the trunk's tokens, or none: the trunk pools):
    uint8-free, takes normalised (B, 3, S, S) input."""

    def __init__(self, trunk: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk
        self.head = head if head is not None else nn.Identity()
        self.pools_tokens = head is not None
        self.num_prefix = getattr(trunk, "num_prefix_tokens", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pools_tokens:
            return self.trunk(x)
        return self.head(self.trunk.forward_features(x))


def build_encoder(name: str, device: str | torch.device = "cpu") -> tuple[Encoder, EncoderConfig]:
    """The preset's architecture, untrained: seeded on a forked RNG, so every process builds
    the same one and the caller's random state is left as it was."""
    import timm

    cfg = get_config(name)
    kw = dict(cfg.kwargs)
    if kw.pop("swiglu", False):
        kw.update(_swiglu())
    if kw.pop("convstem", False):
        kw["embed_layer"] = ConvStem
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        if callable(cfg.arch):
            trunk = cfg.arch(**kw)
        else:
            trunk = timm.create_model(cfg.arch, pretrained=False, **kw)
        if cfg.adapt is not None:
            cfg.adapt(trunk)
        model = Encoder(trunk, cfg.head(trunk) if cfg.head is not None else None)
    return model.eval(), cfg


def remap_checkpoint(sd: dict, cfg: EncoderConfig, model: Encoder) -> dict:
    """An official checkpoint (or one saved from this Encoder) → this Encoder's keys. The
    layout is decided on whole key sets, never on one prefix (CONCH v1.5's official file
    shares `trunk.*` with ours): the file as stored or as the preset's remap reads it,
    whichever differs from the model's keys in fewer names, so that a strict load that
    fails names the keys that really differ. A position embedding stored for another grid
    is then resampled to the model's."""
    sd = unwrap_state_dict(sd)
    want = set(model.state_dict())
    if set(sd) != want:
        try:
            remapped = cfg.remap(sd, model)
        except (KeyError, ValueError, RuntimeError, IndexError):
            remapped = None  # not this preset's official layout at all
        if remapped is not None and len(want ^ set(remapped)) <= len(want ^ set(sd)):
            sd = remapped
    return _fit_pos_embed(sd, model, cfg.pos_embed_fit)


def _fit_pos_embed(sd: dict, model: Encoder, how: tuple[str, bool]) -> dict:
    """Resample `trunk.pos_embed` when it was stored for another patch grid (CONCH v1.5 is
    seen with 14x14 and 28x28) the way the preset's reference does (timm's checkpoint
    filter: bicubic, antialiased; CONCH v1.5: bilinear), saying so in the log."""
    key = "trunk.pos_embed"
    want = model.state_dict().get(key)
    have = sd.get(key)
    if want is None or have is None or have.shape == want.shape or have.ndim != 3:
        return sd
    from timm.layers import resample_abs_pos_embed

    trunk = model.trunk
    prefix = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
    grid = tuple(trunk.patch_embed.grid_size)
    old = int(round((have.shape[1] - prefix) ** 0.5))
    if old * old + prefix != have.shape[1] or have.shape[2] != want.shape[2]:
        return sd  # not a square grid of this width: the strict load names the mismatch
    mode, antialias = how
    log.warning("the checkpoint's position embedding is for a %dx%d patch grid, the model's "
                "%dx%d: resampled (%s%s, as the reference implementation does)", old, old,
                *grid, mode, ", antialiased" if antialias else "")
    sd = dict(sd)
    sd[key] = resample_abs_pos_embed(have.float(), new_size=list(grid), old_size=[old, old],
                                     num_prefix_tokens=prefix, interpolation=mode,
                                     antialias=antialias).to(have.dtype)
    return sd


def load_state_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from e


def load_weights(model: Encoder, cfg: EncoderConfig, name: str, path: Path) -> None:
    """Strict load; a mismatch lists the missing and unexpected keys."""
    sd = remap_checkpoint(load_state_file(path), cfg, model)
    missing, unexpected = _key_diff(model, sd)
    if missing or unexpected:
        raise EncoderError(
            f"{path} does not fit encoder {name!r} ({cfg.arch_name}): "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys "
            f"{_few(unexpected)}. Is it the checkpoint of another model?")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EncoderError(f"{path} does not fit encoder {name!r}: "
                           f"{' '.join(str(e).split())[:800]}") from e


def _key_diff(model: nn.Module, sd: dict) -> tuple[list[str], list[str]]:
    want = set(model.state_dict())
    return sorted(want - set(sd)), sorted(set(sd) - want)


def _few(keys: list[str], n: int = 6) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model_vision.bin",
                "model.pth", "model.pt")


@dataclass
class ResolvedWeights:
    path: Path | None  # None: random
    ident: str  # recorded in the features file: "random" or "sha256:<hex>"
    source: str = ""


def resolve_weights(name: str, weights: str | None,
                    env: dict[str, str] | None = None) -> ResolvedWeights:
    """A patch-encoder preset's weights (see `resolve_weights_for`)."""
    cfg = get_config(name)
    return resolve_weights_for(name, cfg.hf_repo, cfg.hf_file, cfg.gated, weights, env)


def local_weights(name: str, hf_file: str, env: dict[str, str] | None = None) -> Path | None:
    """The checkpoint under $WSI_EMBED_WEIGHTS for a preset, if one is there."""
    env = os.environ if env is None else env
    folder = env.get("WSI_EMBED_WEIGHTS")
    if not folder:
        return None
    base = Path(folder)
    candidates = [base / name / f for f in (hf_file, *WEIGHT_FILES)]
    candidates += [base / f"{name}{ext}" for ext in (".safetensors", ".bin", ".pth", ".pt")]
    return next((c for c in candidates if c.is_file()), None)


def hub_download(repo: str, file: str) -> tuple[Path | None, str]:
    """The file from the Hugging Face hub (its cache), or None and why not."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, file)), ""
    except Exception as e:  # offline, gated, no token: all end in the same advice
        return None, " ".join(str(e).split())[:300]


def gated_advice(repo: str) -> str:
    return (f"It is gated: accept its licence on https://huggingface.co/{repo} and log in "
            "(HF_TOKEN) first.")


def resolve_weights_for(name: str, hf_repo: str, hf_file: str, gated: bool,
                        weights: str | None, env: dict[str, str] | None = None
                        ) -> ResolvedWeights:
    """--weights PATH → $WSI_EMBED_WEIGHTS/<name>/ → Hugging Face hub → an error saying what
    to do. Shared by patch and slide encoders."""
    env = os.environ if env is None else env
    if weights == "random":
        return ResolvedWeights(None, "random", "random (untrained; tests and benchmarks only)")
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise EncoderError(f"--weights {p}: no such file")
        return ResolvedWeights(p, "sha256:" + sha256_file(p), str(p))
    folder = env.get("WSI_EMBED_WEIGHTS")
    local = local_weights(name, hf_file, env)
    if local is not None:
        return ResolvedWeights(local, "sha256:" + sha256_file(local), str(local))
    if hf_repo:
        p, reason = hub_download(hf_repo, hf_file)
        if p is not None:
            return ResolvedWeights(p, "sha256:" + sha256_file(p), f"hf:{hf_repo}")
    else:
        reason = "no hub repository known for this preset"
    gate = f" {gated_advice(hf_repo)}" if gated and hf_repo else ""
    raise EncoderError(
        f"no weights for encoder {name!r}: tried --weights, $WSI_EMBED_WEIGHTS"
        f"{' (' + folder + ')' if folder else ' (unset)'} and the Hugging Face hub "
        f"({hf_repo or '-'}: {reason}).{gate} Download {hf_file} and pass --weights "
        f"PATH, or put it at $WSI_EMBED_WEIGHTS/{name}/{hf_file}. "
        "(--weights random builds an untrained model, for tests only.)")


def load_encoder(name: str, weights: str | None, device: str | torch.device = "cpu",
                 env: dict[str, str] | None = None) -> tuple[Encoder, EncoderConfig, str]:
    """Build the preset, load its weights; returns (model on device, config, weights id)."""
    res = resolve_weights(name, weights, env)
    model, cfg = build_encoder(name, "cpu")
    if res.path is not None:
        load_weights(model, cfg, name, res.path)
    return model.to(device), cfg, res.ident


@dataclass
class PresetRow:
    """What a pipeline needs to know of a preset (`wsi-embed encoders --json`)."""

    name: str
    arch: str
    dim: int
    output: str
    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_mpp: float  # µm/px the authors trained at
    precision: str  # on CUDA
    weights: str
    weights_file: str
    gated: bool
    licence: str
    note: str


def registry_table() -> list[PresetRow]:
    return [PresetRow(n, c.arch_name, c.dim, c.output, c.input_size, c.resize,
                      c.interpolation, tuple(c.mean_std[0]), tuple(c.mean_std[1]),
                      c.target_mpp, c.precision,
                      f"hf:{c.hf_repo}" if c.hf_repo else "manual download (see note)",
                      c.hf_file, c.gated,
                      c.licence, c.note)
            for n, c in sorted(PRESETS.items())]
