"""Families, options and shapes shared by the structure tests, with parameter counts written out independently, and
the check that an oversized option is refused before it is allocated."""

from __future__ import annotations

import math
import resource
from typing import Callable

import pytest

import surm

# (out_features, in_features): square even and odd, rectangular both ways, sizes not divisible by 2 or 3.
SHAPES: list[tuple[int, int]] = [(8, 8), (7, 7), (5, 9), (10, 6), (12, 18), (13, 11)]

#: Option values worth testing beyond what the registry gives (below): uneven block sizes, other ranks.
EXTRA_CASES: list[tuple[str, dict]] = [("lowrank", {"rank": 3}), ("monarch", {"nblocks": 3, "block_rank": 2}),
                                       ("fourier", {"frequencies": 5})]


def _fits_every_shape(name: str, options: dict) -> bool:
    try:
        for m, n in SHAPES:
            surm.structure(name, m, n, **options)
    except ValueError:
        return False
    return True


def registry_cases() -> list[tuple[str, dict]]:
    """Every registered family at its defaults, and with each declared option set to its first non-default value
    (among its choices, else the values surm search tries), where they fit every test shape (lowrank's default rank
    8 does not fit 7 x 7): a family registered in surm.STRUCTURES is tested by being registered."""
    cases: list[tuple[str, dict]] = []
    for name, family in surm.STRUCTURES.items():
        if _fits_every_shape(name, {}):
            cases.append((name, {}))
        for option in family.options:
            values = [v for v in (option.choices or option.search) if v is not None and v != option.default]
            fitting = next((v for v in values if _fits_every_shape(name, {option.name: v})), None)
            if fitting is not None:
                cases.append((name, {option.name: fitting}))
    return cases


# (family, options): every parameterisation of every family.
FAMILY_CASES: list[tuple[str, dict]] = registry_cases()
FAMILY_CASES += [case for case in EXTRA_CASES if case not in FAMILY_CASES]

# Kronecker with SURM's rank (r must divide both sizes).
KRONECKER_RANK_CASES: list[tuple[int, int, int]] = [(6, 6, 2), (12, 18, 3), (8, 4, 4)]


def case_id(case: tuple[str, dict]) -> str:
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in sorted(options.items()))


def nearest_sqrt_divisor(n: int) -> int:
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and (abs(d * d - n), d) < (abs(best * best - n), best):
            best = d
    return best


#: The families whose parameter count the README gives as a closed formula, written out again below.
FORMULA_FAMILIES = ("lowrank", "circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "ldr", "monarch", "fourier")


def expected_parameters(name: str, options: dict, m: int, n: int) -> int:
    """The closed formulas of the README, written out again (for :data:`FORMULA_FAMILIES`)."""
    big = max(m, n)
    product = options.get("parameterization") == "product"
    if name == "lowrank":
        return options.get("rank", 8) * (m + n)
    if name == "circulant":
        return 2 * big if product else big
    if name == "toeplitz":
        k = min(m, n)
        return (m + k - 1) + (k + n - 1) if product else m + n - 1
    if name == "symmetric_toeplitz":
        return m + n if product else big
    if name == "kronecker":
        if "rank" in options:
            return m + n
        m1, n1 = options.get("factors") or (nearest_sqrt_divisor(m), nearest_sqrt_divisor(n))
        return options.get("terms", 1) * (m1 * n1 + (m // m1) * (n // n1))
    if name == "ldr":
        return 2 * options.get("displacement_rank", 1) * big
    if name == "monarch":
        blocks, rank = options.get("nblocks", 4), options.get("block_rank", 4)
        return rank * blocks * (math.ceil(n / blocks) + math.ceil(m / blocks))
    if name == "fourier":  # K; by default max(m, n), capped by the (m n + s) / 2 distinct cosines (s <= 4)
        pairs = (m * n + (2 - m % 2) * (2 - n % 2)) // 2
        return options.get("frequencies") or min(big, pairs)
    raise AssertionError(f"no formula for {name}")


#: A size option far beyond any matrix's max(m, n): allocating it would take gigabytes (rank 10**8 on 16 x 16 lowrank
#: is 12.6 GB), so the family must refuse it before allocating anything.
HUGE = 10**8


def assert_refused_quickly(build: Callable[[], object], match: str) -> None:
    """``build()`` raises a one-line ValueError matching ``match`` before allocating: the process's peak memory
    does not grow by 100 MB (what a huge size option would allocate is gigabytes)."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ValueError, match=match) as error:
        build()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024, "memory peaked"
    assert "\n" not in str(error.value)
