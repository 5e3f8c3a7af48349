"""Low rank: M = B A with rank at most r."""

from __future__ import annotations

import torch

import surm



def test_dense_is_b_times_a_with_rank_r():
    torch.manual_seed(0)
    module = surm.structure("lowrank", 12, 9, rank=3, init="random").double()
    assert torch.equal(module.dense(), module.up @ module.down)
    assert int(torch.linalg.matrix_rank(module.dense())) == 3


def test_zero_init_is_loras():
    module = surm.structure("lowrank", 12, 9, rank=3)
    assert torch.count_nonzero(module.up) == 0
    assert module.down.abs().max() <= 1 / 9**0.5
