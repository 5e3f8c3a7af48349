"""Reusing what a fast apply derives from its parameters alone (FFT spectra) across calls that record no gradient.

A generating model calls every adapted layer once per new token with the same parameters; the FFT families would
otherwise rebuild their kernels' spectra (and the Toeplitz circulant embedding) on each call, which costs as much as
applying them to one token, and Monarch would run its blocks' thin batched products where two plain ones on its
factors L' R' do. :class:`ParameterCache` keeps one such value, computed from a few parameters, and hands it back
while the parameters are provably unchanged. The families keep only values of the parameters' order (spectra of
length L/2 + 1 per kernel; Monarch's factors, N times its parameters), never a dense matrix, so their memory stays
O(parameters); a small layer (at most :data:`surm.execution.KEPT_DENSE_MAX_NUMBERS` weights) keeps its folded
weight W0 + s · dense(M) the same way (:class:`surm.peft.layer.SurmLayer`), and a small matrix applied on its own by
the dense path (an adapter-mode map, a standalone delta) its s · dense(M) (:func:`surm.insertion.dense_product`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

Value = TypeVar("Value")


def records_gradient(*tensors: Tensor) -> bool:
    """True if an operation on ``tensors`` now enters the autograd graph: grad mode is on and one of them requires a
    gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def reusable(x: Tensor, params: Sequence[Tensor], training: bool) -> bool:
    """True if a value derived from ``params`` may be reused for this call: an eval-mode call through which no
    gradient is recorded.

    That is: the module is in eval mode (``training`` False: generation and evaluation; a training phase changes
    the parameters, and switching modes forgets cached values, see :meth:`ParameterCache.clear`); grad mode is off,
    or neither ``x`` nor any parameter requires a gradient (a reused value then never enters a graph, so it needs
    no history); and the call is not being traced by ``torch.compile``, whose graph computes the value itself (a
    Python-side cache would be a guard-less constant there).
    """
    if training or torch.compiler.is_compiling():
        return False
    return not records_gradient(x, *params)


class ParameterCache(Generic[Value]):
    """One value computed from some parameters, returned again while they are unchanged.

    The key of a value is, per parameter, its storage address (``data_ptr``), in-place version counter
    (``_version``), dtype, device and shape, plus a caller-given ``extra`` (e.g. the compute dtype). Every way a
    parameter's numbers change moves one of them: an optimizer step, ``load_state_dict``, ``copy_``,
    ``torch.no_grad()`` edits and merging bump the version; ``.to()``, ``.half()`` and ``param.data = ...`` swap
    the storage (dtype or device too). Edits through ``param.data`` bypass the version counter, as they bypass
    autograd's checks: values are therefore reused in eval mode only and forgotten whenever the module switches
    mode (``train()`` / ``eval()``, :meth:`clear`), so a training phase that edits ``.data`` (an old-style
    optimizer) is seen; only a ``.data`` edit made in eval mode between two eval calls is not (``eval()`` on a module
    already in eval mode switches nothing and forgets nothing, see :func:`forget_on_mode_switch`). The cache holds
    aliases of the parameters it read (views, no copy), so a swapped-out storage cannot be freed and its address
    reused by a new one with an equal version while the cached value lives.

    Parameters that are inference tensors (created under ``torch.inference_mode``) have no version counter, so
    nothing is cached for them.
    """

    __slots__ = ("_key", "_value", "_held")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Value | None = None
        self._held: tuple[Tensor, ...] = ()

    def clear(self) -> None:
        """Forget the cached value (and the parameter aliases it holds)."""
        self._key, self._value, self._held = None, None, ()

    def get(self, params: Sequence[Tensor], extra: object, build: Callable[[], Value]) -> Value:
        """The cached value for ``params`` and ``extra``, or ``build()`` (remembered) if it is missing or stale.

        ``build`` must compute from ``params`` only (and ``extra``), without recording gradients.
        """
        if any(p.is_inference() for p in params):
            return build()
        key = (extra, *((p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params))
        if key != self._key or self._value is None:
            with torch.no_grad():
                value = build()
            self._key, self._value, self._held = key, value, tuple(p.detach() for p in params)
        return self._value


def forget_on_mode_switch(module: torch.nn.Module, mode: bool) -> None:
    """Clear every :class:`ParameterCache` attribute of ``module`` if ``mode`` switches its train/eval mode (call it
    from ``train()`` before the mode is set): a training phase may change the parameters in ways the version counters
    miss (edits through ``.data``). Setting the mode it is already in (``eval()`` before each generation) keeps them."""
    if mode != module.training:
        for value in vars(module).values():
            if isinstance(value, ParameterCache):
                value.clear()
