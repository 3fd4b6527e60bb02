"""train and classify on synthetic witness bags written as real features files."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from wsi_embed.bags import BagStore, scan_features
from wsi_embed.heads import HEADS, SLIDE_EMBEDDING_HEADS
from wsi_embed.synthetic import write_witness_bags
from wsi_embed.train import TrainConfig

from .conftest import cli

FAST = ("--epochs", "10", "--lr", "1e-3")
DIM = 96  # what the heads learn does not depend on the width; CPU time does


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return write_witness_bags(tmp_path_factory.mktemp("bags") / "f", 80, n_classes=2,
                              patches=(40, 80), shift=20.0, dim=DIM)


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def attention(folder, sid):
    with h5py.File(folder / "attention" / f"{sid}.h5") as f:
        return f["attention"][:]


def classify_matches_fold_predictions(feats, model, fold_predictions, out):
    """`classify` with `model` gives, to the printed digit, the predictions its fold wrote."""
    r = cli("classify", "--features", feats, "--model", model, "--out", out)
    assert r.exit_code == 0, r.output
    got = {row["slide_id"]: row for row in read_csv(out / "predictions.csv")}
    rows = read_csv(fold_predictions)
    for row in rows:
        for c in ("prob_0", "prob_1", "prediction"):
            assert got[row["slide_id"]][c] == row[c]
    return rows


def witnesses_draw_attention(binary, out):
    ratios = []
    for sid, label in binary.labels.items():
        if label == "1":
            a, w = attention(out, sid), binary.witnesses[sid]
            ratios.append(a[w].mean() / a[~w].mean())
    assert np.mean(ratios) >= 5, ratios


def test_cross_validation_is_patient_level_and_its_fold_models_classify_alike(binary,
                                                                            tmp_path):
    """One 5-fold run (the head does not matter here): every slide tested once, no patient
    on two sides of a split, each fold's model gives its predictions through `classify`."""
    feats, out = binary.labels_csv.parent, tmp_path / "m"
    r = cli("train", "--features", feats, "--labels", binary.labels_csv, "--out", out,
            "--head", "abmil", *FAST)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 5
    assert metrics["summary"]["auc"]["mean"] >= 0.95, metrics["summary"]
    splits = json.loads((out / "splits.json").read_text())
    test_ids = [s for f in splits.values() for s in f["test"]]
    assert sorted(test_ids) == sorted(binary.labels)  # each slide tested exactly once
    patient = {r["slide_id"]: r["patient_id"] for r in read_csv(binary.labels_csv)}
    assert len(set(patient.values())) < len(patient)  # patients with two slides exist
    for f in splits.values():  # patient-level: no patient on both sides
        patients = {p: {patient[s] for s in f[p]} for p in ("train", "val", "test")}
        assert not patients["train"] & patients["test"]
        assert not patients["train"] & patients["val"]
    fold = out / "folds" / "fold_0"
    rows = classify_matches_fold_predictions(feats, fold / "model.pt",
                                             fold / "predictions.csv", tmp_path / "c0")
    assert len(rows) == len(splits["fold_0"]["test"])


@pytest.mark.parametrize("head", [h for h in HEADS if h not in SLIDE_EMBEDDING_HEADS])
def test_every_head_finds_the_witnesses(binary, tmp_path, head):
    """One fit per head on a fixed patient-level split (train 48, val 16, test 16 slides):
    it separates the test slides, and its saved model predicts the same through
    `classify`; attention heads put their attention on the witness patches."""
    feats, out = binary.labels_csv.parent, tmp_path / "m"
    rows = read_csv(binary.labels_csv)
    patients = sorted({r["patient_id"] for r in rows})  # patient_<k>_<class>: classes alternate
    part = {p: ("train", "train", "train", "val", "test")[i % 5] for i, p in
            enumerate(patients)}
    labels = tmp_path / "split.csv"
    labels.write_text("slide_id,label,patient_id,split\n" + "".join(
        f"{r['slide_id']},{r['label']},{r['patient_id']},{part[r['patient_id']]}\n"
        for r in rows))
    r = cli("train", "--features", feats, "--labels", labels, "--out", out, "--head", head,
            *FAST)
    assert r.exit_code == 0, r.output
    (fold,) = json.loads((out / "metrics.json").read_text())["folds"]
    assert fold["evaluated_on"] == "test" and fold["n"] >= 12 and fold["auc"] >= 0.95, fold
    # without --bag-size, the head's own: TransMIL trains on fresh random subsets
    config = json.loads((out / "config.json").read_text())
    assert config["bag_size"] == (256 if head == "transmil" else 512)
    assert TrainConfig(out, head).bag_size == config["bag_size"]  # the Python API's too
    classify_matches_fold_predictions(feats, out / "model.pt",
                                      out / "folds" / "fold_0" / "predictions.csv",
                                      tmp_path / "c")
    if head in ("abmil", "resampler"):  # witnesses draw the attention
        witnesses_draw_attention(binary, tmp_path / "c")
    if head == "mean":  # its map: exactly the score lost when a patch is left out
        from wsi_embed.h5io import read_features
        from wsi_embed.slide_model import bag_logits, load_model

        model, _ = load_model(out / "model.pt")
        sid = next(s for s, label in binary.labels.items() if label == "1")
        x = read_features(feats / f"{sid}.h5")
        with h5py.File(tmp_path / "c" / "attention" / f"{sid}.h5") as f:
            assert f.attrs["map_method"].startswith("leave-one-out")
            c = f["patch_contribution"][:]
        (member,) = model.members
        whole = bag_logits(member, x).logits[0]
        k = int(whole.argmax())
        for i in (0, int(np.argmax(c)), len(x) - 1):
            without = bag_logits(member, np.delete(x, i, axis=0)).logits[0]
            assert c[i] == pytest.approx(float(whole[k] - without[k]), abs=1e-4)
    if head == "transmil":  # maps show each patch's gradient × input contribution
        apart = []
        for sid, label in binary.labels.items():
            if label == "1":
                with h5py.File(tmp_path / "c" / "attention" / f"{sid}.h5") as f:
                    assert f.attrs["map_score"] == "patch_contribution"
                    c, w = f["patch_contribution"][:], binary.witnesses[sid]
                    said = f.attrs["prediction"]
                # witnesses push the predicted class's logit up (class 1) or down (class 0)
                apart.append(c[w].mean() > np.quantile(c[~w], 0.75) if said == "1"
                             else c[w].mean() < np.quantile(c[~w], 0.25))
        assert np.mean(apart) >= 0.9, np.mean(apart)


def test_three_classes(tmp_path):
    bags = write_witness_bags(tmp_path / "f", 90, n_classes=3, patches=(40, 80), shift=20.0,
                              seed=3, dim=DIM)
    out = tmp_path / "m"
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", out, "--head", "abmil", "--folds", "3", *FAST)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["0", "1", "2"]
    assert metrics["summary"]["auc"]["mean"] >= 0.95
    assert metrics["summary"]["balanced_accuracy"]["mean"] >= 0.8
    rows = read_csv(out / "oof_predictions.csv")
    assert {"prob_0", "prob_1", "prob_2", "fold", "label"} <= set(rows[0])
    assert len(rows) == 90


def test_same_seed_same_results_other_seed_differs(binary, tmp_path):
    args = ("--features", binary.labels_csv.parent, "--labels", binary.labels_csv,
            "--folds", "3", "--epochs", "3", "--head", "abmil")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert cli("train", *args, "--out", tmp_path / name, "--seed", seed).exit_code == 0
    oof = {n: (tmp_path / n / "oof_predictions.csv").read_text() for n in "abc"}
    m = {n: json.loads((tmp_path / n / "metrics.json").read_text())["folds"] for n in "abc"}
    assert oof["a"] == oof["b"] and m["a"] == m["b"]
    assert oof["a"] != oof["c"]


def test_bag_cache_stays_within_its_budget(binary, tmp_path):
    fs = scan_features(binary.labels_csv.parent)
    one = fs.metas["slide_0000"].n * fs.dim * 2  # float16 on disk
    store = BagStore(fs.metas, cache_bytes=3 * one)
    for sid in list(fs.metas) * 2:
        x = store.get(sid)
        assert x.dtype == np.float32 and x.shape == (fs.metas[sid].n, fs.dim)
        assert store.cached_bytes <= 3 * one
    # training with a cache far smaller than the data streams bags from disk every epoch
    r = cli("train", "--features", binary.labels_csv.parent, "--labels", binary.labels_csv,
            "--out", tmp_path / "m", "--folds", "2", "--epochs", "2", "--cache-gb", "0.0001")
    assert r.exit_code == 0, r.output


def _copy_bags(binary, dst, n=20):
    dst.mkdir(parents=True)
    for sid in sorted(binary.labels)[:n]:
        shutil.copy(binary.labels_csv.parent / f"{sid}.h5", dst)
    return dst


def _labels(path, rows, header="slide_id,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_bad_inputs_give_clear_errors(binary, tmp_path):
    feats = _copy_bags(binary, tmp_path / "f")
    ids = sorted(p.stem for p in feats.glob("*.h5"))

    def train(labels, *extra, folder=feats):
        return cli("train", "--features", folder, "--labels", labels, "--out",
                   tmp_path / "o", *extra)

    r = train(_labels(tmp_path / "a.csv", [f"{s},x" for s in ids], "slide,diagnosis"))
    assert r.exit_code == 2 and "'slide_id'" in r.output and "slide, diagnosis" in r.output
    r = train(_labels(tmp_path / "b.csv", [f"{s},tumour" for s in ids]))
    assert r.exit_code == 2 and "only one class" in r.output
    r = train(_labels(tmp_path / "c.csv", [f"{s},{i % 2}" for i, s in enumerate(ids)]),
              "--folds", "15")
    assert r.exit_code == 2 and "too few patients" in r.output and "--folds" in r.output
    r = train(_labels(tmp_path / "d.csv", ["nope_1,0", "nope_2,1"]))
    assert r.exit_code == 2 and "has a features file" in r.output

    # mixed dims and mixed encoders are refused, naming an example file of each
    other = tmp_path / "other"
    write_witness_bags(other, 2, dim=32, patches=(5, 6))
    mixed = tmp_path / "mixed"
    shutil.copytree(feats, mixed)
    shutil.copy(other / "slide_0000.h5", mixed / "x_small.h5")
    r = train(tmp_path / "c.csv", folder=mixed)
    assert r.exit_code == 2 and "different dims" in r.output and "x_small.h5" in r.output
    with h5py.File(mixed / "x_small.h5", "r+") as f:
        del f["features"]
        f["features"] = np.zeros((5, DIM), np.float16)
        f.attrs["encoder"] = "uni_v1"
    r = train(tmp_path / "c.csv", folder=mixed)
    assert r.exit_code == 2 and "different encoders" in r.output and "'uni_v1'" in r.output

    # NaN features: the file is named, nothing crashes
    nan = tmp_path / "nan"
    shutil.copytree(feats, nan)
    with h5py.File(nan / f"{ids[3]}.h5", "r+") as f:
        f["features"][2, 5] = np.nan
    r = train(tmp_path / "c.csv", "--folds", "2", "--epochs", "1", folder=nan)
    assert r.exit_code == 2 and f"{ids[3]}.h5" in r.output and "NaN" in r.output


def test_missing_and_unlabelled_slides_are_reported_not_fatal(binary, tmp_path):
    feats = _copy_bags(binary, tmp_path / "f")
    ids = sorted(p.stem for p in feats.glob("*.h5"))
    labels = _labels(tmp_path / "l.csv", [f"{s},{i % 2}" for i, s in enumerate(ids[:16])]
                     + ["ghost_a,0", "ghost_b,1"])
    r = cli("train", "--features", feats, "--labels", labels, "--out", tmp_path / "o",
            "--folds", "2", "--epochs", "1")
    assert r.exit_code == 0, r.output
    text = r.output
    assert "2 labelled slides have no features file" in text and "ghost_a" in text
    assert "4 features files have no label" in text
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["n_slides"] == 16 and config["features"] == str(feats.absolute())
    # an existing model is not overwritten by accident
    r = cli("train", "--features", feats, "--labels", labels, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_split_column_and_empty_bags(binary, tmp_path):
    feats = _copy_bags(binary, tmp_path / "f")
    ids = sorted(p.stem for p in feats.glob("*.h5"))
    with h5py.File(feats / "empty.h5", "w") as f:  # a slide where no tissue was found
        f.attrs.update({"encoder": "synthetic", "weights": "random"})
        f["features"] = np.zeros((0, DIM), np.float16)
        f["coords"] = np.zeros((0, 2), np.int64)
    split = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    labels = _labels(tmp_path / "l.csv", [f"{s},{i % 2},{split[i]}" for i, s in enumerate(ids)]
                     + ["empty,1,train"], "slide_id,label,split")
    r = cli("train", "--features", feats, "--labels", labels, "--out", tmp_path / "m",
            "--epochs", "2")
    assert r.exit_code == 0, r.output
    splits = json.loads((tmp_path / "m" / "splits.json").read_text())
    assert list(splits) == ["fold_0"] and splits["fold_0"]["test"] == ids[16:]
    assert "empty" not in splits["fold_0"]["train"]
    r = cli("classify", "--features", feats, "--model", tmp_path / "m" / "model.pt", "--out",
            tmp_path / "c")
    assert r.exit_code == 1  # one slide could not be classified; all others were
    rows = {x["slide_id"]: x for x in read_csv(tmp_path / "c" / "predictions.csv")}
    assert rows["empty"]["status"] == "failed" and "no patches" in rows["empty"]["error"]
    assert sum(x["status"] == "ok" for x in rows.values()) == 20


def test_foreign_layouts_train_and_classify_refuses_other_encoders(binary, tmp_path):
    """CLAM/TRIDENT files (features + coords, no provenance) and STAMP files (feats)."""
    clam, stamp = tmp_path / "clam", tmp_path / "stamp"
    clam.mkdir(), stamp.mkdir()
    for sid in sorted(binary.labels)[:20]:
        with h5py.File(binary.labels_csv.parent / f"{sid}.h5") as src:
            x, c = src["features"][:], src["coords"][:]
        with h5py.File(clam / f"{sid}.h5", "w") as f:
            f["features"], f["coords"] = x, c
        with h5py.File(stamp / f"{sid}.h5", "w") as f:
            f["feats"], f["coords"] = x, c
            f.attrs["extractor"] = "stamp-uni"
    assert scan_features(stamp).encoder == "stamp-uni"
    assert scan_features(clam).encoder is None
    r = cli("train", "--features", clam, "--labels", binary.labels_csv, "--out", tmp_path / "m",
            "--folds", "2", "--epochs", "2")
    assert r.exit_code == 0, r.output
    r = cli("classify", "--features", stamp, "--model", tmp_path / "m" / "model.pt", "--out",
            tmp_path / "c")
    assert r.exit_code == 2 and "stamp-uni" in r.output and "same encoder" in r.output
    assert not (tmp_path / "c" / "predictions.csv").exists()


def test_string_labels_keep_their_names(binary, tmp_path):
    feats = _copy_bags(binary, tmp_path / "f")
    ids = sorted(p.stem for p in feats.glob("*.h5"))
    names = {"0": "LUSC", "1": "LUAD"}
    labels = _labels(tmp_path / "l.csv", [f"{s},{names[binary.labels[s]]}" for s in ids])
    r = cli("train", "--features", feats, "--labels", labels, "--out", tmp_path / "m",
            "--folds", "2", "--epochs", "2")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["classes"] == ["LUAD",
                                                                                   "LUSC"]
    r = cli("classify", "--features", feats, "--model", tmp_path / "m" / "model.pt", "--out",
            tmp_path / "c")
    assert r.exit_code == 0, r.output
    rows = read_csv(tmp_path / "c" / "predictions.csv")
    assert {"prob_LUAD", "prob_LUSC"} <= set(rows[0])
    assert {row["prediction"] for row in rows} <= {"LUAD", "LUSC"}
