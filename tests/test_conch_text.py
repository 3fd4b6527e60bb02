"""CONCH's text tower and contrastive space against CONCH's own code.

`tests/fixtures/conch_text/` (made by `make_fixture.py` there with mahmoodlab/CONCH): a
reduced CoCa with random weights in the official layout, a small tokenizer of ours with
CONCH's pipeline, and what CONCH's `tokenize`, `encode_text`, `encode_image` gave.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_embed.conch_text import TOKENIZER_FILE, find_tokenizer, load_conch_text
from wsi_embed.errors import EncoderError, UsageError

FIXTURE = Path(__file__).parent / "fixtures" / "conch_text"
WEIGHTS = FIXTURE / "pytorch_model.bin"
TOKENIZER = FIXTURE / "tokenizer.json"
PROMPTS = json.loads((FIXTURE / "prompts.json").read_text())
EXPECTED = np.load(FIXTURE / "expected.npz")


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b),
                                                       dim=-1).min())


@pytest.fixture(scope="module")
def conch():
    return load_conch_text(str(WEIGHTS), TOKENIZER)


def test_token_ids_equal_conch_s_for_punctuation_accents_unknown_words_and_overflow(conch):
    ids = conch.tokenizer.encode(PROMPTS)
    assert ids.shape == (len(PROMPTS), 128)
    assert np.array_equal(ids.numpy(), EXPECTED["ids"])


def test_a_prompt_over_the_context_is_truncated_with_a_warning(conch, caplog):
    caplog.set_level("WARNING")
    conch.tokenizer.encode(PROMPTS[:1])
    assert "truncated" not in caplog.text
    conch.tokenizer.encode(PROMPTS[-1:])
    assert "truncated to 127 tokens" in caplog.text


def test_text_embeddings_equal_conch_s_encode_text(conch):
    with torch.inference_mode():
        got = conch.model.encode_text(conch.tokenizer.encode(PROMPTS))
    assert cos(got, EXPECTED["text"]) >= 0.9999


def test_projected_stored_features_equal_conch_s_encode_image(conch):
    """What `extract --encoder conch_v1` stores (unprojected pooled features), projected here,
    is CONCH's default `encode_image()`; the unprojected ones are not."""
    with torch.inference_mode():
        got = conch.model.project_image(torch.from_numpy(EXPECTED["pooled"]))
    assert cos(got, EXPECTED["image"]) >= 0.9999
    assert cos(torch.nn.functional.normalize(torch.from_numpy(EXPECTED["pooled"]), dim=-1),
               EXPECTED["image"]) < 0.9


def test_patch_by_prompt_logits_equal_conch_s(conch):
    with torch.inference_mode():
        img = conch.model.project_image(torch.from_numpy(EXPECTED["pooled"]))
        txt = conch.model.encode_text(conch.tokenizer.encode(PROMPTS))
        logits = img @ txt.T * conch.model.logit_scale.exp()
    assert np.allclose(logits.numpy(), EXPECTED["logits"], atol=1e-5)


def test_a_checkpoint_without_a_text_tower_is_refused(tmp_path):
    sd = torch.load(WEIGHTS, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("text.")},
               tmp_path / "vision_only.bin")
    with pytest.raises(EncoderError, match="no CONCH text tower"):
        load_conch_text(str(tmp_path / "vision_only.bin"), TOKENIZER)


def test_a_missing_tokenizer_names_where_to_get_it(tmp_path):
    with pytest.raises(UsageError, match=TOKENIZER_FILE + ".*github.com/mahmoodlab/CONCH"):
        find_tokenizer(None, tmp_path / "pytorch_model.bin", env={})
    (tmp_path / TOKENIZER_FILE).write_text(TOKENIZER.read_text())
    assert find_tokenizer(None, tmp_path / "pytorch_model.bin", env={}) == \
        tmp_path / TOKENIZER_FILE
    with pytest.raises(UsageError, match="not a tokenizers JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        load_conch_text(str(WEIGHTS), bad)


def test_the_tokenizer_file_s_prefix_space_is_kept():
    """CONCH's code run under transformers 4.41-4.57 drops the file's `add_prefix_space`
    (the first word loses its space marker); the file, transformers 5 and the releases CONCH
    was trained with keep it, and so do we. The fixture holds both tokenisations."""
    with_space, without = EXPECTED["ids"], EXPECTED["ids_without_prefix_space"]
    assert (with_space[:, 1] != without[:, 1])[:5].all()  # the first word of each prompt
