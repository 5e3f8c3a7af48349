"""Matrices with a sparse 2-D Fourier spectrum (FourierFT's update), applied by one real FFT each way."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..validation import require_positive_int
from ._fft import fft_work
from ._reuse import records_gradient
from .base import Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, operator_calls, same_options
from .options import Option

#: Seed of the rule that draws a shape's frequencies: every matrix of one shape and count uses the same ones, so
#: they are recomputed, not stored (Python's ``random.random()`` stream is stable across Python versions).
FREQUENCY_SEED = 0


def distinct_frequencies(rows: int, cols: int) -> int:
    """How many 2-D frequencies (r, c) of an (rows, cols) matrix give different cosines: (r, c) and
    (-r mod rows, -c mod cols) give the same one, so (rows * cols + s) / 2, s the self-paired ones (up to 4)."""
    self_paired = (2 if rows % 2 == 0 else 1) * (2 if cols % 2 == 0 else 1)
    return (rows * cols + self_paired) // 2


@functools.lru_cache(maxsize=256)
def drawn_frequencies(rows: int, cols: int, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` distinct frequencies (r, c), each the smaller of itself and its pair (-r mod rows, -c mod cols),
    drawn uniformly with :data:`FREQUENCY_SEED` in a fixed order (the first k of a larger count are the same)."""
    generator = random.Random(FREQUENCY_SEED)
    chosen: dict[tuple[int, int], None] = {}
    total = rows * cols
    while len(chosen) < count:
        flat = min(int(generator.random() * total), total - 1)
        r, c = divmod(flat, cols)
        chosen.setdefault(min((r, c), ((-r) % rows, (-c) % cols)))
    return tuple(chosen)


def _planes(x: Tensor) -> Tensor:
    """rfft over the last dimension of the rows x (T, n), as (2, n // 2 + 1, T): real and imaginary planes, each row
    one frequency's values over the T rows (contiguous, so that gathering and adding frequencies moves whole rows)."""
    return torch.view_as_real(torch.fft.rfft(x, dim=-1)).permute(2, 1, 0).contiguous()


def _from_planes(planes: Tensor, length: int) -> Tensor:
    """irfft of (2, length // 2 + 1, T) planes: the rows (T, length)."""
    return torch.fft.irfft(torch.view_as_complex(planes.permute(2, 1, 0).contiguous()), n=length, dim=-1)


def _gather_scatter(planes: Tensor, weights: Tensor, in_bin: Tensor, out_bin: Tensor, out_features: int) -> Tensor:
    """H (2, out_features // 2 + 1, T): H[:, out_bin_k] += weights[k] * planes[:, in_bin_k], per plane."""
    half = planes.new_zeros((2, out_features // 2 + 1, planes.shape[-1]))
    return half.index_add_(1, out_bin, planes.index_select(1, in_bin) * weights.t().unsqueeze(-1))


class SpectrumGatherScatter(torch.autograd.Function):
    """y = irfft(H), H[:, out_bin_k] += weights[k] * rfft(x)[:, in_bin_k] per plane (real, imaginary), over rows.

    Backward, with the adjoints of the two transforms written out (two real FFTs, where autograd's backward of rfft
    takes a full complex one): irfft's adjoint is rfft(grad) / m, doubled on the bins irfft counts twice
    (``out_factor``), and rfft's is n irfft(.) with those bins halved (``in_factor``); the weights' gradient sums,
    over rows, the output gradient's bin times the input's (the input's planes are kept from forward: about x's
    size).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, layout: tuple[Tensor, ...],  # type: ignore[override]
                out_features: int) -> Tensor:
        in_bin, out_bin = layout[:2]
        planes = _planes(x)
        ctx.save_for_backward(planes, weights)
        ctx.layout, ctx.in_features = layout, x.shape[-1]
        return _from_planes(_gather_scatter(planes, weights, in_bin, out_bin, out_features), out_features)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        planes, weights = ctx.saved_tensors
        in_bin, out_bin, in_factor, out_factor = ctx.layout
        gathered = _planes(grad).index_select(1, out_bin)  # dL/d(weights[k] * input bin) / out_factor, (2, K, T)
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            spread = planes.new_zeros(planes.shape)
            spread.index_add_(1, in_bin, gathered * (weights.t() * in_factor * out_factor).unsqueeze(-1))
            grad_x = _from_planes(spread, ctx.in_features)
        if ctx.needs_input_grad[1]:
            picked = planes.index_select(1, in_bin)
            rows = picked.shape[-1]
            dots = torch.bmm(gathered.reshape(-1, 1, rows), picked.reshape(-1, rows, 1)).view(2, -1)
            grad_weights = (dots * out_factor).t()
        return grad_x, grad_weights, None, None


class Fourier(StructuredMatrix):
    """M = g * sum_k s_k cos(2 pi (r_k i / m + c_k j / n)), K frequencies (r_k, c_k), g = sqrt(2 / (m n)).

    The real part of a matrix whose 2-D DFT has K non-zero real entries (Gao et al. 2024, "Parameter-efficient
    fine-tuning with discrete Fourier transform", FourierFT): K numbers for any shape, and a rank that is not
    bounded by K's size in a product form: each frequency adds a rank-2 cosine on the row frequencies +-r_k it
    brings (K = 614 on a 384 x 384 layer: rank 356; K = 128 on 48 x 64: full). The frequencies are drawn once per
    shape by a fixed rule (:func:`drawn_frequencies`), distinct and never a pair giving the same cosine; ``g`` makes
    each cosine's Frobenius norm 1 (sqrt 2 for the up to 4 frequencies paired with themselves).

    Fast apply, O((m + n) log + K) per row, with real FFTs only (backward: :class:`SpectrumGatherScatter`):
    sum_j cos(...) x_j is the real part of e^{2 pi i r_k i / m} conj(X[c_k]), X = FFT(x), read from rfft(x)
    (X[c] = conj(X[n - c]) beyond n/2); the K products s_k conj(X[c_k]) are added into a half spectrum H of length
    m/2 + 1 (into bin m - r_k, conjugated, for r_k > m/2; halved where irfft doubles a bin) and y = g m irfft(H).
    Dense form: g m n Re(ifft2(S)), S the (m, n) spectrum holding s_k at (r_k, c_k).

    Parameters: ``K`` (``frequencies``; default max(m, n), the circulant's count). Init ``"zero"``: s = 0 (M = 0,
    dM/ds != 0); ``"random"``: s ~ N(0, 1).

    PEFT's FourierFT draws its frequencies from all m n positions (so two may give the same cosine), scales by a
    ``scaling`` hyperparameter over m n instead of g, and starts from a random spectrum.

    Args:
        out_features: m.
        in_features: n.
        frequencies: K, 1 <= K <= :func:`distinct_frequencies` (m, n); None for max(m, n) (or the most there are).
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``frequencies`` is not an integer in that range (checked before allocating).
    """

    options = (Option("frequencies", int, None, "K, the number of trained 2-D frequencies (default max(m, n))",
                      search=(None, 1024, 4096)),)
    default_lr = 3e-2

    def __init__(self, out_features: int, in_features: int, frequencies: Optional[int] = None,
                 init: Init = "zero") -> None:
        super().__init__(out_features, in_features, init)
        limit = distinct_frequencies(out_features, in_features)
        if frequencies is None:
            frequencies = min(max(out_features, in_features), limit)
        require_positive_int("frequencies", frequencies)
        if frequencies > limit:
            raise ValueError(f"fourier frequencies={frequencies} exceeds the {limit} distinct frequencies of a "
                             f"{out_features} x {in_features} matrix; valid: 1..{limit}")
        self.frequencies = frequencies
        self.coefficients = nn.Parameter(torch.empty(frequencies))
        rows, cols = zip(*drawn_frequencies(out_features, in_features, frequencies))
        self._layout(torch.tensor(rows, device="cpu"), torch.tensor(cols, device="cpu"))
        self.reset_parameters()

    @property
    def gain(self) -> float:
        """g = sqrt(2 / (m n)), the factor that gives each cosine unit Frobenius norm."""
        return math.sqrt(2.0 / (self.out_features * self.in_features))

    def _layout(self, rows: Tensor, cols: Tensor) -> None:
        """The index buffers of the fast apply and the dense form (recomputed from the shape, never saved), and the
        per-frequency constants of the fast apply (float64, CPU; cast per device and dtype on use): ``scale`` (K, 2),
        what s_k multiplies in the real and imaginary plane, and the backward's ``in_factor`` and ``out_factor``."""
        m, n = self.out_features, self.in_features
        input_conjugated = cols <= n // 2  # conj(X[c]) is conj(rfft[c]) there, rfft[n - c] beyond
        in_bin = torch.where(input_conjugated, cols, n - cols)
        output_conjugated = rows > m // 2  # bin m - r, conjugated
        out_bin = torch.where(output_conjugated, m - rows, rows)
        doubled_out = (out_bin > 0) & (2 * out_bin != m)  # irfft counts these bins twice
        doubled_in = (in_bin > 0) & (2 * in_bin != n)
        scale = self.gain * m * torch.where(doubled_out, 0.5, 1.0).double()
        imaginary_sign = torch.where(input_conjugated != output_conjugated, -1.0, 1.0).double()
        for name, value in (("rows", rows), ("cols", cols), ("in_bin", in_bin), ("out_bin", out_bin)):
            self.register_buffer(name, value, persistent=False)
        self._constants = {
            "scale": torch.stack([scale, scale * imaginary_sign], dim=-1),
            "in_factor": n / torch.where(doubled_in, 2.0, 1.0).double(),
            "out_factor": torch.where(doubled_out, 2.0, 1.0).double() / m,
        }
        self._cast: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def _constant(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._cast:
            self._cast[key] = self._constants[name].to(device=device, dtype=dtype)
        return self._cast[key]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "random":
                self.coefficients.normal_(0.0, 1.0)
            else:
                self.coefficients.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """y = g m irfft(H), H[out_bin_k] += s_k * scale_k * rfft(x)[in_bin_k] (conjugated where the bins say)."""
        self._check_input(x)
        dtype = compute_dtype(x, self.coefficients)
        if x.numel() == 0:  # MKL refuses empty transforms; the dense product keeps x and s in the graph
            return cast(cast(x, dtype) @ cast(self.dense(), dtype).T, x.dtype)
        device = x.device
        weights = cast(self.coefficients, dtype).unsqueeze(-1) * self._constant("scale", device, dtype)
        rows = cast(x, dtype).reshape(-1, self.in_features)
        if records_gradient(rows, weights):
            layout = (self.in_bin, self.out_bin, self._constant("in_factor", device, dtype),
                      self._constant("out_factor", device, dtype))
            y = SpectrumGatherScatter.apply(rows, weights, layout, self.out_features)
        else:
            half = _gather_scatter(_planes(rows), weights, self.in_bin, self.out_bin, self.out_features)
            y = _from_planes(half, self.out_features)
        return cast(y.reshape(*x.shape[:-1], self.out_features), x.dtype)

    def dense(self) -> Tensor:
        m, n = self.out_features, self.in_features
        dtype = self.coefficients.dtype if self.coefficients.dtype == torch.float64 else torch.float32
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        grid = torch.zeros(m * n, dtype=complex_dtype, device=self.coefficients.device)
        grid = grid.index_put((self.rows * n + self.cols,), self.coefficients.to(complex_dtype)).view(m, n)
        matrix = torch.fft.ifft2(grid).real * (self.gain * m * n)
        return matrix.to(self.coefficients.dtype)

    def num_parameters(self) -> int:
        return self.frequencies

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        # Forward: rfft(x), K picked bins times their weights, added into m/2 + 1 bins, irfft. Backward
        # (SpectrumGatherScatter): the two transforms' adjoints and the gathers', plus the coefficients' gradient.
        fft = tokens * (fft_work(self.in_features) + fft_work(self.out_features))
        elementwise = tokens * (2 * 2 * self.frequencies + (self.out_features // 2 + 1) * 2 + self.out_features)
        work = Cost(fft=(2 if backward else 1) * fft, elementwise=(3 if backward else 1) * elementwise)
        return work + operator_calls(8, 14, backward)

    def dense_cost(self, backward: bool) -> Cost:
        m, n = self.out_features, self.in_features
        fft = 2 * m * n * math.log2(max(m * n, 2))  # one complex 2-D transform
        return Cost(fft=(2 if backward else 1) * fft, elementwise=(3 if backward else 1) * 3 * m * n) + \
            operator_calls(6, 8, backward)

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """M is linear in s, and the same shape and K give the same frequencies: sum_i a_i M(s_i) = M(sum_i a_i s_i);
        options must agree."""
        return same_options(cls, options)

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        check_combination(matrices, scales, self)
        with torch.no_grad():
            self.coefficients.copy_(sum(s * m.coefficients for m, s in zip(matrices, scales)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frequencies={self.frequencies}"
