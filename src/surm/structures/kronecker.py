"""Sums of Kronecker products, applied as two small matmuls without building M."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._reuse import records_gradient
from .base import (Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, declared_options,
                   kaiming_uniform_, operator_calls, same_options, thin_flops)
from ..validation import require_positive_int
from .options import Option, divisor_nearest_sqrt, divisors, require_size_option


def _term_products(x: Tensor, second: Tensor, n1: int) -> Tensor:
    """Z = X B_k^T for every row and term, as one plain product, laid out (T m2, n1 K) with Z[(t, j), (c, k)].

    ``x`` is (T, n1 n2), each row X_t in R^{n1 x n2} row-major; ``second`` is (K, m2, n2).
    """
    terms, m2, n2 = second.shape
    rows = x.shape[0]
    z = x.reshape(rows * n1, n2) @ second.reshape(terms * m2, n2).T  # (T n1, K m2): Z[(t, c), (k, j)]
    return z.view(rows, n1 * terms, m2).transpose(1, 2).reshape(rows * m2, n1 * terms)


def _first_flat(first: Tensor) -> Tensor:
    """A_k side by side as one (m1, n1 K) matrix, column (c, k) holding A_k[:, c]."""
    terms, m1, n1 = first.shape
    return first.permute(1, 2, 0).reshape(m1, n1 * terms)


def _kronecker_values(first: Tensor, second: Tensor, x: Tensor) -> Tensor:
    """The values of :class:`KroneckerProduct`, with no autograd Function."""
    m1, n1, m2 = first.shape[1], first.shape[2], second.shape[1]
    rows = x.shape[0]
    y = _term_products(x, second, n1) @ _first_flat(first).T  # (T m2, m1): Y[(t, j), i]
    return y.view(rows, m2, m1).transpose(1, 2).reshape(rows, m1 * m2)


class KroneckerProduct(torch.autograd.Function):
    """Y_t = sum_k A_k X_t B_k^T for every row x_t = vec(X_t), as two plain matrix products, saving only x.

    Forward: Z = X B_k^T for all rows and terms in one product (T n1, n2) @ (n2, K m2); then the sum over k and
    the columns c of X, sum_{c, k} A_k[i, c] Z_t[c, k, j], in one product (T m2, n1 K) @ (n1 K, m1). (Batched
    products over the T rows with the factors broadcast, as ``A @ (X @ B^T)`` dispatches, run a per-row loop in
    their backward: 2.5 x slower at 2048 tokens of 384 on 2 threads, forward and backward.)
    Backward, with G_t the gradient of Y_t: grad A_k = sum_t G_t Z_tk^T; grad Z_tk = A_k^T G_t; grad B_k =
    sum_t (grad Z_tk)^T X_t; grad X_t = sum_k grad Z_tk B_k. Z is recomputed from x there (one product), not
    saved: it is as large as the layer's output, and x is usually saved by the base layer already. The backward's
    operations are differentiable, so double backward works.

    Zero rows (an empty batch) give an empty result and zero gradients (the products handle them). Under autocast
    the forward's products run in its precision; backward computes in the operands' own (float32 for float32
    parameters), as a dense form's weight gradient would be accumulated.
    """

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        """``first`` (K, m1, n1), ``second`` (K, m2, n2), ``x`` (T, n1 n2) -> (T, m1 m2). ``ctx`` is the first
        argument (no ``setup_context``), as in :class:`~surm.structures._fft.CircularConvolution`."""
        ctx.save_for_backward(first, second, x)
        return _kronecker_values(first, second, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        first, second, x = ctx.saved_tensors
        # Under autocast the forward's products ran in a lower precision and the gradient arrives in it, while the
        # saved operands keep theirs (one dtype, see Kronecker.forward): backward computes in the operands' dtype.
        grad = grad.to(first.dtype)
        terms, m1, n1 = first.shape
        m2, n2 = second.shape[1:]
        rows = x.shape[0]
        grad_t = grad.reshape(rows, m1, m2).transpose(1, 2).reshape(rows * m2, m1)  # G[(t, j), i]
        grad_first = grad_second = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_flat = grad_t.T @ _term_products(x, second, n1)  # (m1, n1 K)
            grad_first = grad_flat.view(m1, n1, terms).permute(2, 0, 1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_z = grad_t @ _first_flat(first)
            grad_z = grad_z.view(rows, m2, n1 * terms).transpose(1, 2).reshape(rows * n1, terms * m2)
            if ctx.needs_input_grad[1]:
                grad_second = (grad_z.T @ x.reshape(rows * n1, n2)).view(terms, m2, n2)
            if ctx.needs_input_grad[2]:
                grad_x = (grad_z @ second.reshape(terms * m2, n2)).view(rows, n1 * n2)
        return grad_first, grad_second, grad_x


def kronecker_product(first: Tensor, second: Tensor, x: Tensor) -> Tensor:
    """sum_k (A_k ⊗ B_k) x_t for every row of ``x`` (T, n1 n2): :class:`KroneckerProduct`, or its plain forward
    when no gradient is recorded (no Function bookkeeping)."""
    if records_gradient(first, second, x):
        return KroneckerProduct.apply(first, second, x)
    return _kronecker_values(first, second, x)


class Kronecker(StructuredMatrix):
    """M = sum_{k=1..K} A_k ⊗ B_k, A_k in R^{m1 x n1}, B_k in R^{m2 x n2}, m = m1 m2, n = n1 n2.

    Applied without forming M: with x reshaped row-major to X in R^{n1 x n2},
    ``(A ⊗ B) vec(X) = vec(A X B^T)``, two plain matrix products for all rows and terms together
    (:class:`KroneckerProduct`, which recomputes X B^T in backward instead of saving it).

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
        dtype = compute_dtype(x, self.first)
        rows = cast(x, dtype).reshape(-1, self.in_features)
        y = kronecker_product(cast(self.first, dtype), cast(self.second, dtype), rows)
        return cast(y.reshape(*x.shape[:-1], self.out_features), x.dtype)

    def dense(self) -> Tensor:
        # kron(A, B)[a m2 + b, c n2 + d] = A[a, c] B[b, d], summed over the K terms in the same contraction.
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        return torch.einsum("kac,kbd->abcd", self.first, self.second).reshape(m1 * m2, n1 * n2)

    def num_parameters(self) -> int:
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        return self.terms * (m1 * n1 + m2 * n2)

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        # Z = X B^T: (T n1, n2) @ (n2, K m2); Y from Z: (T m2, n1 K) @ (n1 K, m1). Backward recomputes Z and runs
        # three products of Z's shape (grad B, grad x) and two of Y's (grad A, grad Z). Their inner sizes are
        # small, so each also moves its two large operands through memory (counted as elementwise work), as do
        # the transposing copies of Z and Y.
        (m1, n1), (m2, n2) = self.factors, self.second_shape
        k = self.terms
        to_z = Cost(small_gemm=thin_flops(2 * tokens * n1 * n2 * k * m2, min(n2, k * m2)),
                    elementwise=tokens * (self.in_features + k * n1 * m2))
        to_y = Cost(small_gemm=thin_flops(2 * tokens * m2 * n1 * k * m1, min(n1 * k, m1)),
                    elementwise=tokens * (k * n1 * m2 + self.out_features))
        copies = Cost(elementwise=tokens * (k * n1 * m2 + m1 * m2))  # Z's transpose, Y's
        side_by_side = 1 if k > 1 else 0  # the A_k laid side by side is a copy (a view for one term)
        calls = operator_calls(4 + side_by_side, 8 + 3 * side_by_side, backward)
        if backward:  # and the gradient's transpose, Z's again, grad Z's
            copies = copies + Cost(elementwise=tokens * (m1 * m2 + 2 * k * n1 * m2))
            return to_z * 4 + to_y * 3 + copies + calls
        return to_z + to_y + copies + calls

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
