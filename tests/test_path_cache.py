"""DeltaUpdate remembers its execution-path decision per call signature (surm.insertion.DeltaUpdate.path): the
remembered answer is always the cost model's, a changed setting, grad mode, adapter, dtype, device or train/eval mode
never meets a stale one, and outputs equal those computed with no memory at all. Also the other per-call shortcuts
of the layer forward: identity dropout skipped, the circular convolution without autograd when nothing records."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surm  # noqa: E402
from surm.execution import EXECUTIONS, choose_path  # noqa: E402
from surm.insertion import PATH_CACHE_SIZE  # noqa: E402
from surm.structures._fft import circular_convolution  # noqa: E402

from .checks import relative_error  # noqa: E402
from .structures.cases import FAMILY_CASES, case_id  # noqa: E402

TOKENS = (1, 7, 64, 256, 512, 2048, 8192)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def adapted(name: str, options: dict, execution: str = "auto", dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    config = surm.SurmConfig(structure=name, target_modules=["linear"], init_weights=False, execution=execution,
                             dropout=dropout, **options)
    return peft.get_peft_model(Net().double(), config)


def forget(model: nn.Module) -> None:
    """Empty every DeltaUpdate's remembered decisions."""
    for module in model.modules():
        if isinstance(module, surm.DeltaUpdate):
            module._paths.clear()


def test_the_remembered_path_is_the_cost_models_choice_for_every_signature():
    update = surm.DeltaUpdate(surm.structure("circulant", 384, 384))
    # (tokens, folded, backward, reused) -> auto's answer on the CPU
    auto: dict[tuple[int, bool, bool, bool], str] = {}
    for frozen in (False, True):
        update.matrix.requires_grad_(not frozen)
        for training in (True, False):
            update.train(training)
            for execution in EXECUTIONS:
                update.execution = execution  # a changed setting is part of the signature
                for device in ("cpu", "meta"):
                    for tokens in TOKENS:
                        for folded in (False, True):
                            for grad in (False, True):
                                for requires_grad in (False, True):
                                    x = torch.empty(tokens, 384, device=device, requires_grad=requires_grad)
                                    backward = grad and (requires_grad or not frozen)
                                    reused = not backward and not training
                                    want = choose_path(execution, update.matrix, tokens, folded=folded,
                                                       backward=backward, reused=reused, device_type=device)
                                    with torch.set_grad_enabled(grad):
                                        assert update.path(x, folded=folded) == want  # computed
                                        assert update.path(x, folded=folded) == want  # remembered
                                    if execution == "auto" and device == "cpu":
                                        auto[tokens, folded, backward, reused] = want
    # Auto's answer changes with each input of the signature here, so a key that missed one would have failed above.
    assert any(auto[t, f, False, False] != auto[t, f, True, False] for t in TOKENS for f in (False, True))
    assert any(auto[t, False, b, False] != auto[t, True, b, False] for t in TOKENS for b in (False, True))
    assert any(auto[1, f, b, False] != auto[TOKENS[-1], f, b, False] for f in (False, True) for b in (False, True))
    assert any(auto[t, f, False, False] != auto[t, f, False, True] for t in TOKENS for f in (False, True))


def test_the_memory_is_bounded():
    update = surm.DeltaUpdate(surm.structure("circulant", 32, 32))
    for tokens in range(1, 2 * PATH_CACHE_SIZE + 10):
        x = torch.empty(tokens, 32)
        assert update.path(x) == choose_path("auto", update.matrix, tokens, folded=False, backward=True)
        assert 0 < len(update._paths) <= PATH_CACHE_SIZE


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_outputs_and_gradients_equal_those_without_memory(name, options):
    """The same calls (generation-like single rows without gradients, then training batches) on two copies of one
    model, one of which forgets its decisions before every call: the outputs and gradients are identical."""
    cached, fresh = adapted(name, options), adapted(name, options)
    calls = [(torch.no_grad, (1, 1, 12), "eval"), (torch.no_grad, (1, 16, 12), "eval"),
             (torch.enable_grad, (4, 64, 12), "train"), (torch.no_grad, (1, 1, 12), "eval")] * 2
    for index, (mode, shape, state) in enumerate(calls):
        torch.manual_seed(index)
        x = torch.randn(*shape, dtype=torch.float64)
        outputs = []
        for model in (cached, fresh):
            if model is fresh:
                forget(model)
            getattr(model, state)()
            with mode():
                y = model(x)
                trainable = [p for p in model.parameters() if p.requires_grad]
                grads = torch.autograd.grad(y.square().sum(), trainable) if y.requires_grad else ()
            outputs.append((y, grads))
        (y_cached, g_cached), (y_fresh, g_fresh) = outputs
        assert torch.equal(y_cached, y_fresh) and len(g_cached) == len(g_fresh)
        assert all(torch.equal(a, b) for a, b in zip(g_cached, g_fresh))


def test_a_changed_execution_setting_takes_the_new_path(monkeypatch):
    model = adapted("circulant", {})
    update = model.base_model.model.linear.surm_delta["default"]
    x = torch.randn(3, 12, dtype=torch.float64)
    for execution, forbidden in (("structured", "dense"), ("dense", "forward"), ("structured", "dense")):
        update.execution = execution
        with monkeypatch.context() as patch:
            patch.setattr(update.matrix, forbidden, lambda *a, **k: 1 / 0)
            model(x)  # the remembered answer of the previous setting would call the forbidden method


def test_switching_adapters_uses_each_adapters_own_path(monkeypatch):
    model = adapted("toeplitz", {}, execution="dense")
    config = surm.SurmConfig(structure="toeplitz", target_modules=["linear"], init_weights=False,
                             execution="structured")
    model.add_adapter("other", config)
    layer = model.base_model.model.linear
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        want = {name: layer.get_base_layer()(x) + x @ layer.get_delta_weight(name).T for name in ("default", "other")}
    # Each adapter's own path only: a decision remembered for the other adapter would call a forbidden method.
    monkeypatch.setattr(layer.surm_delta["default"].matrix, "forward", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(layer.surm_delta["other"].matrix, "dense", lambda *a, **k: 1 / 0)
    for name in ("default", "other", "default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            assert relative_error(model(x), want[name]) < 1e-12


def test_train_eval_and_dropout_are_never_answered_from_memory():
    """With dropout, a training call is not folded (its update's input differs) even after eval calls were."""
    model = adapted("circulant", {}, execution="dense", dropout=0.5)
    layer = model.base_model.model.linear
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        merged = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
    for state in ("eval", "train", "eval", "train"):
        getattr(model, state)()
        torch.manual_seed(1)
        y = model(x)
        if state == "eval":
            assert relative_error(y, merged) < 1e-12
        else:
            torch.manual_seed(1)
            kept = nn.functional.dropout(x, 0.5, training=True)
            with torch.no_grad():
                want = layer.get_base_layer()(x) + kept @ layer.get_delta_weight("default").T
            assert relative_error(y, want) < 1e-12


def test_a_dtype_change_is_followed():
    """Folding depends on the dtype (never into a half-precision weight); the remembered path does not hide that."""
    model = adapted("circulant", {}, execution="dense")
    layer = model.base_model.model.linear
    x = torch.randn(3, 12, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16, torch.float64):
        model.to(dtype)
        with torch.no_grad():
            y = model(x.to(dtype))
            want = layer.get_base_layer()(x.to(dtype)).double() + x @ layer.get_delta_weight("default").double().T
        assert y.dtype == dtype
        assert relative_error(y.double(), want) < (1e-12 if dtype == torch.float64 else 2e-2)
        assert layer.can_fold(layer.surm_delta["default"], x.to(dtype), (), {}) == (dtype == torch.float64)


def test_identity_dropout_is_skipped_and_active_dropout_applied():
    for mode in ("delta", "adapter"):
        torch.manual_seed(0)
        config = surm.SurmConfig(structure="circulant", target_modules=["linear"], init_weights=False, mode=mode,
                                 dropout=0.5, execution="structured")
        model = peft.get_peft_model(Net().double(), config)
        layer = model.base_model.model.linear
        adapter = layer.surm_delta["default"] if mode == "delta" else layer.surm_adapter["default"]
        calls = []
        adapter.dropout.register_forward_hook(lambda *args: calls.append(1))
        x = torch.randn(3, 12, dtype=torch.float64)
        model.eval()
        model(x)
        assert calls == []  # eval: dropout is the identity and is not even called
        model.train()
        model(x)
        assert calls == [1]


def test_the_circular_convolution_without_autograd_equals_it_with():
    torch.manual_seed(0)
    kernel = torch.randn(16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    recorded = circular_convolution(kernel, x, 16)
    with torch.no_grad():
        plain = circular_convolution(kernel, x, 16)
    assert recorded.grad_fn is not None and plain.grad_fn is None
    assert torch.equal(recorded, plain)
    assert torch.equal(circular_convolution(kernel.detach(), x, 16), plain)


def test_a_compiled_layer_decides_in_its_graph_and_remembers_nothing():
    torch._dynamo.reset()
    try:
        model = adapted("circulant", {})
        layer = model.base_model.model.linear
        x = torch.randn(2, 3, 12, dtype=torch.float64)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        assert layer.surm_delta["default"]._paths == {}
        assert relative_error(got, layer(x)) < 1e-12
    finally:
        torch._dynamo.reset()
