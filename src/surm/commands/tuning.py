"""Learning-rate tuning for ``surm compare --tune-lr``: the grid each method gets and the rule that picks its rate.

Every method gets the same number of grid points, on the same ladder of rates (1 and 3 times the powers of ten:
..., 1e-4, 3e-4, 1e-3, 3e-3, ...), centred on its default rate. The rate is chosen on the validation split only
(tuning runs never read the test split); the chosen rate is then trained again with every seed and only those
final runs are tested.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from ..validation import is_int


def ladder_index(rate: float) -> int:
    """The rung of the 1-3 ladder nearest ``rate`` in log scale: rung 2k is 10**k, rung 2k + 1 is 3 * 10**k.

    Raises:
        ValueError: for a rate that is not a positive finite number.
    """
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"a learning rate must be a positive finite number, got {rate!r}")
    exponent = math.floor(math.log10(rate))
    candidates = [2 * exponent + step for step in (-1, 0, 1, 2)]
    return min(candidates, key=lambda i: (abs(math.log10(ladder_rate(i)) - math.log10(rate)), i))


def ladder_rate(index: int) -> float:
    """The rate of rung ``index``: 10**k for index 2k, 3 * 10**k for index 2k + 1 (rounded to 1 significant digit)."""
    exponent, odd = divmod(index, 2)
    return float(f"{(3 if odd else 1)}e{exponent}")


def require_grid_points(points: object) -> int:
    """``points`` if it is a number of grid points (at least 2: a grid of one rate tunes nothing), else a
    ValueError."""
    if not is_int(points, minimum=2):
        raise ValueError(f"--tune-lr takes the number of grid points per method, at least 2, got {points!r}")
    return points  # type: ignore[return-value]


def lr_grid(default: float, points: int) -> list[float]:
    """``points`` rates of the ladder centred on ``default``'s rung, ascending (one more above for even counts).

    >>> lr_grid(1e-3, 3)
    [0.0003, 0.001, 0.003]

    Raises:
        ValueError: for fewer than 2 points (:func:`require_grid_points`).
    """
    require_grid_points(points)
    centre = ladder_index(default)
    return [ladder_rate(centre + step) for step in range(-((points - 1) // 2), points // 2 + 1)]


def pick_rate(validation: Mapping[float, Sequence[float]], default: float) -> float:
    """The rate with the highest mean validation accuracy over its tuning seeds.

    Ties go to the rate nearer the default on the ladder, then to the smaller rate. Rates whose tuning runs all
    failed are absent from ``validation``.

    Raises:
        ValueError: if no rate has a finished tuning run.
    """
    scored = {rate: statistics.fmean(accuracies) for rate, accuracies in validation.items() if accuracies}
    if not scored:
        raise ValueError("no tuning run finished, so no learning rate can be chosen")
    centre = ladder_index(default)
    return min(scored, key=lambda rate: (-scored[rate], abs(ladder_index(rate) - centre), rate))
