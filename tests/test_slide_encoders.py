"""Slide encoders against their reference code (fixtures made by
`tests/fixtures/slide_encoders/make_fixtures.py` from CHIEF, MIL-Lab (FEATHER) and
MADELEINE): the official checkpoint layout loads strictly through our loader and gives the
reference's slide embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_embed.errors import EncoderError
from wsi_embed.slide_encoders import SLIDE_PRESETS, load_slide_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "slide_encoders"
#: preset → fixture folder (the FEATHER presets share one architecture)
CASES = {"chief": "chief", "feather_conch15": "feather", "feather_uni2": "feather",
         "madeleine": "madeleine", "titan": "titan", "gigapath_slide": "gigapath",
         "prism": "prism"}


def fixture(folder: str):
    meta = json.loads((FIXTURES / folder / "fixture.json").read_text())
    data = np.load(FIXTURES / folder / "expected.npz")
    return meta, torch.from_numpy(data["x"]), torch.from_numpy(data["coords"]), \
        torch.from_numpy(data["z"])


def test_every_slide_preset_has_a_reference_fixture():
    assert set(CASES) == set(SLIDE_PRESETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_slide_embedding_equals_the_reference(name):
    meta, x, coords, want = fixture(CASES[name])
    model, ident = load_slide_encoder(name, str(FIXTURES / CASES[name] / meta["weights"]))
    assert ident.startswith("sha256:")
    with torch.inference_mode():
        got = model.encode(x, coords, 512)
    assert got.shape == want.shape
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.9999
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_published_sizes_build_untrained(name):
    model, ident = load_slide_encoder(name, "random")
    cfg = SLIDE_PRESETS[name]
    x = torch.randn(7, cfg.default_sizes["in_dim"])
    with torch.inference_mode():
        assert model.encode(x, torch.zeros(7, 2), 512).shape == (cfg.dim,)
    assert ident == "random"


def test_another_model_s_checkpoint_is_refused_naming_keys(tmp_path):
    meta, *_ = fixture("chief")
    with pytest.raises(EncoderError, match="does not fit slide encoder 'madeleine'|not a "
                                           "madeleine checkpoint"):
        load_slide_encoder("madeleine", str(FIXTURES / "chief" / meta["weights"]))
    sd = torch.load(FIXTURES / "chief" / meta["weights"], weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(EncoderError, match="unexpected.*extra.weight"):
        load_slide_encoder("chief", str(tmp_path / "c.pth"))
