"""Toeplitz matrices (constant along every diagonal), applied by embedding in a circulant and FFT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._fft import (
    apply_toeplitz,
    apply_toeplitz_spectrum,
    circular_convolution_work,
    toeplitz_dense,
    toeplitz_length,
    toeplitz_spectrum,
)
from ._reuse import ParameterCache, reusable
from .base import Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, operator_calls, same_options
from .options import PARAMETERIZATION, Parameterization

#: Standard deviation of the non-zero factor in the SURM code's product init.
SURM_PRODUCT_STD = 0.02


class Toeplitz(StructuredMatrix):
    """M_ij = t_{i-j} for i - j in [-(n-1), m-1]: rectangular natively, no padding rule needed.

    Applied in O((m+n) log(m+n)): T is the top-left block of a circulant of length L >= m + n - 1
    (L the next 5-smooth size), so ``y = irfft(rfft(c) * rfft(pad_L(x)))[:m]``.

    Parameterisations:

    * ``"plain"`` (default): the m + n - 1 diagonals are the parameters. Parameters: ``m + n - 1``.
      Init ``"zero"``: t = 0.
    * ``"product"`` (SURM's Toeplitz LoRA, generalised to rectangles): M = T(b) T(a) with T(a) of shape
      (k, n), T(b) of shape (m, k), k = min(m, n) (M cannot have rank above k anyway).
      Parameters: ``(m + k - 1) + (k + n - 1)``. Init ``"zero"``: a ~ N(0, 0.02^2), b = 0.
      A product of Toeplitz matrices is in general not Toeplitz.

    Args:
        out_features: m.
        in_features: n.
        parameterization: ``"plain"`` or ``"product"``.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: for an unknown parameterisation.
    """

    options = (PARAMETERIZATION,)
    default_lr = 1e-3
    #: Operators that turn one factor's values into its diagonals, (forward, backward): none, they are the diagonals.
    diagonal_calls: tuple[int, int] = (0, 0)

    def __init__(
        self,
        out_features: int,
        in_features: int,
        parameterization: Parameterization = "plain",
        init: Init = "zero",
    ) -> None:
        super().__init__(out_features, in_features, init)
        self.parameterization = PARAMETERIZATION.check_type(parameterization)
        self.inner = min(out_features, in_features)
        if parameterization == "plain":
            self.outer_values = nn.Parameter(torch.empty(self._values_length(out_features, in_features)))
            self.inner_values = None
        else:
            self.outer_values = nn.Parameter(torch.empty(self._values_length(out_features, self.inner)))
            self.inner_values = nn.Parameter(torch.empty(self._values_length(self.inner, in_features)))
        self._spectra: ParameterCache[list[Tensor]] = ParameterCache()
        self.reset_parameters()

    @staticmethod
    def _values_length(rows: int, cols: int) -> int:
        """How many numbers parameterise one (rows, cols) factor."""
        return rows + cols - 1

    @staticmethod
    def _diagonals(values: Tensor, rows: int, cols: int) -> Tensor:
        """The rows + cols - 1 diagonals t_{-(cols-1)} .. t_{rows-1} of the factor held in ``values``."""
        return values

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.inner_values is None:
                if self.init == "random":
                    self.outer_values.normal_(0.0, 1.0 / math.sqrt(self.in_features))
                else:
                    self.outer_values.zero_()
                return
            if self.init == "random":
                self.inner_values.normal_(0.0, 1.0 / math.sqrt(self.in_features))
                self.outer_values.normal_(0.0, 1.0 / math.sqrt(self.inner))
            else:
                self.inner_values.normal_(0.0, SURM_PRODUCT_STD)
                self.outer_values.zero_()

    def _factors(self) -> list[tuple[Tensor, int, int]]:
        """(values, rows, cols) of the factors in the order they apply to x: T(a) (k, n) first, then T(b) (m, k)."""
        m, n, k = self.out_features, self.in_features, self.inner
        if self.inner_values is None:
            return [(self.outer_values, m, n)]
        return [(self.inner_values, k, n), (self.outer_values, m, k)]

    def forward(self, x: Tensor) -> Tensor:
        """y = T(b) T(a) x (or T(t) x), each factor by its circulant embedding's FFT.

        The embeddings' spectra are reused across calls that record no gradient (they depend on the parameters
        only); otherwise the diagonals are rebuilt and transformed on each call, with their gradients.
        """
        self._check_input(x)
        dtype = compute_dtype(x, self.outer_values)
        factors = self._factors()
        h = cast(x, dtype)
        params = [values for values, _, _ in factors]
        if reusable(x, params, self.training):
            spectra = self._spectra.get(params, dtype, lambda: [
                toeplitz_spectrum(self._diagonals(cast(values, dtype), rows, cols), rows, cols)
                for values, rows, cols in factors
            ])
            for spectrum, (_, rows, cols) in zip(spectra, factors):
                h = apply_toeplitz_spectrum(spectrum, h, rows, cols)
        else:
            for values, rows, cols in factors:
                h = apply_toeplitz(self._diagonals(cast(values, dtype), rows, cols), h, rows, cols)
        return cast(h, x.dtype)

    def dense(self) -> Tensor:
        m, n, k = self.out_features, self.in_features, self.inner
        if self.inner_values is None:
            return toeplitz_dense(self._diagonals(self.outer_values, m, n), m, n)
        outer = toeplitz_dense(self._diagonals(self.outer_values, m, k), m, k)
        inner = toeplitz_dense(self._diagonals(self.inner_values, k, n), k, n)
        return outer @ inner

    def num_parameters(self) -> int:
        m, n, k = self.out_features, self.in_features, self.inner
        if self.parameterization == "plain":
            return self._values_length(m, n)
        return self._values_length(m, k) + self._values_length(k, n)

    def _factor_shapes(self) -> list[tuple[int, int]]:
        return [(rows, cols) for _, rows, cols in self._factors()]

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        total = Cost()
        building_forward, building_backward = self.diagonal_calls
        # Per factor: the input's padding, its rfft, the product with the kept spectrum and irfft when reused;
        # otherwise also the diagonals' building and the embedding's transform.
        calls = operator_calls(4, 0, False) if reused else operator_calls(
            7 + building_forward, 14 + building_backward, backward)
        for rows, cols in self._factor_shapes():
            fft, elementwise = circular_convolution_work(tokens, toeplitz_length(rows, cols), backward)
            total = total + Cost(fft=fft, elementwise=elementwise + tokens * rows) + calls
        return total

    def dense_cost(self, backward: bool) -> Cost:
        m, n, k = self.out_features, self.in_features, self.inner
        shapes = self._factor_shapes()
        factors = len(shapes)
        building_forward, building_backward = self.diagonal_calls
        copies = Cost(elementwise=(2 if backward else 1) * sum(r * c for r, c in shapes))
        copies = copies + operator_calls(factors * (1 + building_forward), factors * (2 + building_backward), backward)
        if self.inner_values is None:
            return copies
        return copies + Cost(gemm=(3 if backward else 1) * 2 * m * k * n) + operator_calls(1, 2, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Plain: M is linear in its values, sum_i s_i T(t_i) = T(sum_i s_i t_i). The product T(b) T(a) is not:
        a sum of such products is in general none of them."""
        shared = same_options(cls, options)
        if shared["parameterization"] != "plain":
            return super().combined_options(options)
        return shared

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        check_combination(matrices, scales, self)
        if self.inner_values is not None:
            super().load_combination(matrices, scales)
        with torch.no_grad():
            self.outer_values.copy_(sum(s * m.outer_values for m, s in zip(matrices, scales)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parameterization={self.parameterization!r}"
