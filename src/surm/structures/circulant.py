"""Circulant matrices, applied by FFT in O(N log N)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._fft import circulant_dense, circular_convolution, circular_convolution_work, convolve_spectrum
from ._reuse import ParameterCache, reusable
from .base import Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, operator_calls, same_options
from .options import PARAMETERIZATION, Parameterization


class Circulant(StructuredMatrix):
    """M = the top-left (m, n) block of circ(c), c in R^N, N = max(m, n).

    ``M_ij = c_{(i-j) mod N}``. Applied as ``y = irfft(rfft(c) * rfft(pad_N(x)))[:m]``: x is zero-padded
    to N, the circular convolution has N outputs and the first m are kept. For m = n this is the plain
    circulant matrix; for m != n it is the circulant of the larger side, truncated.

    Parameterisations:

    * ``"plain"`` (default): c is the parameter. Parameters: ``N = max(m, n)``.
      Init ``"zero"``: c = 0 (M = 0, dM/dc != 0).
    * ``"product"`` (SURM's ``use_prod``): c = a * b element-wise. Parameters: ``2 N``.
      Init ``"zero"``: a ~ N(0, 1), b = 0, as in the SURM code.

    Args:
        out_features: m.
        in_features: n.
        parameterization: ``"plain"`` or ``"product"``.
        init: ``"zero"`` or ``"random"`` (see :class:`StructuredMatrix`).

    Raises:
        ValueError: for an unknown parameterisation.
    """

    options = (PARAMETERIZATION,)
    default_lr = 3e-3

    def __init__(
        self,
        out_features: int,
        in_features: int,
        parameterization: Parameterization = "plain",
        init: Init = "zero",
    ) -> None:
        super().__init__(out_features, in_features, init)
        self.parameterization = PARAMETERIZATION.check_type(parameterization)
        self.size = max(out_features, in_features)
        self.column = nn.Parameter(torch.empty(self.size))
        self.factor = nn.Parameter(torch.empty(self.size)) if parameterization == "product" else None
        self._spectra: ParameterCache[Tensor] = ParameterCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = 1.0 / math.sqrt(self.size)
        with torch.no_grad():
            if self.factor is not None:
                self.factor.normal_(0.0, 1.0)
            if self.init == "random":
                self.column.normal_(0.0, scale)
            else:
                self.column.zero_()

    def first_column(self) -> Tensor:
        """c, the first column of the N x N circulant."""
        return self.column if self.factor is None else self.column * self.factor

    def forward(self, x: Tensor) -> Tensor:
        """y = irfft(rfft(c) * rfft(pad_N(x)))[:m]; rfft(c) is reused across calls that record no gradient."""
        self._check_input(x)
        dtype = compute_dtype(x, self.column)
        params = (self.column,) if self.factor is None else (self.column, self.factor)
        if reusable(x, params, self.training):
            spectrum = self._spectra.get(
                params, dtype, lambda: torch.fft.rfft(cast(self.first_column(), dtype), n=self.size)
            )
            y = convolve_spectrum(spectrum, cast(x, dtype), self.size)
        else:
            y = circular_convolution(cast(self.first_column(), dtype), cast(x, dtype), self.size)
        return cast(y if y.shape[-1] == self.out_features else y[..., : self.out_features], x.dtype)

    def dense(self) -> Tensor:
        return circulant_dense(self.first_column(), self.out_features, self.in_features)

    def num_parameters(self) -> int:
        return self.size * (2 if self.parameterization == "product" else 1)

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        fft, elementwise = circular_convolution_work(tokens, self.size, backward)
        work = Cost(fft=fft, elementwise=elementwise + tokens * self.out_features)
        if reused:  # rfft(x), the product with the kept spectrum, irfft
            return work + operator_calls(3, 0, False)
        product = self.factor is not None  # c * factor: one more product, and its gradients
        return work + operator_calls(5 + product, 10 + 2 * product, backward)

    def dense_cost(self, backward: bool) -> Cost:
        product = self.factor is not None
        return Cost(elementwise=(2 if backward else 1) * self.out_features * self.in_features) + operator_calls(
            2 + product, 4 + 2 * product, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """M is linear in its first column c: sum_i s_i circ(c_i) = circ(sum_i s_i c_i); options must agree."""
        return same_options(cls, options)

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        """c = sum_i s_i c_i; in the product form as c = c * 1 (the factor set to ones)."""
        check_combination(matrices, scales, self)
        with torch.no_grad():
            self.column.copy_(sum(s * m.first_column() for m, s in zip(matrices, scales)))
            if self.factor is not None:
                self.factor.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parameterization={self.parameterization!r}"
