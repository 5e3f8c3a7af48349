"""Numerical checks shared by the structure and execution-path tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def gradcheck_module(module: nn.Module, x: torch.Tensor) -> bool:
    """``torch.autograd.gradcheck`` of ``module(x)`` with respect to ``x`` and every parameter (float64)."""
    names = [k for k, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

    def apply(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, values)), (x,))

    return torch.autograd.gradcheck(apply, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def assert_matches_dense(module: nn.Module, x: torch.Tensor, atol: float = 1e-10) -> None:
    """``module(x)`` equals ``x @ module.dense().T`` in values, in the gradient of x and in every parameter's
    gradient (for a random weighting of the outputs), to ``atol``; float64 is expected."""
    x_fast = x.detach().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    y, expected = module(x_fast), x_dense @ module.dense().T
    assert y.shape == expected.shape and torch.allclose(y, expected, atol=atol)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    fast = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    (expected * weights).sum().backward()
    assert torch.allclose(x_fast.grad, x_dense.grad, atol=atol)
    for got, want in zip(fast, (p.grad for p in module.parameters())):
        assert torch.allclose(got, want, atol=atol)
