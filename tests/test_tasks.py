"""Survival, regression, several targets and patient bags through `wsi-embed train`, on
synthetic bags with a planted signal; heatmap scores for every head."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from wsi_embed.heads import HEADS, SLIDE_EMBEDDING_HEADS
from wsi_embed.synthetic import write_outcome_bags, write_witness_bags
from wsi_embed.tasks import c_index, cox_loss

from .conftest import cli
from .test_train import read_csv

FAST = ("--epochs", "8", "--lr", "1e-3", "--batch-size", "16", "--seeds", "1")
SURVIVAL = ("--task", "survival", "--time", "time", "--event", "event")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return write_outcome_bags(tmp_path_factory.mktemp("outcomes") / "f", 64, patches=(12, 24))


def train(outcomes, out, *args):
    r = cli("train", "--features", outcomes.labels_csv.parent, "--labels", outcomes.labels_csv,
            "--out", out, *FAST, *args)
    assert r.exit_code == 0, r.output
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("head", [h for h in HEADS if h not in SLIDE_EMBEDDING_HEADS])
def test_every_head_learns_survival(outcomes, tmp_path, head):
    """The witness fraction sets the hazard (censored times included): every head ranks
    slides by risk in 3-fold CV; folds are stratified by event; the risk written per slide
    is what the C-index was computed on."""
    m = train(outcomes, tmp_path / "m", *SURVIVAL, "--head", head, "--folds", 3)
    assert m["task"] == "survival" and len(m["folds"]) == 3
    assert m["summary"]["c_index"]["mean"] >= 0.75, [f["c_index"] for f in m["folds"]]
    oof = read_csv(tmp_path / "m" / "oof_predictions.csv")
    assert {"slide_id", "fold", "time", "event", "risk"} <= set(oof[0])
    events = [sum(int(r["event"]) for r in oof if r["fold"] == str(k)) for k in range(3)]
    assert max(events) - min(events) <= 2, events  # stratified by event
    fold0 = [r for r in oof if r["fold"] == "0"]
    assert c_index(np.array([float(r["time"]) for r in fold0]),
                   np.array([int(r["event"]) for r in fold0]),
                   np.array([float(r["risk"]) for r in fold0])) == pytest.approx(
        m["folds"][0]["c_index"], abs=1e-4)


def test_survival_nll_heatmaps_and_kaplan_meier(outcomes, tmp_path):
    """The discrete-time loss learns too (less well than Cox here: times within one interval
    are not ranked); the statistics' Kaplan–Meier groups separate (log-rank); `classify`
    writes risks and per-patch contributions that are highest on the witness patches, which
    raise the risk."""
    nll = train(outcomes, tmp_path / "nll", *SURVIVAL, "--survival-loss", "nll", "--bins", "4",
                "--head", "mean")
    assert nll["summary"]["c_index"]["mean"] >= 0.65, nll["summary"]
    m = train(outcomes, tmp_path / "m", *SURVIVAL, "--head", "mean")
    assert m["summary"]["c_index"]["mean"] >= 0.75, m["summary"]
    s = json.loads((tmp_path / "m" / "statistics" / "statistics.json").read_text())
    assert s["logrank"]["p_value"] < 0.01 and s["c_index"]["ci_low"] < s["c_index"]["value"]
    assert (tmp_path / "m" / "statistics" / "kaplan_meier.png").stat().st_size > 5000
    r = cli("classify", "--features", outcomes.labels_csv.parent, "--model",
            tmp_path / "m" / "model.pt", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    rows = read_csv(tmp_path / "c" / "predictions.csv")
    assert {"risk", "status"} <= set(rows[0]) and "prob_risk" not in rows[0]
    ratios = []
    for sid, w in outcomes.witnesses.items():
        if 0 < w.sum() < len(w):
            with h5py.File(tmp_path / "c" / "attention" / f"{sid}.h5") as f:
                assert f.attrs["map_score"] == "patch_contribution"
                assert f.attrs["map_method"].startswith("leave-one-out")  # the mean head's
                assert f.attrs["task"] == "survival"
                c = f["patch_contribution"][:]
            ratios.append(c[w].mean() > c[~w].mean())
    assert np.mean(ratios) >= 0.9, np.mean(ratios)


def test_c_index_and_cox_loss_agree_with_references():
    """Harrell's C (lifelines) against the pairs counted out on a fixed example with
    censoring and tied risks; the Cox loss against the partial likelihood written out
    (Breslow ties)."""
    rng = np.random.default_rng(3)
    time = rng.permutation(40).astype(float) + 1
    event = rng.uniform(size=40) < 0.6
    risk = np.round(rng.normal(size=40) - 0.05 * time, 1)  # tied risks count one half
    num = den = 0.0
    for i in range(40):
        for j in range(40):
            if event[i] and time[i] < time[j]:  # comparable: i had its event first
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert c_index(time, event, risk) == pytest.approx(num / den, abs=1e-12)
    assert c_index(time, event, -risk) == pytest.approx(1 - num / den, abs=1e-12)
    time = rng.integers(1, 12, 40).astype(float)  # tied times for the loss
    import torch

    r, t, e = torch.tensor(risk[:10]), torch.tensor(time[:10]), torch.tensor(event[:10] * 1.0)
    want = -sum(r[i] - torch.logsumexp(r[t >= t[i]], 0) for i in range(10) if e[i]) / e.sum()
    assert float(cox_loss(r, t, e)) == pytest.approx(float(want), abs=1e-9)


def test_regression_learns_a_planted_linear_signal(outcomes, tmp_path):
    """score = 10 × witness fraction + noise: predictions correlate (r ≥ 0.8) in the
    target's own units (targets are standardised for training, not in the output)."""
    m = train(outcomes, tmp_path / "m", "--task", "regression", "--target", "score",
              "--head", "abmil")
    assert m["summary"]["pearson_r"]["mean"] >= 0.8, m["summary"]
    oof = read_csv(tmp_path / "m" / "oof_predictions.csv")
    pred = np.array([float(r["prediction"]) for r in oof])
    truth = np.array([float(r["label"]) for r in oof])
    assert abs(pred.mean() - truth.mean()) < 0.5 and np.corrcoef(pred, truth)[0, 1] >= 0.8
    s = json.loads((tmp_path / "m" / "statistics" / "statistics.json").read_text())
    assert s["pearson_r"]["ci_low"] <= s["pearson_r"]["value"] <= s["pearson_r"]["ci_high"]
    assert (tmp_path / "m" / "statistics" / "scatter.svg").is_file()
    # the maps of a regression head: witness patches raise the value (gradient × input)
    r = cli("classify", "--features", outcomes.labels_csv.parent, "--model",
            tmp_path / "m" / "model.pt", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    up = []
    for sid, w in outcomes.witnesses.items():
        if 0 < w.sum() < len(w):
            with h5py.File(tmp_path / "c" / "attention" / f"{sid}.h5") as f:
                assert f.attrs["map_method"].startswith("gradient × input")
                c = f["patch_contribution"][:]
            up.append(c[w].mean() > c[~w].mean())
    assert np.mean(up) >= 0.9, np.mean(up)


def two_targets(tmp_path, missing: str = "NA"):
    """64 slides with two independent planted targets, `high` missing for every 8th."""
    outcomes = write_outcome_bags(tmp_path / "f", 64, patches=(12, 24), second_fraction=0.3)
    rows = outcomes.rows
    no_high = {r["slide_id"] for r in rows[::8]}
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,high,second\n" + "".join(
        f"{r['slide_id']},{missing if r['slide_id'] in no_high else r['high']},{r['second']}\n"
        for r in rows))
    return outcomes, rows, no_high, labels


def test_two_targets_on_shared_splits_missing_labels_skip_one_target_only(tmp_path):
    """`--targets high,second`: two independent planted targets, both learned; slides
    without `high` still train and test `second`; the splits are shared."""
    outcomes, rows, no_high, labels = two_targets(tmp_path)
    r = cli("train", "--features", outcomes.labels_csv.parent, "--labels", labels, "--out",
            tmp_path / "m", "--targets", "high,second", "--head", "abmil", *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())["targets"]
    assert m["high"]["auc"]["mean"] >= 0.8 and m["second"]["auc"]["mean"] >= 0.8, m
    tested = {t: {row["slide_id"]: row["fold"] for row in
                  read_csv(tmp_path / "m" / "targets" / t / "oof_predictions.csv")}
              for t in ("high", "second")}
    assert set(tested["second"]) == {r["slide_id"] for r in rows}
    assert set(tested["high"]) == {r["slide_id"] for r in rows} - no_high
    assert all(tested["second"][s] == f for s, f in tested["high"].items())  # shared folds
    for t in ("high", "second"):
        assert (tmp_path / "m" / "targets" / t / "model.pt").is_file()


def test_patient_bags_find_the_signal_in_one_of_two_slides(tmp_path):
    """Positive patients have witnesses in one of their two slides, negative ones in none:
    pooled into one bag per patient, patients are classified right, and no patient's
    slides are split across folds (the unit is the patient)."""
    bags = write_witness_bags(tmp_path / "f", 96, patches=(20, 40), shift=20.0, dim=32,
                              witness_frac=(0.1, 0.2))
    rows, k = [], 0
    pos = [s for s, c in bags.labels.items() if c == "1"]
    neg = [s for s, c in bags.labels.items() if c == "0"]
    for i in range(len(pos)):  # a positive patient: one witness slide + one clean slide
        rows += [(pos[i], "1", f"pat{k:03d}"), (neg[i], "1", f"pat{k:03d}")]
        k += 1
    labels = tmp_path / "patients.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(",".join(r) + "\n" for r in rows)
                      + "".join(f"{s},0,neg{j:03d}\n" for j, s in enumerate(neg[len(pos):])))
    # 48 positive patients of 2 slides, and 0 negative slides left: make negatives
    extra = write_witness_bags(tmp_path / "g", 64, patches=(20, 40), shift=20.0, dim=32,
                               seed=1)
    for s, c in extra.labels.items():
        if c == "0":
            (tmp_path / "g" / f"{s}.h5").rename(tmp_path / "f" / f"neg_{s}.h5")
    with open(labels, "a") as fh:
        negs = sorted(s for s, c in extra.labels.items() if c == "0")
        for j in range(0, len(negs) - 1, 2):
            fh.write(f"neg_{negs[j]},0,negp{j:03d}\nneg_{negs[j + 1]},0,negp{j:03d}\n")
    r = cli("train", "--features", tmp_path / "f", "--labels", labels, "--out", tmp_path / "m",
            "--patient-bags", "--head", "abmil", *FAST, "--batch-size", "4")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["summary"]["auc"]["mean"] >= 0.95 and m["summary"]["balanced_accuracy"][
        "mean"] >= 0.9, m["summary"]
    oof = read_csv(tmp_path / "m" / "oof_predictions.csv")
    assert "patient_id" in oof[0] and len(oof) == len({r["patient_id"] for r in oof}) == 48 + 16
    members = json.loads((tmp_path / "m" / "patients.json").read_text())
    assert all(len(v) == 2 for v in members.values())
    splits = json.loads((tmp_path / "m" / "splits.json").read_text())
    for f in splits.values():
        assert not set(f["train"]) & set(f["test"]) and not set(f["val"]) & set(f["test"])


@pytest.mark.parametrize("case, args, rows, message", [
    ("no event column", SURVIVAL, "slide_id,time\ncase_0000,3\n", "no 'event' column"),
    ("negative time", SURVIVAL, "slide_id,time,event\ncase_0000,-2,1\n", "negative time"),
    ("no --event", ("--task", "survival", "--time", "time"),
     "slide_id,time,event\ncase_0000,2,1\n", "needs --event"),
    ("class names as a number", ("--task", "regression", "--target", "t"),
     "slide_id,t\ncase_0000,MSI\ncase_0001,MSS\n", "use --task classification"),
    ("a 0/1 class column", ("--task", "regression", "--target", "t"),
     "slide_id,t\n" + "".join(f"case_{i:04d},{i % 2}\n" for i in range(10)),
     "use --task classification"),
    ("event not 0/1", SURVIVAL, "slide_id,time,event\ncase_0000,2,dead\n", "holds 1"),
])
def test_bad_task_inputs_exit_2_with_one_line(outcomes, tmp_path, case, args, rows, message):
    labels = tmp_path / "l.csv"
    labels.write_text(rows)
    r = cli("train", "--features", outcomes.labels_csv.parent, "--labels", labels, "--out",
            tmp_path / "m", *args)
    assert r.exit_code == 2 and message in r.output, (case, r.output)
    assert not (tmp_path / "m").exists()


def test_one_multi_head_model_learns_two_targets(tmp_path):
    """`--targets high,second --multi-head`: one model whose outputs hold both targets;
    a slide without `high` still trains `second`; `classify` and `statistics` give each
    target its own columns and numbers."""
    _, rows, no_high, labels = two_targets(tmp_path, missing="")
    r = cli("train", "--features", tmp_path / "f", "--labels", labels, "--out", tmp_path / "m",
            "--targets", "high,second", "--multi-head", "--head", "abmil", *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["per_target"]["high"]["auc"]["mean"] >= 0.8, m["per_target"]
    assert m["per_target"]["second"]["auc"]["mean"] >= 0.8, m["per_target"]
    oof = read_csv(tmp_path / "m" / "oof_predictions.csv")
    assert len(oof) == 64 and {"label_high", "prob_high:1", "prediction_second"} <= set(oof[0])
    assert sum(r["label_high"] == "" for r in oof) == len(no_high)
    for t in ("high", "second"):
        s = json.loads((tmp_path / "m" / "statistics" / t / "statistics.json").read_text())
        assert s["n"] == (64 - len(no_high) if t == "high" else 64)
    r = cli("classify", "--features", tmp_path / "f", "--model", tmp_path / "m" / "model.pt",
            "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    pred = {p["slide_id"]: p for p in read_csv(tmp_path / "c" / "predictions.csv")}
    row = pred[rows[1]["slide_id"]]
    assert float(row["prob_second:0"]) + float(row["prob_second:1"]) == pytest.approx(1, abs=2e-6)
    r = cli("statistics", "--predictions", tmp_path / "c" / "predictions.csv", "--labels",
            labels, "--target", "second", "--out", tmp_path / "s", "--bootstrap", "50")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s" / "statistics.json").read_text())
    assert s["per_class"]["1"]["auroc"]["value"] >= 0.8
