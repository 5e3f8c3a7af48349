"""Classification metrics with numpy only."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1).astype(np.int64), np.asarray(labels).reshape(-1).astype(np.int64)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """The fraction of predictions equal to the labels."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, num_labels: int) -> np.ndarray:
    """``counts[i, j]``: the number of examples of class ``i`` predicted as class ``j`` (rows are the true labels,
    columns the predictions; ``num_labels`` x ``num_labels`` int64). Class ``i``'s recall is
    ``counts[i, i] / counts[i].sum()``.

    Raises:
        ValueError: for empty or unequal inputs, or a class index outside ``[0, num_labels)``.
    """
    p, y = _pair(preds, labels)
    if min(p.min(), y.min()) < 0 or max(p.max(), y.max()) >= num_labels:
        raise ValueError(f"class indices must lie in [0, {num_labels})")
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (y, p), 1)
    return counts


def macro_f1(preds: ArrayLike, labels: ArrayLike, num_labels: int) -> float:
    """The unweighted mean of per-class F1 over the classes that occur in ``labels`` or ``preds``.

    Matches ``sklearn.metrics.f1_score(labels, preds, average="macro")``: a class that occurs only in the
    predictions scores 0, a class absent from both is left out. ``num_labels`` bounds the class indices.
    """
    return macro_f1_of(confusion_matrix(preds, labels, num_labels))


def macro_f1_of(counts: ArrayLike) -> float:
    """:func:`macro_f1` from a confusion matrix (:func:`confusion_matrix`): the mean over the classes present in
    its rows or columns of ``2 tp / (predicted + actual)``."""
    counts = np.asarray(counts)
    tp, predicted, actual = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    present = (predicted + actual) > 0
    f1 = 2 * tp[present] / (predicted[present] + actual[present])
    return float(f1.mean())


def recall_per_class(counts: ArrayLike) -> list[float | None]:
    """Each class's recall from a confusion matrix (:func:`confusion_matrix`): the share of its examples predicted
    as it; None for a class with no examples."""
    counts = np.asarray(counts)
    actual = counts.sum(axis=1)
    return [float(counts[i, i] / actual[i]) if actual[i] else None for i in range(len(counts))]


def is_imbalanced(labels: ArrayLike, num_labels: int | None = None, ratio: float = 0.5) -> bool:
    """Whether the rarest class is below ``ratio`` times its uniform share ``1 / num_labels``.

    With the default ratio 0.5 a binary task is imbalanced when its minority class is under 25%; then report
    macro-F1 next to accuracy. ``num_labels`` defaults to the largest index + 1 (absent classes count as 0).
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.size == 0:
        raise ValueError("cannot judge the balance of an empty label set")
    counts = np.bincount(y, minlength=num_labels or 0)
    return bool(counts.min() / y.size < ratio / counts.size)
