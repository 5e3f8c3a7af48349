"""Low rank M = B A: LoRA's update, the baseline inside surm's own framework."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import (Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, declared_options,
                   kaiming_uniform_, operator_calls, thin_flops)
from .options import Option, require_size_option


class LowRank(StructuredMatrix):
    """M = B A with B in R^{m x r}, A in R^{r x n} (Hu et al. 2021, LoRA).

    Applied as two matmuls, ``y = (x A^T) B^T``. Parameters: ``r (m + n)``. Any m, n, and 1 <= r <= max(m, n)
    (rank(M) <= min(m, n) whatever r; the bound only stops absurd allocations).
    Init ``"zero"``: A Kaiming-uniform (a = sqrt(5)), B = 0, as in LoRA.

    Args:
        out_features: m.
        in_features: n.
        rank: r.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``rank`` is not an integer in 1..max(m, n) (checked before allocating).
    """

    options = (Option("rank", int, 8, "the rank r of B A", search=(1, 2, 4, 8, 16)),)
    default_lr = 3e-3
    peft_equivalent = True

    def __init__(self, out_features: int, in_features: int, rank: int = 8, init: Init = "zero") -> None:
        super().__init__(out_features, in_features, init)
        self.rank = require_size_option("lowrank", "rank", rank, out_features, in_features)
        self.down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = nn.Parameter(torch.empty(out_features, rank))  # B
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.down, self.in_features)
        if self.init == "random":
            kaiming_uniform_(self.up, self.rank)
        else:
            with torch.no_grad():
                self.up.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        dtype = compute_dtype(x, self.down)
        # F.linear(x, W) is x @ W.T (the same matmul kernel, same values) without a separate transpose op per factor.
        h = F.linear(cast(x, dtype), cast(self.down, dtype))
        return cast(F.linear(h, cast(self.up, dtype)), x.dtype)

    def dense(self) -> Tensor:
        return self.up @ self.down

    def num_parameters(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        # Forward: x A^T, then h B^T. Backward: four more thin products (grad of h, B, A and x).
        flops = 2 * tokens * self.rank * (self.in_features + self.out_features)
        small = thin_flops((3 if backward else 1) * flops, self.rank)
        return Cost(small_gemm=small, elementwise=tokens * self.out_features) + operator_calls(2, 4, backward)

    def dense_cost(self, backward: bool) -> Cost:
        flops = 2 * self.out_features * self.rank * self.in_features
        return Cost(small_gemm=thin_flops((3 if backward else 1) * flops, self.rank)) + operator_calls(1, 2, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """sum_i s_i B_i A_i = [s_1 B_1, ..., s_k B_k] [A_1; ...; A_k]: ranks add up."""
        return {"rank": sum(declared_options(cls, o)["rank"] for o in options)}

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        check_combination(matrices, scales, self)
        with torch.no_grad():
            self.down.copy_(torch.cat([m.down for m in matrices]))
            self.up.copy_(torch.cat([s * m.up for m, s in zip(matrices, scales)], dim=1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
