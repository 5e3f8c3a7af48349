"""surm.recommend: the rule's roles on real architectures (MiniLM pretrained; tiny Llama, Qwen2, GPT-2 and
EfficientNet-style models built from configs with random weights), the budget as a hard bound on the built adapter,
determinism, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, LlamaConfig,
                          Qwen2Config)

import surm
from surm.models import minilm_path
from surm.cli import config_method
from surm.methods import MethodChoice, build_peft_config, recommended_method
from surm.recommendation import RECIPES, model_roles, recommended_recipe

from .runs import environment

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def minilm():
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def tiny_llama():
    return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def tiny_qwen2():
    return AutoModelForCausalLM.from_config(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def tiny_gpt2():
    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                                       bos_token_id=0, eos_token_id=0))


def adapter_parameters(model, config):
    return surm_parameters(peft.get_peft_model(model, config))


def surm_parameters(wrapped) -> int:
    """Trainable adapter parameters of a model wrapped by PEFT (heads not counted)."""
    return sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "surm_" in n)


def monarch_shapes(wrapped) -> dict[str, tuple[int, int]]:
    """(nblocks, block rank) of every Monarch delta update of a model wrapped by PEFT, by module name."""
    return {name.removeprefix("base_model.model."): (module.surm_delta["default"].matrix.nblocks,
                                                     module.surm_delta["default"].matrix.block_rank)
            for name, module in wrapped.named_modules() if hasattr(module, "surm_delta")}


def test_minilm_roles_in_priority_order(minilm):
    roles = model_roles(minilm)
    assert [r.target for r in roles] == ["attention.self.query", "attention.self.value", "attention.output.dense",
                                         "attention.self.key", "intermediate.dense", "output.dense"]
    assert [len(r.shapes) for r in roles] == [6] * 6
    assert roles[4].shapes[0] == (1536, 384) and roles[5].shapes[0] == (384, 1536)


@pytest.mark.parametrize("build, expected", [
    (tiny_llama, ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.k_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"]),
    (tiny_qwen2, ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.k_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"]),
    (tiny_gpt2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
])
def test_decoder_roles(build, expected):
    """The heads (lm_head) and embeddings are not candidates; GPT-2's fused qkv Conv1D comes first."""
    assert [r.target for r in model_roles(build())] == expected


class Block(nn.Module):
    """An EfficientNet-style block: a 1x1 expansion, a 3x3 depthwise and a grouped 1x1 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(channels, 2 * channels, 1)
        self.conv_dw = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.conv_grouped = nn.Conv2d(2 * channels, channels, 1, groups=2)


def test_one_by_one_convolutions_in_numbered_blocks_are_candidates():
    model = nn.Module()
    model.stem = nn.Conv2d(3, 8, 1)
    model.blocks = nn.ModuleList([Block(8), Block(8)])
    assert [(r.target, r.shapes) for r in model_roles(model)] == [("conv_pw", ((16, 8), (16, 8)))]


@pytest.mark.parametrize("budget", [2_304, 4_608, 7_372, 9_216, 20_000, 27_648, 36_863, 73_728, 200_000])
def test_the_built_adapter_stays_within_the_budget(minilm, budget):
    config = surm.recommend(minilm, budget)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    assert adapter_parameters(model, config) <= budget


QV = ["attention.self.query", "attention.self.value"]
EVERY_ROLE = ["attention.self.query", "attention.self.value", "attention.output.dense", "attention.self.key",
              "intermediate.dense", "output.dense"]


@pytest.mark.parametrize("budget, structure, options, targets, lr", [
    (7_372, "fourier", {"frequencies": 614}, QV, 3e-2),
    (4_608, "fourier", {"frequencies": 384}, QV, 3e-2),
    (9_215, "fourier", {"frequencies": 767}, QV, 3e-2),
    (9_216, "monarch", {"nblocks": 16, "block_rank": 1}, QV, 1e-2),
    (14_745, "monarch", {"nblocks": 16, "block_rank": 1}, QV + ["attention.output.dense"], 1e-2),
    (20_000, "monarch", {"nblocks": 16, "block_rank": 1}, QV + ["attention.output.dense", "attention.self.key"], 1e-2),
    (41_471, "monarch", {"nblocks": 16, "block_rank": 1}, EVERY_ROLE[:5], 1e-2),
    (4_607, "circulant", {}, ["attention.self.query"], 1e-3),  # Fourier would get fewer than 384 per layer
    (2_304, "circulant", {}, ["attention.self.query"], 1e-3),
    (73_728, "monarch", {"nblocks": 16, "block_rank": 1}, EVERY_ROLE, 1e-2),
    (59_904, "monarch", {"nblocks": 16, "block_rank": 1}, EVERY_ROLE, 1e-2),
    (59_903, "monarch", {"nblocks": 16, "block_rank": 1}, EVERY_ROLE, 1e-2),
    (41_472, "monarch", {"nblocks": 16, "block_rank": 1}, EVERY_ROLE, 1e-2),
])
def test_the_documented_recommendations(minilm, budget, structure, options, targets, lr):
    """docs/recommend.md's table."""
    config = surm.recommend(minilm, budget)
    assert config.structure == structure and config.mode == "delta" and config.target_modules == set(targets)
    assert all(getattr(config, name) == value for name, value in options.items())
    recipe, ordered = recommended_recipe(minilm, budget)
    assert (recipe.family, recipe.options, ordered, recipe.lr) == (structure, options, targets, lr)


ATTENTION = ["attention.self.query", "attention.self.value", "attention.output.dense", "attention.self.key"]


@pytest.mark.parametrize("budget, attention_rank, params", [(73_728, 2, 59_904), (59_904, 2, 59_904),
                                                            (59_903, 1, 41_472), (41_472, 1, 41_472)])
def test_monarch_takes_block_rank_2_on_the_attention_roles_when_all_six_fit(minilm, budget, attention_rank, params):
    """From 59,904 on MiniLM: 16 x 2 on q, k, v and the attention output, 16 x 1 on the MLP; every module of the
    built adapter has the block rank of its role, and the adapter has exactly the parameters the table says."""
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    wrapped = peft.get_peft_model(model, surm.recommend(minilm, budget))
    shapes = monarch_shapes(wrapped)
    assert len(shapes) == 36
    for name, (_, rank) in shapes.items():
        assert rank == (attention_rank if any(name.endswith(role) for role in ATTENTION) else 1), name
    assert surm_parameters(wrapped) == params


def test_the_recommended_method_builds_the_same_adapter(minilm):
    """``surm finetune --budget-params`` trains :func:`recommended_method`'s choice: at 73,728 the same per-role
    block ranks and 59,904 parameters as ``surm.recommend``'s config, at the recipe's rate."""
    choice, lr = recommended_method(minilm, 73_728)
    assert (choice.name, choice.targets, lr) == ("monarch", EVERY_ROLE, 1e-2)
    config = build_peft_config(choice, "SEQ_CLS", ["classifier"])
    assert config.to_dict() == {**surm.recommend(minilm, 73_728).to_dict(), "task_type": "SEQ_CLS"}
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    assert adapter_parameters(model, config) == 59_904


def test_the_recommendation_at_lora_budget_is_the_measured_configuration(minilm):
    """``--budget-params 73728`` builds, module by module, what docs/results/monarch_16x2_attention_config.json
    (the file the comparisons ran with ``--config``) builds."""
    name, mode, targets, options = config_method(DOCS / "results" / "monarch_16x2_attention_config.json", {})
    measured = build_peft_config(MethodChoice(name, targets=targets, mode=mode, options=options), "SEQ_CLS",
                                 ["classifier"])
    choice, _ = recommended_method(minilm, 73_728)
    shipped = build_peft_config(choice, "SEQ_CLS", ["classifier"])
    shipped_shapes, measured_shapes = (
        monarch_shapes(peft.get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2), config))
        for config in (shipped, measured))
    assert shipped_shapes == measured_shapes
    assert sorted(set(shipped_shapes.values())) == [(16, 1), (16, 2)]


def test_the_attention_options_name_exactly_the_attention_targets():
    """The override pattern is built from the chosen attention targets, escaped: it matches the attention output
    (``attention.output.dense``) and not the MLP's ``output.dense``, and decoder names (``o_proj``) too."""
    recipe = RECIPES[0]
    pattern = next(iter(recipe.settings(EVERY_ROLE)["override_pattern"]))
    config = surm.SurmConfig(structure="monarch", target_modules=EVERY_ROLE, **recipe.settings(EVERY_ROLE))
    assert config.resolve("encoder.layer.0.attention.output.dense")["options"]["block_rank"] == 2
    assert config.resolve("encoder.layer.0.output.dense")["options"]["block_rank"] == 1
    assert config.resolve("encoder.layer.0.intermediate.dense")["options"]["block_rank"] == 1
    assert "." not in pattern.replace("\\.", "")
    decoder = ["q_proj", "v_proj", "o_proj", "k_proj", "up_proj", "down_proj"]
    assert recipe.settings(decoder)["override_pattern"] == {"q_proj|v_proj|o_proj|k_proj": {"block_rank": 2}}
    assert recipe.settings(["up_proj"]) == recipe.options


def test_a_filling_recipe_spends_the_budget_evenly_on_its_roles(minilm):
    """Fourier on q and v: budget // 12 frequencies per layer, so a tenth of LoRA r=8's parameters leaves 4 unused."""
    config = surm.recommend(minilm, 7_372)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    assert adapter_parameters(model, config) == 12 * 614 == 7_368


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2])
@pytest.mark.parametrize("budget", [300, 1_000, 5_000, 50_000])
def test_decoder_recommendations_fit(build, budget):
    model = build()
    try:
        config = surm.recommend(model, budget)
    except ValueError as error:
        assert "is below the cheapest recommendation" in str(error)
        return
    assert adapter_parameters(model, config) <= budget


@pytest.mark.parametrize("build, attention", [(tiny_llama, ".self_attn."), (tiny_gpt2, ".attn.")])
def test_decoder_attention_roles_get_block_rank_2(build, attention):
    """On decoders the attention projections (Llama's q, k, v, o; GPT-2's fused c_attn and attn.c_proj) take rank 2
    and the MLP's rank 1, GPT-2's mlp.c_proj included although it shares attn.c_proj's last name."""
    model = build()
    wrapped = peft.get_peft_model(model, surm.recommend(model, 50_000))
    ranks = {name: rank for name, (_, rank) in monarch_shapes(wrapped).items()}
    assert ranks and {rank for name, rank in ranks.items() if attention in name} == {2}
    assert {rank for name, rank in ranks.items() if ".mlp." in name} == {1}
    assert len(ranks) == len([n for n in ranks if attention in n or ".mlp." in n])


def test_the_recommendation_is_deterministic(minilm):
    """The same model and budget give the same config, here and in a fresh interpreter."""
    here = {budget: surm.recommend(minilm, budget).to_dict() for budget in (7_372, 73_728)}
    again = {budget: surm.recommend(minilm, budget).to_dict() for budget in (7_372, 73_728)}
    assert here == again
    code = ("import json, surm, transformers; from surm.models import minilm_path; "
            "m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2); "
            "print(json.dumps({b: sorted(surm.recommend(m, b).target_modules) + [surm.recommend(m, b).structure] "
            "for b in (7372, 73728)}))")
    child = subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True, text=True,
                           timeout=300, check=True)
    assert json.loads(child.stdout.strip().splitlines()[-1]) == {
        str(b): sorted(c["target_modules"]) + [c["structure"]] for b, c in here.items()}


def test_a_recipe_whose_options_do_not_fit_the_layers_is_passed_over():
    """16 Monarch blocks need at least 16 inputs and outputs: on 8-channel layers the rule falls through to
    circulant, whatever the budget."""
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(8), Block(8)])
    recipe, targets = recommended_recipe(model, 10 ** 6)
    assert (recipe.family, targets) == ("circulant", ["conv_pw"])


def test_richest_recipe_first():
    assert RECIPES[-1].min_roles == 1  # the cheapest one always applies when any role fits


@pytest.mark.parametrize("budget", [0, -5, 2.5, "7372", True, None])
def test_a_budget_must_be_a_positive_integer(minilm, budget):
    with pytest.raises(ValueError, match="budget_params must be a positive integer"):
        surm.recommend(minilm, budget)


def test_a_budget_below_the_cheapest_recommendation(minilm):
    with pytest.raises(ValueError) as error:
        surm.recommend(minilm, 2_303)
    assert str(error.value) == ("budget_params=2,303 is below the cheapest recommendation (circulant on "
                                "attention.self.query: 2,304 parameters); give at least 2,304")


def test_a_model_without_numbered_blocks():
    with pytest.raises(ValueError, match="Linear has no linear layers inside numbered blocks"):
        surm.recommend(nn.Linear(8, 8), 1_000)


def test_counting_allocates_nothing():
    """Counting builds updates on the meta device: a huge layer costs no memory."""
    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(50_000, 50_000, device="meta")})])
    config = surm.recommend(model, 10 ** 6)
    assert config.target_modules == {"proj"} and torch.device("meta") == next(model.parameters()).device
