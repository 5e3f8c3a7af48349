"""SurmConfig: validation of every field, override_pattern, module selection and trainable-parameter counts."""

from __future__ import annotations

import math
import re

import peft
import pytest
import torch

import surm
from surm.peft.config import OVERRIDABLE

from .common import FAMILIES, FAMILY_MODE_IDS, FAMILY_MODES, adapter_parameters, surm_layers, tiny_peft
from .helpers import TINY_TARGETS, make_tiny

VALID_STRUCTURES = re.escape(str(sorted(surm.STRUCTURES)))

# (keyword arguments, regex the ValueError message must match)
INVALID_CONFIGS = [
    ({"structure": "circulent"}, rf"unknown structure 'circulent'; valid structures: {VALID_STRUCTURES}"),
    ({"structure": None}, rf"unknown structure None; valid structures: {VALID_STRUCTURES}"),
    ({"structure": "circulant", "rank": 4}, r"\['rank'\] do not apply to structure 'circulant'.*\['parameterization'\]"),
    (
        {"structure": "monarch", "parameterization": "product"},
        r"\['parameterization'\] do not apply to structure 'monarch'.*\['nblocks', 'block_rank'\]",
    ),
    ({"structure": "lowrank", "nblocks": 2}, r"\['nblocks'\] do not apply to structure 'lowrank'.*\['rank'\]"),
    ({"structure": "toeplitz", "factors": [2, 2]}, r"\['factors'\] do not apply to structure 'toeplitz'"),
    ({"structure": "ldr", "terms": 2}, r"\['terms'\] do not apply to structure 'ldr'.*\['displacement_rank'\]"),
    ({"structure": "kronecker", "block_rank": 2}, r"\['block_rank'\] do not apply to structure 'kronecker'"),
    ({"mode": "delt"}, r"mode must be one of \('delta', 'adapter'\), got 'delt'"),
    ({"mode": None}, r"mode must be one of \('delta', 'adapter'\), got None"),
    ({"bottleneck": 4}, r"bottleneck=4 needs mode='adapter', got mode='delta'"),
    ({"mode": "adapter", "bottleneck": 0}, r"bottleneck must be a positive integer or None, got 0"),
    ({"mode": "adapter", "bottleneck": -3}, r"bottleneck must be a positive integer or None, got -3"),
    ({"mode": "adapter", "bottleneck": True}, r"bottleneck must be a positive integer or None, got True"),
    ({"mode": "adapter", "bottleneck": 2.5}, r"bottleneck must be a positive integer or None, got 2.5"),
    ({"activation": "relu"}, r"activation must be one of \('gelu', 'tanh', 'silu', 'identity'\), got 'relu'"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\), got -0.1"),
    ({"alpha": math.nan}, r"alpha must be a finite number, got nan"),
    ({"alpha": math.inf}, r"alpha must be a finite number, got inf"),
    ({"alpha": "1"}, r"alpha must be a finite number, got '1'"),
    ({"alpha": True}, r"alpha must be a finite number, got True"),
    ({"init_weights": "yes"}, r"init_weights must be True or False, got 'yes'"),
    ({"mode": "adapter", "adapter_bias": "no"}, r"adapter_bias must be True or False, got 'no'"),
    ({"adapter_bias": False}, r"adapter_bias=False needs mode='adapter' \(delta mode has no adapter bias\), got "
                              r"mode='delta'"),
    ({"target_modules": r".*\.up", "layers_to_transform": [0]}, r"layers_to_transform cannot be used when target_modules is a regex"),
    ({"override_pattern": [("up", {})]}, r"override_pattern must be a dict, got list"),
    ({"override_pattern": {"up": "monarch"}}, r"override_pattern\['up'\] must be a dict, got 'monarch'"),
    # a pattern that also matches the empty name must not be applied before it is validated
    ({"override_pattern": {".*": "monarch"}}, r"override_pattern\['\.\*'\] must be a dict, got 'monarch'"),
    (
        {"override_pattern": {"up": {"structur": "monarch"}}},
        r"override_pattern\['up'\] has unknown key\(s\) \['structur'\]; valid: \['structure', 'rank',",
    ),
    ({"override_pattern": {"up[": {"structure": "monarch"}}}, r"override_pattern key 'up\[' is not a valid regex"),
    ({"override_pattern": {"(up": {"alpha": 2.0}}}, r"override_pattern key '\(up' is not a valid regex"),
    (
        {"override_pattern": {"up": {"structure": "nope"}}},
        rf"override_pattern\['up'\]: unknown structure 'nope'; valid structures: {VALID_STRUCTURES}",
    ),
    (
        {"structure": "circulant", "override_pattern": {"up": {"rank": 3}}},
        r"override_pattern\['up'\]: option\(s\) \['rank'\] do not apply to structure 'circulant'",
    ),
    (
        {"structure": "lowrank", "override_pattern": {"up": {"structure": "monarch", "rank": 2}}},
        r"override_pattern\['up'\]: option\(s\) \['rank'\] do not apply to structure 'monarch'",
    ),
    ({"override_pattern": {"up": {"bottleneck": 3}}}, r"override_pattern\['up'\] sets bottleneck=3, which needs mode='adapter'"),
    ({"mode": "adapter", "override_pattern": {"up": {"bottleneck": 0}}}, r"bottleneck must be a positive integer or None, got 0"),
    ({"override_pattern": {"up": {"alpha": "x"}}}, r"override_pattern\['up'\]: alpha must be a finite number, got 'x'"),
]

# Numeric fields of the wrong type (or not a number at all): (keyword arguments, field, the message's regex).
DROPOUT = r"^dropout must be a number in \[0, 1\), got "
INT = "must be a positive integer or None, got "
PAIR = r"factors must be None or a pair \[m1, n1\] of positive integers, got "
UP = r"^override_pattern\['up'\]: "
WRONG_TYPES = [
    ({"dropout": "0.1"}, "dropout", rf"{DROPOUT}'0\.1'$"),
    ({"dropout": None}, "dropout", rf"{DROPOUT}None$"),
    ({"dropout": True}, "dropout", rf"{DROPOUT}True$"),
    ({"dropout": [0.1]}, "dropout", rf"{DROPOUT}\[0\.1\]$"),
    ({"dropout": math.nan}, "dropout", rf"{DROPOUT}nan$"),
    ({"dropout": math.inf}, "dropout", rf"{DROPOUT}inf$"),
    ({"dropout": -math.inf}, "dropout", rf"{DROPOUT}-inf$"),
    ({"alpha": None}, "alpha", r"^SurmConfig: alpha must be a finite number, got None$"),
    ({"alpha": [2.0]}, "alpha", r"^SurmConfig: alpha must be a finite number, got \[2\.0\]$"),
    ({"mode": "adapter", "bottleneck": "4"}, "bottleneck", rf"^SurmConfig: bottleneck {INT}'4'$"),
    ({"mode": "adapter", "bottleneck": 4.0}, "bottleneck", rf"^SurmConfig: bottleneck {INT}4\.0$"),
    ({"structure": "lowrank", "rank": "8"}, "rank", rf"^SurmConfig: rank {INT}'8'$"),
    ({"structure": "lowrank", "rank": 8.0}, "rank", rf"^SurmConfig: rank {INT}8\.0$"),
    ({"structure": "lowrank", "rank": True}, "rank", rf"^SurmConfig: rank {INT}True$"),
    ({"structure": "kronecker", "rank": [2]}, "rank", rf"^SurmConfig: rank {INT}\[2\]$"),
    ({"structure": "monarch", "nblocks": "4"}, "nblocks", rf"^SurmConfig: nblocks {INT}'4'$"),
    ({"structure": "monarch", "block_rank": 2.5}, "block_rank", rf"^SurmConfig: block_rank {INT}2\.5$"),
    ({"structure": "kronecker", "terms": "2"}, "terms", rf"^SurmConfig: terms {INT}'2'$"),
    ({"structure": "ldr", "displacement_rank": 1.0}, "displacement_rank", rf"displacement_rank {INT}1\.0$"),
    ({"structure": "kronecker", "factors": "3x4"}, "factors", rf"^SurmConfig: {PAIR}'3x4'$"),
    ({"structure": "kronecker", "factors": 3}, "factors", rf"^SurmConfig: {PAIR}3$"),
    ({"structure": "kronecker", "factors": [3]}, "factors", rf"^SurmConfig: {PAIR}\[3\]$"),
    ({"structure": "kronecker", "factors": [3, "4"]}, "factors", rf"^SurmConfig: {PAIR}\[3, '4'\]$"),
    ({"structure": "kronecker", "factors": (3.0, 4)}, "factors", rf"^SurmConfig: {PAIR}\[3\.0, 4\]$"),
    ({"structure": "lowrank", "override_pattern": {"up": {"rank": "2"}}}, "rank", rf"{UP}rank {INT}'2'$"),
    ({"override_pattern": {"up": {"structure": "monarch", "nblocks": 2.0}}}, "nblocks", rf"{UP}nblocks {INT}2\.0$"),
    ({"override_pattern": {"up": {"structure": "kronecker", "factors": [2]}}}, "factors", rf"{UP}{PAIR}\[2\]$"),
    ({"mode": "adapter", "override_pattern": {"up": {"bottleneck": "3"}}}, "bottleneck", rf"{UP}bottleneck {INT}'3'$"),
    ({"structure": "circulant", "parameterization": "prod"}, "parameterization",
     r"^SurmConfig: parameterization must be one of \['plain', 'product'\], got 'prod'$"),
    ({"override_pattern": {"up": {"structure": "toeplitz", "parameterization": 1}}}, "parameterization",
     rf"{UP}parameterization must be one of \['plain', 'product'\], got 1$"),
]


@pytest.mark.parametrize("kwargs, message", INVALID_CONFIGS, ids=[str(i) for i in range(len(INVALID_CONFIGS))])
def test_invalid_config_raises_a_value_error_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        surm.SurmConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field, message", WRONG_TYPES, ids=[f"{i}-{c[1]}" for i, c in enumerate(WRONG_TYPES)])
def test_numeric_fields_of_the_wrong_type_raise_a_one_line_value_error(kwargs, field, message):
    """Not a TypeError from a comparison deep inside: a ValueError naming the field, the value and what is valid."""
    with pytest.raises(ValueError, match=message) as error:
        surm.SurmConfig(**kwargs)
    assert field in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("dropout", [0, 0.0, 0.5, 0.999])
def test_valid_dropout_values_are_accepted(dropout):
    assert surm.SurmConfig(dropout=dropout).dropout == dropout


def test_unknown_structure_lists_every_family():
    with pytest.raises(ValueError) as error:
        surm.SurmConfig(structure="circulent")
    for family in FAMILIES:
        assert repr(family) in str(error.value)


def test_overridable_keys_are_listed_in_the_error():
    with pytest.raises(ValueError) as error:
        surm.SurmConfig(override_pattern={"up": {"mode": "adapter"}})
    for key in OVERRIDABLE:
        assert repr(key) in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"structure": "lowrank", "rank": 0}, r"'encoder\.layers\.0\.mix'.*rank must be a positive integer, got 0"),
        ({"structure": "monarch", "nblocks": 13}, r"monarch nblocks=13 exceeds min\(out_features, in_features\)=12; valid: 1\.\.12"),
        ({"structure": "kronecker", "factors": [5, 5]}, r"kronecker factors=\(5, 5\): 5 does not divide out_features=12"),
        ({"structure": "ldr", "displacement_rank": -1}, r"displacement_rank must be a positive integer, got -1"),
        ({"structure": "lowrank", "rank": 13}, r"lowrank rank=13 exceeds max\(out_features, .*=12; valid: 1\.\.12$"),
        ({"structure": "monarch", "block_rank": 10**8}, r"monarch block_rank=100000000 exceeds .*=12; valid: 1\.\.12"),
        ({"mode": "adapter", "bottleneck": 13}, r"bottleneck must be None or an integer in 1\.\.12 .*, got 13$"),
        ({"mode": "adapter", "bottleneck": 10**9}, r"bottleneck must be None or an integer in 1\.\.12 .*, got 10+$"),
    ],
)
def test_option_values_that_do_not_fit_a_layer_fail_at_injection_naming_the_module(kwargs, message):
    config = surm.SurmConfig(target_modules=["mix"], **kwargs)
    with pytest.raises(ValueError, match=message) as error:
        peft.get_peft_model(make_tiny(), config)
    assert "cannot add surm adapter 'default'" in str(error.value)


def test_valid_config_defaults():
    config = surm.SurmConfig()
    assert config.peft_type == peft.PeftType.SURM
    assert (config.structure, config.mode, config.alpha, config.bottleneck) == ("circulant", "delta", 1.0, None)
    assert config.init_weights is True
    assert config.resolve("encoder.layer.0.attention.self.query") == {
        "structure": "circulant",
        "options": {},
        "alpha": 1.0,
        "bottleneck": None,
    }


def test_list_fields_are_normalised():
    config = surm.SurmConfig(structure="kronecker", factors=(3, 4), target_modules=["a", "b"], exclude_modules=["c"])
    assert config.factors == [3, 4]
    assert config.target_modules == {"a", "b"}
    assert config.exclude_modules == {"c"}
    assert config.resolve("x")["options"] == {"factors": (3, 4)}


# -- override_pattern -----------------------------------------------------------------------------------------


def test_resolve_applies_the_first_matching_pattern_at_a_name_boundary():
    config = surm.SurmConfig(
        structure="circulant",
        override_pattern={
            r"layers\.1\.up": {"structure": "monarch", "nblocks": 2},
            "up|down": {"structure": "lowrank", "rank": 2, "alpha": 0.5},
            "p": {"structure": "toeplitz"},
        },
    )
    assert config.resolve("encoder.layers.1.up")["structure"] == "monarch"
    assert config.resolve("encoder.layers.1.up")["options"] == {"nblocks": 2}
    # alternation applies to the whole pattern, with or without a prefix
    for name in ("encoder.layers.0.up", "encoder.layers.0.down", "up", "down"):
        assert config.resolve(name) == {"structure": "lowrank", "options": {"rank": 2}, "alpha": 0.5, "bottleneck": None}
    # "p" matches a whole name segment only, never the end of "up" or "mix"
    assert config.resolve("encoder.layers.0.mix")["structure"] == "circulant"
    assert config.resolve("encoder.p")["structure"] == "toeplitz"


def test_an_override_that_changes_the_family_does_not_inherit_the_family_options():
    config = surm.SurmConfig(
        structure="lowrank",
        rank=4,
        override_pattern={
            "value": {"structure": "monarch", "nblocks": 2},
            "key": {"structure": "kronecker"},  # lowrank's rank=4 is not kronecker's rank (SURM's r)
            "query": {"alpha": 2.0},  # same family: the config's options still apply
            "dense": {"structure": "lowrank", "rank": 2},
        },
    )
    assert config.resolve("attention.self.value")["options"] == {"nblocks": 2}
    assert config.resolve("attention.self.key") == {"structure": "kronecker", "options": {}, "alpha": 1.0, "bottleneck": None}
    assert config.resolve("attention.self.query") == {"structure": "lowrank", "options": {"rank": 4}, "alpha": 2.0, "bottleneck": None}
    assert config.resolve("attention.output.dense")["options"] == {"rank": 2}
    assert config.resolve("intermediate.other")["options"] == {"rank": 4}


def test_override_pattern_gives_each_layer_its_own_structure_and_size(x):
    config = surm.SurmConfig(
        structure="circulant",
        target_modules=list(TINY_TARGETS),
        init_weights=False,
        override_pattern={
            r"layers\.1\.up": {"structure": "monarch", "nblocks": 2, "block_rank": 3},
            "down": {"structure": "lowrank", "rank": 2, "alpha": 0.5},
            r"layers\.0\.mix": {"structure": "kronecker", "factors": [3, 4]},
        },
    )
    model = peft.get_peft_model(make_tiny(), config)
    layers = surm_layers(model)
    expected = {  # name: (family class, alpha, closed-form parameter count)
        "encoder.layers.0.mix": ("Kronecker", 1.0, 3 * 4 + 4 * 3),
        "encoder.layers.1.mix": ("Circulant", 1.0, 12),
        "encoder.layers.0.up": ("Circulant", 1.0, 18),
        "encoder.layers.1.up": ("Monarch", 1.0, 3 * (2 * 6 + 2 * 9)),
        "encoder.layers.0.down": ("LowRank", 0.5, 2 * (18 + 12)),
        "encoder.layers.1.down": ("LowRank", 0.5, 2 * (18 + 12)),
    }
    assert set(layers) == set(expected)
    for name, (family, alpha, count) in expected.items():
        delta = layers[name].surm_delta["default"]
        assert type(delta.matrix).__name__ == family, name
        assert delta.alpha == alpha, name
        assert delta.num_parameters() == count, name
        assert sum(p.numel() for p in delta.parameters()) == count, name
    assert layers["encoder.layers.0.mix"].surm_delta["default"].matrix.factors == (3, 4)
    assert layers["encoder.layers.1.up"].surm_delta["default"].matrix.nblocks == 2
    assert layers["encoder.layers.1.up"].surm_delta["default"].matrix.block_rank == 3
    # alpha scales the delta: h = W0 x + b + 0.5 * M x on the lowrank layers
    down = layers["encoder.layers.0.down"]
    h = torch.randn(2, 18)
    with torch.no_grad():
        expected_out = down.base_layer(h) + 0.5 * h @ down.surm_delta["default"].matrix.dense().T
        torch.testing.assert_close(down(h), expected_out, atol=1e-5, rtol=1e-5)
    assert model.get_nb_trainable_parameters()[0] == sum(c for _, _, c in expected.values())


def test_override_pattern_sets_the_bottleneck_per_layer():
    config = surm.SurmConfig(
        structure="circulant",
        mode="adapter",
        target_modules=list(TINY_TARGETS),
        override_pattern={"up": {"bottleneck": 2, "structure": "monarch", "nblocks": 2}},
    )
    layers = surm_layers(peft.get_peft_model(make_tiny(), config))
    for name, layer in layers.items():
        adapter = layer.surm_adapter["default"]
        if name.endswith("up"):
            assert adapter.bottleneck == 2
            assert type(adapter.down).__name__ == type(adapter.up).__name__ == "Monarch"
            assert (adapter.down.out_features, adapter.down.in_features) == (2, 18)
            assert (adapter.up.out_features, adapter.up.in_features) == (18, 2)
        else:
            assert adapter.bottleneck is None
            assert type(adapter.map).__name__ == "Circulant"


# -- which modules get adapted ---------------------------------------------------------------------------------

ALL_TINY_LINEARS = {f"encoder.layers.{i}.{n}" for i in range(2) for n in TINY_TARGETS}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"target_modules": ["up", "down"]}, {f"encoder.layers.{i}.{n}" for i in range(2) for n in ("up", "down")}),
        ({"target_modules": r".*layers\.1\.(mix|up)"}, {"encoder.layers.1.mix", "encoder.layers.1.up"}),
        ({"target_modules": "all-linear"}, ALL_TINY_LINEARS | {"classifier"}),
        ({"target_modules": list(TINY_TARGETS), "exclude_modules": ["encoder.layers.0.up"]}, ALL_TINY_LINEARS - {"encoder.layers.0.up"}),
        ({"target_modules": list(TINY_TARGETS), "exclude_modules": r".*\.mix"}, ALL_TINY_LINEARS - {"encoder.layers.0.mix", "encoder.layers.1.mix"}),
        ({"target_modules": ["mix", "up"], "layers_to_transform": [1]}, {"encoder.layers.1.mix", "encoder.layers.1.up"}),
        ({"target_modules": ["mix", "up"], "layers_to_transform": 0}, {"encoder.layers.0.mix", "encoder.layers.0.up"}),
        (
            {"target_modules": ["down"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
            {"encoder.layers.0.down", "encoder.layers.1.down"},
        ),
    ],
    ids=["list", "regex", "all-linear", "exclude-list", "exclude-regex", "layers-list", "layers-int", "layers-pattern"],
)
def test_target_selection(kwargs, expected):
    model = peft.get_peft_model(make_tiny(), surm.SurmConfig(**kwargs))
    assert set(surm_layers(model)) == expected
    for name, module in make_tiny().named_modules():
        if isinstance(module, torch.nn.Linear) and name not in expected:
            assert isinstance(model.get_submodule(f"base_model.model.{name}"), torch.nn.Linear), name


def test_modules_to_save_trains_a_copy_of_the_classifier():
    model = tiny_peft("circulant", modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.modules_to_save.default.bias" in trainable
    assert not any("original_module" in n for n in trainable)
    assert trainable - set(adapter_parameters(model)) == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }


@pytest.mark.parametrize("mode", ["delta", "adapter"])
def test_no_default_target_modules_for_an_unknown_model_type(mode):
    with pytest.raises(ValueError, match=rf"SurmConfig\(mode='{mode}'\) has no default target_modules for model_type="):
        peft.get_peft_model(make_tiny(), surm.SurmConfig(mode=mode))


# -- trainable parameter counts -----------------------------------------------------------------------------------

# Closed formulas written out for TinyNet (2 blocks: mix 12x12, up 18x12, down 12x18) at the families' defaults.
HAND_COUNTS = {
    ("circulant", "delta", None): 2 * (12 + 18 + 18),  # max(m, n)
    ("lowrank", "delta", None): 2 * 8 * ((12 + 12) + (18 + 12) + (12 + 18)),  # r (m + n), r = 8
    ("toeplitz", "delta", None): 2 * ((12 + 12 - 1) + (18 + 12 - 1) + (12 + 18 - 1)),  # m + n - 1
    ("monarch", "delta", None): 2 * (4 * 4 * (3 + 3) + 4 * 4 * (3 + 5) + 4 * 4 * (5 + 3)),  # r_b N (p + s)
    ("ldr", "delta", None): 2 * 2 * (12 + 18 + 18),  # 2 r N, r = 1
    ("circulant", "adapter", None): 2 * ((12 + 12) + (18 + 18) + (12 + 12)),  # d x d map + bias d
    ("circulant", "adapter", 4): 2 * ((12 + 12) + (18 + 18) + (12 + 12)),  # D (4 x d) + U (d x 4): d + d
}


@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_trainable_parameters_are_the_structure_formulas_plus_modules_to_save(family, mode, bottleneck, capsys):
    model = tiny_peft(family, mode, bottleneck, modules_to_save=["classifier"])
    formulas = 0
    for layer in surm_layers(model).values():
        module = layer.surm_delta["default"] if mode == "delta" else layer.surm_adapter["default"]
        assert sum(p.numel() for p in module.parameters()) == module.num_parameters()
        formulas += module.num_parameters()
    classifier = 12 * 3 + 3
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == formulas + classifier
    assert sum(p.numel() for p in adapter_parameters(model).values()) == formulas
    if (family, mode, bottleneck) in HAND_COUNTS:
        assert formulas == HAND_COUNTS[(family, mode, bottleneck)]
    base_total = sum(p.numel() for p in make_tiny().parameters())
    assert total == base_total + formulas + classifier  # PEFT counts the trained copy of the classifier too
    capsys.readouterr()
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert re.search(rf"trainable params: {trainable:,} \|\| all params: {total:,}", printed), printed


def test_an_adapter_without_its_bias_has_only_the_map_parameters():
    model = tiny_peft("circulant", "adapter", None, adapter_bias=False)
    adapters = [layer.surm_adapter["default"] for layer in surm_layers(model).values()]
    assert all(adapter.bias is None for adapter in adapters)
    assert sum(adapter.num_parameters() for adapter in adapters) == 2 * (12 + 18 + 12)  # max(m, n) per d x d map
    assert sum(p.numel() for p in adapter_parameters(model).values()) == 2 * (12 + 18 + 12)
    assert not any(name.endswith("bias") for name in adapter_parameters(model))


# -- serialisation ---------------------------------------------------------------------------------------------


def test_config_round_trips_through_json(tmp_path):
    config = surm.SurmConfig(
        structure="kronecker",
        factors=[3, 4],
        terms=2,
        mode="adapter",
        bottleneck=6,
        activation="tanh",
        alpha=0.25,
        dropout=0.1,
        target_modules=["mix", "up"],
        exclude_modules=["encoder.layers.0.mix"],
        modules_to_save=["classifier"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        init_weights=False,
        override_pattern={"up": {"structure": "monarch", "nblocks": 2, "bottleneck": 3}},
    )
    config.save_pretrained(tmp_path)
    loaded = surm.SurmConfig.from_pretrained(tmp_path)
    assert type(loaded) is surm.SurmConfig
    for name in (
        "structure", "factors", "terms", "mode", "bottleneck", "activation", "alpha", "dropout", "target_modules",
        "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "init_weights",
        "override_pattern", "peft_type",
    ):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.resolve("encoder.layers.0.up") == config.resolve("encoder.layers.0.up")
