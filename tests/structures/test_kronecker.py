"""Kronecker: the dense form is torch.kron of the factors; factor choice and its errors."""

from __future__ import annotations

import pytest
import torch

import surm



@pytest.mark.parametrize(("m", "n", "options"), [(12, 18, {}), (12, 18, {"terms": 3}), (6, 10, {"factors": (3, 5)})])
def test_dense_is_a_sum_of_torch_kron(m, n, options):
    torch.manual_seed(0)
    module = surm.structure("kronecker", m, n, init="random", **options).double()
    expected = sum(torch.kron(module.first[k], module.second[k]) for k in range(module.terms))
    assert torch.equal(module.dense(), expected)


def test_surm_rank_gives_kron_b_a_with_surm_shapes():
    module = surm.structure("kronecker", 12, 18, rank=3)
    assert module.first.shape == (1, 4, 3)  # B in R^{m/r x r}, zero at init
    assert module.second.shape == (1, 3, 6)  # A in R^{r x n/r}
    assert torch.count_nonzero(module.first) == 0
    assert torch.count_nonzero(module.second) > 0


def test_default_factors_are_divisors_nearest_the_square_root():
    assert surm.structure("kronecker", 384, 1536).factors == (16, 32)
    assert surm.structure("kronecker", 7, 5).factors == (1, 1)  # primes: the trivial factor


def test_factors_that_do_not_divide_name_the_valid_values():
    with pytest.raises(ValueError, match=r"5 does not divide out_features=12; valid values: \[1, 2, 3, 4, 6, 12\]"):
        surm.structure("kronecker", 12, 12, factors=(5, 3))
    with pytest.raises(ValueError, match=r"7 does not divide in_features=12"):
        surm.structure("kronecker", 12, 12, factors=(3, 7))
    with pytest.raises(ValueError, match=r"factors must be a pair"):
        surm.structure("kronecker", 12, 12, factors=(3,))


def test_rank_that_does_not_divide_names_the_common_divisors():
    with pytest.raises(ValueError, match=r"rank=4 must divide both out_features=12 and in_features=18; valid ranks: \[1, 2, 3, 6\]"):
        surm.structure("kronecker", 12, 18, rank=4)
    with pytest.raises(ValueError, match="either factors or rank"):
        surm.structure("kronecker", 12, 18, rank=2, factors=(2, 2))
