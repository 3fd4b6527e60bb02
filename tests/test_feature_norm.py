"""`train --feature-norm`: z-scores clipped to ±5 σ (the default), or each feature dimension
mapped through the training split's quantiles to a standard normal (scikit-learn's
QuantileTransformer, reproduced in torch), stored in the model so that `classify` and maps
apply it. Where plain z-scores leave a few patches tens of σ out, the planted signal is
learned."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import QuantileTransformer

from wsi_embed.bags import BagStore, scan_features
from wsi_embed.feature_norm import feature_quantiles, to_normal
from wsi_embed.h5io import read_features, write_features_file
from wsi_embed.slide_model import load_model, patch_contributions, predict_bag
from wsi_embed.synthetic import write_witness_bags

from .conftest import cli


def store_of(folder, bags: list[np.ndarray]) -> tuple[BagStore, list[str]]:
    folder.mkdir()
    for i, x in enumerate(bags):
        write_features_file(folder / f"s{i}.h5", x.astype(np.float32),
                            np.zeros((len(x), 2), int), {"patch_size": 256},
                            {"encoder": "synthetic", "weights": "random",
                             "embed_dim": x.shape[1]})
    metas = scan_features(folder).metas
    return BagStore(metas, 2**30), sorted(metas)


def test_the_quantile_map_is_scikit_learns_and_a_tie_at_the_minimum_maps_to_its_middle(
        tmp_path):
    rng = np.random.default_rng(0)
    n = 1200
    x = np.c_[rng.standard_cauchy(n), np.exp(3 * rng.standard_normal(n)),
              np.round(rng.standard_normal(n), 1)]  # heavy tails; ties inside the range
    store, ids = store_of(tmp_path / "f", np.array_split(x.astype(np.float32), 3))
    q = feature_quantiles(store, ids)
    ref = QuantileTransformer(n_quantiles=1000, output_distribution="normal",
                              subsample=10**9).fit(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(q.T, ref.quantiles_, rtol=1e-6)
    new = np.r_[x[:300], 5 * rng.standard_cauchy((300, 3))]  # and beyond the training range
    mine = to_normal(torch.tensor(new), torch.tensor(q, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(mine, ref.transform(new), atol=1e-5)
    assert np.abs(mine).max() <= 5.2 and mine.dtype == np.float64

    # 30 % zeros at the bottom (ReLU-like): scikit-learn sends them to -5.2 σ; here they
    # take the middle of their mass, as ties elsewhere do
    relu = np.r_[np.zeros(300), rng.uniform(0.1, 5.0, 700)][:, None]
    z = to_normal(torch.zeros(1, 1), torch.tensor(np.quantile(relu, np.linspace(0, 1, 1000),
                                                              axis=0).T, dtype=torch.float32))
    assert abs(float(z) - norm.ppf(0.15)) < 0.01


def test_large_cohorts_take_their_quantiles_from_a_fixed_sample(tmp_path):
    rng = np.random.default_rng(1)
    store, ids = store_of(tmp_path / "f", [rng.lognormal(size=(k, 4)) for k in (900, 300, 600)])
    q = feature_quantiles(store, ids, n_quantiles=1000, sample=600)
    assert q.shape == (4, 600) and (np.diff(q, axis=1) >= 0).all()
    np.testing.assert_array_equal(q, feature_quantiles(store, ids, 1000, 600))
    whole = feature_quantiles(store, ids, 1000, 10**6)
    assert whole.shape == (4, 1000)
    assert np.abs(np.median(q, 1) - np.median(whole, 1)).max() < 0.15  # the lognormal's 1.0


def witness_cohort(folder, change):
    """60 witness bags (32-d, 6 σ), each features file rewritten as change(x)."""
    bags = write_witness_bags(folder, 60, dim=32, patches=(20, 40), witness_frac=(0.1, 0.2),
                              shift=6.0, seed=0)
    for p in sorted(folder.glob("*.h5")):
        with h5py.File(p, "r+") as f:
            x = change(f["features"][:].astype(np.float32))
            del f["features"]
            f["features"] = x
    return bags


def heavy_tailed_cohort(folder):
    """Witness bags whose every feature went through sinh(3x): monotone, so the signal is
    all there, but a few patches per dimension lie hundreds of σ out."""
    return witness_cohort(folder, lambda x: np.sinh(3 * x))


def fold_model_reproduces_its_predictions(out, feats):
    """fold_0's model file, and the last test bag's features, after checking that the model
    gives the fold's predictions (through its stored feature map)."""
    split = json.loads((out / "splits.json").read_text())["fold_0"]
    model, _ = load_model(out / "folds" / "fold_0" / "model.pt")
    with open(out / "folds" / "fold_0" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == split["test"]
    for row in rows:
        x = read_features(feats / f"{row['slide_id']}.h5")
        assert abs(predict_bag(model, x)[0][1] - float(row["prob_1"])) < 1e-5
    return model, split, x


def oof_auc(out) -> float:
    with open(out / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return roc_auc_score([int(r["label"]) for r in rows], [float(r["prob_1"]) for r in rows])


def test_quantile_norm_learns_a_heavy_tailed_signal_and_the_model_file_keeps_its_table(
        tmp_path):
    bags = heavy_tailed_cohort(tmp_path / "b")
    feats = bags.labels_csv.parent
    base = ["train", "--features", feats, "--labels", bags.labels_csv, "--folds", 2,
            "--lr", "2e-3", "--epochs", 60]
    r = cli(*base, "--out", tmp_path / "z", "--feature-norm", "zscore")
    assert r.exit_code == 0, r.output
    r = cli(*base, "--out", tmp_path / "q", "--feature-norm", "quantile")
    assert r.exit_code == 0, r.output
    auc_z, auc_q = oof_auc(tmp_path / "z"), oof_auc(tmp_path / "q")
    assert auc_q >= 0.95 and auc_z < 0.85, (auc_q, auc_z)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["feature_norm"] == config["model"]["feature_norm"] == "quantile"

    # a fold's model file reproduces the fold's predictions through its stored table
    model, split, x = fold_model_reproduces_its_predictions(tmp_path / "q", feats)
    assert model.members[0].quantiles.shape == (32, min(1000, sum(
        len(read_features(feats / f"{s}.h5")) for s in split["train"])))
    scores, _ = patch_contributions(model, x)
    assert scores.shape == (len(x),) and np.isfinite(scores).all()

    r = cli("classify", "--features", feats, "--model", tmp_path / "q" / "model.pt", "--out",
            tmp_path / "c")
    assert r.exit_code == 0, r.output
    final, _ = load_model(tmp_path / "q" / "model.pt")
    with open(tmp_path / "c" / "predictions.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    x = read_features(feats / f"{row['slide_id']}.h5")
    assert abs(predict_bag(final, x)[0][1] - float(row["prob_1"])) < 1e-5


def test_clipped_z_scores_keep_rare_outliers_from_hiding_the_signal(tmp_path):
    """Gaussian witness bags where 0.3 % of the values are pushed 40 σ out (as in FOX and
    TIGER, whose dimensions have rare values tens of σ out): with plain z-scores those few
    patches dominate the head and the planted signal is lost; clipped to ±5 σ it is learned."""
    rng = np.random.default_rng(100)

    def outliers(x):
        hit = rng.random(x.shape) < 0.003
        x[hit] += 40 * rng.choice([-1, 1], hit.sum())
        return x

    bags = witness_cohort(tmp_path / "b", outliers)
    base = ["train", "--features", tmp_path / "b", "--labels", bags.labels_csv, "--folds", 2,
            "--seeds", 1, "--lr", "2e-3", "--epochs", 30]
    r = cli(*base, "--out", tmp_path / "z", "--feature-norm", "zscore")
    assert r.exit_code == 0, r.output
    r = cli(*base, "--out", tmp_path / "c")  # the default
    assert r.exit_code == 0, r.output
    auc_z, auc_c = oof_auc(tmp_path / "z"), oof_auc(tmp_path / "c")
    assert auc_c >= 0.95 and auc_z < 0.8, (auc_c, auc_z)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["feature_norm"] == \
        "zscore-clip"

    # the model file clips too: a fold's model reproduces the fold's predictions
    model, _, x = fold_model_reproduces_its_predictions(tmp_path / "c", tmp_path / "b")
    assert model.members[0].spec.feature_norm == "zscore-clip"
    z = model.members[0].standardise(torch.tensor(x))
    assert float(z.abs().max()) == 5.0
