"""Kronecker: the dense form is torch.kron of the factors; factor choice and its errors."""

from __future__ import annotations

import pytest
import torch

import surm
from surm.structures.kronecker import kronecker_product



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


@pytest.mark.parametrize(("m", "n", "options"), [(12, 18, {"terms": 3}), (10, 6, {}), (13, 11, {})])
def test_second_derivatives_equal_the_dense_forms(m, n, options):
    """KroneckerProduct's backward is made of differentiable operations: gradgradcheck passes."""
    torch.manual_seed(0)
    module = surm.structure("kronecker", m, n, init="random", **options).double()
    first = module.first.detach().clone().requires_grad_(True)
    second = module.second.detach().clone().requires_grad_(True)
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(kronecker_product, (first, second, x))


def test_training_saves_the_input_and_the_factors_only():
    """No intermediate of the rows' size is kept for backward (X B^T is recomputed there): what the graph saves
    is x (shared with the base layer in an adapted layer) and the factors."""
    module = surm.structure("kronecker", 384, 384, init="random", terms=2)
    x = torch.randn(64, 384, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x).sum().backward()
    row_sized = [tuple(t.shape) for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert row_sized == []
    assert sum(t.numel() for t in saved) == x.numel() + module.first.numel() + module.second.numel()


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_gradients_of_one_operand_alone(needs):
    """A backward asked for one operand's gradient (a frozen adapter, a frozen input) computes that one right."""
    torch.manual_seed(0)
    module = surm.structure("kronecker", 12, 18, init="random", terms=2).double()
    operands = [module.first.detach().clone(), module.second.detach().clone(), torch.randn(4, 18).double()]
    for tensor, need in zip(operands, needs):
        tensor.requires_grad_(need)
    weights = torch.randn(4, 12, dtype=torch.float64)
    wanted = [t for t in operands if t.requires_grad]
    fast = torch.autograd.grad((kronecker_product(*operands) * weights).sum(), wanted)
    dense = module.dense().new_zeros(12, 18)
    first, second, x = operands
    for k in range(2):
        dense = dense + torch.kron(first[k], second[k])
    reference = torch.autograd.grad((x @ dense.T * weights).sum(), wanted)
    assert torch.allclose(fast[0], reference[0], rtol=1e-10, atol=1e-12)


def test_autocast_forward_with_float32_gradients():
    """Under bfloat16 autocast the products run in bfloat16 (the result is cast back to x's float32); backward, where
    the saved operands are float32 and the gradient arrives in bfloat16, computes in float32 and gives float32
    gradients near the exact ones."""
    torch.manual_seed(0)
    module = surm.structure("kronecker", 12, 18, init="random", terms=2)
    x = torch.randn(5, 18, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32 and not torch.equal(out, x @ module.dense().T)  # rounded in bfloat16
    out.sum().backward()
    grads = [module.first.grad, module.second.grad, x.grad]
    assert all(g.dtype == torch.float32 for g in grads)
    exact = torch.autograd.grad((x.detach() @ module.dense().T).sum(), [module.first, module.second])
    for got, want in zip(grads, exact):
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
