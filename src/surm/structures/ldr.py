"""Low displacement rank matrices: sums of circulant times skew-circulant products, applied by FFT."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._fft import (
    circular_convolution,
    circular_convolution_work,
    convolve_spectrum,
    fast_fft_length,
    toeplitz_dense,
)
from ._reuse import ParameterCache, reusable
from .base import Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, declared_options, operator_calls
from .options import Option, require_size_option

#: Standard deviation of the skew-circulant vectors in the SURM code's init.
SURM_SKEW_STD = 0.02


def skew_circulant_dense(column: Tensor) -> Tensor:
    """Z_{-1}(s): the N x N skew-circulant with first column s: entry (i, j) = ±s_{(i-j) mod N}, minus above the
    diagonal."""
    size = column.shape[-1]
    i = torch.arange(size, device=column.device).unsqueeze(1)
    j = torch.arange(size, device=column.device).unsqueeze(0)
    sign = torch.where(i >= j, 1.0, -1.0).to(column.dtype)
    return column[..., (i - j) % size] * sign


class LowDisplacementRank(StructuredMatrix):
    """M = the top-left (m, n) block of sum_{i=1..r} Z_1(c_i) Z_{-1}(s_i), c_i, s_i in R^N, N = max(m, n).

    Z_1(c) is the circulant and Z_{-1}(s) the skew-circulant matrix with first columns c and s
    (Sindhwani et al. 2015, "Structured transforms for small-footprint deep learning"). With the
    shift operators Z_f (ones below the diagonal, f in the top-right corner), every term satisfies
    rank(Z_1 T - T Z_{-1}) <= 1, so the N x N sum has displacement rank at most r. x is zero-padded to N
    and the output truncated to m, as for :class:`~surm.structures.circulant.Circulant`.

    Fast apply, O(r N log N), in real FFTs only: Z_{-1}(s) x is the negacyclic convolution of s and x, i.e. the
    linear convolution z = s * x (a circular one of length L >= N + n - 1, so nothing wraps) folded with a sign,
    ``z[:N] - z[N:2N]`` (the same product as ``D^{-1} Z_1(D s) D x`` with D = diag(ω^k), ω = e^{iπ/N}, without
    complex scalings); each result is then convolved circularly with its c_i (length N) and the r terms summed.

    Parameters: ``2 r N``. Init ``"zero"`` (the SURM code's): c_i = 0, s_i ~ N(0, 0.02^2).

    Args:
        out_features: m.
        in_features: n.
        displacement_rank: r, 1 <= r <= N.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``displacement_rank`` is not an integer in 1..N (checked before allocating).
    """

    options = (Option("displacement_rank", int, 1, "r, the number of circulant x skew-circulant terms",
                      search=(1, 2, 4)),)
    default_lr = 3e-3

    def __init__(
        self, out_features: int, in_features: int, displacement_rank: int = 1, init: Init = "zero"
    ) -> None:
        super().__init__(out_features, in_features, init)
        self.displacement_rank = require_size_option(
            "ldr", "displacement_rank", displacement_rank, out_features, in_features
        )
        self.size = max(out_features, in_features)
        self.circulant_columns = nn.Parameter(torch.empty(displacement_rank, self.size))
        self.skew_columns = nn.Parameter(torch.empty(displacement_rank, self.size))
        self._spectra: ParameterCache[tuple[Tensor, Tensor]] = ParameterCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "random":
                self.skew_columns.normal_(0.0, 1.0 / math.sqrt(self.size))
                self.circulant_columns.normal_(0.0, 1.0 / math.sqrt(self.size * self.displacement_rank))
            else:
                self.skew_columns.normal_(0.0, SURM_SKEW_STD)
                self.circulant_columns.zero_()

    def _skew_length(self) -> int:
        """L, the circular length that holds the linear convolution s_i * x without wrapping: N + n - 1 values
        (s_i has N, x its n = in_features; 2N - 1 when n = N), rounded up to a 5-smooth size. A tall M (m > n)
        thus transforms at about N + n rather than 2N points."""
        return fast_fft_length(self.size + self.in_features - 1)

    def forward(self, x: Tensor) -> Tensor:
        """y = sum_i circ_N(c_i) fold(s_i * x), the fold z[:N] - z[N:2N] of the linear convolution s_i * x.

        The kernels' spectra (rfft(s_i, L), rfft(c_i, N)) are reused across calls that record no gradient.
        """
        self._check_input(x)
        size, length = self.size, self._skew_length()
        dtype = compute_dtype(x, self.circulant_columns)
        h = cast(x, dtype).unsqueeze(-2)
        params = (self.skew_columns, self.circulant_columns)
        if reusable(x, params, self.training):
            skew_hat, circulant_hat = self._spectra.get(params, dtype, lambda: (
                torch.fft.rfft(cast(self.skew_columns, dtype), n=length),
                torch.fft.rfft(cast(self.circulant_columns, dtype), n=size),
            ))
            by_skew = functools.partial(convolve_spectrum, skew_hat)
            by_circulant = functools.partial(convolve_spectrum, circulant_hat)
        else:
            by_skew = functools.partial(circular_convolution, cast(self.skew_columns, dtype))
            by_circulant = functools.partial(circular_convolution, cast(self.circulant_columns, dtype))
        linear = by_skew(h, length)  # (..., r, L); entries from N + n - 1 on are zero
        wrapped = linear[..., size : 2 * size]
        if wrapped.shape[-1] < size:  # L < 2N: the entries past L are zero
            wrapped = F.pad(wrapped, (0, size - wrapped.shape[-1]))
        skewed = linear[..., :size] - wrapped  # Z_{-1}(s_i) x, (..., r, N)
        y = by_circulant(skewed, size).sum(dim=-2)
        return cast(y if y.shape[-1] == self.out_features else y[..., : self.out_features], x.dtype)

    def square_dense(self) -> Tensor:
        """The N x N matrix sum_i Z_1(c_i) Z_{-1}(s_i) before truncation to (m, n).

        Z_{-1}(s) is Toeplitz with t_k = s_k and t_{-k} = -s_{N-k}; Z_1(c) is applied to its columns by FFT
        (O(r N^2 log N), not a dense N^3 product). Half-precision parameters are transformed in float32 (FFTs in
        half precision run only at powers of two, and lose accuracy) and the result cast back, as in ``forward``.
        """
        size = self.size
        dtype = compute_dtype(self.skew_columns, self.circulant_columns)
        skew, circulant = self.skew_columns.to(dtype), self.circulant_columns.to(dtype)
        diagonals = torch.cat([-skew[:, 1:], skew], dim=-1)
        skews = toeplitz_dense(diagonals, size, size)  # (r, N, N)
        columns = circular_convolution(circulant.unsqueeze(-2), skews.transpose(-1, -2), size)
        # Row j of `columns` is Z_1(c_i) times column j of Z_{-1}(s_i).
        return columns.sum(dim=0).T.to(self.skew_columns.dtype)

    def dense(self) -> Tensor:
        return self.square_dense()[: self.out_features, : self.in_features]

    def num_parameters(self) -> int:
        return 2 * self.displacement_rank * self.size

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        rows = tokens * self.displacement_rank
        skew_fft, skew_elementwise = circular_convolution_work(rows, self._skew_length(), backward)
        circ_fft, circ_elementwise = circular_convolution_work(rows, self.size, backward)
        folds = (2 if backward else 1) * 2 * rows * self.size  # the sign fold and the sum over r
        work = Cost(fft=skew_fft + circ_fft, elementwise=skew_elementwise + circ_elementwise + folds)
        # Reused: the kernels' two transforms (and their casts) are kept; two convolutions, the fold and the sum stay.
        return work + (operator_calls(9, 0, False) if reused else operator_calls(13, 26, backward))

    def dense_cost(self, backward: bool) -> Cost:
        fft, elementwise = circular_convolution_work(self.displacement_rank * self.size, self.size, backward)
        copies = (2 if backward else 1) * 2 * self.displacement_rank * self.size**2
        return Cost(fft=fft, elementwise=elementwise + copies) + operator_calls(8, 16, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A weighted sum of sums of circulant x skew-circulant products is one with r_1 + ... + r_n terms."""
        return {"displacement_rank": sum(declared_options(cls, o)["displacement_rank"] for o in options)}

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        check_combination(matrices, scales, self)
        with torch.no_grad():
            self.circulant_columns.copy_(torch.cat([s * m.circulant_columns for m, s in zip(matrices, scales)]))
            self.skew_columns.copy_(torch.cat([m.skew_columns for m in matrices]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, displacement_rank={self.displacement_rank}"
