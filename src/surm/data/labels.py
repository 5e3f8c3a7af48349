"""Turn a column of raw label values into class indices, refusing values that are not usable classes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

_SHOWN = 5  # how many offending rows an error message lists


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOWN])
    return shown + (f" and {len(numbers) - _SHOWN} more" if len(numbers) > _SHOWN else "")


def _normalize(value: Any) -> int | float | str | None:
    """A raw value as an int, a float, a string (a class name), or None (missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        for parse in (int, float):
            try:
                number = parse(text)
            except ValueError:
                continue
            return None if isinstance(number, float) and math.isnan(number) else number
        return text
    raise TypeError(type(value).__name__)


def encode_labels(values: Sequence[Any], *, column: str, source: str) -> tuple[list[int], tuple[str, ...]]:
    """Map raw labels to class indices ``0..k-1``; return ``(indices, label_names)``.

    Numeric labels (ints, integer-valued floats, or strings that parse as such) are ordered numerically; any other
    labels are ordered by the sorted order of their names (strings). Rows are numbered from 1 in messages.

    Raises:
        ValueError: a label is missing (None, empty, NaN), not a scalar, a non-integer number such as 0.5 (a
            regression target, not a class), or there are fewer than two classes.
    """
    normalized, missing, bad_type = [], [], []
    for row, value in enumerate(values, start=1):
        try:
            item = _normalize(value)
        except TypeError:
            bad_type.append(row)
            continue
        if item is None:
            missing.append(row)
        normalized.append(item)
    where = f"label column {column!r} of {source}"
    if bad_type:
        raise ValueError(f"{where} holds values that are not class labels (lists or objects) in rows {_rows(bad_type)}")
    if missing:
        raise ValueError(f"{where} has missing or empty labels (empty, null or NaN) in rows {_rows(missing)}")
    if all(isinstance(item, (int, float)) for item in normalized):
        fractional = [row for row, item in enumerate(normalized, 1) if not float(item).is_integer()]
        if fractional:
            example = normalized[fractional[0] - 1]
            raise ValueError(f"{where} holds non-integer numbers (e.g. {example!r} in row {fractional[0]}): "
                             "classification needs class labels (strings or integers), not a continuous score")
        keys: list[Any] = [int(item) for item in normalized]
        classes = sorted(set(keys))
        names = tuple(str(c) for c in classes)
    else:
        keys = [str(int(item)) if isinstance(item, float) and item.is_integer() else str(item) for item in normalized]
        classes = sorted(set(keys))
        names = tuple(classes)
    if len(classes) < 2:
        found = f"only the class {names[0]!r}" if names else "no classes"
        raise ValueError(f"{where} has {found}: classification needs at least 2 classes")
    index = {c: i for i, c in enumerate(classes)}
    return [index[k] for k in keys], names
