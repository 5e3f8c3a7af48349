"""surm.structure(): names, options and the errors for bad input."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import surm
from surm.cli import build_parser
from surm.methods import default_learning_rate

FAMILIES = list(surm.STRUCTURES)


def test_the_seven_families_of_the_papers_are_registered():
    assert {"lowrank", "circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "ldr", "monarch"} <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_a_module_with_the_contract(name):
    module = surm.structure(name, 12, 8)
    assert isinstance(module, torch.nn.Module)
    assert (module.out_features, module.in_features) == (12, 8)
    assert module.dense().shape == (12, 8)
    assert module(torch.randn(8)).shape == (12,)
    assert "init" in surm.structure_options(name)


def test_unknown_structure_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown structure 'circulent'.*'circulant'"):
        surm.structure("circulent", 4, 4)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for structure 'circulant'.*parameterization"):
        surm.structure("circulant", 4, 4, rank=2)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_bad_sizes(name, size):
    with pytest.raises(ValueError, match="must be a positive integer"):
        surm.structure(name, size, 8)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        surm.structure(name, 8, size)


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_init(name):
    with pytest.raises(ValueError, match=r"init must be one of \('zero', 'random'\), got 'ones'"):
        surm.structure(name, 8, 8, init="ones")


@pytest.mark.parametrize("name", ["circulant", "toeplitz", "symmetric_toeplitz"])
def test_bad_parameterization(name):
    with pytest.raises(ValueError, match=r"parameterization must be one of \['plain', 'product'\], got 'sum'"):
        surm.structure(name, 8, 8, parameterization="sum")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lowrank", {"rank": 0}, "rank must be a positive integer, got 0"),
        ("ldr", {"displacement_rank": -1}, "displacement_rank must be a positive integer, got -1"),
        ("kronecker", {"terms": 0}, "terms must be a positive integer, got 0"),
        ("monarch", {"block_rank": 0}, "block_rank must be a positive integer, got 0"),
        ("monarch", {"nblocks": 0}, "nblocks must be a positive integer, got 0"),
    ],
)
def test_bad_counts(name, options, message):
    with pytest.raises(ValueError, match=message):
        surm.structure(name, 8, 8, **options)


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_input_size_is_named(name):
    module = surm.structure(name, 6, 8)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 8\), got \(3, 7\)"):
        module(torch.randn(3, 7))


# -- the family protocol: declarations from which config fields, flags, the search space and defaults derive ------


@pytest.mark.parametrize("name", FAMILIES)
def test_declared_options_are_the_constructor_keywords_with_their_defaults(name):
    family = surm.STRUCTURES[name]
    parameters = inspect.signature(family).parameters
    assert [o.name for o in family.options] == [p for p in parameters if p not in ("out_features", "in_features",
                                                                                     "init")]
    for option in family.options:
        assert parameters[option.name].default == option.default
        assert option.help and option.kind in (int, str, tuple)
    assert surm.structure_options(name) == (*(o.name for o in family.options), "init")
    assert family.default_lr > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_every_searched_value_builds_on_a_transformer_layer(name):
    """surm search tries these: each must build on MiniLM's square and rectangular layers."""
    for option, values in surm.structures.search_space(name).items():
        for value in values:
            for m, n in ((384, 384), (1536, 384), (384, 1536)):
                options = {} if value is None else {option: value}
                assert surm.structure(name, m, n, **options).num_parameters() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_options_reach_the_config_the_command_line_and_the_search(name):
    fields = {f.name: f for f in dataclasses.fields(surm.SurmConfig)}
    examples = {int: 2, str: None, tuple: (2, 2)}
    for option in surm.STRUCTURES[name].options:
        assert option.name in fields and fields[option.name].default is None
        assert name in fields[option.name].metadata["help"]
        value = option.choices[-1] if option.choices else examples[option.kind]
        args = build_parser().parse_args(["finetune", "--output", "x", f"--{option.flag}", option.format(value)])
        assert getattr(args, option.name) == value  # the flag exists and reads back what it was given
    assert default_learning_rate(name) == surm.STRUCTURES[name].default_lr


def test_a_family_whose_declarations_disagree_with_its_constructor_is_refused_at_registration():
    class Wrong(surm.structures.Circulant):
        options = (surm.structures.Option("parameterization", str, "product", "wrong default"),)

    with pytest.raises(TypeError, match="option 'parameterization' declares the default 'product', the constructor "
                                        "has 'plain'"):
        surm.structures.checked_registry({"wrong": Wrong})

    class Undeclared(surm.structures.Circulant):
        options = ()

    with pytest.raises(TypeError, match=r"declares the options \[\], but its constructor takes \['parameterization'\]"):
        surm.structures.checked_registry({"undeclared": Undeclared})

    class Clash(surm.structures.Circulant):
        options = (surm.structures.Option("parameterization", int, "plain", "an int elsewhere"),)

    with pytest.raises(TypeError, match="option 'parameterization' of family 'clash' is of kind int, another "
                                        "family's is of kind str"):
        surm.structures.checked_registry({"circulant": surm.structures.Circulant, "clash": Clash})
