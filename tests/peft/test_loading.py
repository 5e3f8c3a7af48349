"""Strict loading of surm adapter folders: a config that does not match its weights is an error, not a warning.

Each test saves a real adapter with PEFT, tampers with the folder (rewrites adapter_config.json, or rewrites
adapter_model.safetensors with safetensors.torch) and loads it with ``PeftModel.from_pretrained`` or
``load_adapter``. PEFT itself only warns about missing keys and would keep the fresh initial weights in place of the
trained ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from .common import tiny_peft
from .helpers import make_tiny, tiny_input

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
MISMATCH = r"its adapter_config\.json does not match its weights"
MIX = "base_model.model.encoder.layers.0.mix"


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def save(folder: Path, family: str = "circulant", mode: str = "delta", bottleneck: int | None = None, **kwargs):
    """Save a random (non-identity) adapter with a trained classifier copy; return its outputs on the tiny input."""
    model = tiny_peft(family, mode, bottleneck, init_weights=False, modules_to_save=["classifier"], **kwargs).eval()
    with torch.no_grad():
        for p in model.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(0.25)
    model.save_pretrained(folder)
    return forward(model, tiny_input())


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS, metadata={"format": "pt"})


def load(folder: Path, adapter_name: str = "default") -> PeftModel:
    return PeftModel.from_pretrained(make_tiny(), folder, adapter_name=adapter_name)


# -- folders that load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, mode, bottleneck", [("circulant", "delta", None), ("monarch", "adapter", 4)])
def test_a_matching_folder_loads_with_identical_outputs(family, mode, bottleneck, tmp_path):
    expected = save(tmp_path, family, mode, bottleneck)
    for name in ("default", "other"):
        assert torch.equal(forward(load(tmp_path, name), tiny_input()), expected), name


def test_an_adapter_without_its_bias_loads_and_a_config_that_disagrees_is_refused(tmp_path):
    expected = save(tmp_path, "circulant", "adapter", None, activation="identity", adapter_bias=False)
    assert torch.equal(forward(load(tmp_path), tiny_input()), expected)
    edit_config(tmp_path, adapter_bias=True)  # the config now asks for a bias the weights do not hold
    with pytest.raises(ValueError, match=MISMATCH):
        load(tmp_path)


def test_a_second_named_adapter_loads_into_a_model_that_has_one(tmp_path):
    first = save(tmp_path / "a", "circulant")
    second = save(tmp_path / "b", "toeplitz", "adapter")
    model = load(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(forward(model, tiny_input()), first)  # loading "b" left the active "a" as it was
    model.set_adapter("b")
    assert torch.equal(forward(model, tiny_input()), second)


def test_other_floating_dtypes_load_and_only_surm_keys_are_strict(tmp_path):
    """bfloat16 weights are cast in as PEFT does; a foreign tensor that is not surm's is ignored as PEFT ignores it."""
    expected = save(tmp_path)

    def change(state: dict[str, torch.Tensor]) -> None:
        for key in [k for k in state if ".surm_delta." in k]:
            state[key] = state[key].to(torch.bfloat16)
        state["base_model.model.encoder.layers.0.norm.weight"] = torch.ones(12)

    edit_weights(tmp_path, change)
    torch.testing.assert_close(forward(load(tmp_path), tiny_input()), expected, atol=5e-2, rtol=5e-2)


# -- config and weights that do not match ----------------------------------------------------------------------


def test_config_of_another_structure(tmp_path):
    save(tmp_path, "circulant")
    edit_config(tmp_path, structure="toeplitz")
    message = (
        rf"^surm adapter 'default' \(structure='toeplitz', mode='delta'\): {MISMATCH}: 6 missing key\(s\) "
        rf"\['{MIX.replace('.0.mix', '.0.down')}\.surm_delta\.matrix\.outer_values', .*\] and 3 more, "
        r"6 unexpected key\(s\) \[.*surm_delta\.matrix\.column', .*\] and 3 more; load the weights with the config "
        r"they were saved with$"
    )
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_weights_of_another_structure(tmp_path):
    save(tmp_path / "circulant", "circulant")
    save(tmp_path / "toeplitz", "toeplitz")
    (tmp_path / "circulant" / WEIGHTS).write_bytes((tmp_path / "toeplitz" / WEIGHTS).read_bytes())
    message = rf"structure='circulant'.*{MISMATCH}: 6 missing .*matrix\.column.*outer_values"
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "circulant")


def test_config_in_adapter_mode_with_delta_weights(tmp_path):
    save(tmp_path, "circulant", "delta")
    edit_config(tmp_path, mode="adapter")
    message = rf"mode='adapter'\): {MISMATCH}: 12 missing .*surm_adapter\.bias.*surm_delta"
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_config_in_delta_mode_with_adapter_weights(tmp_path):
    save(tmp_path, "lowrank", "adapter", 4)
    edit_config(tmp_path, mode="delta", bottleneck=None)
    message = rf"mode='delta'\): {MISMATCH}: 12 missing .*surm_delta.*surm_adapter\.down"
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_config_with_another_size(tmp_path):
    save(tmp_path, "lowrank", rank=8)
    edit_config(tmp_path, rank=4)
    message = rf"{MISMATCH}: '{MIX}\.surm_delta\.matrix\.down' has shape \(8, 12\) in the weights but \(4, 12\) in"
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_config_with_fewer_targets(tmp_path):
    save(tmp_path)
    edit_config(tmp_path, target_modules=["mix"])
    with pytest.raises(ValueError, match=rf"{MISMATCH}: 0 missing key\(s\) \[\], 4 unexpected key\(s\) \[.*down"):
        load(tmp_path)


def test_weights_without_one_layers_tensors(tmp_path):
    save(tmp_path, "monarch")
    edit_weights(tmp_path, lambda state: [state.pop(k) for k in list(state) if k.startswith(f"{MIX}.")])
    left, right = (f"'{MIX}\\.surm_delta\\.matrix\\.{name}'" for name in ("left", "right"))
    with pytest.raises(ValueError, match=rf"{MISMATCH}: 2 missing key\(s\) \[{left}, {right}\], 0 unexpected"):
        load(tmp_path)


#: A surm tensor the adapter does not have, one the untargeted classifier does not have, one of the other mode.
EXTRA_KEYS = [
    f"{MIX}.surm_delta.matrix.extra",
    "base_model.model.classifier.surm_delta.matrix.column",
    f"{MIX}.surm_adapter.bias",
]


@pytest.mark.parametrize("extra", EXTRA_KEYS)
def test_weights_with_extra_surm_tensors(extra, tmp_path):
    save(tmp_path)
    edit_weights(tmp_path, lambda state: state.update({extra: torch.zeros(12)}))
    message = rf"{MISMATCH}: 0 missing key\(s\) \[\], 1 unexpected key\(s\) \['{re.escape(extra)}'\]"
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_a_tensor_of_the_wrong_shape(tmp_path):
    save(tmp_path)
    edit_weights(tmp_path, lambda state: state.update({f"{MIX}.surm_delta.matrix.column": torch.zeros(7)}))
    message = rf"'{MIX}\.surm_delta\.matrix\.column' has shape \(7,\) in the weights but \(12,\)"
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_tensor_that_is_not_floating_point(dtype, tmp_path):
    save(tmp_path)
    key = f"{MIX}.surm_delta.matrix.column"
    edit_weights(tmp_path, lambda state: state.update({key: torch.ones(12, dtype=dtype)}))
    with pytest.raises(ValueError, match=rf"'{key}' has dtype {dtype}; surm weights are floating point$"):
        load(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_tensor_with_non_finite_values(bad, tmp_path):
    save(tmp_path, "lowrank", "adapter", 4)
    key = "base_model.model.encoder.layers.1.up.surm_adapter.up.up"

    def change(state: dict[str, torch.Tensor]) -> None:
        state[key][0, 0] = bad

    edit_weights(tmp_path, change)
    with pytest.raises(ValueError, match=rf"^surm adapter 'default' .*'{key}' holds non-finite values \(NaN or inf\)"):
        load(tmp_path)


def test_load_adapter_names_the_adapter_and_leaves_the_loaded_one_alone(tmp_path):
    first = save(tmp_path / "a", "circulant")
    save(tmp_path / "b", "circulant")
    edit_config(tmp_path / "b", structure="symmetric_toeplitz")
    model = load(tmp_path / "a", "a")
    message = rf"^surm adapter 'b' \(structure='symmetric_toeplitz', mode='delta'\): {MISMATCH}"
    with pytest.raises(ValueError, match=message):
        model.load_adapter(tmp_path / "b", adapter_name="b")
    model.set_adapter("a")
    assert torch.equal(forward(model, tiny_input()), first)
