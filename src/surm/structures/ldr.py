"""Low displacement rank matrices: sums of circulant times skew-circulant products, applied by FFT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._fft import circular_convolution, circular_convolution_work, fast_fft_length, fft_work, toeplitz_dense
from ._reuse import ParameterCache, records_gradient, reusable
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


def _kernel_spectra(skew: Tensor, circulant: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(rfft(s_i, L), rfft(c_i, N)) of the (r, N) skew-circulant and circulant columns."""
    return torch.fft.rfft(skew, n=length), torch.fft.rfft(circulant, n=circulant.shape[-1])


def _fold(linear: Tensor, size: int) -> Tensor:
    """z[..., :N] - z[..., N:2N] of a length-L linear convolution z (entries past L are zero): Z_{-1}(s) x."""
    folded = linear[..., :size].clone()
    width = min(size, linear.shape[-1] - size)
    folded[..., :width] -= linear[..., size : size + width]
    return folded


def _unfold(grad: Tensor, length: int) -> Tensor:
    """The adjoint of :func:`_fold` (g on z[:N], -g on z[N:2N], cut to L; rfft zero-pads the rest)."""
    width = min(grad.shape[-1], length - grad.shape[-1])
    return torch.cat([grad, -grad[..., :width]], dim=-1)


def _sum_terms(products: Tensor) -> Tensor:
    """The sum over the r terms (dimension -2) of per-term spectra (..., r, F); a view for r = 1."""
    return products.squeeze(-2) if products.shape[-2] == 1 else products.sum(dim=-2)


def _apply(skew_hat: Tensor, circulant_hat: Tensor, x: Tensor, out_features: int, length: int,
           size: int) -> tuple[Tensor, Tensor]:
    """(y, the folded terms' spectra U_i) of M x from the kernels' spectra; y has ``out_features`` entries.

    Per row: X = rfft(x, L); u_i = fold(irfft(S_i X, L)); U_i = rfft(u_i, N); y = irfft(sum_i C_i U_i, N)[:m]:
    2 + 2r real transforms (the terms summed on their spectra, before the one inverse). An empty batch gives empty
    results without a transform (the FFT libraries refuse zero-size inputs).
    """
    rank = skew_hat.shape[0]
    if x.numel() == 0:
        return (x.new_zeros((*x.shape[:-1], out_features)),
                x.new_zeros((*x.shape[:-1], rank, size // 2 + 1), dtype=circulant_hat.dtype))
    linear = torch.fft.irfft(skew_hat * torch.fft.rfft(x, n=length).unsqueeze(-2), n=length)  # (..., r, L)
    folded_hat = torch.fft.rfft(_fold(linear, size), n=size)  # (..., r, N // 2 + 1)
    y = torch.fft.irfft(_sum_terms(circulant_hat * folded_hat), n=size)
    return (y if out_features == size else y[..., :out_features]), folded_hat


class LowDisplacementApply(torch.autograd.Function):
    """y = [sum_i circ_N(c_i) fold(s_i * x)][..., :m] with a backward that keeps the folded terms' spectra.

    Forward: :func:`_apply` (2 + 2r real transforms per row); it saves x (often shared with other adapters of the same
    input), the kernels and U_i = rfft(u_i, N), the size of the u_i it replaces. Backward, with G = rfft(grad, N) and
    W_i = rfft(unfold(irfft(conj(C_i) G, N)), L):
    grad_c_i = irfft(sum_rows conj(U_i) G, N), grad_s_i = irfft(sum_rows conj(X) W_i, L)[:N] (X = rfft(x, L)
    recomputed), grad_x = irfft(sum_i conj(S_i) W_i, L)[:n]: 3 + 2r transforms per row (the two chained circular
    convolutions' own backwards take 5r + 1). Exact (real correlations), so equal to plain autograd to rounding; not
    differentiable twice (``once_differentiable``: a double backward raises rather than dropping U_i's terms).
    """

    @staticmethod
    def forward(ctx, skew: Tensor, circulant: Tensor, x: Tensor, out_features: int,  # type: ignore[override]
                length: int) -> Tensor:
        size = circulant.shape[-1]
        skew_hat, circulant_hat = _kernel_spectra(skew, circulant, length)
        y, folded_hat = _apply(skew_hat, circulant_hat, x, out_features, length, size)
        ctx.save_for_backward(skew, circulant, x, folded_hat)
        ctx.length = length
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        skew, circulant, x, folded_hat = ctx.saved_tensors
        length, (rank, size) = ctx.length, circulant.shape
        needs_skew, needs_circulant, needs_x = ctx.needs_input_grad[:3]
        if grad.numel() == 0 or x.numel() == 0:
            zeros = (torch.zeros_like(skew), torch.zeros_like(circulant), torch.zeros_like(x))
            return (*(z if needed else None for z, needed in zip(zeros, (needs_skew, needs_circulant, needs_x))),
                    None, None)
        grad_hat = torch.fft.rfft(grad, n=size).unsqueeze(-2)  # (..., 1, N // 2 + 1)
        grad_skew = grad_circulant = grad_x = None
        if needs_circulant:
            products = (folded_hat.conj() * grad_hat).sum_to_size(rank, size // 2 + 1)
            grad_circulant = torch.fft.irfft(products, n=size)
        if needs_skew or needs_x:
            circulant_hat = torch.fft.rfft(circulant, n=size)
            grad_folded = torch.fft.irfft(circulant_hat.conj() * grad_hat, n=size)  # (..., r, N)
            weights = torch.fft.rfft(_unfold(grad_folded, length), n=length)  # (..., r, L // 2 + 1)
            if needs_skew:
                x_hat = torch.fft.rfft(x, n=length).unsqueeze(-2).conj()
                products = (x_hat * weights).sum_to_size(rank, length // 2 + 1)
                grad_skew = torch.fft.irfft(products, n=length)[..., :size]
            if needs_x:
                skew_hat = torch.fft.rfft(skew, n=length).conj()
                grad_x = torch.fft.irfft(_sum_terms(skew_hat * weights), n=length)[..., : x.shape[-1]]
        return grad_skew, grad_circulant, grad_x, None, None


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

        Recording a gradient: :class:`LowDisplacementApply`. Otherwise the same values from the kernels' spectra
        (rfft(s_i, L), rfft(c_i, N)), which are reused across calls that record no gradient.
        """
        self._check_input(x)
        dtype = compute_dtype(x, self.circulant_columns)
        h = cast(x, dtype)
        skew, circulant = cast(self.skew_columns, dtype), cast(self.circulant_columns, dtype)
        length = self._skew_length()
        if records_gradient(skew, circulant, h):
            y = LowDisplacementApply.apply(skew, circulant, h, self.out_features, length)
        else:
            params = (self.skew_columns, self.circulant_columns)
            spectra = (self._spectra.get(params, dtype, lambda: _kernel_spectra(skew, circulant, length))
                       if reusable(x, params, self.training) else _kernel_spectra(skew, circulant, length))
            y = _apply(*spectra, h, self.out_features, length, self.size)[0]
        return cast(y, x.dtype)

    def dense(self) -> Tensor:
        """The (m, n) block of sum_i Z_1(c_i) Z_{-1}(s_i).

        Z_{-1}(s) is Toeplitz with t_k = s_k and t_{-k} = -s_{N-k}; only its first n columns are built, Z_1(c) is
        applied to each by FFT (O(r n N log N), not a dense product) and the rows cut to m. Half-precision parameters
        are transformed in float32 (FFTs in half precision run only at powers of two, and lose accuracy) and the
        result cast back, as in ``forward``.
        """
        size, cols = self.size, self.in_features
        dtype = compute_dtype(self.skew_columns, self.circulant_columns)
        skew, circulant = self.skew_columns.to(dtype), self.circulant_columns.to(dtype)
        diagonals = torch.cat([-skew[:, 1:], skew], dim=-1)[:, size - cols :]  # t_{-(n-1)} .. t_{N-1}
        skews = toeplitz_dense(diagonals, size, cols)  # (r, N, n)
        columns = circular_convolution(circulant.unsqueeze(-2), skews.transpose(-1, -2), size)
        # Row j of `columns` is Z_1(c_i) times column j of Z_{-1}(s_i).
        return columns[..., : self.out_features].sum(dim=0).T.to(self.skew_columns.dtype)

    def num_parameters(self) -> int:
        return 2 * self.displacement_rank * self.size

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        """:class:`LowDisplacementApply`'s transforms per row: 2 + 2r forward, 3 + 2r more in backward."""
        rank, size, length = self.displacement_rank, self.size, self._skew_length()
        long, short = tokens * fft_work(length), tokens * fft_work(size)
        fft = (1 + rank) * (long + short)
        spectra = 2 * tokens * rank * (length // 2 + 1 + size // 2 + 1)  # one complex product each, in reals
        elementwise = spectra + 2 * tokens * rank * size  # the fold
        if backward:
            fft += (2 + rank) * long + (1 + rank) * short
            elementwise += 2 * spectra + 2 * tokens * rank * size  # four products, the unfold
        # Reused: the kernels' two transforms (and their casts) are kept.
        return Cost(fft=fft, elementwise=elementwise) + (operator_calls(10, 0, False) if reused
                                                         else operator_calls(13, 26, backward))

    def dense_cost(self, backward: bool) -> Cost:
        """:meth:`dense`: one length-N convolution per column of the n built (copies of N x n numbers each way)."""
        rank, size, cols = self.displacement_rank, self.size, self.in_features
        fft, elementwise = circular_convolution_work(rank * cols, size, backward)
        copies = (2 if backward else 1) * 2 * rank * size * cols
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
