"""The contract every structured family fulfils: fast apply, dense form, closed-form parameter count."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..validation import require_positive_int
from ._reuse import forget_on_mode_switch
from .options import Option

Init = Literal["zero", "random"]
INITS: tuple[str, ...] = ("zero", "random")


@dataclass(frozen=True)
class Cost:
    """The work of an operation, by kind, in the units of the execution cost model (:mod:`surm.execution`).

    Each kind runs at its own rate on a device (large products near peak, FFTs and elementwise passes limited by
    memory), so they are counted apart and weighted by measured rates.

    Attributes:
        gemm: floating-point operations in large matrix products (every dimension in the tens or more).
        small_gemm: floating-point operations in thin or batched small products, weighted by :func:`thin_flops`
            (the thinner the product, the further below peak it runs).
        fft: real-FFT work, length * log2(length) per transform of one row (a complex transform counts twice).
        elementwise: numbers written by elementwise passes (products, sums, copies, pads).
        calls: operator calls that do work (every PyTorch operator but views), each paying a fixed cost whatever
            its size: dispatch on a CPU, and a kernel launch on a GPU, where at fine-tuning's shapes this fixed cost
            often outweighs the work itself. Counted per call of the path (forward, plus backward if asked);
            ``tests/test_execution.py`` checks every family's counts against the operators PyTorch dispatches.
    """

    gemm: float = 0.0
    small_gemm: float = 0.0
    fft: float = 0.0
    elementwise: float = 0.0
    calls: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, factor: float) -> Cost:
        return Cost(*(getattr(self, f.name) * factor for f in fields(self)))

    __rmul__ = __mul__


#: Products whose thinnest dimension is below this run proportionally further below peak (measured on CPU: LoRA's
#: rank-8 products and Monarch's rank-4 blocks reach about 1/2 and 1/4 of the rate of rank-16 products).
THIN_DIMENSION = 16


def operator_calls(forward: int, backward_calls: int, backward: bool) -> Cost:
    """The :attr:`Cost.calls` of a path: ``forward`` operators, plus ``backward_calls`` if a backward pass follows."""
    return Cost(calls=forward + (backward_calls if backward else 0))


def thin_flops(flops: float, thinnest: int) -> float:
    """``flops`` of a product whose thinnest dimension is ``thinnest``, in :attr:`Cost.small_gemm` units."""
    return flops * max(1.0, THIN_DIMENSION / max(thinnest, 1))


class StructuredMatrix(nn.Module, ABC):
    """A trainable matrix M of shape (out_features, in_features) with a structured parameterisation.

    A family is one subclass that declares three class attributes and implements six methods:

    * :attr:`options` -- its constructor's keyword arguments (besides the sizes and ``init``) as
      :class:`~surm.structures.options.Option` declarations: type, default, help and the values ``surm search``
      tries; ``SurmConfig``'s fields, the command-line flags and the search space are generated from them;
    * :attr:`default_lr` -- the AdamW learning rate that works for it (``docs/sweep.md``);
    * :attr:`peft_equivalent` -- True if PEFT offers the same method (low rank is LoRA), so that comparisons use
      PEFT's own;
    * :meth:`forward` -- the fast apply ``y = M x`` over the last dimension of ``x``, never building M;
    * :meth:`dense` -- M itself, for merging, testing and export;
    * :meth:`num_parameters` -- the closed-form count of trainable numbers;
    * :meth:`structured_cost` and :meth:`dense_cost` -- the work of the two execution paths (forward, and
      backward when training), from which :mod:`surm.execution` picks one per layer;
    * :meth:`reset_parameters` -- the initialisation of ``init``.

    Registering it is one line in :data:`surm.structures.STRUCTURES`, which checks the declarations against the
    constructor.

    Args:
        out_features: m, the number of rows of M.
        in_features: n, the number of columns of M.
        init: ``"zero"`` makes M = 0 (the adapted model equals the base model at step 0) while keeping a
            non-zero gradient; ``"random"`` makes M a non-zero random matrix (used by tests and by users who
            want a non-identity start).

    Raises:
        ValueError: if a size is not a positive integer or ``init`` is not one of ``"zero"``, ``"random"``.
    """

    options: ClassVar[tuple[Option, ...]] = ()
    default_lr: ClassVar[float]
    peft_equivalent: ClassVar[bool] = False

    def __init__(self, out_features: int, in_features: int, init: Init = "zero") -> None:
        super().__init__()
        require_positive_int("out_features", out_features)
        require_positive_int("in_features", in_features)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.out_features = out_features
        self.in_features = in_features
        self.init = init

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Apply M to the last dimension of ``x``: (..., in_features) -> (..., out_features)."""

    @abstractmethod
    def dense(self) -> Tensor:
        """Return M as a dense (out_features, in_features) tensor in the parameters' dtype."""

    @abstractmethod
    def num_parameters(self) -> int:
        """Return the number of trainable numbers, computed from the closed formula of the family."""

    @abstractmethod
    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        """The work of ``forward`` on ``tokens`` rows, plus its backward (input and parameter gradients) if asked.

        ``reused`` (only without ``backward``): the call takes what the family derives from its parameters alone
        (FFT spectra, Monarch's factors) from its cache (:mod:`surm.structures._reuse`: an eval-mode call that
        records no gradient, as in generation), so that work is not paid. A family that keeps nothing ignores it.
        """

    @abstractmethod
    def dense_cost(self, backward: bool) -> Cost:
        """The work of ``dense()``, plus mapping a gradient of the dense matrix back onto the parameters if asked."""

    @abstractmethod
    def reset_parameters(self) -> None:
        """Re-initialise the parameters according to ``self.init``."""

    # -- exact combinations (PEFT's add_weighted_adapter) ---------------------------------------------------------

    @classmethod
    def combined_options(cls, options: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The options of one matrix of this family that holds sum_i s_i M_i, M_i built with ``options[i]``.

        A family whose M is linear in its parameters keeps its options (they must agree); one that is bilinear adds
        up a count (ranks, terms); one whose sum leaves the family cannot be combined exactly (the default).

        Raises:
            ValueError: if the family, or these options, cannot hold the sum exactly (naming what can).
        """
        raise ValueError(f"{cls.__name__} matrices cannot be summed exactly within their family; combine them by "
                         "SVD into a low-rank adapter instead (combination_type='svd')")

    def load_combination(self, matrices: Sequence[StructuredMatrix], scales: Sequence[float]) -> None:
        """Set this matrix (built with :meth:`combined_options` of theirs) to sum_i scales[i] * matrices[i], exactly."""
        raise ValueError(f"{type(self).__name__} matrices cannot be summed exactly within their family")

    def train(self, mode: bool = True) -> StructuredMatrix:
        """Set the mode; switching it forgets the values cached from the parameters (:func:`forget_on_mode_switch`)."""
        forget_on_mode_switch(self, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, init={self.init!r}"

    def dense_shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return self.out_features, self.in_features

    def _check_input(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )


def compute_dtype(x: Tensor, *params: Tensor) -> torch.dtype:
    """The dtype a fast apply runs in: float64 if anything is float64, otherwise float32.

    Half-precision inputs (float16, bfloat16) are computed in float32: FFTs in half precision are
    limited to power-of-two sizes and lose accuracy. The caller casts the result back to ``x.dtype``.
    """
    if x.dtype == torch.float64 or any(p.dtype == torch.float64 for p in params):
        return torch.float64
    return torch.float32


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``t`` itself when it already is one, without a call to ``Tensor.to`` (about a microsecond
    even when it changes nothing, several times per layer and token in generation)."""
    return t if t.dtype == dtype else t.to(dtype)


def kaiming_uniform_(tensor: Tensor, fan_in: int) -> Tensor:
    """LoRA's Kaiming-uniform init (a = sqrt(5)) for a factor whose rows read ``fan_in`` inputs."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def declared_options(family: type[StructuredMatrix], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every declared option of ``family`` that it leaves out at its default."""
    return {option.name: options.get(option.name, option.default) for option in family.options}


def same_options(family: type[StructuredMatrix], options: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The options all of ``options`` share (defaults filled in), or a ValueError naming the first difference."""
    full = [declared_options(family, o) for o in options]
    for other in full[1:]:
        if other != full[0]:
            raise ValueError(f"{family.__name__} matrices with other options cannot be summed exactly: {full[0]} and "
                             f"{other}")
    return full[0]


def check_combination(matrices: Sequence[StructuredMatrix], scales: Sequence[float], target: StructuredMatrix) -> None:
    """The sources of :meth:`StructuredMatrix.load_combination` are as many as the scales, of the target's shape."""
    if not matrices or len(matrices) != len(scales):
        raise ValueError(f"give one scale per matrix, got {len(matrices)} matrices and {len(scales)} scales")
    for matrix in matrices:
        if type(matrix) is not type(target) or matrix.dense_shape() != target.dense_shape():
            raise ValueError(f"cannot sum a {type(matrix).__name__} {matrix.dense_shape()} into a "
                             f"{type(target).__name__} {target.dense_shape()}")
