"""Monarch matrices (MoRe): block-diagonal, stride permutation, block-diagonal; two batched matmuls."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Init, StructuredMatrix, compute_dtype, kaiming_uniform_
from .options import require_positive_int


def stride_permutation(groups: int, group_size: int) -> Tensor:
    """Indices ``perm`` with ``(P v) = v[perm]`` that turn v laid out as (groups, group_size) into (group_size, groups).

    Entry ``a * groups + g`` of the result is entry ``g * group_size + a`` of v (einops
    ``(g a) -> (a g)``).
    """
    return torch.arange(groups * group_size).view(groups, group_size).T.reshape(-1)


def permutation_matrix(perm: Tensor, dtype: torch.dtype) -> Tensor:
    """The matrix P with ``P v = v[perm]``."""
    return torch.eye(perm.numel(), dtype=dtype, device=perm.device)[perm]


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
        block_rank: r_b >= 1.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``nblocks`` is outside [1, min(m, n)] or ``block_rank`` is not a positive integer.
    """

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
        self.block_rank = require_positive_int("block_rank", block_rank)
        self.block_in = math.ceil(in_features / nblocks)  # p
        self.block_out = math.ceil(out_features / nblocks)  # s
        self.right = nn.Parameter(torch.empty(nblocks, block_rank, self.block_in))  # R_j
        self.left = nn.Parameter(torch.empty(nblocks, self.block_out, block_rank))  # L_j
        self.register_buffer("mid_permutation", stride_permutation(block_rank, nblocks), persistent=False)
        self.register_buffer("out_permutation", stride_permutation(nblocks, self.block_out), persistent=False)
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
        h = F.pad(x.to(dtype).reshape(-1, self.in_features), (0, nblocks * p - self.in_features))
        batch = h.shape[0]
        h = torch.bmm(h.view(batch, nblocks, p).transpose(0, 1), self.right.to(dtype).transpose(1, 2))  # (N, b, r_b)
        # P_mid: the flat (k r) layout read as (r k); block l of L takes entry l of every R block.
        h = h.transpose(0, 1).reshape(batch, rank, nblocks).permute(2, 0, 1)  # (N, b, r_b)
        h = torch.bmm(h, self.left.to(dtype).transpose(1, 2))  # (N, b, s)
        y = h.permute(1, 2, 0).reshape(batch, s * nblocks)  # P_out: (l s) -> (s l)
        return y[:, : self.out_features].reshape(*lead, self.out_features).to(x.dtype)

    def dense(self) -> Tensor:
        right = torch.block_diag(*self.right)  # (N r_b, N p)
        left = torch.block_diag(*self.left)  # (N s, N r_b)
        p_mid = permutation_matrix(self.mid_permutation, right.dtype)
        p_out = permutation_matrix(self.out_permutation, right.dtype)
        return (p_out @ left @ p_mid @ right)[: self.out_features, : self.in_features]

    def num_parameters(self) -> int:
        return self.block_rank * self.nblocks * (self.block_in + self.block_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, block_rank={self.block_rank}"
