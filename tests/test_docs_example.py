"""The example family of docs/adding_a_family.md (docs/examples/blockdiag.py) keeps the family protocol: its
declarations pass the registry's check, and its fast apply equals its dense form in float64."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import surm

from .checks import gradcheck_module, relative_error

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "blockdiag.py"


def load_example() -> type:
    spec = importlib.util.spec_from_file_location("blockdiag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BlockDiagonal


def test_the_example_passes_the_registry_check():
    family = load_example()
    registry = surm.structures.checked_registry({**surm.STRUCTURES, "blockdiag": family})
    assert registry["blockdiag"] is family and family.default_lr > 0


@pytest.mark.parametrize("m, n", [(8, 8), (7, 7), (5, 9), (10, 6), (13, 11)])
@pytest.mark.parametrize("block", [1, 3, 4])
def test_the_example_applies_its_dense_form(m, n, block):
    torch.manual_seed(0)
    module = load_example()(m, n, block=block, init="random").double()
    for lead in [(), (3,), (2, 3), (0,)]:
        x = torch.randn(*lead, n, dtype=torch.float64, requires_grad=True)
        y = module(x)
        assert y.shape == (*lead, m)
        reference = x @ module.dense().T
        assert relative_error(y, reference) < 1e-12 if reference.numel() else y.numel() == 0
    assert gradcheck_module(module, torch.randn(2, n, dtype=torch.float64))
    assert module.num_parameters() == sum(p.numel() for p in module.parameters())
