"""The same guarantees on a CUDA device: cuFFT, cuBLAS and the custom autograd functions against the dense form.

CI has no GPU, so every test here is skipped there; they run wherever ``torch.cuda.is_available()``. Each check
mirrors a CPU test (tests/structures/test_fast_apply.py, tests/test_execution.py, tests/test_compile.py) and
compares the device's result with the dense materialisation on the same device in float64, and with the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surm  # noqa: E402
from surm.structures import STRUCTURES  # noqa: E402

from .structures.cases import FAMILY_CASES, SHAPES, case_id  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"
CASES = [(name, options, m, n) for name, options in FAMILY_CASES for m, n in SHAPES]
IDS = [f"{case_id((name, options))}-{m}x{n}" for name, options, m, n in CASES]
PATHS = ("structured", "dense")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def build(name: str, options: dict, m: int, n: int) -> surm.StructuredMatrix:
    torch.manual_seed(0)
    return surm.structure(name, m, n, init="random", **options).double()


@pytest.mark.parametrize(("name", "options", "m", "n"), CASES, ids=IDS)
def test_fast_apply_and_gradients_equal_dense_on_cuda(name, options, m, n):
    on_cpu = build(name, options, m, n)
    module = build(name, options, m, n).to(CUDA)
    x = torch.randn(2, 3, n, dtype=torch.float64, device=CUDA, requires_grad=True)
    probe = torch.randn(2, 3, m, dtype=torch.float64, device=CUDA)
    params = list(module.parameters())

    fast = module(x)
    dense = x @ module.dense().T
    assert fast.device.type == CUDA and fast.dtype == torch.float64
    assert relative_error(fast, dense) < 1e-10
    assert relative_error(fast.cpu(), on_cpu(x.detach().cpu())) < 1e-10
    fast_grads = torch.autograd.grad((fast * probe).sum(), [x, *params])
    dense_grads = torch.autograd.grad((dense * probe).sum(), [x, *params])
    for fast_grad, dense_grad in zip(fast_grads, dense_grads):
        assert dense_grad.abs().max() > 0
        assert relative_error(fast_grad, dense_grad) < 1e-10


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_gradcheck_on_cuda(name, options):
    module = build(name, options, 7, 5).to(CUDA)
    names = [k for k, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    x = torch.randn(2, 5, dtype=torch.float64, device=CUDA, requires_grad=True)

    def apply(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(apply, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("path", PATHS)
def test_delta_update_paths_equal_dense_on_cuda(name, options, path):
    torch.manual_seed(0)
    matrix = surm.structure(name, 10, 6, init="random", **options).double().to(CUDA)
    update = surm.DeltaUpdate(matrix, alpha=0.7, execution=path)
    x = torch.randn(4, 3, 6, dtype=torch.float64, device=CUDA, requires_grad=True)
    probe = torch.randn(4, 3, 10, dtype=torch.float64, device=CUDA)
    params = list(update.parameters())
    assert update.path(x) == path
    y = update(x)
    reference = x @ (update.alpha * matrix.dense()).T
    assert relative_error(y, reference) < 1e-12
    grads = torch.autograd.grad((y * probe).sum(), [x, *params])
    expected = torch.autograd.grad((reference * probe).sum(), [x, *params])
    for got, want in zip(grads, expected):
        assert want.abs().max() > 0
        assert relative_error(got, want) < 1e-11


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_on_cuda(name, options, dtype):
    """cuFFT runs half precision only at powers of two: odd sizes must still work (the FFTs run in float32)."""
    torch.manual_seed(0)
    module = surm.structure(name, 12, 18, init="random", **options).to(CUDA)
    x = torch.randn(4, 18, device=CUDA)
    y = module(x.to(dtype))
    assert y.dtype == dtype and y.device.type == CUDA
    reference = x.to(dtype).float() @ module.dense().T
    assert relative_error(y.float(), reference) < {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(24, 24)
        self.value = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.value(torch.relu(self.query(x)))))


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("mode", ["delta", "adapter"])
def test_peft_model_trains_merges_and_reloads_on_cuda(structure, mode, tmp_path):
    """A PEFT model on the GPU: a bf16-autocast training step changes the adapter, merge (delta mode) equals the
    unmerged output, and the saved adapter reloads on the GPU with the same outputs."""
    torch.manual_seed(0)
    config = surm.SurmConfig(structure=structure, mode=mode, target_modules=["query", "value"])
    model = peft.get_peft_model(Net(), config).to(CUDA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 5, 24, device=CUDA)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert any("surm_" in k for k in changed), "no adapter parameter changed"

    model.eval()
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "adapter").to(CUDA).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), y, rtol=1e-5, atol=1e-6)
        if mode == "delta":
            model.merge_adapter()
            torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_inductor_compiles_every_family_on_cuda():
    """One module holding every family (both paths), compiled once by inductor (Triton kernels), equal to eager."""
    torch.manual_seed(0)
    updates = nn.ModuleList(
        surm.DeltaUpdate(surm.structure(name, 10, 12, init="random"), execution=execution)
        for name in STRUCTURES
        for execution in PATHS
    ).to(CUDA)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([update(x) for update in updates])

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True)
    x = torch.randn(5, 12, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), forward(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
