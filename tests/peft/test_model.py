"""surm through PEFT's public API: merge, disable, identity, save/load, training, several adapters, layer types, dtypes."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import surm
from surm.execution import EXECUTIONS

from ..devices import DEVICES
from .common import (FAMILIES, FAMILY_MODE_IDS, FAMILY_MODES, adapter_parameters, max_diff, mode_id, surm_layers,
                     tiny_peft)
from .helpers import TINY_TARGETS, ConvNet, make_gpt2, make_tiny, run_fresh_python, tiny_input

ATOL = 1e-4  # merged vs unmerged, float32


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that is not a surm adapter parameter, cloned."""
    adapters = set(adapter_parameters(model))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


# -- 1. merged == unmerged == merge_and_unload, all different from the base model ---------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_delta_merged_unmerged_and_merge_and_unload_agree(family, x, base_output, device):
    x, base_output = x.to(device), base_output.to(device)
    model = tiny_peft(family, init_weights=False).eval().to(device)
    unmerged = forward(model, x)
    assert max_diff(unmerged, base_output) > 1e-3, "a non-identity init must change the output"
    model.merge_adapter()
    assert all(layer.merged for layer in surm_layers(model).values())
    merged = forward(model, x)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in surm_layers(model).values())
    torch.testing.assert_close(forward(model, x), unmerged, atol=ATOL, rtol=0)
    unloaded = model.merge_and_unload()
    assert isinstance(unloaded, type(make_tiny()))
    assert not surm_layers(unloaded)
    assert all(type(m) is nn.Linear for n, m in unloaded.named_modules() if n.endswith(tuple(TINY_TARGETS)))
    merged_and_unloaded = forward(unloaded, x)
    torch.testing.assert_close(merged_and_unloaded, unmerged, atol=ATOL, rtol=0)
    assert max_diff(merged_and_unloaded, base_output) > 1e-3


#: alpha for every family; the product parameterisation exists for circulant and the Toeplitz families only.
OPTION_CASES = [(f, {"alpha": 0.3}) for f in FAMILIES] + [
    (f, {"parameterization": "product"}) for f in ("circulant", "toeplitz", "symmetric_toeplitz")
]


@pytest.mark.parametrize("family, options", OPTION_CASES, ids=[f"{f}-{next(iter(o))}" for f, o in OPTION_CASES])
def test_delta_merge_with_options(family, options, x):
    model = tiny_peft(family, init_weights=False, **options).eval()
    unmerged = forward(model, x)
    merged = forward(model.merge_and_unload(), x)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, mode, bottleneck", [c for c in FAMILY_MODES if c[1] == "adapter"],
                         ids=[i for i, c in zip(FAMILY_MODE_IDS, FAMILY_MODES) if c[1] == "adapter"])
def test_adapter_mode_changes_the_output_of_each_targeted_module(family, mode, bottleneck, x, base_output):
    model = tiny_peft(family, mode, bottleneck, init_weights=False).eval()
    assert max_diff(forward(model, x), base_output) > 1e-4
    layers = surm_layers(model)
    assert set(layers) == {f"encoder.layers.{i}.{n}" for i in range(2) for n in TINY_TARGETS}
    for layer in layers.values():
        assert list(layer.surm_adapter) == ["default"] and not layer.surm_delta
        adapter = layer.surm_adapter["default"]
        assert adapter.features == layer.out_features
        assert adapter.bottleneck == bottleneck


# -- 2. disable_adapter ---------------------------------------------------------------------------------------------


#: Every family and mode unmerged, and delta mode merged too (adapter mode cannot merge: tested separately).
DISABLE_CASES = [(*case, False) for case in FAMILY_MODES] + [(*case, True) for case in FAMILY_MODES if case[1] == "delta"]


@pytest.mark.parametrize(
    "family, mode, bottleneck, merge", DISABLE_CASES,
    ids=[mode_id(f, m, b) + ("-merged" if merge else "") for f, m, b, merge in DISABLE_CASES],
)
def test_disable_adapter_gives_the_base_output_and_restores_the_adapter(family, mode, bottleneck, merge, x, base_output):
    model = tiny_peft(family, mode, bottleneck, init_weights=False)
    adapted = forward(model.eval(), x)
    if merge:
        model.merge_adapter()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    with model.disable_adapter():
        disabled = forward(model, x)
        assert all(layer.disable_adapters for layer in surm_layers(model).values())
    torch.testing.assert_close(disabled, base_output, atol=1e-5 if merge else 0, rtol=0)
    assert not any(layer.disable_adapters for layer in surm_layers(model).values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(forward(model, x), adapted, atol=ATOL, rtol=0)


# -- 3. identity at init ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_identity_at_init(family, mode, bottleneck, x, base_output):
    model = tiny_peft(family, mode, bottleneck, init_weights=True, modules_to_save=["classifier"]).eval()
    assert adapter_parameters(model)
    torch.testing.assert_close(forward(model, x), base_output, atol=1e-6, rtol=0)
    if mode == "delta":
        for layer in surm_layers(model).values():
            assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
        torch.testing.assert_close(forward(model.merge_and_unload(), x), base_output, atol=1e-6, rtol=0)


# -- 4. save / load ---------------------------------------------------------------------------------------------


def perturb_classifier(model: PeftModel, name: str = "default") -> None:
    """Make the trained copy of the classifier differ from the base model's, so that loading must restore it."""
    with torch.no_grad():
        for p in model.base_model.model.classifier.modules_to_save[name].parameters():
            p.add_(0.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_save_and_load_restores_the_outputs_exactly(family, mode, bottleneck, x, tmp_path, device):
    x = x.to(device)
    model = tiny_peft(family, mode, bottleneck, init_weights=False, modules_to_save=["classifier"]).eval().to(device)
    perturb_classifier(model)
    expected = forward(model, x)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "SURM"
    assert (saved_config["structure"], saved_config["mode"], saved_config["bottleneck"]) == (family, mode, bottleneck)
    assert saved_config["init_weights"] is False
    # the checkpoint holds exactly the adapter parameters (and the classifier copy), without the adapter name
    state = load_file(tmp_path / "adapter_model.safetensors")
    model_keys = set(adapter_parameters(model))
    expected_keys = {k.replace(".default.", ".", 1) for k in model_keys}
    expected_keys |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(state) == expected_keys
    assert all(t.dtype == torch.float32 for t in state.values())

    for name in ("default", "other"):
        loaded = PeftModel.from_pretrained(make_tiny(), tmp_path, adapter_name=name).eval().to(device)
        assert isinstance(loaded.base_model, surm.SurmModel)
        assert loaded.active_adapters == [name]
        assert isinstance(loaded.peft_config[name], surm.SurmConfig)
        assert torch.equal(forward(loaded, x), expected)
        assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = PeftModel.from_pretrained(make_tiny(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in adapter_parameters(trainable).values())


@pytest.mark.slow  # a fresh interpreter
def test_save_and_load_in_a_fresh_process(tmp_path):
    """Every family and mode: save here, load in a new interpreter that only does ``import surm``, compare bit for bit."""
    x = tiny_input()
    torch.save(x, tmp_path / "x.pt")
    jobs, expected = [], {}
    for case, case_id in zip(FAMILY_MODES, FAMILY_MODE_IDS):
        model = tiny_peft(*case, init_weights=False, modules_to_save=["classifier"]).eval()
        perturb_classifier(model)
        folder = tmp_path / case_id
        model.save_pretrained(folder)
        expected[case_id] = forward(model, x)
        names = ["default", "other"] if case_id.startswith(("circulant", "monarch")) else ["default"]
        for name in names:
            jobs.append({"folder": str(folder), "name": name, "output": str(tmp_path / f"{case_id}-{name}.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = """
import json, sys
import torch
import surm  # registers the method with PEFT
from peft import PeftModel
from tests.peft.helpers import make_tiny
folder = sys.argv[1]
x = torch.load(folder + "/x.pt")
for job in json.load(open(folder + "/jobs.json")):
    model = PeftModel.from_pretrained(make_tiny(), job["folder"], adapter_name=job["name"]).eval()
    assert type(model.base_model).__name__ == "SurmModel", type(model.base_model)
    with torch.no_grad():
        torch.save(model(x), job["output"])
"""
    run_fresh_python(script, str(tmp_path))
    for job in jobs:
        case_id = job["folder"].rsplit("/", 1)[-1]
        assert torch.equal(torch.load(job["output"]), expected[case_id]), job


# -- 5. a training step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_weights", [False, True], ids=["random-init", "identity-init"])
@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_a_training_step_changes_only_adapter_and_saved_module_parameters(family, mode, bottleneck, init_weights):
    model = tiny_peft(family, mode, bottleneck, init_weights=init_weights, modules_to_save=["classifier"]).train()
    adapters = adapter_parameters(model)
    saved = {f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters) | saved
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every parameter: frozen ones must get no grad
    x = tiny_input()
    target = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(2))

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        return grads

    grads = step()
    assert set(grads) == trainable
    if not init_weights:
        for name in adapters:
            assert grads[name].abs().sum() > 0, f"zero gradient for {name}"
    else:
        # At the identity init the zero factors (M = 0, U = 0, c = 0, bias = 0) must get a gradient: the adapter
        # learns from step 0. A factor multiplied by a zero factor has a zero gradient at step 0 (as LoRA's A).
        zero = [n for n in adapters if torch.count_nonzero(before[n]) == 0]
        assert zero, "an identity init needs a zero factor"
        for name in zero:
            assert grads[name].abs().sum() > 0, f"zero gradient at the identity init for {name}"
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    assert torch.equal(after["base_model.model.classifier.original_module.weight"], before["base_model.model.classifier.original_module.weight"])
    # after one step every adapter parameter takes part
    grads = step()
    for name in adapters:
        assert grads[name].abs().sum() > 0, f"zero gradient after one step for {name}"


#: Every family in every mode; delta mode also with each execution path forced (it applies to delta adapters only).
EMPTY_BATCH_CASES = [(*case, e) for case in FAMILY_MODES for e in (EXECUTIONS if case[1] == "delta" else ("auto",))]
EMPTY_BATCH_IDS = [f"{mode_id(*case[:3])}-{case[3]}" for case in EMPTY_BATCH_CASES]


@pytest.mark.parametrize("family, mode, bottleneck, execution", EMPTY_BATCH_CASES, ids=EMPTY_BATCH_IDS)
def test_an_empty_batch_runs_forward_and_backward(family, mode, bottleneck, execution):
    """No rows (an empty last batch, a filtered-out split): an empty output and zero gradients, not an FFT error."""
    model = tiny_peft(
        family, mode, bottleneck, init_weights=False, modules_to_save=["classifier"], dropout=0.1, execution=execution
    )
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for shape in [(0, 4, 12), (3, 0, 12), (0, 12)]:
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(*shape))
        assert out.shape == (*shape[:-1], 3)
        out.sum().backward()
        for name, p in trainable.items():
            assert p.grad is not None and p.grad.shape == p.shape, (shape, name)
            assert torch.count_nonzero(p.grad) == 0, (shape, name)
    with torch.no_grad():
        assert model.eval()(torch.randn(0, 4, 12)).shape == (0, 4, 3)


# -- 6. several adapters ----------------------------------------------------------------------------------------


def test_add_set_and_delete_adapters(x, base_output):
    model = tiny_peft("circulant", init_weights=False, adapter_name="a").eval()
    out_a = forward(model, x)
    model.add_adapter("b", surm.SurmConfig(structure="monarch", nblocks=2, target_modules=["up", "down"], init_weights=False))
    model.add_adapter("c", surm.SurmConfig(structure="kronecker", mode="adapter", target_modules=["mix"], init_weights=False))
    assert set(model.peft_config) == {"a", "b", "c"}
    assert model.active_adapters == ["a"]
    torch.testing.assert_close(forward(model, x), out_a, atol=0, rtol=0)  # adding does not activate
    assert set(adapter_parameters(model)) >= {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)

    model.set_adapter("b")
    out_b = forward(model, x)
    assert model.active_adapters == ["b"]
    assert max_diff(out_b, out_a) > 1e-3 and max_diff(out_b, base_output) > 1e-3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in adapter_parameters(model) if ".b." in n}
    layers = surm_layers(model)
    assert set(layers["encoder.layers.0.up"].surm_delta) == {"a", "b"}
    assert set(layers["encoder.layers.0.mix"].surm_delta) == {"a"}
    assert set(layers["encoder.layers.0.mix"].surm_adapter) == {"c"}

    model.delete_adapter("a")
    assert set(model.peft_config) == {"b", "c"}
    assert not any(".a." in n for n in adapter_parameters(model))
    model.set_adapter("b")
    torch.testing.assert_close(forward(model, x), out_b, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="Adapter b was active which is now deleted. Setting active adapter to c"):
        model.delete_adapter("b")  # PEFT's own notice, as for LoRA
    model.set_adapter("c")
    assert max_diff(forward(model, x), base_output) > 1e-4
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("b")


@pytest.mark.parametrize(
    "structures",
    [("circulant", "monarch"), ("lowrank", "ldr"), ("kronecker", "toeplitz"), ("symmetric_toeplitz", "circulant")],
    ids=lambda s: "+".join(s),
)
def test_active_delta_adapters_on_one_layer_add_up(structures, x):
    """Two delta adapters active at once on the last Linear before the (linear) classifier: effects add exactly."""
    target = {"target_modules": [r"layers.1.down"]}
    model = tiny_peft(structures[0], init_weights=False, adapter_name="a", **target).eval()
    model.add_adapter("b", surm.SurmConfig(structure=structures[1], init_weights=False, alpha=0.6, **target))
    base = forward(make_tiny(), x)
    model.set_adapter("a")
    out_a = forward(model, x)
    model.set_adapter("b")
    out_b = forward(model, x)
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    both = forward(model, x)
    assert max_diff(out_a, base) > 1e-3 and max_diff(out_b, base) > 1e-3
    torch.testing.assert_close(both - base, (out_a - base) + (out_b - base), atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    assert sorted(surm_layers(model)["encoder.layers.1.down"].merged_adapters) == ["a", "b"]
    torch.testing.assert_close(forward(model, x), both, atol=ATOL, rtol=0)
    model.unmerge_adapter()  # restores W0 up to float32 rounding of the add and subtract
    with model.disable_adapter():
        torch.testing.assert_close(forward(model, x), base, atol=1e-6, rtol=0)
    merged = model.merge_and_unload(adapter_names=["a", "b"])
    torch.testing.assert_close(forward(merged, x), both, atol=ATOL, rtol=0)


def test_several_adapters_with_mixed_structures_and_modes_save_and_load(x, tmp_path):
    model = tiny_peft("circulant", init_weights=False, adapter_name="a").eval()
    model.add_adapter("b", surm.SurmConfig(structure="monarch", nblocks=3, block_rank=2, target_modules=["up", "mix"], init_weights=False))
    model.add_adapter("c", surm.SurmConfig(structure="toeplitz", mode="adapter", bottleneck=3, target_modules=["down"], init_weights=False))
    model.base_model.set_adapter(["a", "b", "c"])
    all_three = forward(model, x)
    for subset in (["a"], ["b"], ["c"], ["a", "b"]):
        model.base_model.set_adapter(subset)
        assert max_diff(forward(model, x), all_three) > 1e-4, subset
    model.save_pretrained(tmp_path)
    for name in "abc":  # PEFT writes each adapter not named "default" into a sub-folder of its name
        assert (tmp_path / name / "adapter_model.safetensors").is_file(), name
    loaded = PeftModel.from_pretrained(make_tiny(), tmp_path / "a", adapter_name="a").eval()
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.load_adapter(tmp_path / "c", adapter_name="c")
    loaded.base_model.set_adapter(["a", "b", "c"])
    # Equal up to float32 rounding: the folded dense path's product may round differently in other memory (MKL).
    torch.testing.assert_close(forward(loaded, x), all_three, atol=1e-5, rtol=0)


# -- 7. merge refusals and safe merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("family, bottleneck", [(f, b) for f in FAMILIES for b in (None, 4)])
def test_adapter_mode_refuses_to_merge_and_leaves_the_weights(family, bottleneck, x, base_output):
    model = tiny_peft(family, "adapter", bottleneck, init_weights=False).eval()
    adapted = forward(model, x)
    before = base_weights(model)
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(surm.NotMergeableError, match=r"\['default'\] are in mode 'adapter'.*cannot be merged.*unload\(\)"):
            merge()
        assert_same_tensors(before, base_weights(model))
        assert not any(layer.merged for layer in surm_layers(model).values())
        assert torch.equal(forward(model, x), adapted)
    unloaded = model.unload()
    assert not surm_layers(unloaded)
    assert torch.equal(forward(unloaded, x), base_output)


def test_merging_only_the_delta_adapters_when_an_adapter_mode_one_exists(x):
    model = tiny_peft("monarch", init_weights=False, adapter_name="delta").eval()
    output_adapter = surm.SurmConfig(
        structure="circulant", mode="adapter", target_modules=list(TINY_TARGETS), init_weights=False
    )
    model.add_adapter("output", output_adapter)  # a name inside the prefix "surm_" would make PEFT warn
    model.base_model.set_adapter(["delta", "output"])
    both = forward(model, x)
    with pytest.raises(surm.NotMergeableError, match=r"\['output'\]"):
        model.merge_adapter()
    model.merge_adapter(adapter_names=["delta"])
    torch.testing.assert_close(forward(model, x), both, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("family", ["circulant", "monarch", "lowrank"])
def test_safe_merge_refuses_non_finite_adapter_weights(family, bad, x):
    model = tiny_peft(family, init_weights=False).eval()
    layer = surm_layers(model)["encoder.layers.0.mix"]
    with torch.no_grad():
        next(layer.surm_delta["default"].parameters()).view(-1)[0] = bad
    before = base_weights(model)
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before["base_model.model.encoder.layers.0.mix.base_layer.weight"])
    assert torch.isfinite(layer.base_layer.weight).all()
    assert not layer.merged
    assert surm_layers(model), "a refused merge_and_unload must not unload"


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_twice_is_a_no_op(family, x):
    model = tiny_peft(family, init_weights=False).eval()
    model.merge_adapter()
    once = base_weights(model)
    out = forward(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert any("already merged" in str(w.message) for w in caught)
    assert_same_tensors(once, base_weights(model))
    assert torch.equal(forward(model, x), out)
    assert all(layer.merged_adapters == ["default"] for layer in surm_layers(model).values())


# -- 8. layer types -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_gpt2_conv1d_delta(family, gpt2_ids, tmp_path):
    base = logits(make_gpt2(), gpt2_ids)
    model = peft.get_peft_model(make_gpt2(), surm.SurmConfig(structure=family, target_modules=["c_attn", "c_proj"], init_weights=False)).eval()
    layers = surm_layers(model)
    assert len(layers) == 2 * 3  # c_attn, attn.c_proj, mlp.c_proj per block
    geometry = {n.split(".", 3)[-1]: (l.kind, l.in_features, l.out_features) for n, l in layers.items()}
    assert geometry == {
        "attn.c_attn": ("conv1d", 32, 96),
        "attn.c_proj": ("conv1d", 32, 32),
        "mlp.c_proj": ("conv1d", 128, 32),
    }
    for layer in layers.values():
        assert isinstance(layer.base_layer, Conv1D)
        assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape == (layer.in_features, layer.out_features)
    out = logits(model, gpt2_ids)
    assert max_diff(out, base) > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(logits(model, gpt2_ids), out, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_gpt2(), tmp_path)
    assert torch.equal(logits(loaded, gpt2_ids), out)
    torch.testing.assert_close(logits(model.merge_and_unload(), gpt2_ids), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["circulant", "monarch", "toeplitz"])
@pytest.mark.parametrize("bottleneck", [None, 8])
def test_gpt2_conv1d_adapter_mode(family, bottleneck, gpt2_ids):
    base = logits(make_gpt2(), gpt2_ids)
    config = dict(structure=family, mode="adapter", bottleneck=bottleneck, target_modules=["c_attn", "c_proj"])
    identity = peft.get_peft_model(make_gpt2(), surm.SurmConfig(**config)).eval()
    torch.testing.assert_close(logits(identity, gpt2_ids), base, atol=1e-6, rtol=0)
    model = peft.get_peft_model(make_gpt2(), surm.SurmConfig(**config, init_weights=False)).eval()
    assert max_diff(logits(model, gpt2_ids), base) > 1e-4
    with pytest.raises(surm.NotMergeableError):
        model.merge_adapter()


def test_gpt2_default_targets_are_lora_s():
    model = peft.get_peft_model(make_gpt2(), surm.SurmConfig())
    assert set(surm_layers(model)) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_conv2d_1x1_model(family, stride, padding):
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    base_model = ConvNet(stride, padding).eval()
    base = forward(base_model, x)
    model = peft.get_peft_model(copy.deepcopy(base_model), surm.SurmConfig(structure=family, target_modules=["conv", "head"], init_weights=False)).eval()
    assert {n: (l.kind, l.in_features, l.out_features) for n, l in surm_layers(model).items()} == {
        "conv": ("conv2d", 6, 10),
        "head": ("conv2d", 10, 4),
    }
    out = forward(model, x)
    assert out.shape == base.shape
    assert max_diff(out, base) > 1e-3
    merged = forward(model.merge_and_unload(), x)
    torch.testing.assert_close(merged, out, atol=ATOL, rtol=0)
    adapter = peft.get_peft_model(copy.deepcopy(base_model), surm.SurmConfig(structure=family, mode="adapter", target_modules=["conv"], init_weights=False)).eval()
    assert max_diff(forward(adapter, x), base) > 1e-4
    identity = peft.get_peft_model(copy.deepcopy(base_model), surm.SurmConfig(structure=family, target_modules=["conv", "head"])).eval()
    torch.testing.assert_close(forward(identity, x), base, atol=1e-6, rtol=0)


def test_conv2d_3x3_is_refused_with_a_type_error():
    with pytest.raises(TypeError, match=r"cannot add surm adapter 'default' to 'conv'.*kernel_size=\(1, 1\).*got kernel_size=\(3, 3\)"):
        peft.get_peft_model(ConvNet(kernel_size=3), surm.SurmConfig(target_modules=["conv"]))


def test_rectangular_layers_both_ways():
    model = tiny_peft("toeplitz", init_weights=False)
    geometry = {n: (l.in_features, l.out_features) for n, l in surm_layers(model).items() if n.startswith("encoder.layers.0")}
    assert geometry == {"encoder.layers.0.mix": (12, 12), "encoder.layers.0.up": (12, 18), "encoder.layers.0.down": (18, 12)}
    for name, layer in surm_layers(model).items():
        matrix = layer.surm_delta["default"].matrix
        assert matrix.dense().shape == layer.base_layer.weight.shape == (layer.out_features, layer.in_features)


# -- 9. dtypes ----------------------------------------------------------------------------------------------------


def bf16_tolerance(reference: torch.Tensor) -> float:
    return 0.05 * (1.0 + reference.abs().max().item())


@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_bfloat16_base_model_keeps_float32_adapters(family, mode, bottleneck, x):
    model = peft.get_peft_model(
        make_tiny().to(torch.bfloat16),
        surm.SurmConfig(structure=family, mode=mode, bottleneck=bottleneck, target_modules=list(TINY_TARGETS), init_weights=False),
    ).eval()
    adapters = adapter_parameters(model)
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in adapters)
    out = forward(model, x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # the same adapter on the float32 model
    reference_model = tiny_peft(family, mode, bottleneck, init_weights=False).eval()
    missing = reference_model.load_state_dict({n: p.detach() for n, p in adapters.items()}, strict=False)
    assert not missing.unexpected_keys
    reference = forward(reference_model, x)
    assert max_diff(out, reference) <= bf16_tolerance(reference)
    # gradients reach the float32 adapter weights through the bfloat16 model
    model.train()
    model(x.to(torch.bfloat16)).float().pow(2).mean().backward()
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    if mode == "delta":
        model.eval()
        model.merge_adapter()
        assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in surm_layers(model).values())
        assert max_diff(forward(model, x.to(torch.bfloat16)), out) <= bf16_tolerance(reference)


def test_bfloat16_adapters_added_later_and_loaded_are_float32(tmp_path):
    model = peft.get_peft_model(make_tiny().to(torch.bfloat16), surm.SurmConfig(structure="circulant", target_modules=list(TINY_TARGETS)))
    model.add_adapter("b", surm.SurmConfig(structure="monarch", mode="adapter", target_modules=list(TINY_TARGETS)))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny().to(torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(loaded).values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_autocast_bfloat16(family, mode, bottleneck, x, device):
    x = x.to(device)
    model = tiny_peft(family, mode, bottleneck, init_weights=False).eval().to(device)
    reference = forward(model, x)
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert max_diff(out, reference) <= bf16_tolerance(reference)
    out.float().pow(2).mean().backward()
    for name, p in adapter_parameters(model).items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert p.grad.abs().sum() > 0, name
