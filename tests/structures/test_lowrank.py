"""Low rank: M = B A with rank at most r."""

from __future__ import annotations

import pytest
import torch

import surm

from .cases import HUGE, assert_refused_quickly


def test_dense_is_b_times_a_with_rank_r():
    torch.manual_seed(0)
    module = surm.structure("lowrank", 12, 9, rank=3, init="random").double()
    assert torch.equal(module.dense(), module.up @ module.down)
    assert int(torch.linalg.matrix_rank(module.dense())) == 3


def test_zero_init_is_loras():
    module = surm.structure("lowrank", 12, 9, rank=3)
    assert torch.count_nonzero(module.up) == 0
    assert module.down.abs().max() <= 1 / 9**0.5


@pytest.mark.parametrize(("m", "n", "rank"), [(16, 16, HUGE), (16, 16, 17), (4, 12, 13), (12, 4, 13)])
def test_rank_above_the_larger_side_is_refused_before_allocating(m, n, rank):
    limit = max(m, n)
    assert_refused_quickly(
        lambda: surm.structure("lowrank", m, n, rank=rank),
        rf"lowrank rank={rank} exceeds max\(out_features, in_features\)={limit}; valid: 1\.\.{limit}$",
    )


def test_rank_up_to_the_larger_side_is_allowed():
    assert surm.structure("lowrank", 4, 12, rank=12).num_parameters() == 12 * 16  # e.g. a bottleneck adapter's map
    assert surm.structure("lowrank", 4, 12, rank=8).rank == 8
