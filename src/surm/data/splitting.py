"""Seeded, stratified train/validation/test splits that are identical on every machine."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions lie in [0, 1) and leave some data for training."""
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(f"validation_fraction + test_fraction must be below 1, got "
                         f"{validation_fraction} + {test_fraction}")


def _sizes(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test sizes for a class of n examples: rounded, at least 1 each when asked for, train >= 1."""
    sizes = [max(1 if f > 0 else 0, math.floor(n * f + 0.5)) for f in (validation_fraction, test_fraction)]
    while n - sum(sizes) < 1:
        sizes[sizes.index(max(sizes))] -= 1
    return sizes[0], sizes[1]


def stratified_split(labels: Sequence[int], label_names: Sequence[str], *, seed: int, validation_fraction: float,
                     test_fraction: float, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split example indices into (train, validation, test), each sorted, with every class divided in proportion.

    Each class is shuffled with numpy's legacy ``RandomState(seed)`` (its stream is frozen across numpy versions
    and platforms), then cut into validation, test and train parts of ``round(n * fraction)`` examples (at least 1
    when the fraction is positive).

    Raises:
        ValueError: bad fractions or seed, or a class with too few examples to appear in every split.
    """
    check_fractions(validation_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    labels = np.asarray(labels, dtype=np.int64)
    needed = 1 + (validation_fraction > 0) + (test_fraction > 0)
    counts = np.bincount(labels, minlength=len(label_names))
    small = [f"{label_names[c]!r} ({counts[c]})" for c in range(len(label_names)) if counts[c] < needed]
    if small:
        raise ValueError(f"{source}: too few examples to stratify into train/validation/test: each class needs at "
                         f"least {needed}, but these have fewer: {', '.join(small[:10])}"
                         + (f" and {len(small) - 10} more classes" if len(small) > 10 else ""))
    rng = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(len(label_names)):
        members = np.flatnonzero(labels == c)[rng.permutation(counts[c])]
        n_val, n_test = _sizes(len(members), validation_fraction, test_fraction)
        parts[1].append(members[:n_val])
        parts[2].append(members[n_val:n_val + n_test])
        parts[0].append(members[n_val + n_test:])
    train, validation, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, validation, test
