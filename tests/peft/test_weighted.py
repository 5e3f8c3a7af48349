"""add_weighted_adapter: a new delta adapter whose update is sum_i w_i ΔW_i, exactly within the family where the
family can hold it, or as the best rank-r approximation by SVD; it saves, reloads and merges like any adapter."""

from __future__ import annotations

import peft
import pytest
import torch

import surm

from .common import FAMILIES, surm_layers, tiny_peft
from .helpers import TINY_TARGETS, make_tiny, tiny_input

WEIGHTS = [0.5, -1.5]
#: Families whose sums leave the family (see tests/structures/test_combination.py).
EXACT_REFUSED = {"monarch"}


#: Options of both adapters (two rank-8 adapters would make rank 16, beyond TinyNet's 12 x 12 layer).
OPTIONS = {"lowrank": {"rank": 4}}


def two_adapters(family: str, **second: object) -> peft.PeftModel:
    """Adapters "a" and "b" of ``family`` (random, non-zero; alpha 0.7 and 1.3) on TinyNet, in float64."""
    torch.manual_seed(0)
    model = tiny_peft(family, init_weights=False, adapter_name="a", alpha=0.7, **OPTIONS.get(family, {}))
    second = {**OPTIONS.get(family, {}), **second}
    model.add_adapter("b", surm.SurmConfig(structure=family, init_weights=False, alpha=1.3,
                                           target_modules=list(TINY_TARGETS), **second))
    return model.double()


def expected_delta(layer: surm.SurmLayer) -> torch.Tensor:
    return sum(w * layer.get_delta_weight(a) for a, w in zip("ab", WEIGHTS) if a in layer.surm_delta)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exact_combination_holds_the_weighted_sum_or_points_to_the_svd(family):
    model = two_adapters(family)
    if family in EXACT_REFUSED:
        with pytest.raises(ValueError, match="combination_type='svd'"):
            model.add_weighted_adapter(["a", "b"], WEIGHTS, "ab")
        assert "ab" not in model.peft_config
        return
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "ab")
    assert model.peft_config["ab"].structure == family and model.peft_config["ab"].alpha == 1.0
    for layer in surm_layers(model).values():
        assert torch.allclose(layer.get_delta_weight("ab"), expected_delta(layer), atol=1e-12)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ab." in n)  # frozen, as PEFT's
    model.set_adapter("ab")
    with torch.no_grad():
        assert torch.isfinite(model(tiny_input().double())).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_svd_combination_is_the_best_low_rank_approximation(family):
    model = two_adapters(family)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "full", combination_type="svd", svd_rank=12)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "r2", combination_type="svd", svd_rank=2)
    assert model.peft_config["r2"].structure == "lowrank" and model.peft_config["r2"].rank == 2
    for layer in surm_layers(model).values():
        delta = expected_delta(layer)
        assert torch.allclose(layer.get_delta_weight("full"), delta, atol=1e-10)  # full rank: exact
        singular = torch.linalg.svdvals(delta)
        error = torch.linalg.matrix_norm(layer.get_delta_weight("r2") - delta)
        assert torch.isclose(error, singular[2:].norm(), rtol=1e-8)  # Eckart-Young


def test_counts_add_up_and_layers_with_other_options_get_overrides():
    model = two_adapters("lowrank", rank=2, override_pattern={"up": {"rank": 1}})
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "ab")
    config = model.peft_config["ab"]
    assert config.rank == 4 + 2  # mix and down: ranks 4 (a) and 2 (b)
    overridden = {pattern: entry["rank"] for pattern, entry in config.override_pattern.items()}
    assert overridden == {r"encoder\.layers\.0\.up": 5, r"encoder\.layers\.1\.up": 5}
    for layer in surm_layers(model).values():
        assert torch.allclose(layer.get_delta_weight("ab"), expected_delta(layer), atol=1e-12)


def test_the_combination_saves_reloads_and_merges(tmp_path):
    model = two_adapters("kronecker")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "ab")
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    x = tiny_input().double()
    model.set_adapter("ab")
    with torch.no_grad():
        expected = model(x)
    reloaded = peft.PeftModel.from_pretrained(make_tiny().double(), tmp_path / "ab").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), expected, atol=1e-10)
        assert torch.allclose(reloaded.merge_and_unload()(x), expected, atol=1e-10)


@pytest.mark.parametrize("arguments, message", [
    ((["a", "zz"], WEIGHTS, "c"), r"unknown: \['zz'\]"),
    ((["a", "b"], [1.0], "c"), "weights must be one finite number per adapter"),
    ((["a", "b"], [1.0, float("nan")], "c"), "weights must be one finite number per adapter"),
    ((["a", "b"], WEIGHTS, "a"), "an adapter named 'a' exists already"),
    ((["a", "b"], WEIGHTS, "c", "ties"), r"combination_type must be one of \('exact', 'svd'\)"),
    ((["a", "b"], WEIGHTS, "c", "svd"), "needs svd_rank"),
    ((["a", "b"], WEIGHTS, "c", "svd", 13), r"svd_rank=13 exceeds min\(out, in\)"),
])
def test_bad_arguments_are_refused_and_nothing_is_added(arguments, message):
    model = two_adapters("circulant")
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(*arguments)
    assert sorted(model.peft_config) == ["a", "b"]


def test_a_combination_beyond_a_layers_bound_is_refused_and_nothing_is_added():
    torch.manual_seed(0)
    model = tiny_peft("lowrank", init_weights=False, adapter_name="a")  # rank 8 twice: 16 > 12
    model.add_adapter("b", surm.SurmConfig(structure="lowrank", init_weights=False, target_modules=list(TINY_TARGETS)))
    with pytest.raises(ValueError, match="lowrank rank=16 exceeds max"):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "ab")
    assert sorted(model.peft_config) == ["a", "b"]
    assert all("ab" not in layer.surm_delta for layer in surm_layers(model).values())


def test_adapter_mode_and_mixed_families_are_refused_where_they_cannot_be_summed():
    model = two_adapters("circulant")
    model.add_adapter("ad", surm.SurmConfig(structure="circulant", mode="adapter", target_modules=["mix"]))
    with pytest.raises(ValueError, match="only delta-mode adapters can be combined"):
        model.add_weighted_adapter(["a", "ad"], WEIGHTS, "c")
    model.add_adapter("t", surm.SurmConfig(structure="toeplitz", init_weights=False, target_modules=list(TINY_TARGETS)))
    with pytest.raises(ValueError, match=r"holds adapters of the families \['circulant', 'toeplitz'\].*'svd'"):
        model.add_weighted_adapter(["a", "t"], WEIGHTS, "c")
    model.double()
    model.add_weighted_adapter(["a", "t"], WEIGHTS, "c", combination_type="svd", svd_rank=12)
    assert model.peft_config["c"].structure == "lowrank"
