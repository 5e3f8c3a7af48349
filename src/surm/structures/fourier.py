"""Matrices with a sparse 2-D Fourier spectrum (FourierFT's update), applied by one real FFT each way."""

from __future__ import annotations

import functools
import math
import random
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..validation import require_positive_int
from ._fft import fft_work
from ._reuse import records_gradient
from .base import Cost, Init, StructuredMatrix, cast, check_combination, compute_dtype, operator_calls, same_options
from .options import Option

#: Elementwise units per number the fast apply moves through its bin-major copies and sparse products: measured
#: with ``benchmarks/path_rates.py --families fourier``, these run slower than the elementwise passes the shared rates
#: were fitted on. Refitted after the copy back from the planes became two cache-friendly copies (2026-12-03,
#: docs/results/path_rates_cpu_fourier_refit.md: 11 shapes from 64 x 256 to 5632 x 2048, MiniLM's among them, 1 to
#: 2,048 tokens, training and eval): with 3 ``auto`` takes the faster path in 125 of 132 cells and loses 31.5 ms of
#: 966 (2, the value fitted before that change: 119 and 57 ms; 1.5: 117 and 48; 4: 122 and 41), the cells it misses
#: mostly the largest layers' 2,048-row eval calls.
MOVED_NUMBER_WORK = 3.0

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
    """rfft over the last dimension of the rows x (T, n), as (n // 2 + 1, 2, T): per frequency bin, its real and
    imaginary values over the T rows. Bins lead so that the planes are P's right-hand side as a (2 bins, T) matrix
    (row 2 bin + plane, :class:`SpectralLayout`), and the gather / scatter form moves whole contiguous blocks along
    the first dimension, where PyTorch's index_select / index_add_ run fastest."""
    return torch.view_as_real(torch.fft.rfft(x, dim=-1)).permute(1, 2, 0).contiguous()


def _from_planes(planes: Tensor, length: int) -> Tensor:
    """irfft of (length // 2 + 1, 2, T) planes: the rows (T, length).

    Back to token-major in two copies: each bin's (2, T) block to (T, 2), then the complex (bins, T) matrix
    transposed. One permuting copy of the planes to (T, bins, 2) reads them with a stride of T and runs up to ten
    times slower (measured on a 2-core Xeon: 17.4 against 1.8 ms for 2817 bins of 256 rows;
    ``docs/results/decoder_speed.md``)."""
    spectrum = torch.view_as_complex(planes.transpose(1, 2).contiguous())  # (bins, T)
    return torch.fft.irfft(spectrum.T.contiguous(), n=length, dim=-1)


def _consume_sparse_beta_warning() -> None:
    """Build one CSR tensor with PyTorch's once-per-process "Sparse CSR tensor support is in beta state" warning
    silenced, so that users of the fast apply (which builds CSR tensors) never see it: the operations used here
    (construction, ``sparse.mm``, ``sparse.sampled_addmm``) are tested against the dense form."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        index = torch.zeros(2, dtype=torch.long, device="cpu")
        torch.sparse_csr_tensor(index, index[:0], torch.zeros(0, device="cpu"), (1, 1), check_invariants=False)


_consume_sparse_beta_warning()


def _compressed(rows: Tensor, count: int) -> Tensor:
    """CSR row pointers (count + 1) of positions sorted by row, ``rows`` their rows."""
    return torch.cat([rows.new_zeros(1), torch.cumsum(torch.bincount(rows, minlength=count), 0)])


class SpectralLayout(NamedTuple):
    """Where each of the 2 K numbers weights[k, p] (p: real, imaginary plane) sits in the sparse spectral matrix P
    (2 (m // 2 + 1) x 2 (n // 2 + 1)): row 2 out_bin_k + p, column 2 in_bin_k + p. In compressed sparse row form,
    ``slot`` maps entries to P's stored values (two frequencies can share a position: their entries add), ``crow`` /
    ``col`` index P, ``transposed`` orders P's values as P^T's, indexed by ``transposed_crow`` / ``transposed_col``;
    ``in_bin`` / ``out_bin`` (K) serve the gather / scatter form used where sparse kernels are not
    (:func:`_sparse_kernels`); ``in_factor`` / ``out_factor`` (K) are the backward's factors of each frequency."""

    in_bin: Tensor
    out_bin: Tensor
    slot: Tensor
    crow: Tensor
    col: Tensor
    transposed: Tensor
    transposed_crow: Tensor
    transposed_col: Tensor
    in_factor: Tensor
    out_factor: Tensor


def _sparse_kernels(like: Tensor) -> bool:
    """Whether the products below run as PyTorch sparse (CSR) kernels: on CPU and CUDA tensors, outside
    ``torch.compile`` (which cannot trace sparse tensors); elsewhere they gather, weight and scatter the bins with
    index_select / index_add_ (the same values, with a (K, 2, T) intermediate: slower at LLM shapes)."""
    return like.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()


def _sparse(entries: Tensor, layout: SpectralLayout, transposed: bool, shape: tuple[int, int]) -> Tensor:
    """P (or P^T) holding the 2 K ``entries`` (K, 2), the entries sharing a position added."""
    values = entries.new_zeros(layout.col.shape).index_add_(0, layout.slot, entries.reshape(-1))
    if transposed:
        return torch.sparse_csr_tensor(layout.transposed_crow, layout.transposed_col, values[layout.transposed],
                                       shape, check_invariants=False)
    return torch.sparse_csr_tensor(layout.crow, layout.col, values, shape, check_invariants=False)


def _full_precision(like: Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: under autocast, the sparse products would be cast to half precision, which
    PyTorch's sparse kernels do not implement on every device (the CPU's has no bfloat16)."""
    return torch.autocast(like.device.type, enabled=False)


def _bin_product(source: Tensor, entries: Tensor, layout: SpectralLayout, transposed: bool, bins: int) -> Tensor:
    """P source, or with ``transposed`` P^T source, as (bins, 2, T); P holding ``entries`` (K, 2) at its positions:
    result[out_bin_k, p] += entries[k, p] source[in_bin_k, p] over the T rows (in and out swapped for P^T)."""
    rows = source.shape[-1]
    if not _sparse_kernels(source):
        read, write = (layout.out_bin, layout.in_bin) if transposed else (layout.in_bin, layout.out_bin)
        result = source.new_zeros((bins, 2, rows))
        return result.index_add_(0, write, source.index_select(0, read) * entries.unsqueeze(-1))
    matrix = _sparse(entries, layout, transposed, (2 * bins, source.shape[0] * 2))
    with _full_precision(source):
        return torch.sparse.mm(matrix, source.view(-1, rows)).view(bins, 2, rows)


def _sampled_product(spectrum: Tensor, planes: Tensor, layout: SpectralLayout) -> Tensor:
    """(K, 2): sum over the T rows of spectrum[out_bin_k, p] planes[in_bin_k, p], i.e. spectrum planes^T read at P's
    positions (each entry reads its position)."""
    rows = planes.shape[-1]
    if not _sparse_kernels(planes):
        gathered = spectrum.index_select(0, layout.out_bin).reshape(-1, 1, rows)
        return torch.bmm(gathered, planes.index_select(0, layout.in_bin).reshape(-1, rows, 1)).view(-1, 2)
    shape = (spectrum.shape[0] * 2, planes.shape[0] * 2)
    pattern = torch.sparse_csr_tensor(layout.crow, layout.col, planes.new_zeros(layout.col.shape), shape,
                                      check_invariants=False)
    with _full_precision(planes):
        sampled = torch.sparse.sampled_addmm(pattern, spectrum.view(-1, rows), planes.view(-1, rows).t())
    return sampled.values()[layout.slot].view(-1, 2)


class SpectrumGatherScatter(torch.autograd.Function):
    """y = irfft(H), H[out_bin_k, p] += weights[k, p] * rfft(x)[in_bin_k, p] per plane p (real, imaginary), over rows:
    H = P rfft(x), P sparse (:class:`SpectralLayout`).

    Backward, with the adjoints of the two transforms written out (two real FFTs, where autograd's backward of rfft
    takes a full complex one): irfft's adjoint is rfft(grad) / m, doubled on the bins irfft counts twice
    (``out_factor``), and rfft's is n irfft(.) with those bins halved (``in_factor``), so grad_x = irfft(P'^T G),
    G = rfft(grad), P' holding weights * in_factor * out_factor; the weights' gradient is, per entry, the sum over
    rows of G's bin times the input's (G rfft(x)^T read at P's positions), times out_factor. The input's planes are
    kept from forward (about x's size).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, layout: SpectralLayout,  # type: ignore[override]
                out_features: int) -> Tensor:
        planes = _planes(x)
        ctx.save_for_backward(planes, weights)
        ctx.layout, ctx.in_features = layout, x.shape[-1]
        return _from_planes(_bin_product(planes, weights, layout, False, out_features // 2 + 1), out_features)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        planes, weights = ctx.saved_tensors
        layout = ctx.layout
        spectrum = _planes(grad)  # (m // 2 + 1, 2, T)
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            entries = weights * (layout.in_factor * layout.out_factor).unsqueeze(-1)
            grad_x = _from_planes(_bin_product(spectrum, entries, layout, True, planes.shape[0]), ctx.in_features)
        if ctx.needs_input_grad[1]:
            grad_weights = _sampled_product(spectrum, planes, layout) * layout.out_factor.unsqueeze(-1)
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
    Gathering, weighting and adding the K bins is one sparse product H = P rfft(x) over all rows, P holding the 2 K
    weights (real and imaginary plane) in compressed sparse row form (:class:`SpectralLayout`); no (K x rows) copy
    of the picked bins is made (with K = max(m, n) it is larger than the spectrum itself).
    Dense form: g m n Re(ifft2(S)), S the (m, n) spectrum holding s_k at (r_k, c_k); computed as one irfft2 of the
    Hermitian half spectrum (:meth:`dense`).

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
        # The fast apply's sparse P (SpectralLayout): entry 2 k + p at row 2 out_bin_k + p, column 2 in_bin_k + p;
        # positions sorted row-major are P's stored values, in CSR form, and again column-major for P^T.
        plane = torch.arange(2, device=rows.device)
        out_rows, in_rows = 2 * (m // 2 + 1), 2 * (n // 2 + 1)
        entry_rows = (2 * out_bin.unsqueeze(-1) + plane).reshape(-1)
        entry_cols = (2 * in_bin.unsqueeze(-1) + plane).reshape(-1)
        positions, slot = torch.unique(entry_rows * in_rows + entry_cols, return_inverse=True)
        position_rows, position_cols = positions // in_rows, positions % in_rows
        transposed = torch.argsort(position_cols * out_rows + position_rows)
        sparse = {"slot": slot, "crow": _compressed(position_rows, out_rows), "col": position_cols,
                  "transposed": transposed, "transposed_crow": _compressed(position_cols, in_rows),
                  "transposed_col": position_rows[transposed]}
        # The dense form's half grid (m, n // 2 + 1): s_k / 2 at (r_k, c_k) where c_k <= n / 2, and at its pair
        # (-r_k, -c_k) where -c_k mod n <= n / 2 (both for c_k = 0 or n / 2).
        paired_rows, paired_cols = (-rows) % m, (-cols) % n
        in_half, pair_in_half = cols <= n // 2, paired_cols <= n // 2
        half_grid_index = torch.cat([(rows * (n // 2 + 1) + cols)[in_half],
                                     (paired_rows * (n // 2 + 1) + paired_cols)[pair_in_half]])
        frequency = torch.arange(len(rows), device=rows.device)
        half_grid_source = torch.cat([frequency[in_half], frequency[pair_in_half]])
        for name, value in (*((f"spectral_{key}", value) for key, value in sparse.items()),
                            ("in_bin", in_bin), ("out_bin", out_bin), ("half_grid_index", half_grid_index),
                            ("half_grid_source", half_grid_source)):
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
        """y = g m irfft(H), H[out_bin_k] += s_k * scale_k * rfft(x)[in_bin_k] (conjugated where the bins say): H = P
        rfft(x), P sparse (:class:`SpectralLayout`)."""
        self._check_input(x)
        dtype = compute_dtype(x, self.coefficients)
        if x.numel() == 0:  # MKL refuses empty transforms; the dense product keeps x and s in the graph
            return cast(cast(x, dtype) @ cast(self.dense(), dtype).T, x.dtype)
        device = x.device
        weights = cast(self.coefficients, dtype).unsqueeze(-1) * self._constant("scale", device, dtype)
        rows = cast(x, dtype).reshape(-1, self.in_features)
        layout = SpectralLayout(self.in_bin, self.out_bin, self.spectral_slot, self.spectral_crow, self.spectral_col,
                                self.spectral_transposed, self.spectral_transposed_crow, self.spectral_transposed_col,
                                self._constant("in_factor", device, dtype), self._constant("out_factor", device, dtype))
        if records_gradient(rows, weights):
            y = SpectrumGatherScatter.apply(rows, weights, layout, self.out_features)
        else:
            half = _bin_product(_planes(rows), weights, layout, False, self.out_features // 2 + 1)
            y = _from_planes(half, self.out_features)
        return cast(y.reshape(*x.shape[:-1], self.out_features), x.dtype)

    def dense(self) -> Tensor:
        """g m n irfft2(A): A the Hermitian spectrum holding s_k / 2 at (r_k, c_k) and at (-r_k, -c_k), of which irfft2
        reads the half c <= n / 2 (:attr:`half_grid_index`); its backward is one real 2-D FFT of the gradient."""
        m, n = self.out_features, self.in_features
        dtype = self.coefficients.dtype if self.coefficients.dtype == torch.float64 else torch.float32
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        values = self.coefficients.to(complex_dtype).index_select(0, self.half_grid_source) * 0.5
        grid = torch.zeros(m * (n // 2 + 1), dtype=complex_dtype, device=self.coefficients.device)
        grid = grid.index_put((self.half_grid_index,), values, accumulate=True).view(m, n // 2 + 1)
        matrix = torch.fft.irfft2(grid, s=(m, n)) * (self.gain * m * n)
        return matrix.to(self.coefficients.dtype)

    def num_parameters(self) -> int:
        return self.frequencies

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        # Forward: rfft(x), its copy into bin-major planes, the sparse product P planes (2 K multiply-adds and the
        # output's 2 (m/2 + 1) numbers per row), the copy back (two copies, _from_planes), irfft. Backward
        # (SpectrumGatherScatter): the gradient's rfft and planes, P^T's product, its copy back (two) and irfft, and
        # the product sampled at P's 2 K positions for the coefficients.
        in_numbers, out_numbers = 2 * (self.in_features // 2 + 1), 2 * (self.out_features // 2 + 1)
        fft = tokens * (fft_work(self.in_features) + fft_work(self.out_features))
        forward = tokens * (in_numbers + 2 * self.frequencies + 2 * out_numbers)
        backward_work = tokens * (out_numbers + 4 * self.frequencies + 2 * in_numbers) if backward else 0
        work = Cost(fft=(2 if backward else 1) * fft, elementwise=MOVED_NUMBER_WORK * (forward + backward_work))
        return work + operator_calls(10, 16, backward)

    def dense_cost(self, backward: bool) -> Cost:
        # Forward: the half grid (m x (n/2 + 1) complex) and one irfft2; backward: one rfft2 and the gather.
        m, n = self.out_features, self.in_features
        fft = m * n * math.log2(max(m * n, 2))  # one real 2-D transform
        half_grid = 2 * m * (n // 2 + 1)
        return Cost(fft=(2 if backward else 1) * fft, elementwise=(2 if backward else 1) * (half_grid + m * n)) + \
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
