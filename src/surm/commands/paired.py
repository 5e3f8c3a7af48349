"""Paired differences over seeds, with a Student-t 95 % confidence interval (``surm compare --reference``).

Two methods run with the same seeds see the same data order, subsets and head initialisation, so the per-seed
difference ``d_s = a_s - b_s`` removes what the seeds share; its mean is reported with the interval
``mean ± t_{0.975, n-1} · sd(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

#: t_{0.975, df} for df = 1..30 (two-sided 95 %).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish-Fisher beyond).

    Raises:
        ValueError: for df < 1.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences over ``seeds`` and its 95 % interval (None with a single seed)."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    seeds: tuple[int, ...]


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Optional[PairedDifference]:
    """``values - reference`` over the seeds both have; None if they share no seed."""
    seeds = tuple(sorted(set(values) & set(reference)))
    if not seeds:
        return None
    differences = [values[s] - reference[s] for s in seeds]
    mean = statistics.fmean(differences)
    if len(seeds) == 1:
        return PairedDifference(mean, None, None, seeds)
    half = t_quantile_975(len(seeds) - 1) * statistics.stdev(differences) / math.sqrt(len(seeds))
    return PairedDifference(mean, mean - half, mean + half, seeds)
