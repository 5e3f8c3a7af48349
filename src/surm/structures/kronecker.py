"""Sums of Kronecker products, applied as two small matmuls without building M."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import (Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, declared_options,
                   kaiming_uniform_, operator_calls, same_options, thin_flops)
from ..validation import require_positive_int
from .options import Option, divisor_nearest_sqrt, divisors, require_size_option


class Kronecker(StructuredMatrix):
    """M = sum_{k=1..K} A_k ⊗ B_k, A_k in R^{m1 x n1}, B_k in R^{m2 x n2}, m = m1 m2, n = n1 n2.

    Applied without forming M: with x reshaped row-major to X in R^{n1 x n2},
    ``(A ⊗ B) vec(X) = vec(A X B^T)``, two small matmuls per term (all K terms batched).

    Factor shapes (exact divisors of m and n, no padding):

    * default: m1 is the divisor of m nearest sqrt(m), n1 the divisor of n nearest sqrt(n), which roughly
      minimises the parameter count (a prime size gets the trivial factor 1);
    * ``factors=(m1, n1)``: given explicitly;
    * ``rank=r`` (the SURM code's Kronecker LoRA, ``M = kron(B, A)``, B in R^{m/r x r}, A in R^{r x n/r}):
      m1 = m / r, n1 = r, so the count is m + n whatever r. The SURM code scales by alpha / r: that
      scaling belongs to the adapter (its ``alpha``), not to M.

    Parameters: ``K (m1 n1 + m2 n2)``. Init ``"zero"``: A_k = 0, B_k Kaiming-uniform (SURM's init).

    Args:
        out_features: m.
        in_features: n.
        factors: (m1, n1), the shape of each A_k; None for the default.
        rank: SURM's r, an alternative to ``factors``.
        terms: K, the number of Kronecker products summed, 1 <= K <= max(m, n).
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if the factors do not divide the shape (naming the valid divisors), if both
            ``factors`` and ``rank`` are given, or if ``terms`` is not an integer in 1..max(m, n) (checked before
            allocating).
    """

    options = (
        Option("factors", tuple, None, "shape (m1, n1) of each A_k; default: the divisors of m, n nearest their "
               "square roots"),
        Option("rank", int, None, "SURM's r: factors (m/r, r), m + n parameters per term (instead of factors)",
               search=(None, 2, 4, 8, 16, 32)),
        Option("terms", int, 1, "K, the number of Kronecker products summed", search=(1, 2, 4)),
    )
    default_lr = 1e-2

    def __init__(
        self,
        out_features: int,
        in_features: int,
        factors: tuple[int, int] | None = None,
        rank: int | None = None,
        terms: int = 1,
        init: Init = "zero",
    ) -> None:
        super().__init__(out_features, in_features, init)
        self.terms = require_size_option("kronecker", "terms", terms, out_features, in_features)
        self.factors = self._choose_factors(out_features, in_features, factors, rank)
        m1, n1 = self.factors
        self.second_shape = (out_features // m1, in_features // n1)
        self.first = nn.Parameter(torch.empty(terms, m1, n1))  # A_k
        self.second = nn.Parameter(torch.empty(terms, *self.second_shape))  # B_k
        self.reset_parameters()

    @staticmethod
    def _choose_factors(
        m: int, n: int, factors: tuple[int, int] | None, rank: int | None
    ) -> tuple[int, int]:
        if factors is not None and rank is not None:
            raise ValueError(f"give either factors or rank, not both (got factors={factors!r}, rank={rank!r})")
        if rank is not None:
            require_positive_int("rank", rank)
            if m % rank or n % rank:
                common = [d for d in divisors(m) if n % d == 0]
                raise ValueError(
                    f"kronecker rank={rank} must divide both out_features={m} and in_features={n}; "
                    f"valid ranks: {common}"
                )
            return m // rank, rank
        if factors is None:
            return divisor_nearest_sqrt(m), divisor_nearest_sqrt(n)
        if not (isinstance(factors, (tuple, list)) and len(factors) == 2):
            raise ValueError(f"factors must be a pair (m1, n1), got {factors!r}")
        m1, n1 = (require_positive_int("factors[0]", factors[0]), require_positive_int("factors[1]", factors[1]))
        for name, size, value in (("out_features", m, m1), ("in_features", n, n1)):
            if size % value:
                raise ValueError(
                    f"kronecker factors={tuple(factors)}: {value} does not divide {name}={size}; "
                    f"valid values: {divisors(size)}"
                )
        return m1, n1

    def reset_parameters(self) -> None:
        kaiming_uniform_(self.second, self.second_shape[1])
        if self.init == "random":
            kaiming_uniform_(self.first, self.factors[1])
        else:
            with torch.no_grad():
                self.first.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        dtype = compute_dtype(x, self.first)
        lead = x.shape[:-1]
        grid = cast(x, dtype).reshape(-1, 1, n1, n2)  # (b, 1, n1, n2)
        h = grid @ cast(self.second, dtype).transpose(1, 2)  # (b, K, n1, m2): X B_k^T
        y = (cast(self.first, dtype) @ h).sum(dim=1)  # (b, m1, m2): sum_k A_k X B_k^T
        return cast(y.reshape(*lead, m1 * m2), x.dtype)

    def dense(self) -> Tensor:
        # kron(A, B)[a m2 + b, c n2 + d] = A[a, c] B[b, d], summed over the K terms in the same contraction.
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        return torch.einsum("kac,kbd->abcd", self.first, self.second).reshape(m1 * m2, n1 * n2)

    def num_parameters(self) -> int:
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        return self.terms * (m1 * n1 + m2 * n2)

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        flops = 2 * tokens * self.terms * (n1 * n2 * m2 + m1 * n1 * m2)  # X B_k^T, then A_k (X B_k^T)
        copies = tokens * self.terms * n1 * m2 + tokens * m1 * m2
        small = thin_flops((3 if backward else 1) * flops, min(m1, n1, m2, n2))
        return Cost(small_gemm=small, elementwise=(2 if backward else 1) * copies) + operator_calls(
            3 * self.terms, 6 + 2 * self.terms, backward)

    def dense_cost(self, backward: bool) -> Cost:
        flops = 2 * self.terms * self.out_features * self.in_features
        return Cost(small_gemm=(3 if backward else 1) * flops) + operator_calls(self.terms, 3 + self.terms, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """sum_i s_i sum_k A_ik ⊗ B_ik is a sum of K_1 + ... + K_n Kronecker products of the same factor shapes:
        the factor options must agree, the terms add up."""
        shared = same_options(cls, [{**o, "terms": 1} for o in options])
        return {**shared, "terms": sum(declared_options(cls, o)["terms"] for o in options)}

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        check_combination(matrices, scales, self)
        if any(m.factors != self.factors for m in matrices):
            raise ValueError(f"kronecker factors differ: {[m.factors for m in matrices]} and {self.factors}")
        with torch.no_grad():
            self.first.copy_(torch.cat([s * m.first for m, s in zip(matrices, scales)]))
            self.second.copy_(torch.cat([m.second for m in matrices]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factors={self.factors}, second={self.second_shape}, terms={self.terms}"
