"""`wsi-embed report` with HistoGPT, against the reference model's outputs
(tests/fixtures/histogpt, made by its make_fixture.py running marrlab/HistoGPT)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_embed.choices import HistoGPTSize
from wsi_embed.h5io import write_features_file
from wsi_embed.histogpt import SIZES, Decoding, generate
from wsi_embed.write_reports import ReportConfig, load_histogpt

from .conftest import cli
from .test_train import read_csv

FIXTURE = Path(__file__).parent / "fixtures" / "histogpt"


@pytest.fixture(scope="module")
def reference():
    model, tok, _ = load_histogpt(ReportConfig(Path("."), str(FIXTURE), Path(".")))
    return model, tok, np.load(FIXTURE / "expected.npz")


def test_the_reference_checkpoint_loads_and_reproduces_its_outputs(reference):
    """Strict load from the official layout; resampler latents, the prompt's next-token
    logits and 30 greedy tokens as the reference computed them."""
    model, tok, e = reference
    assert tok.encode("Final diagnosis:") == e["prompt"].tolist()
    x = torch.from_numpy(e["features"])[None]
    with torch.no_grad():
        lat = model.histogpt.perceiver_resampler(x)[0]
        media = model.media(x)
        logits = model(torch.from_numpy(e["prompt"])[None], media)[0]
    cos = torch.nn.functional.cosine_similarity(lat.flatten(),
                                                torch.from_numpy(e["latents"]).flatten(), 0)
    assert float(cos) >= 0.9999
    torch.testing.assert_close(media[0], torch.from_numpy(e["latents_gated"]), atol=1e-5,
                               rtol=0)
    assert float((logits - torch.from_numpy(e["logits"])).abs().max()) <= 1e-4
    greedy = generate(model, torch.from_numpy(e["features"]), e["prompt"].tolist(),
                      Decoding(max_new_tokens=30))
    assert greedy == e["greedy"].tolist() and len(set(greedy)) > 5
    # negative control: the slide matters (other features, other logits)
    with torch.no_grad():
        other = model(torch.from_numpy(e["prompt"])[None], model.media(x.flip(2)))[0]
    assert float((other - logits).abs().max()) > 1e-2


def test_sampling_is_seeded_and_one_beam_is_greedy(reference):
    model, _, e = reference
    x, prompt = torch.from_numpy(e["features"]), e["prompt"].tolist()

    def run(**kw):
        return generate(model, x, prompt, Decoding(max_new_tokens=25, **kw))

    a, b, c = run(method="sample", seed=3), run(method="sample", seed=3), run(method="sample",
                                                                              seed=4)
    assert a == b and a != c
    assert run(method="beam", num_beams=1) == run()
    beam = run(method="beam", num_beams=4)
    assert beam and all(0 <= t < model.config.vocab_size for t in beam)


def test_sizes_choice_matches_the_presets():
    assert {s.value for s in HistoGPTSize} == set(SIZES)


def _features(folder: Path, sid: str, x: np.ndarray, encoder: str = "ctranspath") -> None:
    n = len(x)
    coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 256
    write_features_file(folder / f"{sid}.h5", x, coords, {"patch_size": 256,
                                                         "patch_size_level0": 256},
                        {"encoder": encoder, "weights": "official", "embed_dim": x.shape[1]})


def test_report_command_writes_the_reference_report_and_a_failed_row(reference, tmp_path):
    model, tok, e = reference
    feats = tmp_path / "f"
    feats.mkdir()
    _features(feats, "slide_a", e["features"])
    _features(feats, "slide_b", e["features"][::-1].copy())
    _features(feats, "empty", np.zeros((0, 768), np.float32))
    r = cli("report", "--features", feats, "--model", FIXTURE, "--out", tmp_path / "o",
            "--max-new-tokens", "30")
    assert r.exit_code == 1, r.output  # one failed slide
    rows = {row["slide_id"]: row for row in read_csv(tmp_path / "o" / "reports.csv")}
    want = tok.decode(e["prompt"].tolist()[1:] + e["greedy"].tolist(),
                      skip_special_tokens=True).strip()
    assert rows["slide_a"]["status"] == "ok" and rows["slide_a"]["report"] == want
    assert (tmp_path / "o" / "reports" / "slide_a.txt").read_text() == want + "\n"
    assert rows["slide_a"]["report"].startswith("Final diagnosis:")
    assert rows["slide_b"]["status"] == "ok"  # patch order does not matter to the resampler
    assert rows["slide_b"]["report"] == want
    assert rows["empty"]["status"] == "failed" and "no patches" in rows["empty"]["error"]
    # a rerun keeps finished reports; an untrained model of a size runs (tests only)
    (feats / "empty.h5").unlink()
    r = cli("report", "--features", feats, "--model", FIXTURE, "--out", tmp_path / "o")
    rows = {row["slide_id"]: row for row in read_csv(tmp_path / "o" / "reports.csv")}
    assert r.exit_code == 0 and "2 already done" in r.output, r.output
    assert rows["slide_a"]["report"] == want
    r = cli("report", "--features", feats, "--model", "random", "--size", "tiny",
            "--tokenizer", FIXTURE, "--out", tmp_path / "r", "--max-new-tokens", "5",
            "--decoding", "sample")
    assert r.exit_code == 0, r.output
    assert len(read_csv(tmp_path / "r" / "reports.csv")) == 2


def test_report_refuses_other_features_and_missing_tokenizer(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    _features(feats, "s", np.ones((4, 1024), np.float32), encoder="uni_v1")
    r = cli("report", "--features", feats, "--model", FIXTURE, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--encoder ctranspath" in r.output, r.output
    r = cli("report", "--features", feats, "--model", "random", "--size", "tiny", "--out",
            tmp_path / "o")
    assert r.exit_code == 2 and "--tokenizer" in r.output, r.output
    r = cli("report", "--features", feats, "--model", "random", "--size", "tiny",
            "--tokenizer", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "vocab.json" in r.output, r.output


def test_a_50k_patch_bag_builds_no_patch_by_patch_tensor():
    """The resampler over 50,000 patches in a subprocess: its peak memory stays far below
    what one 50,000² float32 matrix needs (10 GB)."""
    code = (
        "import torch\n"
        "from wsi_embed.histogpt import SIZES, HistoGPT\n"
        "m = HistoGPT(SIZES['tiny']).eval()\n"
        "with torch.no_grad():\n"
        "    out = m.media(torch.randn(1, 50000, 768))\n"
        "assert out.shape == (1, 6, 32)\n"
        # this process's peak (VmHWM: unlike ru_maxrss, not inherited across fork + exec)
        "print(next(line.split()[1] for line in open('/proc/self/status')\n"
        "           if line.startswith('VmHWM')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 2_000_000, r.stdout  # KiB: under 2 GB
