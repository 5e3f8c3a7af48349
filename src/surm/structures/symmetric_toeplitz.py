"""Symmetric Toeplitz matrices: M_ij depends only on |i - j|."""

from __future__ import annotations

from torch import Tensor

from ._fft import symmetric_to_toeplitz_diagonals
from .toeplitz import Toeplitz


class SymmetricToeplitz(Toeplitz):
    """M_ij = v_{|i-j|}, v in R^{max(m, n)}; applied by FFT like :class:`Toeplitz`.

    Parameterisations:

    * ``"plain"`` (default): v is the parameter. Parameters: ``max(m, n)``. Init ``"zero"``: v = 0.
    * ``"product"`` (SURM's Toeplitz LoRA: ``T_sym(b) T_sym(a)``): T_sym(a) of shape (k, n), T_sym(b) of
      shape (m, k), k = min(m, n). Parameters: ``max(m, k) + max(k, n) = m + n`` (2d when square, as in
      the SURM code). Init ``"zero"``: a ~ N(0, 0.02^2), b = 0. The product is not symmetric Toeplitz.

    Args and raises as :class:`Toeplitz`.
    """

    default_lr = 3e-3
    #: v -> diagonals is a gather (index arithmetic, then the index), its backward a scatter.
    diagonal_calls = (3, 2)

    @staticmethod
    def _values_length(rows: int, cols: int) -> int:
        return max(rows, cols)

    @staticmethod
    def _diagonals(values: Tensor, rows: int, cols: int) -> Tensor:
        return symmetric_to_toeplitz_diagonals(values, rows, cols)
