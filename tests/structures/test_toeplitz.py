"""Toeplitz and symmetric Toeplitz: entries depend only on i - j, or |i - j|; products are products."""

from __future__ import annotations

import pytest
import torch

import surm

SHAPES = [(7, 7), (5, 9), (10, 6)]


def random(name: str, m: int, n: int, **options) -> surm.StructuredMatrix:
    torch.manual_seed(0)
    return surm.structure(name, m, n, init="random", **options).double()


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_toeplitz_entries_depend_only_on_the_difference(m, n):
    module = random("toeplitz", m, n)
    dense = module.dense()
    values = module.outer_values  # t_{-(n-1)} .. t_{m-1}
    for i in range(m):
        for j in range(n):
            assert dense[i, j] == values[i - j + n - 1]
    assert len(torch.unique(dense)) == m + n - 1  # every diagonal has its own value


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_symmetric_toeplitz_entries_depend_only_on_the_distance(m, n):
    module = random("symmetric_toeplitz", m, n)
    dense = module.dense()
    for i in range(m):
        for j in range(n):
            assert dense[i, j] == module.outer_values[abs(i - j)]
    if m == n:
        assert torch.equal(dense, dense.T)


@pytest.mark.parametrize("name", ["toeplitz", "symmetric_toeplitz"])
@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_product_is_the_product_of_two_factors_of_the_family(name, m, n):
    product = random(name, m, n, parameterization="product")
    k = min(m, n)
    outer = surm.structure(name, m, k).double()
    inner = surm.structure(name, k, n).double()
    with torch.no_grad():
        outer.outer_values.copy_(product.outer_values)
        inner.outer_values.copy_(product.inner_values)
    assert torch.allclose(product.dense(), outer.dense() @ inner.dense(), rtol=0, atol=1e-14)
