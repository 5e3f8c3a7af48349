"""Families, options and shapes shared by the structure tests, with parameter counts written out independently, and
the check that an oversized option is refused before it is allocated."""

from __future__ import annotations

import math
import resource
import time
from typing import Callable

import pytest

# (family, options): every parameterisation of every family.
FAMILY_CASES: list[tuple[str, dict]] = [
    ("lowrank", {"rank": 3}),
    ("circulant", {}),
    ("circulant", {"parameterization": "product"}),
    ("toeplitz", {}),
    ("toeplitz", {"parameterization": "product"}),
    ("symmetric_toeplitz", {}),
    ("symmetric_toeplitz", {"parameterization": "product"}),
    ("kronecker", {}),
    ("kronecker", {"terms": 2}),
    ("ldr", {}),
    ("ldr", {"displacement_rank": 3}),
    ("monarch", {"nblocks": 2, "block_rank": 3}),
    ("monarch", {"nblocks": 3, "block_rank": 2}),
]

# (out_features, in_features): square even and odd, rectangular both ways, sizes not divisible by 2 or 3.
SHAPES: list[tuple[int, int]] = [(8, 8), (7, 7), (5, 9), (10, 6), (12, 18), (13, 11)]

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


def expected_parameters(name: str, options: dict, m: int, n: int) -> int:
    """The closed formulas of the README, written out again."""
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
    raise AssertionError(f"no formula for {name}")


#: A size option far beyond any matrix's max(m, n): allocating it would take gigabytes (rank 10**8 on 16 x 16 lowrank
#: is 12.6 GB), so the family must refuse it before allocating anything.
HUGE = 10**8


def assert_refused_quickly(build: Callable[[], object], match: str) -> None:
    """``build()`` raises a one-line ValueError matching ``match`` within a second and without a memory peak."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as error:
        build()
    assert time.perf_counter() - start < 1.0, "the refusal must come before any large allocation"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024, "memory peaked"
    assert "\n" not in str(error.value)
