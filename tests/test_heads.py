"""Heads: padding never changes a bag's output, tiny and huge bags work."""

from __future__ import annotations

import pytest
import torch

from wsi_embed.heads import HEADS, build_head


@pytest.mark.parametrize("name", list(HEADS))
def test_padding_is_invisible_and_attention_is_a_distribution(name):
    torch.manual_seed(0)
    head = build_head(name, 64, 3).eval()
    x = torch.randn(2, 50, 64)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 37:] = False
    x[1, 37:] = 1e3  # garbage in padded rows must not leak into the output
    with torch.inference_mode():
        out = head(x, mask)
        alone = head(x[1:, :37], torch.ones(1, 37, dtype=torch.bool))
    torch.testing.assert_close(out.logits[1], alone.logits[0], rtol=1e-4, atol=1e-5)
    if out.attention is not None:
        assert torch.all(out.attention[1, 37:] == 0)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(2))


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("n", [1, 3])
def test_bags_smaller_than_any_top_k_train(name, n):
    head = build_head(name, 16, 2).train()
    out = head(torch.randn(1, n, 16), torch.ones(1, n, dtype=torch.bool), torch.tensor([1]))
    loss = out.logits.sum() + (0 if out.aux_loss is None else out.aux_loss)
    loss.backward()
    assert torch.isfinite(out.logits).all()
    if name == "clam-sb" and n == 3:  # k = 1: one top and one bottom patch
        assert out.aux_loss is not None and out.aux_loss > 0


@pytest.mark.parametrize("name", list(HEADS))
def test_a_100k_patch_bag_runs_in_linear_memory(name):
    """An O(N²) attention would need 40 GB here; every head must stay linear in N. TransMIL
    (the slowest) gets 50,000 patches: its 8 heads' full attention would need 80 GB."""
    head = build_head(name, 32, 2).eval()
    n = 50_000 if name == "transmil" else 100_000
    with torch.inference_mode():
        out = head(torch.randn(1, n, 32), torch.ones(1, n, dtype=torch.bool))
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
    if out.attention is not None:
        assert out.attention.shape == (1, n)
        assert abs(float(out.attention.sum()) - 1) < 1e-3
