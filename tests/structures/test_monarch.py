"""Monarch: rank bound, and agreement with an explicit block-diagonal / permutation construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import surm
from surm.structures.monarch import FACTOR_MIN_TOKENS

from ..checks import assert_matches_dense



def more_reference(x: torch.Tensor, right: torch.Tensor, left: torch.Tensor, m: int) -> torch.Tensor:
    """MoRe's blockdiag_butterfly_multiply_reference, einops spelt out: x (b, n) -> (b, m)."""
    blocks, _, p = right.shape
    x = F.pad(x, (0, blocks * p - x.shape[-1]))
    out1 = torch.einsum("kqp,bkp->bkq", right, x.view(x.shape[0], blocks, p))
    out1 = out1.reshape(x.shape[0], -1)  # b (k q)
    out1 = out1.view(x.shape[0], -1, blocks).transpose(1, 2)  # b (r l) -> b l r
    out2 = torch.einsum("lsr,blr->bsl", left, out1)
    return out2.reshape(x.shape[0], -1)[:, :m]  # b s l -> b (s l)


def explicit_dense(right: torch.Tensor, left: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """P_out · blockdiag(L) · P_mid · blockdiag(R), each built entry by entry."""
    blocks, rank, p = right.shape
    s = left.shape[1]
    r_full = torch.zeros(blocks * rank, blocks * p, dtype=right.dtype)
    l_full = torch.zeros(blocks * s, blocks * rank, dtype=right.dtype)
    for k in range(blocks):
        r_full[k * rank : (k + 1) * rank, k * p : (k + 1) * p] = right[k]
        l_full[k * s : (k + 1) * s, k * rank : (k + 1) * rank] = left[k]
    p_mid = torch.zeros(blocks * rank, blocks * rank, dtype=right.dtype)
    for k in range(blocks):  # R's output (k, q) at k*rank+q is read as (r, l) at r*blocks+l, moved to l*rank+r
        for q in range(rank):
            flat = k * rank + q
            r_idx, l_idx = divmod(flat, blocks)
            p_mid[l_idx * rank + r_idx, flat] = 1
    p_out = torch.zeros(blocks * s, blocks * s, dtype=right.dtype)
    for l_idx in range(blocks):
        for s_idx in range(s):
            p_out[s_idx * blocks + l_idx, l_idx * s + s_idx] = 1
    return (p_out @ l_full @ p_mid @ r_full)[:m, :n]


SHAPES_AND_OPTIONS = [(8, 8, 2, 2), (12, 12, 4, 4), (10, 7, 3, 2), (5, 13, 2, 3), (384, 1536, 4, 4)]


@pytest.mark.parametrize(("m", "n", "nblocks", "block_rank"), SHAPES_AND_OPTIONS)
def test_matches_more_reference_and_explicit_construction(m, n, nblocks, block_rank):
    torch.manual_seed(0)
    module = surm.structure("monarch", m, n, nblocks=nblocks, block_rank=block_rank, init="random").double()
    assert module.right.shape == (nblocks, block_rank, math.ceil(n / nblocks))
    assert module.left.shape == (nblocks, math.ceil(m / nblocks), block_rank)
    x = torch.randn(5, n, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(module(x), more_reference(x, module.right, module.left, m), atol=1e-12)
        assert torch.allclose(module.dense(), explicit_dense(module.right, module.left, m, n), atol=1e-12)


@pytest.mark.parametrize(("m", "n", "nblocks", "block_rank"), SHAPES_AND_OPTIONS[:4] + [(16, 16, 4, 1), (24, 24, 2, 2)])
def test_rank_is_at_most_blocks_times_block_rank(m, n, nblocks, block_rank):
    torch.manual_seed(0)
    module = surm.structure("monarch", m, n, nblocks=nblocks, block_rank=block_rank, init="random").double()
    bound = min(nblocks * block_rank, m, n)
    rank = int(torch.linalg.matrix_rank(module.dense()))
    assert rank <= bound
    if m % nblocks == 0 and n % nblocks == 0:
        assert rank == bound  # a random Monarch reaches the bound (padding can cost rank in a partial block)


def test_too_many_blocks_names_the_valid_range():
    with pytest.raises(ValueError, match=r"nblocks=9 exceeds min\(out_features, in_features\)=8; valid: 1\.\.8"):
        surm.structure("monarch", 8, 20, nblocks=9)


@pytest.mark.parametrize(("m", "n", "nblocks", "block_rank"), SHAPES_AND_OPTIONS)
@pytest.mark.parametrize("tokens", [FACTOR_MIN_TOKENS - 1, FACTOR_MIN_TOKENS, 3 * FACTOR_MIN_TOKENS + 1])
def test_both_forms_match_the_dense_form_in_values_and_gradients(m, n, nblocks, block_rank, tokens):
    """Fewer than FACTOR_MIN_TOKENS tokens take the blocks, more the factors (N r_b <= 16 in every case here);
    either way y, dy/dx and dy/dparameters equal those of x M^T in float64, in a (2, tokens / 2, n) batch too."""
    torch.manual_seed(0)
    module = surm.structure("monarch", m, n, nblocks=nblocks, block_rank=block_rank, init="random").double()
    assert module.uses_factors(tokens) == (tokens >= FACTOR_MIN_TOKENS)
    shape = (2, tokens // 2, n) if tokens % 2 == 0 else (tokens, n)
    assert_matches_dense(module, torch.randn(*shape, dtype=torch.float64), atol=1e-12)


def test_factors_only_where_the_products_stay_thin():
    assert surm.structure("monarch", 64, 64, nblocks=4, block_rank=4).uses_factors(FACTOR_MIN_TOKENS)
    assert not surm.structure("monarch", 64, 64, nblocks=8, block_rank=4).uses_factors(10 * FACTOR_MIN_TOKENS)
    assert not surm.structure("monarch", 64, 64, nblocks=2, block_rank=2).uses_factors(FACTOR_MIN_TOKENS - 1)
    assert not surm.structure("monarch", 64, 64).uses_factors(0)  # an empty batch takes the blocks: no work at all
