"""surm.insertion's dense path on its own: an adapter-mode map (OutputAdapter, which follows ``execution`` as a
DeltaUpdate does, never folded) and a standalone DeltaUpdate. Every execution gives the structured path's values and
gradients (float64, both adapter forms, every family case); a small matrix keeps s · dense(M) between eval-mode calls
that record no gradient, built once and equal to a fresh one; a change of the parameters, of alpha, of the dtype or of
the mode is seen; nothing is kept in training, for an input that records a gradient, for "structured", or above
surm.execution.KEPT_DENSE_MAX_NUMBERS; and generation of a tiny Llama (built from a config, random weights) in adapter
mode equals the structured path's before and after a training step."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import surm  # noqa: E402
from surm.execution import EXECUTIONS, KEPT_DENSE_MAX_NUMBERS  # noqa: E402
from surm.insertion import DeltaUpdate, OutputAdapter  # noqa: E402

from .peft.common import assert_change_is_seen, assert_generation_follows_training, make_llama  # noqa: E402
from .structures.cases import FAMILY_CASES, case_id  # noqa: E402

FEATURES = 12


def adapter(name: str, options: dict, execution: str, bottleneck: int | None = None) -> OutputAdapter:
    torch.manual_seed(0)
    return OutputAdapter(FEATURES, name, options, bottleneck=bottleneck, identity_init=False,
                         execution=execution).double()


def kept(module: OutputAdapter) -> list[torch.Tensor | None]:
    return [module._kept_map._value, module._kept_down._value, module._kept_up._value]


def fresh(module: OutputAdapter, x: torch.Tensor) -> torch.Tensor:
    """The module's output with every kept matrix forgotten first (what a module that keeps nothing computes)."""
    for cache in (module._kept_map, module._kept_down, module._kept_up):
        cache.clear()
    with torch.no_grad():
        return module(x)


X = torch.randn(3, 5, FEATURES, dtype=torch.float64)


@pytest.mark.parametrize("bottleneck", [None, 4], ids=["map", "bottleneck"])
@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_every_execution_gives_the_structured_values_and_gradients(name, options, bottleneck):
    reference = adapter(name, options, "structured", bottleneck).train()
    x = X.clone().requires_grad_(True)
    want = reference(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *reference.parameters()])
    for execution in EXECUTIONS:
        module = adapter(name, options, execution, bottleneck).train()
        x = X.clone().requires_grad_(True)
        got = module(x)
        grads = torch.autograd.grad(got.square().sum(), [x, *module.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        module.eval()
        with torch.no_grad():
            torch.testing.assert_close(module(X), want.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(module(X[:1, :1]), want.detach()[:1, :1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bottleneck", [None, 4], ids=["map", "bottleneck"])
@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_kept_maps_are_built_once_and_give_the_outputs_of_fresh_ones(name, options, bottleneck):
    module = adapter(name, options, "dense", bottleneck).eval()
    with torch.no_grad():
        first = module(X)
        matrices = kept(module)
        second = module(X)
    maps = [module.map] if bottleneck is None else [module.down, module.up]
    built = [m for m in matrices if m is not None]
    assert len(built) == len(maps)
    assert all(a is b for a, b in zip(matrices, kept(module)))  # the second call built nothing
    for matrix, weight in zip(maps, built):
        assert torch.equal(weight, matrix.dense()) and weight.dtype == torch.float64
    assert torch.equal(first, second) and torch.equal(second, fresh(module, X))


def changes() -> list[tuple[str, object]]:
    def optimizer_step(module):
        module.train()
        module(X).square().sum().backward()
        torch.optim.SGD(module.parameters(), lr=0.1).step()
        module.eval()

    def in_place_edit(module):
        with torch.no_grad():
            next(module.map.parameters()).add_(0.5)

    def load_state(module):
        module.load_state_dict({k: v + 1.0 for k, v in module.state_dict().items()})

    def dtype(module):
        module.float()

    return [("optimizer step", optimizer_step), ("in-place edit of S", in_place_edit),
            ("load_state_dict", load_state), ("float32", dtype)]


@pytest.mark.parametrize(("label", "change"), changes(), ids=[c[0] for c in changes()])
def test_a_change_is_seen(label, change):
    assert_change_is_seen(adapter("toeplitz", {}, "dense").eval(), change, X, fresh)


def test_nothing_is_kept_in_training_with_a_recorded_gradient_structured_or_above_the_limit():
    module = adapter("circulant", {}, "dense").train()
    with torch.no_grad():
        module(X)
    assert kept(module) == [None, None, None]
    module.eval()
    x = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(x).sum(), x)  # eval mode, but the input's gradient is recorded
    assert kept(module) == [None, None, None] and grad.abs().max() > 0
    structured = adapter("circulant", {}, "structured").eval()
    with torch.no_grad():
        structured(X)
    assert kept(structured) == [None, None, None]
    side = int(KEPT_DENSE_MAX_NUMBERS ** 0.5)
    for features, keeps in ((side + 1, False), (side, True)):
        large = OutputAdapter(features, "circulant", {}, identity_init=False, execution="dense").eval()
        with torch.no_grad():
            large(torch.randn(1, features))
        assert (large._kept_map._value is not None) == keeps


def test_switching_mode_forgets_the_kept_map_and_eval_in_eval_mode_keeps_it():
    module = adapter("circulant", {}, "dense").eval()
    with torch.no_grad():
        module(X)
    weight = module._kept_map._value
    module.eval()
    assert module._kept_map._value is weight
    module.train()
    assert kept(module) == [None, None, None]


def test_auto_keeps_a_small_map_for_one_generated_token():
    module = OutputAdapter(256, "circulant", {}, identity_init=False).eval()
    with torch.no_grad():
        module(torch.randn(1, 1, 256))  # one generated token
    assert module._kept_map._value is not None


def test_a_standalone_delta_keeps_alpha_times_its_dense_form_and_sees_alpha_change():
    torch.manual_seed(0)
    update = DeltaUpdate(surm.structure("toeplitz", 7, 9, init="random"), alpha=0.6, execution="dense").double()
    update.eval()
    x = torch.randn(4, 9, dtype=torch.float64)
    with torch.no_grad():
        first = update(x)
        weight = update._kept._value
        assert torch.equal(weight, 0.6 * update.matrix.dense())
        assert torch.equal(update(x), first) and update._kept._value is weight
        update.alpha = 2.0
        torch.testing.assert_close(update(x), x @ (2.0 * update.matrix.dense()).T, rtol=1e-12, atol=1e-12)
    assert update._kept._value is not weight


@pytest.mark.parametrize("name", ["circulant", "ldr", "fourier"])
def test_adapter_mode_generation_with_kept_maps_follows_training_between_calls(name):
    """Greedy generation and its scores of a tiny Llama with adapter-mode maps kept (auto) equal those of the same
    model on the structured path, before and after a training step taken between two generations."""
    models = []
    for execution in ("auto", "structured"):
        config = surm.SurmConfig(structure=name, mode="adapter", init_weights=False, execution=execution)
        models.append(peft.get_peft_model(make_llama().double(), config))
    adapters = [m for m in models[0].modules() if isinstance(m, OutputAdapter)]
    assert adapters
    assert_generation_follows_training(models, lambda: all(a._kept_map._value is not None for a in adapters),
                                       lambda: all(a._kept_map._value is None for a in adapters))
