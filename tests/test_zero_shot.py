"""`wsi-embed zero-shot` and `wsi-embed search` on stored conch_v1 features, with the reduced
CONCH of `tests/fixtures/conch_text/` (random weights): patches planted along a class's (or
a query's) text direction must decide the prediction, lead the maps and come first."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_embed.conch_text import load_conch_text
from wsi_embed.encoders import sha256_file
from wsi_embed.h5io import read_coords_file, write_features_file
from wsi_embed.zeroshot import DEFAULT_TEMPLATES

from .conftest import CMU, cli, copy

FIXTURE = Path(__file__).parent / "fixtures" / "conch_text"
WEIGHTS = FIXTURE / "pytorch_model.bin"
TOKENIZER = FIXTURE / "tokenizer.json"
CLASSES = {"tumor": ["tumor", "carcinoma"], "normal": ["normal tissue"]}
ARGS = ["--weights", WEIGHTS, "--tokenizer", TOKENIZER]


@pytest.fixture(scope="module")
def conch():
    return load_conch_text(str(WEIGHTS), TOKENIZER)


def pooled_along(conch, direction: torch.Tensor, n: int, rng, noise: float = 0.05) -> np.ndarray:
    """Stored (unprojected) features whose projection points along `direction`."""
    p = conch.model.proj_contrast.detach()
    base = torch.linalg.lstsq(p.T, direction.unsqueeze(1)).solution.squeeze(1)
    base = base / base.norm()
    x = base.numpy()[None] * 8 + noise * rng.standard_normal((n, len(base)))
    return x.astype(np.float32)


def write_slide(folder: Path, sid: str, x: np.ndarray, coords=None, attrs=None,
                encoder: str = "conch_v1") -> None:
    if coords is None:
        side = int(np.ceil(np.sqrt(len(x))))
        coords = np.stack([np.arange(len(x)) % side, np.arange(len(x)) // side], 1) * 512
        attrs = {"patch_size": 512, "patch_size_level0": 512}
    write_features_file(folder / f"{sid}.h5", x, coords, attrs,
                        {"encoder": encoder, "weights": "sha256:" + sha256_file(WEIGHTS),
                         "embed_dim": x.shape[1]})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, conch):
    """6 slides of 200 random patches; 3 hold 12 patches along 'tumor', 3 along 'normal'."""
    root = tmp_path_factory.mktemp("zs")
    emb = conch.class_embeddings(CLASSES, DEFAULT_TEMPLATES)
    rng = np.random.default_rng(0)
    truth, planted = {}, {}
    for i in range(6):
        c = i % 2
        x = rng.standard_normal((200, 64)).astype(np.float32)
        idx = rng.choice(200, 12, replace=False)
        x[idx] = pooled_along(conch, emb[c], 12, rng)
        sid = f"s{i}"
        write_slide(root / "features", sid, x)
        truth[sid], planted[sid] = list(CLASSES)[c], idx
    (root / "classes.yaml").write_text(
        "classes:\n  tumor: [tumor, carcinoma]\n  normal: [normal tissue]\n")
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(
        f"{s},{lab}\n" for s, lab in truth.items()))
    return root, truth, planted


def test_zero_shot_predicts_the_class_whose_patches_a_slide_holds(tmp_path, cohort):
    root, truth, planted = cohort
    out = tmp_path / "zs"
    r = cli("zero-shot", "--features", root / "features", "--classes", root / "classes.yaml",
            "--out", out, "--top-k", 10, "--labels", root / "labels.csv", *ARGS)
    assert r.exit_code == 0, r.output
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("slide_id,n_patches,prediction,prob_tumor,prob_normal,status,")
    got = {line.split(",")[0]: line.split(",")[2] for line in rows[1:]}
    assert got == truth
    assert json.loads((out / "metrics.json").read_text())["balanced_accuracy"] == 1.0
    for sid, idx in planted.items():
        with h5py.File(out / "attention" / f"{sid}.h5") as f:
            sim = f["similarity"][:]
            c = list(CLASSES).index(truth[sid])
            assert set(np.argsort(-sim[:, c])[:12]) == set(idx)
            assert f["patch_probabilities"].shape == (200, 2)


def test_mean_pooling_dilutes_a_few_patches_that_topk_finds(tmp_path, cohort):
    root, truth, _ = cohort
    r = cli("zero-shot", "--features", root / "features", "--classes", root / "classes.yaml",
            "--out", tmp_path / "m", "--pooling", "mean", *ARGS)
    assert r.exit_code == 0, r.output
    margin = {}
    for line in (tmp_path / "m" / "predictions.csv").read_text().splitlines()[1:]:
        sid, _, _, pt, pn = line.split(",")[:5]
        margin[sid] = abs(float(pt) - float(pn))
    r = cli("zero-shot", "--features", root / "features", "--classes", root / "classes.yaml",
            "--out", tmp_path / "k", "--top-k", 10, *ARGS)
    for line in (tmp_path / "k" / "predictions.csv").read_text().splitlines()[1:]:
        sid, _, _, pt, pn = line.split(",")[:5]
        assert abs(float(pt) - float(pn)) > margin[sid]


def test_heatmap_geojson_and_search_put_the_planted_patches_first(tmp_path, conch):
    """On the real sample slide: the patches of its left tenth point along 'tumor'."""
    slides = tmp_path / "slides"
    copy(CMU, slides / "cmu.svs")
    assert cli("tile", slides, "--out", tmp_path / "t").exit_code == 0
    cf = read_coords_file(tmp_path / "t" / "coords" / "cmu.h5")
    coords = cf.coords
    left = coords[:, 0] < np.quantile(coords[:, 0], 0.1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(coords), 64)).astype(np.float32)
    query = "a tumor"
    x[left] = pooled_along(conch, conch.text_embedding(query), int(left.sum()), rng)
    feats = tmp_path / "features"
    write_slide(feats, "cmu", x, coords, cf.attrs)
    (tmp_path / "classes.yaml").write_text(
        "tumor: [tumor]\nnormal: [normal]\ntemplates: ['a CLASSNAME']\n")
    out = tmp_path / "zs"
    r = cli("zero-shot", "--features", feats, "--classes", tmp_path / "classes.yaml", "--out",
            out, "--slides", slides, "--top-k", 5, *ARGS)
    assert r.exit_code == 0, r.output
    assert (out / "heatmaps" / "cmu.png").stat().st_size > 10_000
    geo = json.loads((out / "geojson" / "cmu.geojson").read_text())["features"]
    ranks = np.array([g["properties"]["measurements"]["rank"] for g in geo])
    assert ranks[left].min() > np.quantile(ranks[~left], 0.95)

    r = cli("search", "--features", feats, "--text", query, "--out", tmp_path / "s",
            "--top", int(left.sum()), "--slides", slides, *ARGS)
    assert r.exit_code == 0, r.output
    hits = [line.split(",") for line in
            (tmp_path / "s" / "search.csv").read_text().splitlines()[1:]]
    found = {(int(h[2]), int(h[3])) for h in hits}
    assert found == {tuple(c) for c in coords[left].tolist()}
    assert (tmp_path / "s" / "search_patches.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "s" / "geojson" / "cmu.geojson").read_text())[
        "features"]) == len(hits)


@pytest.mark.parametrize("case", ["empty classes", "class without names", "one class",
                                  "no CLASSNAME", "other encoder", "no tokenizer",
                                  "no text tower", "other weights"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cohort, case):
    root, _, _ = cohort
    feats, classes, args = root / "features", tmp_path / "c.yaml", list(ARGS)
    classes.write_text("tumor: [tumor]\nnormal: [normal]\n")
    if case == "empty classes":
        classes.write_text("")
    elif case == "class without names":
        classes.write_text("classes:\n  tumor: []\n  normal: [normal]\n")
    elif case == "one class":
        classes.write_text("tumor: [tumor]\n")
    elif case == "no CLASSNAME":
        classes.write_text("tumor: [tumor]\nnormal: [normal]\ntemplates: ['an image']\n")
    elif case == "other encoder":
        feats = tmp_path / "uni"
        write_slide(feats, "a", np.zeros((3, 64), np.float32), encoder="uni_v1")
    elif case == "no tokenizer":
        args = ["--weights", WEIGHTS]
    elif case == "no text tower":
        sd = torch.load(WEIGHTS, weights_only=True)
        torch.save({k: v for k, v in sd.items() if not k.startswith("text.")},
                   tmp_path / "vision.bin")
        args = ["--weights", tmp_path / "vision.bin", "--tokenizer", TOKENIZER]
    elif case == "other weights":
        args = ["--weights", "random", "--tokenizer", TOKENIZER]
    out = tmp_path / "out"
    r = cli("zero-shot", "--features", feats, "--classes", classes, "--out", out, *args)
    assert r.exit_code == 2, r.output
    message = r.output.strip().splitlines()[-1]
    assert message.startswith("Error: ")
    expect = {"empty classes": "no classes", "class without names": "has no names",
              "one class": "at least two classes", "no CLASSNAME": "CLASSNAME",
              "other encoder": "extract SLIDES --out OUT --encoder conch_v1",
              "no tokenizer": "conch_byte_level_bpe_uncased.json",
              "no text tower": "no CONCH text tower", "other weights": "extracted with weights"}
    assert expect[case] in message
    assert not out.exists()
