"""surm.structure(): names, options and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

import surm

FAMILIES = ["lowrank", "circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "ldr", "monarch"]


def test_all_seven_families_are_registered():
    assert sorted(surm.STRUCTURES) == sorted(FAMILIES)


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
    with pytest.raises(ValueError, match=r"parameterization must be 'plain' or 'product', got 'sum'"):
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
