"""FFT building blocks shared by the circulant, Toeplitz and LDR families."""

from __future__ import annotations

import torch
from torch import Tensor


def fast_fft_length(minimum: int) -> int:
    """The smallest 5-smooth integer (2^a 3^b 5^c) >= ``minimum``: FFT sizes pocketfft and cuFFT run fastest on."""
    n = max(1, minimum)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def circular_convolution(kernel: Tensor, x: Tensor, length: int) -> Tensor:
    """Return circ(kernel) @ x over the last dimension, both zero-padded to ``length``.

    ``circ(c)_{ij} = c_{(i-j) mod length}``, applied as ``irfft(rfft(c) * rfft(x))``. ``kernel`` has shape
    (..., k) with k <= length and broadcasts against ``x`` (..., n), n <= length; the result has
    ``length`` entries in its last dimension (the caller truncates it). ``n=length`` is passed to irfft,
    so odd lengths keep their last entry.
    """
    spectrum = torch.fft.rfft(kernel, n=length) * torch.fft.rfft(x, n=length)
    return torch.fft.irfft(spectrum, n=length)


def circulant_dense(column: Tensor, rows: int, cols: int) -> Tensor:
    """The top-left (rows, cols) block of circ(column): entry (i, j) is column[(i - j) mod len(column)]."""
    length = column.shape[-1]
    i = torch.arange(rows, device=column.device).unsqueeze(1)
    j = torch.arange(cols, device=column.device).unsqueeze(0)
    return column[..., (i - j) % length]


def toeplitz_dense(diagonals: Tensor, rows: int, cols: int) -> Tensor:
    """The (rows, cols) Toeplitz matrix T with T_ij = t_{i-j}, where ``diagonals[k + cols - 1] = t_k``.

    ``diagonals`` holds rows + cols - 1 values, from t_{-(cols-1)} (top-right corner) to t_{rows-1}
    (bottom-left corner).
    """
    i = torch.arange(rows, device=diagonals.device).unsqueeze(1)
    j = torch.arange(cols, device=diagonals.device).unsqueeze(0)
    return diagonals[..., i - j + cols - 1]


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


def apply_toeplitz(diagonals: Tensor, x: Tensor, rows: int, cols: int) -> Tensor:
    """T @ x over the last dimension of x (..., cols) -> (..., rows), by embedding T in a circulant."""
    length = fast_fft_length(rows + cols - 1)
    column = toeplitz_to_circulant_column(diagonals, rows, cols, length)
    return circular_convolution(column, x, length)[..., :rows]


def symmetric_to_toeplitz_diagonals(values: Tensor, rows: int, cols: int) -> Tensor:
    """Toeplitz diagonals (t_{-(cols-1)} .. t_{rows-1}) of the symmetric Toeplitz matrix T_ij = v_{|i-j|}."""
    offsets = torch.arange(-(cols - 1), rows, device=values.device).abs()
    return values[..., offsets]
