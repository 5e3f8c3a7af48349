"""torch.compile traces every family's adapter forward (and backward) in one graph: ``fullgraph=True`` fails on any
graph break. Dynamo's tracing is what finds graph breaks, so most tests use the ``aot_eager`` backend (it also
traces the backward through AOTAutograd and needs no compiler); one test runs the default inductor backend, which
generates C++ on CPU and is skipped only where no C++ compiler is installed."""

from __future__ import annotations

import shutil

import peft
import pytest
import torch
from torch import nn

import surm

from .devices import DEVICES
from .structures.cases import FAMILY_CASES, case_id

PATHS = ("structured", "dense")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def surm_layer(name: str, options: dict, execution: str) -> surm.SurmLayer:
    torch.manual_seed(0)
    config = surm.SurmConfig(
        structure=name, target_modules=["proj"], init_weights=False, execution=execution, **options
    )
    return peft.get_peft_model(Tiny(), config).base_model.model.proj


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("execution", PATHS)
def test_surm_layer_compiles_in_one_graph_forward_and_backward(name, options, execution):
    layer = surm_layer(name, options, execution)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 12, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *params])
    want = layer(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *params])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES[::2], ids=[case_id(c) for c in FAMILY_CASES[::2]])
def test_delta_update_compiles_in_one_graph_without_gradients(name, options):
    update = surm.DeltaUpdate(surm.structure(name, 10, 12, init="random", **options), alpha=0.5)
    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), update(x), rtol=1e-5, atol=1e-6)


def _cpp_compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
# The FFT families' complex products run as eager kernels inside the compiled graph; inductor says so when it
# lowers them (only when its on-disk cache misses, so the warning comes and goes between machines).
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_inductor_compiles_every_family(device):
    """One module holding every family (both paths), compiled once by inductor (C++ on CPU, Triton on CUDA), equal
    to eager."""
    from surm.structures import STRUCTURES

    if device == "cpu" and _cpp_compiler() is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU")
    torch.manual_seed(0)
    updates = nn.ModuleList(
        surm.DeltaUpdate(surm.structure(name, 10, 12, init="random"), execution=execution)
        for name in STRUCTURES
        for execution in PATHS
    ).to(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([update(x) for update in updates])

    compiled = torch.compile(forward, fullgraph=True)
    x = torch.randn(5, 12).to(device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), forward(x), rtol=1e-4, atol=1e-5)
