"""A small layer keeps its folded weight W0 + s · dense(M) between eval-mode calls that record no gradient
(surm.peft.layer.SurmLayer._forward_folded): the outputs equal those of a layer that keeps nothing, bit for bit; any
change of W0, of the adapters' parameters or scales, of the adapters folded or of the mode is seen; nothing is kept
in training, for an input that records a gradient, or for a layer above surm.execution.KEPT_DENSE_MAX_NUMBERS; the
kept tensor is one weight of the base layer's shape. Linear, Conv1D and a strided, padded 1x1 Conv2d."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surm  # noqa: E402
from surm.execution import KEPT_DENSE_MAX_NUMBERS  # noqa: E402

from ..structures.cases import FAMILY_CASES, case_id  # noqa: E402
from .common import assert_change_is_seen, assert_generation_follows_training, make_llama  # noqa: E402
from ..test_execution import Net  # noqa: E402  (Linear, Conv1D and a strided, padded 1x1 Conv2d)

TARGETS = ["linear", "conv1d", "conv2d"]


def adapted(name: str, options: dict, execution: str = "dense") -> nn.Module:
    torch.manual_seed(0)
    config = surm.SurmConfig(structure=name, target_modules=TARGETS, init_weights=False, alpha=0.6,
                             execution=execution, **options)
    return peft.get_peft_model(Net().double(), config).eval()


def surm_layers(model: nn.Module) -> list[surm.SurmLayer]:
    return [m for m in model.modules() if isinstance(m, surm.SurmLayer)]


def kept(model: nn.Module) -> list[torch.Tensor | None]:
    return [layer._folded_weight._value for layer in surm_layers(model)]


def fresh(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output with every kept weight forgotten first (what a layer that keeps nothing computes)."""
    for layer in surm_layers(model):
        layer._folded_weight.clear()
    with torch.no_grad():
        return model(x)


X = torch.randn(2, 4, 4, 9, dtype=torch.float64)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_kept_weights_give_the_outputs_of_fresh_ones_and_are_built_once(name, options):
    model = adapted(name, options)
    with torch.no_grad():
        first = model(X)
        weights = kept(model)
        second = model(X)
    assert all(w is not None for w in weights)
    assert all(a is b for a, b in zip(weights, kept(model)))  # the second call built nothing
    for layer, weight in zip(surm_layers(model), weights):
        assert weight.shape == layer.get_base_layer().weight.shape and weight.dtype == torch.float64
        expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
        assert torch.equal(weight, expected)
    assert torch.equal(first, second) and torch.equal(second, fresh(model, X))
    structured = adapted(name, options, "structured")
    with torch.no_grad():
        torch.testing.assert_close(structured(X), second, rtol=1e-12, atol=1e-12)
    assert kept(structured) == [None, None, None]  # no folding, nothing kept


def test_auto_folds_a_small_layer_in_generation_and_keeps_its_weight():
    model = adapted("circulant", {}, "auto")
    with torch.no_grad():
        model(X[:1, :1, :1])  # one token per layer, as a generating model calls it
    assert all(w is not None for w in kept(model))


def changes() -> list[tuple[str, object]]:
    def optimizer_step(model):
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        model(X).square().sum().backward()
        torch.optim.SGD(trainable, lr=0.1).step()
        model.eval()

    def in_place_edit(model):
        with torch.no_grad():
            next(surm_layers(model)[1].surm_delta["default"].parameters()).add_(0.5)

    def base_edit(model):
        with torch.no_grad():
            surm_layers(model)[2].get_base_layer().weight.mul_(2.0)

    def new_scale(model):
        surm_layers(model)[0].surm_delta["default"].alpha = 2.5

    def load_state(model):
        state = {k: v + 1.0 for k, v in peft.get_peft_model_state_dict(model).items()}
        peft.set_peft_model_state_dict(model, state)

    def second_adapter(model):
        config = surm.SurmConfig(structure="toeplitz", target_modules=TARGETS, init_weights=False, execution="dense")
        model.add_adapter("other", config)
        model.base_model.set_adapter(["default", "other"])
        model.eval()

    def dtype(model):
        model.float()

    return [("optimizer step", optimizer_step), ("in-place edit of M", in_place_edit),
            ("in-place edit of W0", base_edit), ("alpha", new_scale), ("load_state_dict", load_state),
            ("another active adapter", second_adapter), ("float32", dtype)]


@pytest.mark.parametrize(("label", "change"), changes(), ids=[c[0] for c in changes()])
def test_a_change_is_seen(label, change):
    assert_change_is_seen(adapted("toeplitz", {}), change, X, fresh)


def test_merge_unmerge_and_disabling_are_seen():
    model = adapted("circulant", {})
    with torch.no_grad():
        adapted_output = model(X)
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(X), adapted_output, rtol=1e-12, atol=1e-12)
        model.base_model.unmerge_adapter()
        assert torch.equal(model(X), fresh(model, X))
        with model.disable_adapter():
            base = model(X)
        plain = Net().double()
        for name in TARGETS:
            getattr(plain, name).load_state_dict(getattr(model.base_model.model, name).get_base_layer().state_dict())
        assert torch.equal(base, plain(X))  # the base weights alone
        assert torch.equal(model(X), adapted_output)


def test_nothing_is_kept_in_training_or_while_a_gradient_is_recorded():
    model = adapted("circulant", {})
    model.train()
    with torch.no_grad():
        model(X)
    assert kept(model) == [None, None, None]
    model.eval()
    x = X.clone().requires_grad_(True)
    y = model(x)  # eval mode, but the input's gradient is recorded (e.g. saliency)
    assert kept(model) == [None, None, None]
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.abs().max() > 0


def test_switching_mode_forgets_the_kept_weight_and_eval_in_eval_mode_keeps_it():
    model = adapted("circulant", {})
    with torch.no_grad():
        model(X)
    weights = kept(model)
    model.eval()  # already in eval mode, as a loop that calls eval() before each generate()
    assert all(a is b for a, b in zip(weights, kept(model)))
    model.train()
    assert kept(model) == [None, None, None]


def test_a_layer_above_the_limit_keeps_nothing():
    out = KEPT_DENSE_MAX_NUMBERS // 512 + 1
    large = peft.get_peft_model(nn.Sequential(nn.Linear(512, out)), surm.SurmConfig(
        structure="circulant", target_modules=["0"], init_weights=False, execution="dense")).eval()
    small = peft.get_peft_model(nn.Sequential(nn.Linear(512, out - 1)), surm.SurmConfig(
        structure="circulant", target_modules=["0"], init_weights=False, execution="dense")).eval()
    with torch.no_grad():
        large(torch.randn(1, 512))
        small(torch.randn(1, 512))
    assert kept(large) == [None]
    assert kept(small)[0] is not None and kept(small)[0].numel() <= KEPT_DENSE_MAX_NUMBERS


@pytest.mark.parametrize("name", ["circulant", "ldr", "monarch"])
def test_generation_with_kept_weights_follows_training_between_calls(name):
    """A tiny Llama (built from a config, random weights) on every linear layer: greedy generation and its scores
    with kept folded weights equal those of the same model on the structured path (nothing kept), before and after a
    training step taken between two generations (eval() -> train() -> eval(), as a train-and-sample loop does)."""
    models = []
    for execution in ("auto", "structured"):
        config = surm.SurmConfig(structure=name, target_modules="all-linear", init_weights=False, execution=execution)
        models.append(peft.get_peft_model(make_llama().double(), config))
    kept_model = models[0]
    assert_generation_follows_training(models, lambda: all(w is not None for w in kept(kept_model)),
                                       lambda: kept(kept_model) == [None] * len(kept(kept_model)))
