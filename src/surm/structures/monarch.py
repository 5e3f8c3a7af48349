"""Monarch matrices (MoRe): block-diagonal, stride permutation, block-diagonal; two batched matmuls."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._reuse import ParameterCache, reusable
from .base import Cost, Init, StructuredMatrix, cast, compute_dtype, kaiming_uniform_, operator_calls, thin_flops
from ..validation import require_positive_int
from .options import Option, require_size_option


#: Largest N r_b at which the factor form is used: its products then have inner size <= 16, which runs near the rate
#: of LoRA's rank-16 products (see :data:`~surm.structures.base.THIN_DIMENSION`). Measured on the reference CPU,
#: forward and backward of 256 tokens: 4 x 4 blocks at 5632 x 2048 take 2.9 ms as factors and 5.5 ms as blocks,
#: at 1536 x 384 with 2048 tokens 5.5 and 15.7 ms; 8 x 8 blocks (N r_b = 64) are a tie, 16 x 8 lose as factors.
FACTOR_RANK_LIMIT = 16
#: Fewest tokens of a call for the factor form: with one to a few tokens (generation) building L' and R' costs more
#: than the products (at 5632 x 2048, one token: 0.16 ms as factors, 0.06 ms as blocks; the two tie near 16-64).
FACTOR_MIN_TOKENS = 64


class Monarch(StructuredMatrix):
    """M = P_out · blockdiag(L_1..L_N) · P_mid · blockdiag(R_1..R_N), truncated to (m, n) (Tan et al. 2024, MoRe).

    R_j in R^{r_b x p} and L_j in R^{s x r_b} with N = ``nblocks``, r_b = ``block_rank``,
    p = ceil(n / N), s = ceil(m / N). x is zero-padded to N p, and of the N s outputs the first m are
    kept. P_mid is the stride permutation einops ``(k r) -> (r k)`` on the N r_b intermediate values
    (block l of L reads entry l of every block of R), P_out is ``(l s) -> (s l)``. rank(M) <=
    min(N r_b, m, n): at the parameter count of LoRA rank r_b it can reach rank N r_b.

    Applied in one of two forms with the same values. *Blocks*: two ``bmm`` calls over the N blocks (r_b (n + m)
    multiply-adds per token) with the permutations as copies. *Factors*: M = L' R' with R' = blockdiag(R_j)
    (N r_b x n) and L' = P_out blockdiag(L_l) P_mid (m x N r_b), the two matrices :meth:`dense` multiplies; x R'^T
    L'^T is then two plain products of inner size n and N r_b, the shape of a LoRA of rank N r_b, N times the
    multiply-adds of the blocks but no thin batched products and no permutation copies. The factors are used when
    N r_b <= :data:`FACTOR_RANK_LIMIT` and a call has at least :data:`FACTOR_MIN_TOKENS` tokens (below that,
    building L' and R' costs more than it saves); the blocks otherwise. A call that records no gradient in eval mode
    (generation) reuses L' and R' from the previous such call while the parameters are unchanged (see
    :mod:`~surm.structures._reuse`; they hold N times the parameters, the size of a LoRA of rank N r_b), so it
    takes the factor form with any number of tokens when N r_b <= :data:`FACTOR_RANK_LIMIT`.

    Parameters: ``r_b (N p + N s)``, i.e. r_b (n + m) when N divides both. Init ``"zero"`` (MoRe's): L = 0, R
    Kaiming-uniform per block.

    Args:
        out_features: m.
        in_features: n.
        nblocks: N, 1 <= N <= min(m, n).
        block_rank: r_b, 1 <= r_b <= max(m, n).
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``nblocks`` is outside [1, min(m, n)] or ``block_rank`` outside [1, max(m, n)] (checked
            before allocating).
    """

    options = (
        Option("nblocks", int, 4, "N, the number of blocks", search=(2, 4, 8, 16)),
        Option("block_rank", int, 4, "r_b, the rank of each block", search=(1, 2, 4, 8)),
    )
    default_lr = 1e-2

    def __init__(
        self, out_features: int, in_features: int, nblocks: int = 4, block_rank: int = 4, init: Init = "zero"
    ) -> None:
        super().__init__(out_features, in_features, init)
        require_positive_int("nblocks", nblocks)
        limit = min(out_features, in_features)
        if nblocks > limit:
            raise ValueError(
                f"monarch nblocks={nblocks} exceeds min(out_features, in_features)={limit}; valid: 1..{limit}"
            )
        self.nblocks = nblocks
        self.block_rank = require_size_option("monarch", "block_rank", block_rank, out_features, in_features)
        self.block_in = math.ceil(in_features / nblocks)  # p
        self.block_out = math.ceil(out_features / nblocks)  # s
        self.right = nn.Parameter(torch.empty(nblocks, block_rank, self.block_in))  # R_j
        self.left = nn.Parameter(torch.empty(nblocks, self.block_out, block_rank))  # L_j
        self._factor_cache: ParameterCache[tuple[Tensor, Tensor]] = ParameterCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.right, self.block_in)
        if self.init == "random":
            kaiming_uniform_(self.left, self.block_rank)
        else:
            with torch.no_grad():
                self.left.zero_()

    def uses_factors(self, tokens: int, reused: bool = False) -> bool:
        """Whether a call on ``tokens`` rows applies the factor form (see the class docstring); ``reused``: the call
        may take L' and R' from the cache (then the token count does not matter)."""
        return self.nblocks * self.block_rank <= FACTOR_RANK_LIMIT and (reused or tokens >= FACTOR_MIN_TOKENS)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        dtype = compute_dtype(x, self.right)
        h = cast(x, dtype)
        params = (self.right, self.left)
        reused = reusable(x, params, self.training)
        if self.uses_factors(x.numel() // self.in_features, reused):
            if reused:
                left, right = self._factor_cache.get(params, dtype, lambda: self.factors(dtype))
            else:
                left, right = self.factors(dtype)
            y = F.linear(F.linear(h, right), left)
        else:
            y = self._apply_blocks(h)
        return cast(y, x.dtype)

    def _apply_blocks(self, x: Tensor) -> Tensor:
        """M x by two ``bmm`` over the blocks, the permutations as reshapes (the blocks form)."""
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        if nblocks * p != self.in_features:  # pad only when needed: the copy would be saved for backward
            h = F.pad(h, (0, nblocks * p - self.in_features))
        batch = h.shape[0]
        right = cast(self.right, x.dtype).transpose(1, 2)
        h = torch.bmm(h.view(batch, nblocks, p).transpose(0, 1), right)  # (N, b, r_b)
        # P_mid: the flat (k r) layout read as (r k); block l of L takes entry l of every R block.
        h = h.transpose(0, 1).reshape(batch, rank, nblocks).permute(2, 0, 1)  # (N, b, r_b)
        h = torch.bmm(h, cast(self.left, x.dtype).transpose(1, 2))  # (N, b, s)
        y = h.permute(1, 2, 0).reshape(batch, s * nblocks)  # P_out: (l s) -> (s l)
        return y[:, : self.out_features].reshape(*lead, self.out_features)

    def factors(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(L', R'), of shapes (m, N r_b) and (N r_b, n), with M = L' R' (in ``dtype``, default the parameters').

        Entry (t N + l, j p + q) of P_out L P_mid R is sum_a L_l[t, a] R_j[r, q] over the a with a N + l = j r_b + r
        (the P_mid reading), so R' = blockdiag(R_j) and L' holds L_l[t, a] at row t N + l, column a N + l. Both are
        built with an identity factor, not a loop over blocks.
        """
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        right, left = self.right, self.left
        if dtype is not None:
            right, left = cast(right, dtype), cast(left, dtype)
        eye = torch.eye(nblocks, dtype=right.dtype, device=right.device)
        right = torch.einsum("jrq,jk->jrkq", right, eye).reshape(nblocks * rank, nblocks * p)
        left = torch.einsum("lta,lk->tlak", left, eye).reshape(s * nblocks, rank * nblocks)
        return left[: self.out_features], right[:, : self.in_features]

    def dense(self) -> Tensor:
        left, right = self.factors()
        return left @ right

    def num_parameters(self) -> int:
        return self.block_rank * self.nblocks * (self.block_in + self.block_out)

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        if self.uses_factors(tokens, reused):
            inner = nblocks * rank
            flops = 2 * tokens * inner * (self.in_features + self.out_features)
            products = Cost(small_gemm=thin_flops((3 if backward else 1) * flops, inner))
            if reused:  # L' and R' kept: the two products alone
                return products + operator_calls(2, 0, False)
            building = inner * (nblocks * p + nblocks * s)  # L' and R', N times the parameters
            return products + Cost(elementwise=(2 if backward else 1) * building) + operator_calls(6, 11, backward)
        flops = 2 * tokens * nblocks * rank * (p + s)
        copies = tokens * (nblocks * p if nblocks * p != self.in_features else 0) + tokens * nblocks * (2 * rank + s)
        small = thin_flops((3 if backward else 1) * flops, rank)
        # Rank-1 blocks need no contiguous copies of the block gradients.
        return Cost(small_gemm=small, elementwise=(2 if backward else 1) * copies) + operator_calls(
            3, 7 if rank > 1 else 4, backward)

    def dense_cost(self, backward: bool) -> Cost:
        flops = 2 * self.out_features * self.nblocks * self.block_rank * self.in_features
        small = thin_flops((3 if backward else 1) * flops, self.nblocks * self.block_rank)
        return Cost(small_gemm=small) + operator_calls(5, 9, backward)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, block_rank={self.block_rank}"
