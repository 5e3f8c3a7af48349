"""Option declarations (surm.structures.options) and the bounds on size options: a rank, a number of terms, a block
rank beyond max(out, in) adds nothing to M but memory, so the family refuses it before allocating."""

from __future__ import annotations

import pytest

import surm
from surm.structures import Option

from .cases import HUGE, assert_refused_quickly

#: (family, option, fixed options) of every size option bounded by max(out_features, in_features).
SIZE_OPTIONS = [("lowrank", "rank", {}), ("kronecker", "terms", {}), ("ldr", "displacement_rank", {}),
                ("monarch", "block_rank", {"nblocks": 4})]
SHAPES = [(16, 16), (8, 20), (20, 8), (5, 9)]


@pytest.mark.parametrize("family, option, fixed", SIZE_OPTIONS, ids=[f"{f}-{o}" for f, o, _ in SIZE_OPTIONS])
@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("excess", [1, HUGE])
def test_a_size_option_above_the_larger_side_is_refused_before_allocating(family, option, fixed, m, n, excess):
    limit = max(m, n)
    value = limit + 1 if excess == 1 else HUGE
    assert_refused_quickly(
        lambda: surm.structure(family, m, n, **fixed, **{option: value}),
        rf"{family} {option}={value} exceeds max\(out_features, in_features\)={limit}; valid: 1\.\.{limit}$",
    )


@pytest.mark.parametrize("family, option, fixed", SIZE_OPTIONS, ids=[f"{f}-{o}" for f, o, _ in SIZE_OPTIONS])
@pytest.mark.parametrize("m, n", SHAPES)
def test_a_size_option_up_to_the_larger_side_is_allowed(family, option, fixed, m, n):
    module = surm.structure(family, m, n, **fixed, **{option: max(m, n)})
    assert module.num_parameters() == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind, text, value", [(int, "8", 8), (str, "product", "product"), (tuple, "4,8", (4, 8))])
def test_parse_and_format_are_inverse(kind, text, value):
    option = Option("x_y", kind, None, "help")
    assert option.parse(text) == value and option.format(value) == text and option.flag == "x-y"


@pytest.mark.parametrize("kind, text, message", [(int, "four", "--x-y takes an integer, got 'four'"),
                                                 (tuple, "4", "--x-y takes two integers 'm1,n1', got '4'"),
                                                 (tuple, "4,8,2", "--x-y takes two integers 'm1,n1', got '4,8,2'")])
def test_parse_names_the_flag_and_the_form(kind, text, message):
    with pytest.raises(ValueError, match=message):
        Option("x_y", kind, None, "help").parse(text)


def test_an_option_of_another_kind_cannot_be_declared():
    with pytest.raises(TypeError, match="kind must be one of"):
        Option("x", float, 1.0, "help")
