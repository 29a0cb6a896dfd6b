"""Metrics against cases worked out by hand (in the comments beside each assertion)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cellmodel.evaluate.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    log_loss,
    paired_gap_intervals,
    per_class_scores,
    source_intervals,
    source_scores,
    wilson_interval,
)


def onehot(pred, k, conf=0.8):
    """Probabilities whose argmax is ``pred`` with top-1 confidence ``conf``."""
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_confusion_matrix_counts_rows_true_columns_predicted():
    cm = confusion_matrix([0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 0, 1, 1, 1], 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 3, 0]]


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="2 labels but y_pred has 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)


def test_precision_recall_f1_by_hand_with_a_class_never_predicted():
    # cm rows A [2,1,0], B [1,1,0], C [0,3,0]; C is never predicted.
    cm = np.array([[2, 1, 0], [1, 1, 0], [0, 3, 0]])
    s, notes = per_class_scores(cm, ["A", "B", "C"])
    assert s["A"]["precision"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert s["A"]["recall"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert s["A"]["f1"] == pytest.approx(2 / 3)
    assert s["B"]["precision"] == pytest.approx(1 / 5)  # 1 / (1 + 1 + 3)
    assert s["B"]["recall"] == pytest.approx(1 / 2)
    assert s["B"]["f1"] == pytest.approx(2 / 7)  # 2 * (1/5)(1/2) / (7/10)
    # Undefined precision is 0 (not NaN) and explained in a note.
    assert s["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3, "predicted": 0}
    assert len(notes) == 1 and notes[0].startswith("C: never predicted")


def test_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    m = classification_metrics(onehot(y_pred, 3), y_true, ["A", "B", "C"])
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1 / 5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 7 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 7 + 3 * 0) / 8)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 3, 0]]
    assert m["classes_present"] == ["A", "B", "C"]
    json.dumps(m, allow_nan=False)  # valid JSON: no NaN anywhere


def test_class_absent_from_data_is_left_out_of_macro_averages():
    # True labels only A and B; one A predicted as C. cm A [1,0,1], B [0,2,0], C [0,0,0].
    m = classification_metrics(onehot([0, 2, 1, 1], 3), np.array([0, 0, 1, 1]), ["A", "B", "C"])
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["per_class"]["A"]["f1"] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert m["per_class"]["C"]["precision"] == 0.0  # predicted once, never right
    assert m["per_class"]["C"]["support"] == 0
    assert m["classes_present"] == ["A", "B"]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert any(n.startswith("C: absent from the data") for n in m["notes"])


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.6, 0.4]])
    y = np.array([0, 1, 1, 1])  # right, wrong, right, wrong
    # Gaps |acc - conf| per single-image bin: 0.05, 0.85, 0.35, 0.6; mean = 1.85 / 4.
    assert expected_calibration_error(probs, y, 10) == pytest.approx(0.4625)
    bins = calibration_bins(probs, y, 10)
    # 0.6 sits on an edge and belongs to (0.5, 0.6], bin 5.
    assert bins["count"] == [0, 0, 0, 0, 0, 1, 1, 0, 1, 1]
    assert bins["accuracy"][5] == 0.0 and bins["accuracy"][9] == 1.0
    assert bins["confidence"][6] == pytest.approx(0.65)
    # Two bins: (0, .5] empty; (.5, 1] has mean conf 3.05 / 4 = 0.7625 and accuracy 0.5.
    assert expected_calibration_error(probs, y, 2) == pytest.approx(0.2625)


def test_perfect_calibration_has_zero_ece():
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    assert expected_calibration_error(probs, np.array([0, 1, 0])) == pytest.approx(0.0)


def test_log_loss_by_hand():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert log_loss(probs, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert math.isfinite(log_loss(np.array([[1.0, 0.0]]), np.array([1])))  # clipped, not inf


def test_source_scores_vote_and_mean_probability_differ_by_hand():
    probs = np.array(
        [
            [0.9, 0.1], [0.9, 0.1], [0.4, 0.6],  # s1, label 0: vote 0, mean (.73, .27) -> 0
            [0.55, 0.45], [0.55, 0.45], [0.1, 0.9],  # s2, label 1: vote 0, mean (.4, .6) -> 1
        ]
    )  # fmt: skip
    y = np.array([0, 0, 0, 1, 1, 1])
    s = source_scores(probs, y, ["s1"] * 3 + ["s2"] * 3, ["A", "B"])
    assert s["n_sources"] == 2
    assert s["vote_accuracy"] == pytest.approx(0.5)
    assert s["mean_prob_accuracy"] == pytest.approx(1.0)
    rows = {r["source_id"]: r for r in s["sources"]}
    assert rows["s1"]["image_accuracy"] == pytest.approx(2 / 3)
    assert rows["s2"]["image_accuracy"] == pytest.approx(1 / 3)
    assert s["cell_balanced_accuracy"] == pytest.approx(0.5)  # (2/3 + 1/3) / 2
    assert s["images_per_source"] == {"min": 3, "median": 3.0, "max": 3}
    assert (rows["s2"]["vote"], rows["s2"]["mean_prob"]) == ("A", "B")


def test_cell_balanced_accuracy_weighs_every_source_the_same():
    # s1: 8 images, all right; s2: 2 images, both wrong. Per image 0.8, per source 0.5.
    probs = np.array([[0.9, 0.1]] * 8 + [[0.8, 0.2]] * 2)
    y = np.array([0] * 8 + [1] * 2)
    s = source_scores(probs, y, ["s1"] * 8 + ["s2"] * 2, ["A", "B"])
    assert float(np.mean(probs.argmax(1) == y)) == pytest.approx(0.8)
    assert s["cell_balanced_accuracy"] == pytest.approx(0.5)
    assert s["images_per_source"] == {"min": 2, "median": 5.0, "max": 8}


def test_source_vote_tie_goes_to_higher_mean_probability():
    # One vote each; mean probability (0.45, 0.55) breaks the tie towards B.
    s = source_scores(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 0]), ["x", "x"], ["A", "B"])
    assert s["sources"][0]["vote"] == "B"
    assert s["vote_accuracy"] == 0.0


def test_source_intervals_resample_whole_cells():
    # 19 cells of 10 images, all right, and one cell of 100 images, all wrong: per image
    # 190 / 290. A resample that leaves the big cell out (about a third of them) scores 1.0,
    # one that draws it twice about 0.5, so the interval spans half the scale; resampling
    # the 290 images one by one would give about +-0.05.
    n = np.array([10] * 19 + [100])
    correct = np.array([10] * 19 + [0])
    vote_ok = np.array([1.0] * 19 + [0.0])
    ci = source_intervals(n, correct, vote_ok, resamples=4000)
    lo, hi = ci["accuracy"]
    assert lo < 190 / 290 < hi
    assert hi == pytest.approx(1.0) and lo < 0.5
    assert ci["vote_accuracy"][0] < 0.95 < ci["vote_accuracy"][1]
    assert ci["cell_balanced_accuracy"][1] == pytest.approx(1.0)
    assert (ci["resamples"], ci["level"]) == (4000, 0.95)
    assert source_intervals(n, correct, vote_ok, resamples=4000) == ci  # seeded
    narrower = source_intervals(n, correct, vote_ok, resamples=4000, level=0.5)["accuracy"]
    assert lo <= narrower[0] <= narrower[1] <= hi
    with pytest.raises(ValueError, match="level must lie in"):
        source_intervals(n, correct, vote_ok, level=1.0)
    none = source_intervals(np.zeros(0), np.zeros(0), np.zeros(0))
    assert none["accuracy"] == none["vote_accuracy"] == [0.0, 1.0]  # no cells: anything


def test_source_intervals_of_a_perfect_model_are_a_point():
    probs = onehot([0, 0, 1, 1, 1], 2)
    s = source_scores(probs, np.array([0, 0, 1, 1, 1]), ["a", "a", "b", "c", "c"], ["A", "B"])
    for key in ("accuracy", "vote_accuracy", "cell_balanced_accuracy"):
        assert s["intervals"][key] == [1.0, 1.0]


def test_paired_gap_sees_a_difference_that_separate_intervals_cannot():
    # 20 cells of 10 images and one of 100 that both sides get wrong; A is right on all 20
    # small cells, B wrong on 6 of them. Separately the big cell makes each interval some 40
    # points wide and they overlap; resampled in pairs it weighs on both sides alike, and
    # the gap (60 / 300 = 0.2 per image) stays above 0 on every draw holding one of the 6.
    n = np.array([10] * 20 + [100])
    a = np.array([10] * 20 + [0])
    b = np.array([10] * 14 + [0] * 6 + [0])
    va, vb = (a > 0).astype(float), (b > 0).astype(float)
    gap = paired_gap_intervals(n, a, va, b, vb, resamples=4000)
    assert gap["accuracy"]["gap"] == pytest.approx(60 / 300)
    assert gap["vote_accuracy"]["gap"] == pytest.approx(6 / 21)
    lo, hi = gap["accuracy"]["interval"]
    assert 0.0 < lo < 0.2 < hi
    sep_a = source_intervals(n, a, va, resamples=4000)["accuracy"]
    sep_b = source_intervals(n, b, vb, resamples=4000)["accuracy"]
    assert sep_a[0] < sep_b[1]  # apart, the two overlap: no verdict
    same = paired_gap_intervals(n, a, va, a, va)
    assert same["accuracy"] == {"gap": 0.0, "interval": [0.0, 0.0]}
    # Several runs a side: a side's figure is the mean over its runs.
    two = paired_gap_intervals(n, np.stack([a, b]), np.stack([va, vb]), b, vb)
    assert two["accuracy"]["gap"] == pytest.approx(30 / 300)
    with pytest.raises(ValueError, match="one column per cell"):
        paired_gap_intervals(n, a[:-1], va[:-1], b, vb)


def test_wilson_interval_by_hand():
    # 51 of 54 at 95 %: z = 1.95996, p = 0.9444; centre (p + z^2/108) / (1 + z^2/54) = 0.9149,
    # half-width z * sqrt(p(1-p)/54 + z^2/11664) / (1 + z^2/54) = 0.0660.
    lo, hi = wilson_interval(51, 54)
    assert (lo, hi) == (pytest.approx(0.8492, abs=1e-3), pytest.approx(0.9810, abs=1e-3))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] < 1.0
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] > 0.0
    assert wilson_interval(0, 0) == [0.0, 1.0]
    assert wilson_interval(51, 54, level=0.5)[0] > lo  # a lower level, a narrower interval
    with pytest.raises(ValueError, match="right <= total"):
        wilson_interval(5, 4)


def test_classification_metrics_checks_shapes():
    with pytest.raises(ValueError, match=r"probs must be \(N, 3\)"):
        classification_metrics(np.zeros((2, 2)), np.array([0, 1]), ["A", "B", "C"])
    with pytest.raises(ValueError, match="2 probability rows for 3 labels"):
        classification_metrics(np.zeros((2, 2)), np.array([0, 1, 1]), ["A", "B"])
