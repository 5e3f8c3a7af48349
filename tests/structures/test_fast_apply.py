"""Every family's fast apply against its dense materialisation, in float64, values and gradients, on the CPU and
(where present) a CUDA device, whose result must also equal the CPU's."""

from __future__ import annotations

import pytest
import torch

import surm

from ..checks import gradcheck_module, relative_error
from ..devices import DEVICES
from .cases import FAMILY_CASES, KRONECKER_RANK_CASES, SHAPES, case_id

ALL_CASES = [(name, options, m, n) for name, options in FAMILY_CASES for m, n in SHAPES] + [
    ("kronecker", {"rank": r}, m, n) for m, n, r in KRONECKER_RANK_CASES
]
IDS = [f"{case_id((name, options))}-{m}x{n}" for name, options, m, n in ALL_CASES]


def build(
    name: str, options: dict, m: int, n: int, init: str = "random", seed: int = 0, device: str = "cpu"
) -> surm.StructuredMatrix:
    torch.manual_seed(seed)
    return surm.structure(name, m, n, init=init, **options).double().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options", "m", "n"), ALL_CASES, ids=IDS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["1d", "2d", "3d"])
def test_fast_apply_equals_dense(name, options, m, n, lead, device):
    module = build(name, options, m, n, device=device)
    x = torch.randn(*lead, n, dtype=torch.float64).to(device)
    with torch.no_grad():
        fast = module(x)
        reference = x @ module.dense().T
    assert fast.shape == (*lead, m)
    assert fast.dtype == torch.float64 and fast.device == x.device
    assert reference.abs().max() > 0, "a random init must give a non-zero M"
    assert relative_error(fast, reference) < 1e-10
    if device != "cpu":
        with torch.no_grad():
            assert relative_error(fast.cpu(), build(name, options, m, n)(x.cpu())) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options", "m", "n"), ALL_CASES, ids=IDS)
def test_gradients_equal_dense_gradients(name, options, m, n, device):
    module = build(name, options, m, n, device=device)
    x = torch.randn(2, 3, n, dtype=torch.float64).to(device).requires_grad_(True)
    weights = torch.randn(2, 3, m, dtype=torch.float64).to(device)
    params = dict(module.named_parameters())

    fast_grads = torch.autograd.grad((module(x) * weights).sum(), [x, *params.values()])
    dense_grads = torch.autograd.grad((x @ module.dense().T * weights).sum(), [x, *params.values()])
    for label, fast, dense in zip(["x", *params], fast_grads, dense_grads):
        assert dense.abs().max() > 0, f"gradient of {label} is zero"
        assert relative_error(fast, dense) < 1e-10, label


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options", "m", "n"), ALL_CASES, ids=IDS)
def test_gradcheck(name, options, m, n, device):
    module = build(name, options, m, n, device=device)
    assert gradcheck_module(module, torch.randn(2, n, dtype=torch.float64).to(device))


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_zero_init_is_zero_but_trainable(name, options):
    m, n = 10, 6
    module = build(name, options, m, n, init="zero")
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.count_nonzero(module.dense()) == 0
    y = module(x)
    assert y.abs().max() == 0
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), list(module.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads), "no parameter gets a gradient at M = 0"


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_reset_parameters_restores_init(name, options):
    module = build(name, options, 9, 7, init="zero")
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert module.dense().abs().max() > 0
    module.reset_parameters()
    assert module.dense().abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lower_precision_inputs(name, options, dtype, device):
    """Half-precision inputs at sizes that are not powers of two (cuFFT runs half precision only at powers of two;
    the FFT families compute in float32 and cast back)."""
    torch.manual_seed(0)
    module = surm.structure(name, 12, 18, init="random", **options).to(device)  # float32 parameters
    x = torch.randn(4, 18).to(device)
    y = module(x.to(dtype))
    assert y.dtype == dtype and y.device == x.device
    reference = x.to(dtype).float() @ module.dense().T
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    assert relative_error(y.float(), reference) < tolerance


def test_float64_parameters_with_float32_input_compute_in_float64():
    module = build("circulant", {}, 7, 5)
    x = torch.randn(3, 5)
    y = module(x)
    assert y.dtype == torch.float32
    assert relative_error(y.double(), x.double() @ module.dense().T) < 1e-7


#: Leading shapes with no rows: (0, n), (0, 3, n), (2, 0, n), (3, 0, 2, n).
EMPTY_LEADS = [(0,), (0, 3), (2, 0), (3, 0, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options", "m", "n"), ALL_CASES, ids=IDS)
def test_empty_batches_equal_the_dense_form_with_zero_gradients(name, options, m, n, device):
    """No rows: an empty (..., m) result in x's dtype and device, and the dense form's gradients (an empty one for x,
    zeros of the parameters' shapes), where the FFT families used to stop with MKL's "inconsistent configuration"."""
    module = build(name, options, m, n, device=device)
    params = dict(module.named_parameters())
    for lead in EMPTY_LEADS:
        x = torch.randn(*lead, n, dtype=torch.float64).to(device).requires_grad_(True)
        fast = module(x)
        reference = x @ module.dense().T
        assert fast.shape == (*lead, m), lead
        assert fast.dtype == torch.float64 and fast.device == x.device
        assert torch.equal(fast, reference)
        weights = torch.randn(*lead, m, dtype=torch.float64).to(device)
        # every parameter must be in the graph: autograd.grad raises for one that is not (no allow_unused)
        fast_grads = torch.autograd.grad((fast * weights).sum(), [x, *params.values()])
        dense_grads = torch.autograd.grad((reference * weights).sum(), [x, *params.values()])
        for label, fast_grad, dense_grad in zip(["x", *params], fast_grads, dense_grads):
            assert fast_grad.shape == dense_grad.shape == (x if label == "x" else params[label]).shape, (lead, label)
            assert fast_grad.dtype == torch.float64 and fast_grad.device == x.device, (lead, label)
            assert torch.equal(fast_grad, dense_grad) and torch.count_nonzero(fast_grad) == 0, (lead, label)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_empty_batches_in_lower_precision_keep_the_dtype(name, options, dtype):
    module = surm.structure(name, 12, 18, init="random", **options)
    with torch.no_grad():
        y = module(torch.zeros(0, 5, 18, dtype=dtype))
    assert y.shape == (0, 5, 12) and y.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters(name, options, dtype, device):
    """A module cast to half precision (``model.half()``, or PEFT's ``autocast_adapter_dtype=False`` on a half base)
    applies, builds its dense form (which merging uses) and back-propagates in that dtype, computing in float32 at
    sizes that are not powers of two: the same values as the float32 module with the same (rounded) parameters."""
    torch.manual_seed(0)
    module = surm.structure(name, 12, 18, init="random", **options).to(device=device, dtype=dtype)
    reference = surm.structure(name, 12, 18, init="random", **options).to(device)
    reference.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    x = torch.randn(4, 18, device=device).to(dtype)
    y, dense = module(x), module.dense()
    assert y.dtype == dense.dtype == dtype
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert relative_error(dense.float(), reference.dense()) < tolerance
    assert relative_error(y.float(), reference(x.float())) < tolerance
    (y.float().square().sum() + dense.float().sum()).backward()
    for parameter in module.parameters():
        assert parameter.grad is not None and parameter.grad.dtype == dtype and torch.isfinite(parameter.grad).all()
