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
    m = evaluate(y, probs, ["A", "B", "C"], k=2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["top2_accuracy"] == pytest.approx(1.0)
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
