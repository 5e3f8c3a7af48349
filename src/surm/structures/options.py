"""Validation helpers for family options: errors name the value and what would be valid."""

from __future__ import annotations


def require_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_size_option(family: str, name: str, value: object, out_features: int, in_features: int) -> int:
    """Return ``value`` if it is an integer in 1..N, N = max(out_features, in_features), else raise a ValueError.

    For the size options that multiply a family's parameters (a rank, a number of terms, a block rank): beyond N
    they cannot make M express anything more, only bigger (a 16 x 16 lowrank of rank 10**8 would allocate 12.6 GB),
    so families check this before allocating anything.
    """
    require_positive_int(name, value)
    limit = max(out_features, in_features)
    if value > limit:  # type: ignore[operator]
        raise ValueError(f"{family} {name}={value} exceeds max(out_features, in_features)={limit}; valid: 1..{limit}")
    return value  # type: ignore[return-value]


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def divisor_nearest_sqrt(n: int) -> int:
    """The divisor d of n that is closest to sqrt(n) (the smaller one on a tie), which balances d and n / d."""
    return min(divisors(n), key=lambda d: (abs(d * d - n), d))
