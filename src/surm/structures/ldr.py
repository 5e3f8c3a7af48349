"""Low displacement rank matrices: sums of circulant times skew-circulant products, applied by FFT."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._fft import circulant_dense
from .base import Init, StructuredMatrix, compute_dtype
from .options import require_positive_int

#: Standard deviation of the skew-circulant vectors in the SURM code's init.
SURM_SKEW_STD = 0.02


def skew_circulant_dense(column: Tensor) -> Tensor:
    """Z_{-1}(s): the N x N skew-circulant with first column s, entry (i, j) = ±s_{(i-j) mod N}, minus above the diagonal."""
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

    Fast apply, O(r N log N): ``Z_{-1}(s) = D^{-1} Z_1(D s) D`` with ``D = diag(ω^k)``, ω = e^{iπ/N}
    (ω^N = -1), so each skew-circulant product is a complex FFT convolution between diagonal scalings;
    the r results are then convolved with their c_i and summed in the frequency domain.

    Parameters: ``2 r N``. Init ``"zero"`` (the SURM code's): c_i = 0, s_i ~ N(0, 0.02^2).

    Args:
        out_features: m.
        in_features: n.
        displacement_rank: r.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``displacement_rank`` is not a positive integer.
    """

    def __init__(
        self, out_features: int, in_features: int, displacement_rank: int = 1, init: Init = "zero"
    ) -> None:
        super().__init__(out_features, in_features, init)
        self.displacement_rank = require_positive_int("displacement_rank", displacement_rank)
        self.size = max(out_features, in_features)
        self.circulant_columns = nn.Parameter(torch.empty(displacement_rank, self.size))
        self.skew_columns = nn.Parameter(torch.empty(displacement_rank, self.size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "random":
                self.skew_columns.normal_(0.0, 1.0 / math.sqrt(self.size))
                self.circulant_columns.normal_(0.0, 1.0 / math.sqrt(self.size * self.displacement_rank))
            else:
                self.skew_columns.normal_(0.0, SURM_SKEW_STD)
                self.circulant_columns.zero_()

    def _skew_scaling(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """D = ω^k, k = 0..N-1, ω = e^{iπ/N}: the diagonal that turns skew-circulants into circulants."""
        angles = torch.arange(self.size, device=device, dtype=dtype) * (math.pi / self.size)
        return torch.polar(torch.ones_like(angles), angles)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        size = self.size
        dtype = compute_dtype(x, self.circulant_columns)
        scaling = self._skew_scaling(dtype, x.device)
        h = F.pad(x.to(dtype), (0, size - self.in_features))
        h_hat = torch.fft.fft(h * scaling)  # (..., N)
        s_hat = torch.fft.fft(self.skew_columns.to(dtype) * scaling)  # (r, N)
        skewed = (torch.fft.ifft(h_hat.unsqueeze(-2) * s_hat) * scaling.conj()).real  # (..., r, N): Z_{-1}(s_i) x
        spectrum = (torch.fft.rfft(self.circulant_columns.to(dtype)) * torch.fft.rfft(skewed)).sum(dim=-2)
        y = torch.fft.irfft(spectrum, n=size)[..., : self.out_features]
        return y.to(x.dtype)

    def square_dense(self) -> Tensor:
        """The N x N matrix sum_i Z_1(c_i) Z_{-1}(s_i) before truncation to (m, n)."""
        size = self.size
        circulants = circulant_dense(self.circulant_columns, size, size)  # (r, N, N)
        skews = skew_circulant_dense(self.skew_columns)  # (r, N, N)
        return (circulants @ skews).sum(dim=0)

    def dense(self) -> Tensor:
        return self.square_dense()[: self.out_features, : self.in_features]

    def num_parameters(self) -> int:
        return 2 * self.displacement_rank * self.size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, displacement_rank={self.displacement_rank}"
