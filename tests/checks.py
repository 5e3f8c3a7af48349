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
