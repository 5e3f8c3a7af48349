"""Circulant: entries depend only on (i - j) mod N."""

from __future__ import annotations

import pytest
import torch

import surm


@pytest.mark.parametrize("parameterization", ["plain", "product"])
@pytest.mark.parametrize(("m", "n"), [(7, 7), (5, 9), (10, 6)])
def test_entries_depend_only_on_wrapped_difference(parameterization, m, n):
    torch.manual_seed(0)
    module = surm.structure("circulant", m, n, parameterization=parameterization, init="random").double()
    dense = module.dense()
    size = max(m, n)
    column = module.first_column()
    for i in range(m):
        for j in range(n):
            assert dense[i, j] == column[(i - j) % size]
    assert len(torch.unique(dense)) == min(size, len(torch.unique(column)))


def test_product_is_elementwise_product_of_its_factors():
    torch.manual_seed(0)
    module = surm.structure("circulant", 6, 6, parameterization="product", init="random").double()
    assert torch.equal(module.first_column(), module.column * module.factor)


def test_square_circulant_commutes_with_the_cyclic_shift():
    torch.manual_seed(0)
    dense = surm.structure("circulant", 9, 9, init="random").double().dense()
    shift = torch.roll(torch.eye(9, dtype=torch.float64), 1, dims=0)
    assert torch.allclose(shift @ dense, dense @ shift, atol=1e-12)
