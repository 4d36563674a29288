import numpy as np
import pytest

from geoindex.metrics import evaluate


def one_hot(pred, n):
    return np.eye(n)[pred]


def test_against_hand_computed_values_with_a_never_predicted_class():
    # truth: A A B B C ; predicted: A B B B A  (C is never predicted)
    y = [0, 0, 1, 1, 2]
    probs = one_hot([0, 1, 1, 1, 0], 3)
    probs[4] = [0.5, 0.1, 0.4]  # C second for the last sample -> top-2 hit
    m = evaluate(y, probs, ["A", "B", "C"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert "top3_accuracy" not in m and "top5_accuracy" not in m  # k must be below the number of classes
    # A: P=1/2 R=1/2 F=1/2 ; B: P=2/3 R=1 F=0.8 ; C: P=0 R=0 F=0
    assert m["per_class"]["A"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["B"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["B"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 0) / 5)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_distance_statistics():
    y = [0, 0, 0]
    true = np.array([[48.8566, 2.3522]] * 3)
    pred = np.array([[48.8566, 2.3522], [48.8566 + 0.1, 2.3522], [51.5072, -0.1276]])  # 0, ~11 km, ~344 km
    m = evaluate(y, one_hot([0, 0, 0], 2), ["PRS", "London"], pred, true)
    assert m["median_km"] == pytest.approx(11.1, abs=0.2)
    assert m["within_1km"] == pytest.approx(1 / 3) and m["within_25km"] == pytest.approx(2 / 3)


def test_shape_is_checked():
    with pytest.raises(ValueError):
        evaluate([0, 1], np.ones((2, 3)), ["a", "b"])


def test_top_k_never_counts_a_class_that_scored_zero():
    # 6 classes; the truth (class 5) got probability 0 everywhere: with stable argsort it would sit in the
    # "top 5" of the zero-tied tail; it must not count as a hit.
    probs = np.zeros((4, 6))
    probs[:, 0] = 1.0
    m = evaluate([5, 5, 5, 0], probs, list("abcdef"))
    assert m["top5_accuracy"] == pytest.approx(0.25) and m["top3_accuracy"] == pytest.approx(0.25)
    probs[0] = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]  # truth 5 ties 4th-5th: fewer than 5 classes score higher
    m = evaluate([5, 5, 5, 0], probs, list("abcdef"))
    assert m["top5_accuracy"] == pytest.approx(0.5) and m["top3_accuracy"] == pytest.approx(0.25)


def test_macro_figures_cover_only_the_classes_present():
    # The index knows 4 cities; the scored set holds two of them, both always right.
    m = evaluate([0, 0, 1], one_hot([0, 0, 1], 4), list("abcd"))
    assert m["macro_f1"] == pytest.approx(1.0) and m["classes_present"] == 2


def test_every_distance_threshold_and_json_safety():
    import json
    true = np.array([[48.8566, 2.3522], [48.8566, 2.3522]])
    pred = np.array([[np.nan, np.nan], [41.9028, 12.4964]])  # unknown, then Paris -> Rome ~1,106 km
    m = evaluate([0, 0], one_hot([0, 0], 2), ["PRS", "Rome"], pred, true)
    assert m["n_located"] == 1 and m["within_750km"] == 0.0 and m["within_2500km"] == 1.0
    m_empty = evaluate([], np.zeros((0, 2)), ["a", "b"], np.zeros((0, 2)), np.zeros((0, 2)))
    assert m_empty["median_km"] is None and m_empty["accuracy"] is None
    json.dumps(m_empty, allow_nan=False)
