"""`wsi-embed deploy` (ensembles of trained models) and `wsi-embed statistics` (bootstrap
CIs at the patient level, plots)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from wsi_embed.synthetic import write_witness_bags

from .conftest import cli
from .test_train import read_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    bags = write_witness_bags(root / "f", 40, patches=(20, 40), shift=20.0, dim=32)
    r = cli("train", "--features", root / "f", "--labels", bags.labels_csv, "--out",
            root / "m", "--head", "mean", "--folds", "2", "--epochs", "8", "--lr", "1e-3")
    assert r.exit_code == 0, r.output
    return root, bags


def test_an_ensemble_of_two_copies_equals_the_model(trained, tmp_path):
    root, _ = trained
    shutil.copy(root / "m" / "model.pt", tmp_path / "copy.pt")
    r = cli("classify", "--features", root / "f", "--model", root / "m" / "model.pt", "--out",
            tmp_path / "c")
    assert r.exit_code == 0, r.output
    r = cli("deploy", "--model", root / "m" / "model.pt", "--model", tmp_path / "copy.pt",
            "--features", root / "f", "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    want = {r["slide_id"]: r for r in read_csv(tmp_path / "c" / "predictions.csv")}
    got = read_csv(tmp_path / "d" / "predictions.csv")
    assert len(got) == 40
    for row in got:
        for c in ("prediction", "prob_0", "prob_1"):
            assert row[c] == want[row["slide_id"]][c]
    per_model = read_csv(tmp_path / "d" / "per_model" / "model_1.csv")
    assert [r["prob_1"] for r in per_model] == [want[r["slide_id"]]["prob_1"] for r in per_model]
    # a training folder stands for its fold models: their mean, not the final model
    r = cli("deploy", "--model", root / "m", "--features", root / "f", "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    models = json.loads((tmp_path / "e" / "models.json").read_text())
    assert len(models) == 2 and all("fold_" in p for p in models.values())
    folds = [read_csv(tmp_path / "e" / "per_model" / f"model_{i}.csv") for i in range(2)]
    ens = {r["slide_id"]: float(r["prob_1"]) for r in read_csv(tmp_path / "e" / "predictions.csv")}
    for a, b in zip(*folds, strict=True):
        assert ens[a["slide_id"]] == pytest.approx((float(a["prob_1"]) + float(b["prob_1"])) / 2,
                                                   abs=2e-6)


def test_models_with_other_classes_or_features_are_refused(trained, tmp_path):
    root, _ = trained
    blob = torch.load(root / "m" / "model.pt", weights_only=True)
    blob["spec"]["classes"] = ["benign", "tumour"]
    torch.save(blob, tmp_path / "other.pt")
    r = cli("deploy", "--model", root / "m" / "model.pt", "--model", tmp_path / "other.pt",
            "--features", root / "f", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "classes" in r.output and "other.pt" in r.output, r.output
    assert not (tmp_path / "d").exists()
    blob["spec"]["classes"], blob["spec"]["encoder"] = ["0", "1"], "uni_v1"
    torch.save(blob, tmp_path / "uni.pt")
    r = cli("deploy", "--model", root / "m" / "model.pt", "--model", tmp_path / "uni.pt",
            "--features", root / "f", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "encoder" in r.output, r.output


def _predictions(path, labels, n, seed, patients_per=1):
    """A binary predictions file with a real but imperfect signal, and its labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, 1.2, n))))
    path.write_text("slide_id,prediction,prob_0,prob_1\n" + "".join(
        f"s{i},{int(p[i] > 0.5)},{1 - p[i]:.6f},{p[i]:.6f}\n" for i in range(n)))
    labels.write_text("slide_id,label,patient_id\n" + "".join(
        f"s{i},{y[i]},pt{i // patients_per}\n" for i in range(n)))


def _auroc(out):
    s = json.loads((out / "statistics.json").read_text())
    return s["per_class"]["1"]["auroc"]


def test_statistics_cis_are_seeded_patient_level_and_shrink_with_more_slides(tmp_path):
    def run(name, n, seed=0, patients_per=1, boot="200"):
        pred, labels = tmp_path / f"{name}.csv", tmp_path / f"{name}_labels.csv"
        _predictions(pred, labels, n, 1, patients_per)
        r = cli("statistics", "--predictions", pred, "--labels", labels, "--out",
                tmp_path / name, "--bootstrap", boot, "--seed", str(seed))
        assert r.exit_code == 0, r.output
        return _auroc(tmp_path / name)

    small, again, other = run("a", 60), run("b", 60), run("c", 60, seed=1)
    big = run("d", 600)
    assert small["ci_low"] <= small["value"] <= small["ci_high"]
    assert small == again and other != small  # seeded
    assert big["ci_high"] - big["ci_low"] < 0.6 * (small["ci_high"] - small["ci_low"])
    # slides of one patient move together: pairs of near-copies do not narrow the CI
    pred, labels = tmp_path / "pairs.csv", tmp_path / "pairs_labels.csv"
    _predictions(pred, labels, 60, 1)
    rows = pred.read_text().splitlines()
    pred.write_text("\n".join(rows + [r.replace("s", "t", 1) for r in rows[1:]]) + "\n")
    lab = labels.read_text().splitlines()
    labels.write_text("\n".join(lab + [r.replace("s", "t", 1) for r in lab[1:]]) + "\n")
    r = cli("statistics", "--predictions", pred, "--labels", labels, "--out", tmp_path / "p",
            "--bootstrap", "200")
    assert r.exit_code == 0, r.output
    paired = _auroc(tmp_path / "p")
    width = small["ci_high"] - small["ci_low"]
    assert paired["ci_high"] - paired["ci_low"] == pytest.approx(width, rel=0.25)
    for name in ("roc", "pr", "calibration"):
        img = cv2.imread(str(tmp_path / "a" / f"{name}.png"))
        assert img is not None and min(img.shape[:2]) >= 300 and img.std() > 10
        assert (tmp_path / "a" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_statistics_refuses_labels_that_are_not_the_predictions_classes(tmp_path):
    pred, labels = tmp_path / "p.csv", tmp_path / "l.csv"
    _predictions(pred, labels, 20, 0)
    labels.write_text(labels.read_text().replace(",1,", ",MSI,"))
    r = cli("statistics", "--predictions", pred, "--labels", labels, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "'MSI'" in r.output, r.output
