"""The value checks every part of surm shares: whole numbers that are not booleans, finite numbers, positive counts.

Python's ``bool`` is an ``int``, but ``True`` is never a size, a rank or a seed; and a string such as ``"0.1"`` is
refused, not parsed.
"""

from __future__ import annotations

import math
from typing import Any, Optional


def is_int(value: Any, minimum: Optional[int] = None) -> bool:
    """True for an ``int`` that is not a ``bool`` (and at least ``minimum``, if given)."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a number (:func:`is_number`) that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def parse_bool(text: str) -> bool:
    """``"true"``/``"false"`` (any case; also ``yes``/``no``, ``1``/``0``) from the command line as a bool.

    Raises:
        ValueError: for any other text, naming it and the valid spellings.
    """
    spelled = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    value = spelled.get(str(text).strip().lower())
    if value is None:
        raise ValueError(f"expected true or false (or yes/no, 1/0), got {text!r}")
    return value


def require_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 1, else raise a ValueError naming it."""
    if not is_int(value, minimum=1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
