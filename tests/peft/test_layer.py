"""SurmLayer on its own: supported layer types, the forward formulas, merging, several adapters on one layer."""

from __future__ import annotations

import re
import time
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import surm
from surm.execution import EXECUTIONS, choose_path
from surm.insertion import DeltaUpdate, OutputAdapter
from surm.peft.layer import NotMergeableError, SurmLayer

from .common import FAMILIES, max_diff

ACTS = {"gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "identity": lambda h: h}


def make_layer(base: nn.Module, family: str = "circulant", name: str = "a", **kwargs) -> SurmLayer:
    kwargs.setdefault("init_weights", False)
    config = surm.SurmConfig(structure=family, **kwargs)
    return SurmLayer(base, name, config, config.resolve("layer"))


def add(layer: SurmLayer, name: str, family: str = "circulant", **kwargs) -> None:
    kwargs.setdefault("init_weights", False)
    config = surm.SurmConfig(structure=family, **kwargs)
    layer.update_layer(name, config, config.resolve("layer"))


def linear(out_features: int = 10, in_features: int = 6, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def conv1d(out_features: int = 10, in_features: int = 6, seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(out_features, in_features)  # weight (in, out), as in GPT-2
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def conv2d(out_channels: int = 10, in_channels: int = 6, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, kwargs.pop("kernel_size", 1), **kwargs)


def dense_delta(layer: SurmLayer, name: str) -> torch.Tensor:
    """alpha * dense(M), (out, in), straight from the structure."""
    update = layer.surm_delta[name]
    return update.alpha * update.matrix.dense().detach()


# -- layer types ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, kind, geometry",
    [
        (linear(10, 6), "linear", (6, 10)),
        (linear(6, 10), "linear", (10, 6)),
        (conv1d(10, 6), "conv1d", (6, 10)),
        (conv1d(6, 10), "conv1d", (10, 6)),
        (conv2d(10, 6), "conv2d", (6, 10)),
        (conv2d(6, 10, stride=2, padding=1), "conv2d", (10, 6)),
    ],
    ids=["linear-up", "linear-down", "conv1d-up", "conv1d-down", "conv2d-up", "conv2d-down-strided"],
)
def test_supported_layers_and_their_geometry(base, kind, geometry):
    layer = make_layer(base)
    assert layer.kind == kind
    assert (layer.in_features, layer.out_features) == geometry
    matrix = layer.surm_delta["a"].matrix
    assert (matrix.in_features, matrix.out_features) == geometry


@pytest.mark.parametrize(
    "base, message",
    [
        (nn.Conv2d(6, 10, 3), r"nn\.Conv2d only with kernel_size=\(1, 1\) and groups=1.*got kernel_size=\(3, 3\), groups=1"),
        (nn.Conv2d(6, 10, (1, 3)), r"got kernel_size=\(1, 3\)"),
        (nn.Conv2d(6, 10, 1, groups=2), r"got kernel_size=\(1, 1\), groups=2"),
        (nn.Embedding(10, 6), r"surm cannot adapt Embedding; supported layers: torch\.nn\.Linear, transformers' Conv1D"),
        (nn.Conv1d(6, 10, 1), r"surm cannot adapt Conv1d; supported layers:"),
    ],
    ids=["conv3x3", "conv1x3", "grouped", "embedding", "torch-conv1d"],
)
def test_unsupported_layers_raise_a_clear_type_error(base, message):
    with pytest.raises(TypeError, match=message):
        make_layer(base)


# -- delta mode: forward and merge against the dense formula -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(10, 6), (6, 10), (8, 8)], ids=["up", "down", "square"])
def test_linear_delta_forward_is_base_plus_alpha_times_dense(family, shape):
    layer = make_layer(linear(*shape), family, alpha=0.7)
    x = torch.randn(2, 3, shape[1])
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ dense_delta(layer, "a").T
        assert max_diff(expected, layer.base_layer(x)) > 1e-3  # a non-identity adapter
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        assert layer.surm_delta["a"].alpha == 0.7
        torch.testing.assert_close(layer.get_delta_weight("a"), dense_delta(layer, "a"))


@pytest.mark.parametrize("family", FAMILIES)
def test_conv1d_delta_uses_the_transposed_weight_layout(family):
    layer = make_layer(conv1d(10, 6), family)
    x = torch.randn(2, 3, 6)
    delta = dense_delta(layer, "a")  # (out, in)
    weight = layer.base_layer.weight  # (in, out)
    assert layer.get_delta_weight("a").shape == weight.shape == (6, 10)
    torch.testing.assert_close(layer.get_delta_weight("a"), delta.T)
    with torch.no_grad():
        expected = x @ (weight + delta.T) + layer.base_layer.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), expected, atol=1e-5, rtol=1e-5)


CONV_CASES = [
    {"stride": 1, "padding": 0},
    {"stride": 2, "padding": 0},
    {"stride": 1, "padding": 1},
    {"stride": 2, "padding": 1},
    {"stride": (2, 1), "padding": (1, 0)},
    {"stride": 1, "padding": "same"},
    {"stride": 2, "padding": 1, "padding_mode": "reflect"},
    {"stride": 1, "padding": 1, "padding_mode": "circular"},
]


@pytest.mark.parametrize("family", ["circulant", "kronecker", "monarch", "lowrank"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_1x1_delta_equals_the_conv_with_the_merged_weight(family, case):
    layer = make_layer(conv2d(10, 6, **case), family)
    conv = layer.base_layer
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        weight = conv.weight + dense_delta(layer, "a")[:, :, None, None]
        merged_conv = nn.Conv2d(6, 10, 1, bias=True, **case)
        merged_conv.weight.copy_(weight)
        merged_conv.bias.copy_(conv.bias)
        expected = merged_conv(x)
        out = layer(x)
        assert out.shape == conv(x).shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        unbatched = layer(x[0])
        torch.testing.assert_close(unbatched, expected[0], atol=1e-5, rtol=1e-5)
        assert layer.get_delta_weight("a").shape == (10, 6, 1, 1)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make_base", [linear, conv1d, conv2d], ids=["linear", "conv1d", "conv2d"])
def test_merge_unmerge_round_trip(family, make_base):
    layer = make_layer(make_base(10, 6), family)
    x = torch.randn(2, 6, 3, 3) if make_base is conv2d else torch.randn(2, 3, 6)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer.base_layer.weight, w0 + layer.get_delta_weight("a"))
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merging_twice_is_a_no_op():
    layer = make_layer(linear(), "monarch")
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged)
    assert layer.merged_adapters == ["a"]
    layer.unmerge()
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("safe_merge", [True, False])
def test_non_finite_deltas_are_refused_and_the_weight_is_untouched(bad, safe_merge):
    layer = make_layer(linear(), "circulant")
    with torch.no_grad():
        layer.surm_delta["a"].matrix.column[2] = bad
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"adapter 'a' has non-finite values in its weight delta; refusing to merge"):
        layer.merge(safe_merge=safe_merge)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


@pytest.mark.parametrize("safe_merge", [True, False])
def test_a_refused_merge_of_several_adapters_merges_none_of_them(safe_merge):
    layer = make_layer(linear(), "circulant")
    add(layer, "b", "lowrank")
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        layer.surm_delta["b"].matrix.up[0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="adapter 'b' has non-finite values"):
        layer.merge(safe_merge=safe_merge)
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer.merged_adapters == []


def test_safe_merge_refuses_a_merge_that_overflows():
    layer = make_layer(linear().to(torch.float16), "circulant")
    with torch.no_grad():
        layer.surm_delta["a"].matrix.column.fill_(6e4)  # finite, but W0 + delta overflows float16
        layer.base_layer.weight.fill_(6e4)
    assert torch.isfinite(layer.get_delta_weight("a")).all()
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merging adapter 'a' gives non-finite weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


def test_get_delta_weight_of_an_unknown_adapter_names_the_available_ones():
    layer = make_layer(linear())
    with pytest.raises(KeyError, match=r"no adapter named 'zz'"):
        layer.get_delta_weight("zz")


def test_an_adapter_name_cannot_be_added_twice():
    layer = make_layer(linear())
    with pytest.raises(ValueError, match=r"already has an adapter named 'a'"):
        add(layer, "a")


# -- adapter mode --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["gelu", "tanh", "identity"])
def test_adapter_mode_forward_formula(family, activation):
    layer = make_layer(linear(10, 6), family, mode="adapter", activation=activation)
    adapter = layer.surm_adapter["a"]
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + ACTS[activation](h @ adapter.map.dense().T) + adapter.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        assert max_diff(expected, h) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_adapter_mode_without_its_bias(family, activation):
    """act(S h) alone; with the identity, the linear h <- (I + S) h, in float64 against the dense S."""
    base = linear(10, 6).double()
    layer = make_layer(base, family, mode="adapter", activation=activation, adapter_bias=False).double()
    adapter = layer.surm_adapter["a"]
    assert adapter.bias is None and "bias" not in dict(adapter.named_parameters())
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        h = layer.base_layer(x)
        dense = adapter.map.dense()
        expected = h + ACTS[activation](h @ dense.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
        if activation == "identity":
            torch.testing.assert_close(layer(x), h @ (torch.eye(10, dtype=torch.float64) + dense).T)
        assert max_diff(expected, h) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_mode_bottleneck_formula(family):
    layer = make_layer(linear(10, 6), family, mode="adapter", bottleneck=4)
    adapter = layer.surm_adapter["a"]
    assert (adapter.down.out_features, adapter.down.in_features) == (4, 10)
    assert (adapter.up.out_features, adapter.up.in_features) == (10, 4)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + F.gelu(h @ adapter.down.dense().T) @ adapter.up.dense().T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        assert max_diff(expected, h) > 1e-4


@pytest.mark.parametrize("bottleneck", [None, 4])
def test_adapter_mode_on_conv2d_acts_on_channels(bottleneck):
    layer = make_layer(conv2d(10, 6, stride=2, padding=1), "circulant", mode="adapter", bottleneck=bottleneck)
    adapter = layer.surm_adapter["a"]
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + adapter(h.movedim(1, -1)).movedim(-1, 1)
        torch.testing.assert_close(layer(x), expected)
        assert layer(x).shape == h.shape == (2, 10, 4, 4)


@pytest.mark.parametrize("bottleneck", [None, 4])
def test_adapter_mode_refuses_to_merge_and_leaves_the_weight(bottleneck):
    layer = make_layer(linear(), "circulant", mode="adapter", bottleneck=bottleneck)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(NotMergeableError, match=r"adapter 'a' is in mode 'adapter'.*cannot be merged.*unload\(\)"):
        layer.merge()
    with pytest.raises(NotMergeableError):
        layer.get_delta_weight("a")
    assert isinstance(NotMergeableError("x"), ValueError)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


def test_a_mergeable_adapter_is_not_merged_when_an_adapter_mode_one_is_asked_too():
    layer = make_layer(linear(), "circulant")
    add(layer, "b", mode="adapter")
    layer.set_adapter(["a", "b"])
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(NotMergeableError):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0)
    layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"]


# -- several adapters on one layer -----------------------------------------------------------------------------


@pytest.mark.parametrize("make_base", [linear, conv1d, conv2d], ids=["linear", "conv1d", "conv2d"])
def test_delta_adapters_add_they_do_not_chain(make_base):
    layer = make_layer(make_base(10, 6), "circulant")
    add(layer, "b", "monarch", nblocks=2)
    add(layer, "c", "toeplitz", alpha=0.5)
    x = torch.randn(2, 6, 3, 3) if make_base is conv2d else torch.randn(2, 3, 6)
    outputs = {}
    with torch.no_grad():
        base = layer.base_layer(x)
        for name in ("a", "b", "c"):
            layer.set_adapter(name)
            outputs[name] = layer(x)
            assert max_diff(outputs[name], base) > 1e-3
        layer.set_adapter(["a", "b", "c"])
        assert layer.active_adapters == ["a", "b", "c"]
        together = layer(x)
        expected = base + sum(outputs[n] - base for n in ("a", "b", "c"))
        torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)
        layer.merge()
        assert sorted(layer.merged_adapters) == ["a", "b", "c"]
        torch.testing.assert_close(layer(x), together, atol=1e-5, rtol=1e-5)


def test_adapter_mode_adapters_all_read_the_sub_layer_output():
    layer = make_layer(linear(), "circulant", mode="adapter")
    add(layer, "b", "kronecker", mode="adapter", bottleneck=4)
    layer.set_adapter(["a", "b"])
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + layer.surm_adapter["a"](h) + layer.surm_adapter["b"](h)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_delta_and_adapter_mode_on_one_layer():
    """h = W0 x + b + M x, then h + f(h): the adapter reads the adapted sub-layer output."""
    layer = make_layer(linear(), "monarch", nblocks=2)
    add(layer, "b", "circulant", mode="adapter")
    layer.set_adapter(["a", "b"])
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        h = layer.base_layer(x) + x @ dense_delta(layer, "a").T
        expected = h + layer.surm_adapter["b"](h)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        layer.merge(adapter_names=["a"])
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_a_partial_merge_keeps_the_other_active_deltas():
    layer = make_layer(linear(), "circulant")
    add(layer, "b", "lowrank")
    layer.set_adapter(["a", "b"])
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        both = layer(x)
        layer.merge(adapter_names=["a"])
        assert layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge()  # merges the rest: "b"
        assert sorted(layer.merged_adapters) == ["a", "b"]
        torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)


def test_disabled_layer_returns_the_base_output_and_unmerges():
    layer = make_layer(linear(), "circulant")
    x = torch.randn(2, 6)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.merge()
        layer.enable_adapters(False)
        torch.testing.assert_close(layer(x), base, atol=1e-6, rtol=0)
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
        layer.enable_adapters(True)
        assert max_diff(layer(x), base) > 1e-3


# -- empty batches -------------------------------------------------------------------------------------------------

#: Inputs with no rows for each base layer kind: (features last) for Linear and Conv1D, (N, C, H, W) for Conv2d.
EMPTY_INPUTS = {"linear": [(0, 6), (2, 0, 6), (0, 3, 6)], "conv1d": [(0, 6), (2, 0, 6)], "conv2d": [(0, 6, 3, 3)]}


def assert_zero_gradients(module: nn.Module) -> None:
    """Every trainable parameter got a gradient (not None) of its own shape, and it is zero."""
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_update_and_output_adapter_accept_an_empty_batch(family):
    update = DeltaUpdate(surm.structure(family, 10, 6, init="random"), alpha=2.0, dropout=0.1).train()
    adapter = OutputAdapter(12, family, {}, identity_init=False).train()
    bottleneck = OutputAdapter(12, family, {}, bottleneck=4, identity_init=False, dropout=0.1).train()
    for module, features, out in ((update, 6, 10), (adapter, 12, 12), (bottleneck, 12, 12)):
        for lead in [(0,), (2, 0), (0, 3)]:
            x = torch.randn(*lead, features, requires_grad=True)
            y = module(x)
            assert y.shape == (*lead, out) and y.dtype == x.dtype
            module.zero_grad(set_to_none=True)
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
            assert_zero_gradients(module)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make_base", [linear, conv1d, conv2d], ids=["linear", "conv1d", "conv2d"])
def test_delta_layer_on_an_empty_batch(make_base, family, execution):
    layer = make_layer(make_base(), family, execution=execution).train()
    kind = layer.kind
    for shape in EMPTY_INPUTS[kind]:
        x = torch.randn(*shape)
        out = layer(x)
        with torch.no_grad():
            assert out.shape == layer.base_layer(x).shape and out.dtype == x.dtype, shape
        layer.zero_grad(set_to_none=True)
        out.sum().backward()
        assert_zero_gradients(layer)
        if execution == "auto":  # no rows: the structured path does no work at all, the dense one would build M
            assert layer.surm_delta["a"].path(layer._delta_input(x), folded=True) == "structured"


@pytest.mark.parametrize("bottleneck", [None, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_mode_layer_on_an_empty_batch(family, bottleneck):
    layer = make_layer(linear(10, 6), family, mode="adapter", bottleneck=bottleneck).train()
    for shape in EMPTY_INPUTS["linear"]:
        out = layer(torch.randn(*shape))
        assert out.shape == (*shape[:-1], 10)
        layer.zero_grad(set_to_none=True)
        out.sum().backward()
        assert_zero_gradients(layer)


def test_the_execution_path_for_no_rows_is_structured_unless_forced():
    matrix = surm.structure("circulant", 384, 384)
    for folded in (True, False):
        for backward in (True, False):
            assert choose_path("auto", matrix, 0, folded=folded, backward=backward) == "structured"
            assert choose_path("dense", matrix, 0, folded=folded, backward=backward) == "dense"
    with pytest.raises(ValueError, match=r"tokens must be >= 0 \(the rows of x\), got -1"):
        choose_path("auto", matrix, -1, folded=True, backward=False)


# -- bottleneck bounds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bottleneck", [0, -1, 13, 10**9, 2.5, True, "4"])
def test_a_bottleneck_outside_one_to_d_is_refused_before_allocating(bottleneck):
    start = time.perf_counter()
    valid = r"must be None or an integer in 1\.\.12 \(at most the features d=12\)"
    message = rf"^bottleneck {valid}, got {re.escape(repr(bottleneck))}$"
    with pytest.raises(ValueError, match=message):
        OutputAdapter(12, "lowrank", {}, bottleneck=bottleneck)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("bottleneck", [1, 12])
def test_a_bottleneck_up_to_d_is_allowed(bottleneck):
    adapter = OutputAdapter(12, "lowrank", {"rank": 1}, bottleneck=bottleneck)
    assert (adapter.down.out_features, adapter.up.in_features) == (bottleneck, bottleneck)
