"""`train`'s defaults: training to convergence, calibrated probabilities, a decision threshold
chosen on validation data, seed ensembles. Tiny cohorts (32-d features, a few dozen
patches per bag) keep each run to seconds."""

from __future__ import annotations

import csv
import json

import numpy as np

from wsi_embed.h5io import read_features
from wsi_embed.slide_model import decide, load_model, predict_bag
from wsi_embed.synthetic import write_witness_bags

from .conftest import cli


def cohort(folder, n=60, shift=6.0, seed=0, keep_positive=1.0):
    bags = write_witness_bags(folder, n, dim=32, patches=(20, 40), witness_frac=(0.1, 0.2),
                              shift=shift, seed=seed)
    if keep_positive < 1.0:  # fewer positive slides: another class prior
        rows = bags.labels_csv.read_text().splitlines()
        rng = np.random.default_rng(seed)
        kept = [r for r in rows[1:] if r.split(",")[1] == "0" or rng.random() < keep_positive]
        bags.labels_csv.write_text("\n".join([rows[0], *kept]) + "\n")
    return bags


def oof(out):
    with open(out / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob_1"]) for r in rows])
    return y, p


def test_a_run_stopped_before_convergence_says_so_and_the_defaults_converge(tmp_path):
    bags = cohort(tmp_path / "b", n=120, shift=8.0)
    base = ["train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--folds", 2, "--head", "abmil"]
    r = cli(*base, "--out", tmp_path / "short", "--epochs", 10, "--lr", "1e-4")
    assert r.exit_code == 0, r.output
    folds = json.loads((tmp_path / "short" / "metrics.json").read_text())["folds"]
    cut = [f for f in folds if f["still_improving"]]  # 10 epochs: cut short
    assert cut and all(f["stop_reason"] == "reached --epochs 10" for f in cut)
    assert "still falling at the last epochs" in r.output

    bags = cohort(tmp_path / "d", n=60, shift=4.0, seed=3)
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--folds", 2, "--out", tmp_path / "default")
    assert r.exit_code == 0, r.output
    folds = json.loads((tmp_path / "default" / "metrics.json").read_text())["folds"]
    for f in folds:
        assert f["stop_reason"].startswith("early stop") and f["best_epoch"] < 180, f
        assert not f["still_improving"] and f["auc"] >= 0.9


def expected_calibration_error(y, p, bins=10):
    conf = np.where(p >= 0.5, p, 1 - p)
    right = (p >= 0.5) == (y == 1)
    edges = np.linspace(0.5, 1.0, bins // 2 + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, len(edges) - 2)
    return sum(abs(right[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
               for b in range(len(edges) - 1) if (idx == b).any())


def test_calibrated_probabilities_of_a_separated_cohort_have_small_calibration_error(tmp_path):
    bags = cohort(tmp_path / "b", n=80, shift=8.0)
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", tmp_path / "m", "--folds", 2, "--patience", 8, "--epochs", 60)
    assert r.exit_code == 0, r.output
    y, p = oof(tmp_path / "m")
    assert expected_calibration_error(y, p) <= 0.05
    folds = json.loads((tmp_path / "m" / "metrics.json").read_text())["folds"]
    assert all(f["temperature"][0] != 1.0 for f in folds)
    assert all("balanced_accuracy_at_val_threshold" in f for f in folds)


def test_calibration_and_the_validation_threshold_follow_the_class_priors(tmp_path):
    """A fixed split with a large validation part (calibration and threshold are chosen
    there). Training weighs classes equally; the calibration brings the cohort's prior
    back: the mean probability of class 1 follows its share of slides."""
    thresholds, mean_p1, prior = {}, {}, {}
    for name, keep in (("even", 1.0), ("few positives", 0.3)):
        bags = cohort(tmp_path / name, n=180, shift=5.0, seed=1, keep_positive=keep)
        rows = bags.labels_csv.read_text().splitlines()
        parts = ("train", "train", "val", "val", "test")
        bags.labels_csv.write_text(rows[0] + ",split\n" + "".join(
            f"{r},{parts[i % 5]}\n" for i, r in enumerate(rows[1:])))
        r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
                "--out", tmp_path / f"m {name}", "--patience", 8, "--epochs", 60)
        assert r.exit_code == 0, r.output
        model, _ = load_model(tmp_path / f"m {name}" / "model.pt")
        thresholds[name] = model.threshold
        y, p = oof(tmp_path / f"m {name}")
        mean_p1[name], prior[name] = p.mean(), y.mean()
    assert thresholds["few positives"] != thresholds["even"]
    for name in prior:
        assert abs(mean_p1[name] - prior[name]) < 0.1, (mean_p1, prior)
    assert mean_p1["few positives"] < mean_p1["even"] - 0.15


def test_a_seed_ensemble_is_its_members_mean_and_reproducible(tmp_path):
    bags = cohort(tmp_path / "b", n=40)
    feats = bags.labels_csv.parent
    runs = []
    for i in range(2):
        out = tmp_path / f"m{i}"
        r = cli("train", "--features", feats, "--labels", bags.labels_csv, "--out", out,
                "--folds", 2, "--seeds", 3, "--epochs", 15)
        assert r.exit_code == 0, r.output
        r = cli("classify", "--features", feats, "--model", out / "model.pt", "--out",
                tmp_path / f"c{i}", "--threshold", "val")
        assert r.exit_code == 0, r.output
        with open(tmp_path / f"c{i}" / "predictions.csv", newline="") as fh:
            runs.append([(r["slide_id"], r["prediction"], r["prob_1"])
                         for r in csv.DictReader(fh)])
    assert runs[0] == runs[1]
    # cross-fitting: each member stops on its own validation slides; together they hold out
    # every training slide of the fold, and never one of its test slides
    splits = json.loads((tmp_path / "m0" / "splits.json").read_text())
    for fold in json.loads((tmp_path / "m0" / "metrics.json").read_text())["folds"]:
        split = splits[f"fold_{fold['fold']}"]
        held = [set(v) for v in fold["member_val_slides"]]
        assert len({frozenset(h) for h in held}) == 3
        assert set().union(*held) == set(split["train"]) | set(split["val"])
        assert not set().union(*held) & set(split["test"])
    model, _ = load_model(tmp_path / "m0" / "model.pt")
    assert len(model.members) == 3 and model.threshold is not None
    with open(tmp_path / "c0" / "predictions.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    for sid in list(rows)[:6]:
        x = read_features(feats / f"{sid}.h5")
        members = np.mean([predict_bag(m, x)[0] for m in model.members], axis=0)
        np.testing.assert_allclose(predict_bag(model, x)[0], members, atol=1e-6)
        assert abs(float(rows[sid]["prob_1"]) - members[1]) < 1e-5
        assert rows[sid]["prediction"] == str(decide(members, model.threshold))


def test_tune_searches_bag_size_on_validation_only_and_trains_with_its_choice(tmp_path,
                                                                           monkeypatch):
    """`--tune` (a small grid here: the bag size and the learning rate differ): every
    tuning fit learns and stops on the fold's train and validation slides only, the fold
    keeps the setting of the lowest validation loss, and its members train with it. Bag
    sizes of 64 and 128 both take whole bags of these 20-40 patches: only 64 is fitted."""
    from wsi_embed import train

    grid = {"lr": (1e-3, 5e-3), "weight_decay": (1e-4,), "dropout": (0.1,),
            "bag_size": (8, 64, 128)}
    assert set(grid) == set(train.TUNE_GRID)  # bag size is searched by the real grid too
    monkeypatch.setattr(train, "TUNE_GRID", grid)
    fits, real_fit = [], train.fit

    def recorded(store, split, t, spec, cfg, seed, device, desc):
        model, info = real_fit(store, split, t, spec, cfg, seed, device, desc)
        fits.append((desc, set(split["train"]), set(split["val"]), cfg, info["best_val_loss"]))
        return model, info

    monkeypatch.setattr(train, "fit", recorded)
    bags = cohort(tmp_path / "b", n=40)
    out = tmp_path / "m"
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", out, "--folds", 2, "--seeds", 1, "--epochs", 15, "--tune")
    assert r.exit_code == 0, r.output
    splits = json.loads((out / "splits.json").read_text())
    folds = json.loads((out / "metrics.json").read_text())["folds"]
    for fold in folds:
        k, split = fold["fold"], splits[f"fold_{fold['fold']}"]
        tuning = [f for f in fits if f[0] == f"fold {k} tune"]
        assert len(tuning) == 4
        assert sorted((f[3].lr, f[3].bag_size) for f in tuning) == [
            (1e-3, 8), (1e-3, 64), (5e-3, 8), (5e-3, 64)]
        for _, seen_train, seen_val, _, _ in tuning:
            assert seen_train == set(split["train"]) and seen_val == set(split["val"])
        best = min(tuning, key=lambda f: f[4])[3]
        assert fold["tuned"] == {"lr": best.lr, "weight_decay": 1e-4, "dropout": 0.1,
                                 "bag_size": best.bag_size}
        member = [f for f in fits if f[0].startswith(f"fold {k}") and "tune" not in f[0]]
        assert member and all(f[3].bag_size == best.bag_size and f[3].lr == best.lr
                               for f in member)


def test_tune_keeps_a_bag_size_the_user_gave(tmp_path, monkeypatch):
    """`--tune --bag-size 8`: the user's bag size is not searched over; every tuning fit and
    every member draws 8 patches per bag, and only the other settings are compared."""
    from wsi_embed import train

    monkeypatch.setattr(train, "TUNE_GRID", {"lr": (1e-3, 5e-3), "weight_decay": (1e-4,),
                                             "dropout": (0.1,), "bag_size": (64, 128)})
    fits, real_fit = [], train.fit

    def recorded(store, split, t, spec, cfg, seed, device, desc):
        fits.append((desc, cfg))
        return real_fit(store, split, t, spec, cfg, seed, device, desc)

    monkeypatch.setattr(train, "fit", recorded)
    bags = cohort(tmp_path / "b", n=24)
    out = tmp_path / "m"
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", out, "--folds", 2, "--seeds", 1, "--epochs", 4, "--tune",
            "--bag-size", 8)
    assert r.exit_code == 0, r.output
    tuning = [c for d, c in fits if d.endswith("tune")]
    # 2 folds and the final model, 2 settings each: the bag sizes of the grid are not tried
    assert sorted(c.lr for c in tuning) == [1e-3] * 3 + [5e-3] * 3
    assert all(c.bag_size == 8 for _, c in fits)
    for fold in json.loads((out / "metrics.json").read_text())["folds"]:
        assert "bag_size" not in fold["tuned"]


def test_the_model_is_judged_after_the_warm_up(tmp_path):
    """On this cohort the validation loss rises while the LR warms up (5 epochs of 100) and
    the untrained network's loss at epoch 0 is the lowest for a while: early stopping must
    neither keep that model nor count its patience from it."""
    bags = cohort(tmp_path / "b", n=60, shift=4.0, seed=2)
    out = tmp_path / "m"
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", out, "--folds", 2, "--seeds", 1, "--epochs", 100, "--patience", 3)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    for fold, history in zip(metrics["folds"], metrics["history"], strict=True):
        losses = [h["val_loss"] for h in history]
        assert losses[0] < min(losses[1:5])  # the lucky untrained model
        assert fold["best_epoch"] >= 4 and len(losses) == fold["best_epoch"] + 4, fold


def test_a_diverging_run_says_so_and_leaves_no_model(tmp_path):
    """An absurd learning rate makes the weights non-finite during the warm-up: one clear
    line naming the fix, not a crash on a model that was never kept."""
    bags = cohort(tmp_path / "b", n=40)
    out = tmp_path / "m"
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", out, "--folds", 2, "--seeds", 1, "--epochs", 20, "--lr", "1e30")
    assert r.exit_code == 2, r.output
    assert "diverged" in r.output and "lower --lr (now 1e+30)" in r.output
    assert not (out / "model.pt").exists()


def test_calibration_reaches_the_best_temperature_and_bias_within_its_bounds():
    """Against a grid over T and the class bias: the fitted pair is as good as the grid's
    best (an unconverged or unbounded search is not), also on separable held-out logits,
    which pull T towards 0."""
    import torch
    import torch.nn.functional as F

    from wsi_embed.train import T_BOUNDS, fit_calibration

    rng = np.random.default_rng(0)
    temps = torch.exp(torch.linspace(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1]), 300,
                                     dtype=torch.float64))
    shifts = torch.linspace(-8, 8, 321, dtype=torch.float64)
    for case in range(40):
        n = int(rng.integers(8, 30))
        y = torch.tensor(rng.integers(0, 2, n))
        y[:2] = torch.tensor([0, 1])
        separable = case % 4 == 0
        s = torch.tensor(rng.normal(0, 1, n)) + (2 * y - 1) * (3.0 if separable else
                                                               rng.uniform(0, 2))
        if separable:
            s = torch.where(y == 1, s.abs() + 0.5, -s.abs() - 0.5)
        logits = (torch.stack([-s, s], 1) * float(rng.uniform(0.2, 5))).float()
        t, b = fit_calibration(logits, y)
        assert T_BOUNDS[0] <= t <= T_BOUNDS[1] and torch.isfinite(b).all()
        # the objective: NLL + 1e-3 |b|² (a weak pull that keeps b finite on separable data)
        got = float(F.cross_entropy(logits.double() / t + b.double(), y) + 1e-3 * b.square().sum())
        # every (T, bias) pair on the grid: bias = (-shift/2, shift/2), as b is centred
        z = logits.double()[None, None] / temps[:, None, None, None]
        z = z + torch.stack([-shifts / 2, shifts / 2], 1)[None, :, None, :]
        grid = -torch.log_softmax(z, -1).gather(-1, y.expand(*z.shape[:2], n)[..., None])
        best = float((grid.squeeze(-1).mean(-1) + 5e-4 * shifts[None] ** 2).min())
        assert got <= best + 2e-3, (case, got, best, t)
