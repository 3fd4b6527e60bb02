"""`wsi-embed encode-slides` through the CLI, and slide embeddings downstream (`train --head
linear|mlp`, `classify`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from wsi_embed.h5io import write_features_file
from wsi_embed.slide_encoders import load_slide_encoder

from .conftest import cli

FIXTURE = Path(__file__).parent / "fixtures" / "slide_encoders" / "chief"
WEIGHTS = FIXTURE / "CHIEF_pretraining.pth"  # CHIEF 'xs': 384-d patch features


def patch_features(folder: Path, sid: str, n: int, encoder="chief_ctranspath", px=256,
                   mpp=1.0, dim=384, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    coords = np.stack([np.arange(n) % 10, np.arange(n) // 10], 1) * 512
    write_features_file(folder / f"{sid}.h5", x, coords,
                        {"patch_size": px, "patch_size_level0": 2 * px, "target_mpp": mpp},
                        {"encoder": encoder, "weights": "sha256:patch", "embed_dim": dim})
    return x


def report_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_encode_slides_writes_the_model_s_embedding_and_refuses_wrong_features_per_slide(
        tmp_path):
    feats = tmp_path / "features"
    good = {f"s{i}": patch_features(feats, f"s{i}", 30 + i, seed=i) for i in range(3)}
    patch_features(feats, "uni", 20, encoder="uni_v1")
    patch_features(feats, "big", 20, px=512)
    patch_features(feats, "x20", 20, mpp=0.5)
    out = tmp_path / "out"
    args = ["encode-slides", "--features", feats, "--slide-encoder", "chief", "--out", out,
            "--weights", WEIGHTS, "--device", "cpu"]
    r = cli(*args)
    assert r.exit_code == 1, r.output  # some slides failed
    rows = report_rows(out / "encode_slides_report_chief.csv")
    assert {s: rows[s]["status"] for s in good} == {s: "ok" for s in good}
    hint = "wsi-embed extract SLIDES --out OUT --encoder chief_ctranspath --patch-size 256 " \
           "--target-mpp 1"
    for sid, why in (("uni", "patch encoder 'uni_v1'"), ("big", "512 px patches"),
                     ("x20", "at 0.5 µm/px")):
        assert rows[sid]["status"] == "failed" and why in rows[sid]["error"]
        assert hint in rows[sid]["error"]
        assert not (out / "slide_features" / "chief" / f"{sid}.h5").exists()
    model, ident = load_slide_encoder("chief", str(WEIGHTS))
    for sid, x in good.items():
        with h5py.File(out / "slide_features" / "chief" / f"{sid}.h5") as f:
            z = f["features"][()]
            assert f.attrs["slide_encoder"] == "chief" and f.attrs["weights"] == ident
            assert f.attrs["patch_encoder"] == "chief_ctranspath"
            assert f.attrs["n_patches"] == len(x) and f.attrs["patch_size"] == 256
        with torch.inference_mode():
            want = model.encode(torch.from_numpy(x), torch.zeros(len(x), 2), 512).numpy()
        np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)

    # a rerun keeps what is done; other weights would lose it: refused without --overwrite
    done = out / "slide_features" / "chief" / "s0.h5"
    before = done.stat().st_mtime_ns
    r = cli(*args)
    assert done.stat().st_mtime_ns == before and "skipped" in r.output
    r = cli(*args[:-4], "--weights", "random", "--device", "cpu")
    rows = report_rows(out / "encode_slides_report_chief.csv")
    assert rows["s0"]["status"] == "failed" and "--overwrite" in rows["s0"]["error"]


def slide_embeddings(folder: Path, n: int, encoder: str = "chief", dim: int = 64,
                     seed: int = 0) -> Path:
    """Slide embeddings (what encode-slides writes) with a planted class direction."""
    from wsi_embed.h5io import SLIDE_FEATURES_SCHEMA

    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        y = i % 2
        z = rng.standard_normal(dim) + 3.0 * y * direction
        with h5py.File(folder / f"s{i:03d}.h5", "w") as f:
            f.attrs.update({"schema": SLIDE_FEATURES_SCHEMA, "encoder": encoder,
                            "weights": "random", "embed_dim": dim})
            f.create_dataset("features", data=z.astype(np.float32))
        rows.append(f"s{i:03d},{y}")
    (folder / "labels.csv").write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_a_linear_probe_on_slide_embeddings_learns_a_planted_direction(tmp_path):
    labels = slide_embeddings(tmp_path / "emb", 160)
    for head in ("linear", "mlp"):
        out = tmp_path / f"m_{head}"
        r = cli("train", "--features", tmp_path / "emb", "--labels", labels, "--out", out,
                "--head", head, "--folds", 5, "--epochs", 40, "--lr", "5e-3")
        assert r.exit_code == 0, r.output
        metrics = json.loads((out / "metrics.json").read_text())
        auc = metrics["summary"]["auc"]["mean"] if "summary" in metrics else metrics["auc"]
        assert auc >= 0.95, (head, metrics)
    r = cli("classify", "--features", tmp_path / "emb", "--model",
            tmp_path / "m_linear" / "model.pt", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    rows = report_rows(tmp_path / "c" / "predictions.csv")
    right = sum(rows[f"s{i:03d}"]["prediction"] == str(i % 2) for i in range(160))
    assert right >= 140


def test_slide_embeddings_of_two_slide_encoders_are_not_mixed(tmp_path):
    slide_embeddings(tmp_path / "emb", 10)
    slide_embeddings(tmp_path / "other", 2, encoder="madeleine")
    for p in (tmp_path / "other").glob("*.h5"):
        p.rename(tmp_path / "emb" / f"m_{p.name}")
    r = cli("train", "--features", tmp_path / "emb", "--labels", tmp_path / "emb" /
            "labels.csv", "--out", tmp_path / "m", "--head", "linear")
    assert r.exit_code == 2 and "mixes features of different encoders" in r.output


def test_a_coords_encoder_gets_the_grid_at_the_features_patch_size(tmp_path):
    """TITAN lays patches on a grid of `patch_size_level0` (from the features file): the
    command's embedding equals the model's on those coords and that size."""
    weights = FIXTURE.parent / "titan" / "model.safetensors"  # TITAN reduced: 96-d input
    feats = tmp_path / "features"
    xs = {f"t{i}": patch_features(feats, f"t{i}", 25 + i, encoder="conch_v1_5", px=512,
                                  mpp=0.5, dim=96, seed=i) for i in range(2)}
    out = tmp_path / "out"
    r = cli("encode-slides", "--features", feats, "--slide-encoder", "titan", "--out", out,
            "--weights", weights, "--device", "cpu")
    assert r.exit_code == 0, r.output
    model, _ = load_slide_encoder("titan", str(weights))
    for sid, x in xs.items():
        with h5py.File(feats / f"{sid}.h5") as f:
            coords = torch.from_numpy(f["coords"][:])
        with h5py.File(out / "slide_features" / "titan" / f"{sid}.h5") as f:
            z = f["features"][()]
        with torch.inference_mode():
            want = model.encode(torch.from_numpy(x), coords, 1024).numpy()
            other = model.encode(torch.from_numpy(x), coords, 512).numpy()
        np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(z, other, atol=1e-4)  # the grid step matters
