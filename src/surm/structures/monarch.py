"""Monarch matrices (MoRe): block-diagonal, stride permutation, block-diagonal; two batched matmuls."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Cost, Init, StructuredMatrix, compute_dtype, kaiming_uniform_, thin_flops
from ..validation import require_positive_int
from .options import Option, require_size_option


class Monarch(StructuredMatrix):
    """M = P_out · blockdiag(L_1..L_N) · P_mid · blockdiag(R_1..R_N), truncated to (m, n) (Tan et al. 2024, MoRe).

    R_j in R^{r_b x p} and L_j in R^{s x r_b} with N = ``nblocks``, r_b = ``block_rank``,
    p = ceil(n / N), s = ceil(m / N). x is zero-padded to N p, and of the N s outputs the first m are
    kept. P_mid is the stride permutation einops ``(k r) -> (r k)`` on the N r_b intermediate values
    (block l of L reads entry l of every block of R), P_out is ``(l s) -> (s l)``. rank(M) <=
    min(N r_b, m, n): at the parameter count of LoRA rank r_b it can reach rank N r_b.

    Applied as two ``bmm`` calls over the N blocks. Parameters: ``r_b (N p + N s)``, i.e. r_b (n + m)
    when N divides both. Init ``"zero"`` (MoRe's): L = 0, R Kaiming-uniform per block.

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.right, self.block_in)
        if self.init == "random":
            kaiming_uniform_(self.left, self.block_rank)
        else:
            with torch.no_grad():
                self.left.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        dtype = compute_dtype(x, self.right)
        lead = x.shape[:-1]
        h = x.to(dtype).reshape(-1, self.in_features)
        if nblocks * p != self.in_features:  # pad only when needed: the copy would be saved for backward
            h = F.pad(h, (0, nblocks * p - self.in_features))
        batch = h.shape[0]
        h = torch.bmm(h.view(batch, nblocks, p).transpose(0, 1), self.right.to(dtype).transpose(1, 2))  # (N, b, r_b)
        # P_mid: the flat (k r) layout read as (r k); block l of L takes entry l of every R block.
        h = h.transpose(0, 1).reshape(batch, rank, nblocks).permute(2, 0, 1)  # (N, b, r_b)
        h = torch.bmm(h, self.left.to(dtype).transpose(1, 2))  # (N, b, s)
        y = h.permute(1, 2, 0).reshape(batch, s * nblocks)  # P_out: (l s) -> (s l)
        return y[:, : self.out_features].reshape(*lead, self.out_features).to(x.dtype)

    def dense(self) -> Tensor:
        # Entry (t N + l, j p + q) of P_out L P_mid R is sum_a L_l[t, a] R_j[r, q] over the a with
        # a N + l = j r_b + r (the P_mid reading), so M = L' R' with R' = blockdiag(R_j) and L' holding L_l[t, a]
        # at row t N + l, column a N + l. Both are built with an identity factor, not a loop over blocks.
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        eye = torch.eye(nblocks, dtype=self.right.dtype, device=self.right.device)
        right = torch.einsum("jrq,jk->jrkq", self.right, eye).reshape(nblocks * rank, nblocks * p)
        left = torch.einsum("lta,lk->tlak", self.left, eye).reshape(s * nblocks, rank * nblocks)
        return (left[: self.out_features] @ right)[:, : self.in_features]

    def num_parameters(self) -> int:
        return self.block_rank * self.nblocks * (self.block_in + self.block_out)

    def structured_cost(self, tokens: int, backward: bool) -> Cost:
        nblocks, rank, p, s = self.nblocks, self.block_rank, self.block_in, self.block_out
        flops = 2 * tokens * nblocks * rank * (p + s)
        copies = tokens * (nblocks * p if nblocks * p != self.in_features else 0) + tokens * nblocks * (2 * rank + s)
        small = thin_flops((3 if backward else 1) * flops, rank)
        return Cost(small_gemm=small, elementwise=(2 if backward else 1) * copies)

    def dense_cost(self, backward: bool) -> Cost:
        flops = 2 * self.out_features * self.nblocks * self.block_rank * self.in_features
        return Cost(small_gemm=thin_flops((3 if backward else 1) * flops, self.nblocks * self.block_rank))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, block_rank={self.block_rank}"
