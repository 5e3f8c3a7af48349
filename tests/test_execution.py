"""Both execution paths (structured apply, dense materialisation) against the dense form; the switch between them."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import surm  # noqa: E402
from surm.commands.measure import OneLinear  # noqa: E402
from surm.execution import EXECUTIONS, KEPT_DENSE_MAX_NUMBERS, choose_path, path_costs, path_seconds  # noqa: E402
from surm.structures.base import Cost  # noqa: E402

from .checks import gradcheck_module, relative_error  # noqa: E402
from .devices import DEVICES  # noqa: E402
from .structures.cases import FAMILY_CASES, case_id  # noqa: E402

# Square even and odd, rectangular both ways, sizes with no factor 2 or 3.
SHAPES = [(8, 8), (7, 7), (5, 9), (10, 6), (13, 11)]
CASES = [(name, options, m, n) for name, options in FAMILY_CASES for m, n in SHAPES]
IDS = [f"{case_id((name, options))}-{m}x{n}" for name, options, m, n in CASES]
PATHS = ("structured", "dense")


def delta(
    name: str, options: dict, m: int, n: int, execution: str, alpha: float = 0.7, device: str = "cpu"
) -> surm.DeltaUpdate:
    torch.manual_seed(0)
    matrix = surm.structure(name, m, n, init="random", **options).double()
    return surm.DeltaUpdate(matrix, alpha=alpha, execution=execution).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options", "m", "n"), CASES, ids=IDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["2d", "3d"])
def test_delta_update_paths_equal_the_dense_form(name, options, m, n, path, lead, device):
    update = delta(name, options, m, n, path, device=device)
    x = torch.randn(*lead, n, dtype=torch.float64).to(device).requires_grad_(True)
    weights = torch.randn(*lead, m, dtype=torch.float64).to(device)
    params = dict(update.named_parameters())
    assert update.path(x) == path

    y = update(x)
    reference = x @ (update.alpha * update.matrix.dense()).T
    assert y.shape == (*lead, m) and y.dtype == torch.float64
    assert relative_error(y, reference) < 1e-12
    grads = torch.autograd.grad((y * weights).sum(), [x, *params.values()])
    expected = torch.autograd.grad((reference * weights).sum(), [x, *params.values()])
    for label, got, want in zip(["x", *params], grads, expected):
        assert want.abs().max() > 0, label
        assert relative_error(got, want) < 1e-12, label


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize(("m", "n"), [(6, 6), (5, 7), (7, 4)])
def test_dense_path_gradcheck(name, options, m, n):
    """The gradient of the dense path (through dense(): unfold, einsum, FFT on columns) against finite differences."""
    update = delta(name, options, m, n, "dense")
    assert gradcheck_module(update, torch.randn(3, n, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS)
def test_the_switch_forces_the_path(path, monkeypatch):
    update = delta("circulant", {}, 9, 9, path)
    other = "dense" if path == "structured" else "structured"

    def forbidden(*args, **kwargs):
        raise AssertionError(f"execution={path!r} must not take the {other} path")

    # The structured path never builds dense(M); the dense path never calls the fast apply.
    monkeypatch.setattr(update.matrix, "dense" if path == "structured" else "forward", forbidden)
    for tokens in (1, 4096):
        x = torch.randn(tokens, 9, dtype=torch.float64)
        assert update.path(x) == path
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                update(x)


def test_auto_takes_the_cheaper_path_by_the_cost_model():
    matrix = surm.structure("circulant", 384, 384)
    for tokens in (1, 64, 2048, 65536):
        for folded in (False, True):
            for backward, reused in ((False, False), (True, False), (False, True)):
                seconds = path_seconds(matrix, tokens, folded=folded, backward=backward, reused=reused)
                cheaper = min(seconds, key=seconds.get)
                assert choose_path("auto", matrix, tokens, folded=folded, backward=backward, reused=reused) == cheaper
    # A kept spectrum makes the structured path cheaper; a small layer's kept folded weight makes folding free (the
    # base product alone), and a small matrix applied on its own keeps s · dense(M): one product, no building; a
    # large matrix keeps neither.
    kept, rebuilt = (path_seconds(matrix, 1, folded=True, backward=False, reused=r) for r in (True, False))
    assert kept["structured"] < rebuilt["structured"] and kept["dense"] == 0 < rebuilt["dense"]
    assert choose_path("auto", matrix, 1, folded=True, backward=False, reused=True) == "dense"
    kept, rebuilt = (path_costs(matrix, 1, folded=False, backward=False, reused=r) for r in (True, False))
    assert kept["dense"].gemm == rebuilt["dense"].gemm == 2 * 384 * 384 and kept["dense"].fft == 0
    assert 0 < kept["dense"].calls < rebuilt["dense"].calls and kept["dense"].elementwise < rebuilt["dense"].elementwise
    assert choose_path("auto", matrix, 1, folded=False, backward=False, reused=True) == "dense"
    large = surm.structure("circulant", 1024, KEPT_DENSE_MAX_NUMBERS // 1024 + 1)
    for folded in (True, False):
        kept, rebuilt = (path_seconds(large, 1, folded=folded, backward=False, reused=r) for r in (True, False))
        assert kept["dense"] == rebuilt["dense"] > 0
    edge = surm.structure("circulant", 1024, KEPT_DENSE_MAX_NUMBERS // 1024)
    assert path_seconds(edge, 1, folded=True, backward=False, reused=True)["dense"] == 0
    assert path_costs(edge, 1, folded=False, backward=False, reused=True)["dense"] == Cost(
        gemm=2 * 1024 * (KEPT_DENSE_MAX_NUMBERS // 1024), elementwise=1024, calls=2)
    with pytest.raises(ValueError, match=r"reused values apply only to calls that record no gradient"):
        path_seconds(matrix, 1, folded=True, backward=True, reused=True)
    # One row without gradients does not pay for building an n x n matrix; without gradients, folding into the base
    # product is free once there are enough rows; in training the dense path's weight gradient grows as T n^2.
    assert choose_path("auto", matrix, 1, folded=False, backward=False) == "structured"
    assert choose_path("auto", matrix, 2048, folded=True, backward=False) == "dense"
    assert choose_path("auto", matrix, 65536, folded=True, backward=True) == "structured"
    for execution in PATHS:
        assert choose_path(execution, matrix, 1, folded=True, backward=False) == execution


def test_every_family_reports_positive_costs():
    for name, options in FAMILY_CASES:
        matrix = surm.structure(name, 24, 36, **options)
        for backward in (False, True):
            for cost in (matrix.structured_cost(100, backward), matrix.dense_cost(backward)):
                assert min(cost.gemm, cost.small_gemm, cost.fft, cost.elementwise) >= 0
                assert cost.gemm + cost.small_gemm + cost.fft + cost.elementwise > 0
                assert cost.calls >= 1
        training, inference = (sum(vars(matrix.structured_cost(100, b)).values()) for b in (True, False))
        assert training > inference


#: Operators that only make views (no work, no kernel): not counted in Cost.calls.
VIEW_OPERATORS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "alias",
    "detach", "slice", "select", "unfold", "as_strided", "diagonal", "narrow", "split", "unbind", "_conj", "_neg_view",
    "view_as_real", "view_as_complex", "lift_fresh",
})


class OperatorCount(TorchDispatchMode):
    """Counts the operators PyTorch dispatches that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPERATORS:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def dispatched_calls(module: nn.Module, x: torch.Tensor, backward: bool) -> int:
    """Operators of ``module(x)``, and of its backward if ``backward`` (seeded with a gradient made beforehand).

    A first, uncounted call fills the caches an eval-mode module keeps (and gives the seed's shape).
    """
    with torch.set_grad_enabled(backward):
        first = module(x)
        seed = torch.ones_like(first) if backward else None
        with OperatorCount() as counter:
            y = module(x)
            if backward:
                y.backward(seed)
    return len(counter.names)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
@pytest.mark.parametrize("tokens", [4, 256])  # Monarch switches to its factor form from 64 tokens
@pytest.mark.parametrize(("m", "n"), [(24, 36), (156, 120)])  # wide and tall, N = 36 and 12 x 13
def test_declared_operator_calls_match_the_operators_dispatched(name, options, tokens, m, n):
    """Cost.calls of each path (inside a SurmLayer, folded, and in a standalone DeltaUpdate) within 2 operators or
    25 % of what PyTorch dispatches, views aside: the cost model's fixed cost per call counts real calls. Training
    (forward and backward), inference in train mode (nothing reused) and in eval mode (the family's cached values
    reused, as in generation)."""
    x = torch.randn(tokens, n)
    for path in PATHS:
        torch.manual_seed(0)
        bare = OneLinear(m, n).requires_grad_(False)
        config = surm.SurmConfig(structure=name, target_modules=["proj"], init_weights=False, execution=path,
                                 **options)
        model = peft.get_peft_model(OneLinear(m, n).requires_grad_(False), config)
        matrix = model.base_model.model.proj.surm_delta["default"].matrix
        update = surm.DeltaUpdate(matrix, execution=path)
        for backward, reused in ((False, False), (True, False), (False, True)):
            for module in (model, update):
                module.train(not reused)
            inputs = x.clone().requires_grad_(backward)
            for folded, measured in (
                (True, dispatched_calls(model, inputs, backward) - dispatched_calls(bare, inputs, backward)),
                (False, dispatched_calls(update, inputs, backward)),
            ):
                declared = path_costs(matrix, tokens, folded=folded, backward=backward, reused=reused)[path].calls
                assert abs(declared - measured) <= max(2, 0.25 * measured), (path, folded, backward, reused,
                                                                              declared, measured)


def test_unknown_execution_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"execution must be one of \('auto', 'structured', 'dense'\), got 'fast'"):
        surm.DeltaUpdate(surm.structure("circulant", 4, 4), execution="fast")
    with pytest.raises(ValueError, match=r"execution must be one of .*got 'fast'"):
        surm.SurmConfig(structure="circulant", target_modules=["proj"], execution="fast")


# -- inside a SurmLayer: the dense path folded into the base layer's product ----------------------------------------


class Net(nn.Module):
    """One layer of each kind SurmLayer adapts: nn.Linear, transformers' Conv1D, a strided, padded 1x1 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(9, 7)
        self.conv1d = Conv1D(6, 7)  # in 7 -> out 6
        self.conv2d = nn.Conv2d(6, 5, kernel_size=1, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4, 4, 9)
        h = self.conv1d(self.linear(x))  # (batch, 4, 4, 6)
        return self.conv2d(h.movedim(-1, -3))  # (batch, 5, 3, 3)


def adapted(name: str, options: dict, execution: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    config = surm.SurmConfig(structure=name, target_modules=["linear", "conv1d", "conv2d"], init_weights=False,
                             alpha=0.6, execution=execution, dropout=dropout, **options)
    return peft.get_peft_model(Net().double(), config)


def layers(model: nn.Module) -> list[surm.SurmLayer]:
    return [m for m in model.modules() if isinstance(m, surm.SurmLayer)]


def merged_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same network with W0 + s · dense(M) written into plain layers (the dense form, applied by PyTorch)."""
    net = Net().double()
    inner = model.base_model.model
    with torch.no_grad():
        for layer_name in ("linear", "conv1d", "conv2d"):
            layer = getattr(inner, layer_name)
            plain = getattr(net, layer_name)
            plain.weight.copy_(layer.get_base_layer().weight + layer.get_delta_weight("default"))
            plain.bias.copy_(layer.get_base_layer().bias)
    return net(x)


@pytest.mark.parametrize(("name", "options"), FAMILY_CASES, ids=[case_id(c) for c in FAMILY_CASES])
def test_layer_paths_agree_with_each_other_and_the_merged_weights(name, options):
    x = torch.randn(2, 4, 4, 9, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    outputs, gradients = {}, {}
    for path in PATHS:
        model = adapted(name, options, path)
        assert {layer.surm_delta["default"].path(x) for layer in layers(model)} <= {path}
        y = model(x)
        trainable = [p for p in model.parameters() if p.requires_grad]
        outputs[path] = y
        gradients[path] = torch.autograd.grad((y * probe).sum(), [x, *trainable])
        with torch.no_grad():
            assert relative_error(y, merged_reference(model, x)) < 1e-12
    assert relative_error(outputs["dense"], outputs["structured"]) < 1e-12
    for got, want in zip(gradients["dense"], gradients["structured"]):
        assert want.abs().max() > 0
        assert relative_error(got, want) < 1e-11


def test_layer_dense_path_folds_into_the_base_product(monkeypatch):
    model = adapted("toeplitz", {}, "dense")
    x = torch.randn(2, 4, 4, 9, dtype=torch.float64)
    calls = []
    for layer in layers(model):
        monkeypatch.setattr(layer.get_base_layer(), "forward", lambda *a, **k: calls.append("base") or 1 / 0)
        monkeypatch.setattr(layer.surm_delta["default"].matrix, "forward", lambda *a, **k: 1 / 0)
    model(x)  # neither the base layer's own forward nor the fast apply runs: one product with W0 + s · dense(M)
    assert calls == []


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_a_layer_asks_each_update_for_its_path_once_per_call_and_for_the_option_that_exists(monkeypatch, execution):
    """The layer decides folding with one path query per delta adapter and call (the decision is reused by the
    update's own apply): ``folded=True`` where :meth:`can_fold` accepts the call, ``folded=False`` where it does
    not (active dropout here), and the plan follows the answer."""
    model = adapted("toeplitz", {}, execution, dropout=0.5)
    linear = model.base_model.model.linear
    update = linear.surm_delta["default"]
    asked = []
    original = type(update).path
    monkeypatch.setattr(type(update), "path", lambda self, x, folded=False: asked.append(folded) or original(
        self, x, folded=folded))
    x = torch.randn(3, 9, dtype=torch.float64)
    for training in (False, True):
        model.train(training)
        asked.clear()
        linear(x)
        foldable = not training
        assert asked == [foldable]
        path = original(update, x, folded=foldable)
        plan = linear._plan(update, x, x, (), {})
        assert plan == ("folded" if foldable and path == "dense" else path)


def test_layer_structured_path_never_builds_the_dense_matrix(monkeypatch):
    model = adapted("circulant", {}, "structured")
    for layer in layers(model):
        monkeypatch.setattr(layer.surm_delta["default"].matrix, "dense", lambda *a, **k: 1 / 0)
    x = torch.randn(2, 4, 4, 9, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    with torch.no_grad():
        model(x)


def test_active_dropout_is_not_folded_but_still_uses_the_dense_path():
    """With dropout on the update's input, W0 x + s · dense(M) dropout(x) is not one product: it is not folded."""
    model = adapted("circulant", {}, "dense", dropout=0.5)
    linear = model.base_model.model.linear
    x = torch.randn(3, 9, dtype=torch.float64)
    model.train()
    assert not linear.can_fold(linear.surm_delta["default"], x, (), {})
    torch.manual_seed(1)
    y = linear(x)
    torch.manual_seed(1)
    kept = nn.functional.dropout(x, 0.5, training=True)
    with torch.no_grad():
        expected = linear.get_base_layer()(x) + kept @ linear.get_delta_weight("default").T
    assert relative_error(y, expected) < 1e-12
    model.eval()
    assert linear.can_fold(linear.surm_delta["default"], x, (), {})


def test_half_precision_base_weights_are_not_folded():
    torch.manual_seed(0)
    config = surm.SurmConfig(structure="circulant", target_modules=["linear"], init_weights=False, execution="dense")
    model = peft.get_peft_model(Net(), config).to(torch.bfloat16)
    linear = model.base_model.model.linear
    x = torch.randn(3, 9, dtype=torch.bfloat16)
    assert not linear.can_fold(linear.surm_delta["default"], x, (), {})
    y = linear(x)
    with torch.no_grad():
        expected = linear.get_base_layer()(x).float() + x.float() @ linear.get_delta_weight("default").float().T
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), expected) < 2e-2


def test_execution_is_saved_and_restored(tmp_path):
    model = adapted("monarch", {"nblocks": 2, "block_rank": 2}, "structured")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["execution"] == "structured"
    restored = peft.PeftModel.from_pretrained(Net().double(), tmp_path)
    assert restored.peft_config["default"].execution == "structured"
    assert {layer.surm_delta["default"].execution for layer in layers(restored)} == {"structured"}
    assert surm.SurmConfig(structure="circulant").execution == "auto"
    assert set(EXECUTIONS) == {"auto", "structured", "dense"}
