"""num_parameters() equals the closed formula and the count of trainable elements."""

from __future__ import annotations

import pytest

import surm

from .cases import FAMILY_CASES, FORMULA_FAMILIES, KRONECKER_RANK_CASES, SHAPES, case_id, expected_parameters

LAYER_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
CASES = [(name, options, m, n) for name, options in FAMILY_CASES for m, n in SHAPES + LAYER_SHAPES] + [
    ("kronecker", {"rank": r}, m, n) for m, n, r in KRONECKER_RANK_CASES
]


@pytest.mark.parametrize(
    ("name", "options", "m", "n"), CASES, ids=[f"{case_id((c[0], c[1]))}-{c[2]}x{c[3]}" for c in CASES]
)
def test_num_parameters_matches_the_trainable_count(name, options, m, n):
    module = surm.structure(name, m, n, **options)
    assert module.num_parameters() == sum(p.numel() for p in module.parameters() if p.requires_grad)


FORMULA_CASES = [case for case in CASES if case[0] in FORMULA_FAMILIES]


@pytest.mark.parametrize(
    ("name", "options", "m", "n"), FORMULA_CASES,
    ids=[f"{case_id((c[0], c[1]))}-{c[2]}x{c[3]}" for c in FORMULA_CASES]
)
def test_num_parameters_matches_the_readme_formula(name, options, m, n):
    assert surm.structure(name, m, n, **options).num_parameters() == expected_parameters(name, options, m, n)


def test_paper_sizes_on_a_square_layer():
    d = 384
    assert surm.structure("circulant", d, d).num_parameters() == d
    assert surm.structure("circulant", d, d, parameterization="product").num_parameters() == 2 * d  # SURM
    assert surm.structure("symmetric_toeplitz", d, d, parameterization="product").num_parameters() == 2 * d  # SURM
    assert surm.structure("kronecker", d, d, rank=8).num_parameters() == 2 * d  # SURM: n + m whatever r
    assert surm.structure("monarch", d, d, nblocks=4, block_rank=4).num_parameters() == 4 * 2 * d  # MoRe
    assert surm.structure("lowrank", d, d, rank=8).num_parameters() == 8 * 2 * d  # LoRA r=8
