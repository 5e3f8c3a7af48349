"""FFT building blocks shared by the circulant, Toeplitz and LDR families, and their dense forms.

The convolution has its own autograd (:class:`CircularConvolution`): it saves the input x (often shared with other
adapters of the same layer input, e.g. query and value) and the kernel's small spectrum, and recomputes the
input's FFT in backward, instead of keeping a complex spectrum per adapter as plain autograd would. Its backward
is three real FFTs (the gradient's, one inverse for the input gradient, the input's for the kernel gradient)
where plain autograd's backward of ``rfft`` goes through a full-length complex FFT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._reuse import records_gradient


#: fast_fft_length's answers, by minimum: the search takes up to tens of microseconds (1375 -> 1440: 20 us), and the
#: FFT families ask for their lengths on every call.
_FAST_LENGTHS: dict[int, int] = {}


def fast_fft_length(minimum: int) -> int:
    """The smallest 5-smooth integer (2^a 3^b 5^c) >= ``minimum``: FFT sizes pocketfft and cuFFT run fastest on.

    Remembered per ``minimum`` (in a plain dict, which ``torch.compile`` traces through, where it warns about an
    ``lru_cache``).
    """
    length = _FAST_LENGTHS.get(minimum)
    if length is None:
        length = _FAST_LENGTHS[minimum] = _smallest_5_smooth(minimum)
    return length


def _smallest_5_smooth(minimum: int) -> int:
    n = max(1, minimum)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_work(length: int) -> float:
    """The work of one real FFT of ``length`` points in the cost model's unit: length * log2(length)."""
    return length * math.log2(max(length, 2))


def _convolve(kernel: Tensor, x: Tensor, length: int) -> Tensor:
    """The values of :func:`circular_convolution`, with no autograd Function (see :class:`CircularConvolution`)."""
    if kernel.numel() == 0 or x.numel() == 0:
        shape = torch.broadcast_shapes(kernel.shape[:-1], x.shape[:-1])
        return x.new_zeros((*shape, length), dtype=torch.result_type(kernel, x))
    return convolve_spectrum(torch.fft.rfft(kernel, n=length), x, length)


class CircularConvolution(torch.autograd.Function):
    """``irfft(rfft(kernel, L) * rfft(x, L), L)`` with a backward that saves x, not its spectrum.

    Forward: y = circ_L(kernel) pad_L(x), shape broadcast(kernel, x)[..., L].
    Backward, with G = rfft(grad): grad_x = irfft(G * conj(K))[..., :n] (the transpose of a circulant is the
    circulant of the reversed kernel: a correlation), grad_kernel = irfft(sum_batch G * conj(rfft(x)))[..., :k].
    Both are exact (real circular correlations), so this matches plain autograd to rounding; it is differentiable
    again (double backward goes through the ops of ``backward``). Without double backward (``create_graph`` off)
    the two products overwrite the spectra backward has just made, rfft(x) and G, instead of allocating two more
    (tokens x L/2+1) complex tensors: measured on a 5632 x 2048 Toeplitz layer at 256 tokens, about 1.4 of the
    apply's 16-17 ms, and 0.02-0.05 x LoRA r=16's step of the TinyLlama stack (``docs/results/decoder_speed.md``).

    Zero-size operands (an empty batch, e.g. x of shape (0, n) or (2, 0, n)): the FFT libraries refuse them (MKL's
    "inconsistent configuration"), and the result is known without transforming anything, so forward returns zeros
    of the broadcast shape (..., L) (empty when the batch is) and backward returns zero gradients of the operands'
    shapes: a sum over no rows is zero.
    """

    @staticmethod
    def forward(ctx, kernel: Tensor, x: Tensor, length: int) -> Tensor:  # type: ignore[override]
        """Saves kernel and x (not their spectra) for backward.

        ``ctx`` is forward's first argument (no ``setup_context``): ``Function.apply`` then passes the arguments
        through as they are, where the setup_context form binds them to forward's signature with ``inspect`` on every
        call (measured ~45 of ~65 us of an apply's overhead). Only torch.func transforms (vmap, grad) need the other
        form; the library uses none on it.
        """
        ctx.save_for_backward(kernel, x)
        ctx.length = length
        return _convolve(kernel, x, length)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        kernel, x = ctx.saved_tensors
        length = ctx.length
        if grad.numel() == 0 or kernel.numel() == 0 or x.numel() == 0:
            grad_kernel = torch.zeros_like(kernel) if ctx.needs_input_grad[0] else None
            grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
            return grad_kernel, grad_x, None
        grad_hat = torch.fft.rfft(grad, n=length)
        grad_kernel = grad_x = None
        # Without double backward (grad mode off here) the products overwrite the fresh spectra they read: two fewer
        # (tokens x L/2+1) complex tensors allocated per call. The kernel's gradient goes first: it reads grad_hat.
        in_place = not torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            x_hat = torch.fft.rfft(x, n=length)
            products = _multiply(torch.conj_physical_(x_hat) if in_place else x_hat.conj(), grad_hat, in_place)
            spectrum_shape = (*kernel.shape[:-1], length // 2 + 1)
            if products.shape != spectrum_shape:
                products = products.sum_to_size(spectrum_shape)
            grad_kernel = torch.fft.irfft(products, n=length)[..., : kernel.shape[-1]]
        if ctx.needs_input_grad[1]:
            products = _multiply(grad_hat, torch.fft.rfft(kernel, n=length).conj(), in_place)
            full = torch.fft.irfft(products, n=length)[..., : x.shape[-1]]
            grad_x = full.sum_to_size(x.shape) if full.shape != x.shape else full
        return grad_kernel, grad_x, None


def circular_convolution(kernel: Tensor, x: Tensor, length: int) -> Tensor:
    """Return circ(kernel) @ x over the last dimension, both zero-padded to ``length``.

    ``circ(c)_{ij} = c_{(i-j) mod length}``, applied as ``irfft(rfft(c) * rfft(x))``. ``kernel`` has shape
    (..., k) with k <= length and broadcasts against ``x`` (..., n), n <= length; the result has
    ``length`` entries in its last dimension (the caller truncates it). ``n=length`` is passed to irfft,
    so odd lengths keep their last entry. An empty batch gives an empty result (no FFT is run). Gradients: see
    :class:`CircularConvolution`.

    When no gradient is recorded (inference, or neither operand requires one) the forward runs directly: the same
    operations, without ``Function.apply`` and its graph bookkeeping (about as costly as the FFTs of a one-token
    call).
    """
    if records_gradient(kernel, x):
        return CircularConvolution.apply(kernel, x, length)
    return _convolve(kernel, x, length)


def convolve_spectrum(spectrum: Tensor, x: Tensor, length: int) -> Tensor:
    """``irfft(spectrum * rfft(x, L), L)``: :func:`circular_convolution` given the spectrum ``rfft(kernel, L)``.

    The same operations as the convolution's forward after its first FFT, so the values are identical; no autograd
    Function is involved (used when no gradient is recorded, with a spectrum kept across calls). An empty ``x``
    gives zeros of the broadcast shape (..., L). When nothing is recorded and the product has rfft(x)'s shape and
    dtype, it is made in place in that fresh spectrum (the operands are left alone).
    """
    if x.numel() == 0:
        shape = torch.broadcast_shapes(spectrum.shape[:-1], x.shape[:-1])
        return x.new_zeros((*shape, length))
    # rfft(x) is this call's own tensor: the product may overwrite it.
    return torch.fft.irfft(_multiply(torch.fft.rfft(x, n=length), spectrum, not records_gradient(spectrum, x)),
                           n=length)


def _multiply(own: Tensor, other: Tensor, in_place: bool) -> Tensor:
    """``own * other``, written into ``own`` when ``in_place`` and the product has ``own``'s shape and dtype (so
    that nothing is broadcast into it or cast down); ``own`` must then be the caller's to overwrite."""
    if in_place and own.dtype == other.dtype and torch.broadcast_shapes(own.shape, other.shape) == own.shape:
        return own.mul_(other)
    return own * other


def circular_convolution_work(tokens: int, length: int, backward: bool) -> tuple[float, float]:
    """(FFT work, elementwise work) of :func:`circular_convolution` on ``tokens`` rows, in the cost model's units.

    Forward: rfft(x) and irfft (the kernel's spectrum is negligible); backward: rfft(grad), irfft for the input
    gradient and rfft(x) again for the kernel gradient.
    """
    transforms = 5 if backward else 2
    elementwise = (3 if backward else 1) * tokens * (length // 2 + 1) * 2  # complex products, in real numbers
    return transforms * tokens * fft_work(length), float(elementwise)


def toeplitz_dense(diagonals: Tensor, rows: int, cols: int) -> Tensor:
    """The (rows, cols) Toeplitz matrix T with T_ij = t_{i-j}, where ``diagonals[k + cols - 1] = t_k``.

    ``diagonals`` holds rows + cols - 1 values, from t_{-(cols-1)} (top-right corner) to t_{rows-1}
    (bottom-left corner). Built as a sliding window (``unfold``, a view) flipped along the columns: one copy
    forward, and backward sums the gradient along the diagonals without index scatter.
    """
    return diagonals.unfold(-1, cols, 1).flip(-1)


def circulant_dense(column: Tensor, rows: int, cols: int) -> Tensor:
    """The top-left (rows, cols) block of circ(column): entry (i, j) is column[(i - j) mod len(column)].

    That block is Toeplitz with t_d = column[d mod N] for d in [-(cols-1), rows-1] (cols, rows <= N).
    """
    length = column.shape[-1]
    diagonals = torch.cat([column[..., length - cols + 1 :], column[..., :rows]], dim=-1)
    return toeplitz_dense(diagonals, rows, cols)


def toeplitz_to_circulant_column(diagonals: Tensor, rows: int, cols: int, length: int) -> Tensor:
    """The first column of a circulant of size ``length`` >= rows + cols - 1 whose top-left block is T.

    c_k = t_k for 0 <= k < rows, c_{length-k} = t_{-k} for 0 < k < cols, zeros between.
    """
    if length < rows + cols - 1:
        raise ValueError(f"circulant length {length} is below rows + cols - 1 = {rows + cols - 1}")
    nonnegative = diagonals[..., cols - 1 :]  # t_0 .. t_{rows-1}
    negative = diagonals[..., : cols - 1]  # t_{-(cols-1)} .. t_{-1}
    gap = diagonals.new_zeros(*diagonals.shape[:-1], length - rows - cols + 1)
    return torch.cat([nonnegative, gap, negative], dim=-1)


def toeplitz_length(rows: int, cols: int) -> int:
    """The circulant size a (rows, cols) Toeplitz matrix is embedded in: the next 5-smooth size >= rows + cols - 1."""
    return fast_fft_length(rows + cols - 1)


def apply_toeplitz(diagonals: Tensor, x: Tensor, rows: int, cols: int) -> Tensor:
    """T @ x over the last dimension of x (..., cols) -> (..., rows), by embedding T in a circulant."""
    length = toeplitz_length(rows, cols)
    column = toeplitz_to_circulant_column(diagonals, rows, cols, length)
    return circular_convolution(column, x, length)[..., :rows]


def toeplitz_spectrum(diagonals: Tensor, rows: int, cols: int) -> Tensor:
    """rfft of the circulant embedding of T (see :func:`apply_toeplitz`), for :func:`apply_toeplitz_spectrum`."""
    length = toeplitz_length(rows, cols)
    return torch.fft.rfft(toeplitz_to_circulant_column(diagonals, rows, cols, length), n=length)


def apply_toeplitz_spectrum(spectrum: Tensor, x: Tensor, rows: int, cols: int) -> Tensor:
    """:func:`apply_toeplitz` given :func:`toeplitz_spectrum` (same values; no gradient is recorded)."""
    return convolve_spectrum(spectrum, x, toeplitz_length(rows, cols))[..., :rows]


def symmetric_to_toeplitz_diagonals(values: Tensor, rows: int, cols: int) -> Tensor:
    """Toeplitz diagonals (t_{-(cols-1)} .. t_{rows-1}) of the symmetric Toeplitz matrix T_ij = v_{|i-j|}."""
    offsets = torch.arange(-(cols - 1), rows, device=values.device).abs()
    return values[..., offsets]
