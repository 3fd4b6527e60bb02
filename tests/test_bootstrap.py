"""The patient bootstrap's weighted statistics against scikit-learn on the resampled rows."""

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from wsi_embed import bootstrap
from wsi_embed.bootstrap import (
    bootstrap_ci,
    resample_counts,
    weighted_auroc,
    weighted_average_precision,
    weighted_balanced_accuracy,
    weighted_ci,
)


def _cohort(n_patients=25, seed=0):
    """Patients with 1-3 rows each; scores rounded so that ties occur; a rare third class."""
    rng = np.random.default_rng(seed)
    patients = [f"p{i}" for i in range(n_patients) for _ in range(rng.integers(1, 4))]
    n = len(patients)
    y = rng.integers(0, 2, n)
    y[rng.choice(n, 2, replace=False)] = 2
    score = np.round(0.3 * y + rng.random(n), 1)
    return patients, y, score


def test_weighted_statistics_equal_scikit_learn_on_the_repeated_rows():
    patients, y, score = _cohort()
    pos = (y == 1).astype(int)
    pred = np.where(score > 0.8, 1, np.where(score < 0.2, 2, 0))
    w = next(resample_counts(patients, seed=3, n_boot=200))
    assert w.shape == (200, len(patients))
    auroc = weighted_auroc(pos, score, w)
    ap = weighted_average_precision(pos, score, w)
    bacc = weighted_balanced_accuracy(y, pred, w)
    rows = np.arange(len(patients))
    absent_class = 0
    for b in range(200):
        i = np.repeat(rows, w[b].astype(int))
        np.testing.assert_allclose(auroc[b], roc_auc_score(pos[i], score[i]), atol=1e-12)
        np.testing.assert_allclose(ap[b], average_precision_score(pos[i], score[i]),
                                   atol=1e-12)
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
            warnings.simplefilter("ignore", UserWarning)
            expected = balanced_accuracy_score(y[i], pred[i])
        absent_class += not (y[i] == 2).any()
        np.testing.assert_allclose(bacc[b], expected, atol=1e-12)
    assert absent_class > 0  # the rare class is missing from some resamples: the rule is used


def test_undefined_resamples_are_nan_and_left_out_of_the_interval():
    patients = ["a", "b", "c", "d"]
    pos = np.array([1, 0, 0, 0])
    score = np.array([0.9, 0.1, 0.2, 0.3])
    w = next(resample_counts(patients, seed=0, n_boot=50))
    auroc = weighted_auroc(pos, score, w)
    no_positive = w[:, 0] == 0
    assert no_positive.any() and np.isnan(auroc[no_positive]).all()
    np.testing.assert_allclose(auroc[~no_positive], 1.0)
    assert np.isnan(weighted_average_precision(pos, score, w)[no_positive]).all()
    assert weighted_ci(lambda w: weighted_auroc(pos, score, w), patients, 0, 50) == (1.0, 1.0)


def test_whole_patients_are_drawn_and_blocks_continue_one_stream(monkeypatch):
    patients, y, score = _cohort(n_patients=12, seed=1)
    whole = next(resample_counts(patients, seed=7, n_boot=40))
    for p in set(patients):
        cols = [j for j, q in enumerate(patients) if q == p]
        assert (whole[:, cols] == whole[:, cols[:1]]).all()  # a patient's rows go together
    first_row = {p: patients.index(p) for p in set(patients)}
    assert (whole[:, list(first_row.values())].sum(1) == 12).all()  # 12 patients drawn
    monkeypatch.setattr(bootstrap, "_BLOCK_CELLS", 3 * len(patients))
    blocks = list(resample_counts(patients, seed=7, n_boot=40))
    assert len(blocks) == 14
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


def test_weighted_and_per_resample_intervals_agree():
    patients, y, score = _cohort(seed=2)
    pos = (y == 1).astype(int)
    per_resample = bootstrap_ci(lambda i: roc_auc_score(pos[i], score[i]), patients, 5, 300)
    weighted = weighted_ci(lambda w: weighted_auroc(pos, score, w), patients, 5, 300)
    np.testing.assert_allclose(weighted, per_resample, atol=1e-12)
    assert weighted[0] < roc_auc_score(pos, score) < weighted[1]
