"""Exact combinations (what PEFT's add_weighted_adapter builds): a family that can hold sum_i s_i M_i does so exactly,
in float64; one that cannot says so and points to the SVD."""

from __future__ import annotations

import pytest
import torch

import surm

from ..checks import relative_error
from .cases import FAMILY_CASES, case_id

SCALES = [0.7, -1.3, 2.0]
#: The families whose sums leave the family (a product of Toeplitz matrices; Monarch's permutation ties ranks to blocks).
NOT_COMBINABLE = {("toeplitz", "product"), ("symmetric_toeplitz", "product"), ("monarch", None)}


def sources(name: str, options: list[dict], m: int, n: int) -> list[surm.StructuredMatrix]:
    torch.manual_seed(0)
    return [surm.structure(name, m, n, init="random", **o).double() for o in options]


def combined(name: str, options: list[dict], m: int, n: int):
    family = surm.STRUCTURES[name]
    matrices = sources(name, options, m, n)
    target = surm.structure(name, m, n, **family.combined_options(options)).double()
    target.load_combination(matrices, SCALES[: len(matrices)])
    return target, sum(s * matrix.dense() for matrix, s in zip(matrices, SCALES))


def combinable(name: str, options: dict) -> bool:
    return (name, options.get("parameterization")) not in NOT_COMBINABLE and (name, None) not in NOT_COMBINABLE


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("m, n", [(8, 8), (12, 18), (13, 11)])
def test_a_weighted_sum_is_exact_or_refused_naming_the_svd(name, options, m, n):
    if not combinable(name, options):
        with pytest.raises(ValueError, match="combination_type='svd'"):
            surm.STRUCTURES[name].combined_options([options] * 3)
        return
    target, expected = combined(name, [options] * 2, m, n)
    assert relative_error(target.dense(), expected) < 1e-12
    assert relative_error(target(torch.eye(n, dtype=torch.float64)).T, expected) < 1e-12


@pytest.mark.parametrize("name, options, count", [
    ("lowrank", [{"rank": 2}, {"rank": 3}], {"rank": 5}),
    ("ldr", [{}, {"displacement_rank": 2}], {"displacement_rank": 3}),
    ("kronecker", [{"terms": 1}, {"terms": 2}], {"terms": 3}),
])
def test_counts_add_up_where_the_family_is_bilinear(name, options, count):
    assert surm.STRUCTURES[name].combined_options(options).items() >= count.items()
    target, expected = combined(name, options, 12, 18)
    assert relative_error(target.dense(), expected) < 1e-12


@pytest.mark.parametrize("name, options", [
    ("circulant", [{"parameterization": "plain"}, {"parameterization": "product"}]),
    ("kronecker", [{"factors": (3, 3)}, {"factors": (2, 3)}]),
])
def test_matrices_of_other_options_are_not_summed_silently(name, options):
    with pytest.raises(ValueError, match="with other options cannot be summed exactly"):
        surm.STRUCTURES[name].combined_options(options)


def test_sources_must_fit_the_target():
    target = surm.structure("circulant", 8, 8)
    with pytest.raises(ValueError, match="give one scale per matrix"):
        target.load_combination([surm.structure("circulant", 8, 8)], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"cannot sum a Circulant \(8, 6\) into a Circulant \(8, 8\)"):
        target.load_combination([surm.structure("circulant", 8, 6)], [1.0])
