"""Every preset against its reference implementation.

`tests/fixtures/encoders/<preset>/` holds what the reference (TRIDENT, CONCH, transformers,
timm_ctp; see `make_fixtures.py` there) produced for a reduced configuration of the model with
random weights in the official checkpoint layout: the weights, the 4 input patches (named by
their coordinates on the sample slide and a checksum) and the embeddings. Ours loads the same
file through the CLI's loader and must give the same embeddings: model-only on the very
tensor the reference saw, and end to end through `wsi-embed extract` from the slide.
Negative controls show the check fails for the mistakes it exists to catch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from wsi_embed.encoders import CLIP, IMAGENET, PRESETS, load_encoder
from wsi_embed.slides import open_slide

from .conftest import CMU, cli

FIXTURES = Path(__file__).parent / "fixtures" / "encoders"
MODEL_ONLY = 0.9999
END_TO_END = 0.999
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").is_file())


def meta(name: str) -> dict:
    return json.loads((FIXTURES / name / "fixture.json").read_text())


def cases(name: str) -> list[str]:
    return list(meta(name)["cases"])


def expected(name: str, kind: str, case: str = "main") -> torch.Tensor:
    suffix = "" if case == "main" else f"_{case}"
    return torch.from_numpy(np.load(FIXTURES / name / f"{kind}{suffix}.npy"))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


_PATCHES: dict[int, np.ndarray] = {}


def patches(m: dict) -> np.ndarray:
    """The fixture's patches, read as the reference read them (OpenSlide, level 0)."""
    tile = m["tile"]
    if tile not in _PATCHES:
        with open_slide(CMU) as s:
            _PATCHES[tile] = np.stack([s.read_region(x, y, 0, tile, tile)
                                       for x, y in m["coords"]])
    arr = _PATCHES[tile]
    assert hashlib.sha256(arr.tobytes()).hexdigest() == m["patches_sha256"], \
        "the sample slide's patches are not those the fixture was made from"
    return arr


def model_input(m: dict, mean_std=None) -> torch.Tensor:
    """Centre crop to the input size, ToTensor, Normalize: the tensor the reference saw."""
    s = m["input_size"]
    x = torch.from_numpy(patches(m)).permute(0, 3, 1, 2).float() / 255
    o = (x.shape[-1] - s) // 2
    x = x[..., o:o + s, o:o + s]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean_std or m["mean_std"]))
    return (x - mean) / std


def register(monkeypatch, name: str) -> str:
    """The preset reduced as the fixture's reference was (depth, width), under a new name."""
    cfg, m = PRESETS[name], meta(name)
    key = f"fixture_{name}"
    monkeypatch.setitem(PRESETS, key, dataclasses.replace(
        cfg, kwargs={**cfg.kwargs, **m["ours"]}, dim=m["cases"]["main"]["dim"]))
    return key


def weights(name: str, case: str = "main") -> Path:
    return FIXTURES / name / meta(name)["cases"][case]["weights"]


def ours(monkeypatch, name: str, case: str = "main"):
    model, cfg, _ = load_encoder(register(monkeypatch, name), str(weights(name, case)))
    return model.eval(), cfg


def test_every_preset_has_a_reference_fixture():
    assert NAMES == sorted(PRESETS)
    assert len(PRESETS) >= 25


@pytest.mark.parametrize("name,case", [(n, c) for n in NAMES for c in cases(n)])
def test_model_only_matches_the_reference(monkeypatch, name, case):
    m = meta(name)
    model, _ = ours(monkeypatch, name, case)
    with torch.inference_mode():
        got = model(model_input(m))
    want = expected(name, "model_only", case)
    assert got.shape == want.shape
    assert min_cosine(got, want) >= MODEL_ONLY
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("name,case", [(n, c) for n in NAMES for c in cases(n)])
def test_end_to_end_through_extract_matches_the_reference(monkeypatch, tmp_path, name, case):
    """`wsi-embed extract` on the sample slide, tiles of the reference's size at the slide's
    own resolution (no resampling in the read), our resize/crop/normalise on the device."""
    m = meta(name)
    key = register(monkeypatch, name)
    r = cli("extract", CMU, "--out", tmp_path, "--encoder", key, "--weights",
            weights(name, case), "--patch-size", m["tile"], "--target-mpp", 0.499,
            "--min-tissue", 0, "--device", "cpu", "--num-workers", 0, "--batch-size", 64)
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "features" / key / "CMU-1-Small-Region.h5") as f:
        rows = {tuple(c): i for i, c in enumerate(f["coords"][:].tolist())}
        assert all(tuple(c) in rows for c in m["coords"]), "the tiler missed a fixture patch"
        got = torch.from_numpy(f["features"][:][[rows[tuple(c)] for c in m["coords"]]])
    assert min_cosine(got, expected(name, "end_to_end", case)) >= END_TO_END


# -- negative controls: the same checks fail for the mistakes they exist to catch -----------
def test_gelu_for_silu_in_virchow2_swiglu_fails(monkeypatch):
    m = meta("virchow2")
    model, _ = ours(monkeypatch, "virchow2")
    for block in model.trunk.blocks:
        block.mlp.act = nn.GELU()
    with torch.inference_mode():
        cos = min_cosine(model(model_input(m)), expected("virchow2", "model_only"))
    assert cos < MODEL_ONLY, cos


def test_mean_of_patch_tokens_for_cls_fails(monkeypatch):
    m = meta("uni_v1")
    model, _ = ours(monkeypatch, "uni_v1")
    with torch.inference_mode():
        tokens = model.trunk.forward_features(model_input(m))
        cos = min_cosine(tokens[:, model.num_prefix:].mean(1), expected("uni_v1", "model_only"))
    assert cos < MODEL_ONLY, cos


def test_imagenet_mean_std_for_clip_s_fails(monkeypatch):
    m = meta("conch_v1")
    assert tuple(map(tuple, m["mean_std"])) == CLIP
    model, _ = ours(monkeypatch, "conch_v1")
    with torch.inference_mode():
        cos = min_cosine(model(model_input(m, IMAGENET)), expected("conch_v1", "model_only"))
    assert cos < MODEL_ONLY, cos


def test_hibou_class_position_left_unfolded_fails(monkeypatch):
    """timm's DINOv2-reg layout has no class position: the remap must fold it into the
    token; dropping it instead is the plausible bug."""
    from safetensors.torch import load_file

    m = meta("hibou_b")
    model, _ = ours(monkeypatch, "hibou_b")
    raw = load_file(weights("hibou_b"))["embeddings.cls_token"]
    with torch.no_grad():
        model.trunk.cls_token.copy_(raw.float())
    with torch.inference_mode():
        cos = min_cosine(model(model_input(m)), expected("hibou_b", "model_only"))
    assert cos < MODEL_ONLY, cos


def test_conch_v1_5_stored_28x28_grid_is_resampled_as_the_reference_and_said(monkeypatch,
                                                                               caplog):
    caplog.set_level("WARNING")
    ours(monkeypatch, "conch_v1_5", "main")
    assert "28x28 patch grid" in caplog.text and "14x14" in caplog.text
    assert "bilinear" in caplog.text
    caplog.clear()
    ours(monkeypatch, "conch_v1_5", "grid14")
    assert "patch grid" not in caplog.text
