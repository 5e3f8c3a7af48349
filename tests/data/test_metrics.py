"""numpy-only metrics against hand-computed values."""

import numpy as np
import pytest

from surm.data import accuracy, confusion_matrix, is_imbalanced, macro_f1, macro_f1_of, recall_per_class


def test_accuracy():
    assert accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    assert accuracy(np.array([1]), np.array([1])) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_macro_f1_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: tp 2, fp 0, fn 1 -> 4/5; class 1: tp 1, fp 1, fn 1 -> 1/2; class 2: tp 1, fp 1, fn 0 -> 2/3
    assert macro_f1(preds, labels, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # class 3 absent from both preds and labels: left out, as in scikit-learn
    assert macro_f1(preds, labels, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class only predicted scores 0: class 0 -> 2/3, class 1 -> 0
    assert macro_f1([0, 1], [0, 0], 2) == pytest.approx(1 / 3)
    assert macro_f1([1, 1, 1], [1, 1, 1], 2) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        macro_f1([0, 2], [0, 1], 2)


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels, preds = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
        preds[:3] = 4  # make sure some class may appear on one side only
        assert macro_f1(preds, labels, 5) == pytest.approx(metrics.f1_score(labels, preds, average="macro"))


def test_confusion_matrix_and_recall_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    counts = confusion_matrix(preds, labels, 4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    # rows are true labels: class 0 recalled 2 of 3, class 1 1 of 2, class 2 1 of 1, class 3 has no examples
    assert recall_per_class(counts) == [pytest.approx(2 / 3), 0.5, 1.0, None]
    assert recall_per_class(counts.tolist()) == recall_per_class(counts)
    assert macro_f1_of(counts.tolist()) == macro_f1(preds, labels, 4)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="empty"):
        confusion_matrix([], [], 2)


def test_confusion_matrix_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    expected = metrics.confusion_matrix(labels, preds, labels=range(6))
    assert confusion_matrix(preds, labels, 6).tolist() == expected.tolist()
    assert recall_per_class(expected)[:5] == pytest.approx(
        metrics.recall_score(labels, preds, average=None, labels=range(5)).tolist())


def test_is_imbalanced():
    assert not is_imbalanced([0, 1] * 50)
    assert not is_imbalanced([0] * 75 + [1] * 25)  # exactly 25% is not below 25%
    assert is_imbalanced([0] * 76 + [1] * 24)
    assert is_imbalanced([0] * 10, num_labels=2)  # an absent class counts as 0%
    assert not is_imbalanced([0, 1, 2] * 10)
    assert is_imbalanced([0] * 40 + [1] * 40 + [2] * 4)  # 4.8% < 50% of 1/3
    with pytest.raises(ValueError, match="empty"):
        is_imbalanced([])
