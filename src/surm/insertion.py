"""How a structured matrix enters a network: as an additive update ΔW (delta) or as an Adapter on outputs.

Both are plain ``nn.Module`` objects, independent of PEFT; ``surm.peft`` attaches them to layers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .execution import check_execution, choose_path, keeps_dense
from .structures import StructuredMatrix, structure
from .structures._reuse import ParameterCache, forget_on_mode_switch, records_gradient, reusable
from .structures.base import cast, compute_dtype
from .validation import is_int

_ACTIVATIONS = {"gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "identity": lambda h: h}
#: Activations allowed in adapter mode: each has act(0) = 0 and act'(0) != 0 (ReLU would leave a zero S dead).
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)
#: Decisions a :class:`DeltaUpdate` remembers (one per distinct call signature); past this it forgets them all, so an
#: input whose token count changes every call (no KV cache, growing prompts) cannot grow the cache without bound.
PATH_CACHE_SIZE = 256


def _dropout_is_active(dropout: nn.Module) -> bool:
    """True for an ``nn.Dropout`` in training mode (p > 0 is given: p = 0 builds an ``nn.Identity``)."""
    return isinstance(dropout, nn.Dropout) and dropout.training


def _dropped_out(dropout: nn.Module, x: Tensor) -> Tensor:
    """``dropout(x)``, without calling an inactive dropout (identity, or eval mode), which returns x itself."""
    return dropout(x) if _dropout_is_active(dropout) else x


def _upcast(t: Tensor) -> Tensor:
    """float64 stays float64; every other float dtype is computed in float32."""
    return t if t.dtype == torch.float64 else t.float()


def remembered_path(paths: dict[tuple, str], matrix: StructuredMatrix, execution: str, x: Tensor,
                    folded: bool = False) -> str:
    """``"structured"`` or ``"dense"``: how ``matrix`` applies to ``x`` (..., in_features) now, remembered in ``paths``.

    ``folded`` says whether the dense path would share the base layer's product (inside a SurmLayer).

    The answer is :func:`~surm.execution.choose_path` of the call's signature (``execution``, token count,
    ``folded``, whether a backward pass follows, whether the matrix may reuse its cached values: eval mode and
    no backward, device type); all else it reads (the matrix's shape and options, fixed at construction, and
    the constant :data:`~surm.execution.RATES`) never changes, so each signature's answer is remembered (up to
    :data:`PATH_CACHE_SIZE`). Evaluating the cost model costs about as much as a small layer's product, and a
    generating LLM calls every layer with the same signature for each new token. Changing ``execution``, the
    grad mode, ``requires_grad``, train/eval mode or the device changes the signature, so no answer goes
    stale. Under ``torch.compile`` the choice is traced (and guarded) as plain code instead.
    """
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    # Grad mode off (generation) or an input that requires a gradient (training) settles it without walking
    # the parameters; only a grad-mode call on a constant input asks them.
    backward = torch.is_grad_enabled() and (x.requires_grad or records_gradient(*matrix.parameters()))
    # As the matrix's forward decides (surm.structures._reuse.reusable); under torch.compile it reuses nothing.
    reused = not backward and not matrix.training and not torch.compiler.is_compiling()

    def choose() -> str:
        return choose_path(execution, matrix, tokens, folded=folded, backward=backward, reused=reused,
                           device_type=x.device.type)

    if torch.compiler.is_compiling():
        return choose()
    key = (execution, tokens, folded, backward, reused, x.device.type)
    path = paths.get(key)
    if path is None:
        if len(paths) >= PATH_CACHE_SIZE:
            paths.clear()
        path = paths[key] = choose()
    return path


def scaled_dense(matrix: StructuredMatrix, alpha: float = 1.0) -> Tensor:
    """``alpha · dense(M)``, in M's dtype (``dense(M)`` itself for alpha 1)."""
    dense = matrix.dense()
    return dense if alpha == 1.0 else alpha * dense


def dense_product(matrix: StructuredMatrix, kept: ParameterCache[Tensor], x: Tensor, alpha: float = 1.0) -> Tensor:
    """``x @ (alpha · dense(M))^T`` in the dtype of x (computed as the family's forward is, :func:`compute_dtype`).

    ``alpha · dense(M)`` (:func:`scaled_dense`) is kept in ``kept`` for the next call while that call may reuse it
    (:func:`~surm.structures._reuse.reusable`: eval mode, no gradient recorded) and M is small
    (:func:`~surm.execution.keeps_dense`), as a layer keeps its folded weight; otherwise it is built on each call,
    with its gradients.
    """
    params = tuple(matrix.parameters())
    dtype = compute_dtype(x, *params)

    def build() -> Tensor:
        return cast(scaled_dense(matrix, alpha), dtype)

    if keeps_dense(matrix) and reusable(x, params, matrix.training):
        weight = kept.get(params, (dtype, alpha), build)
    else:
        weight = build()
    return cast(F.linear(cast(x, dtype), weight), x.dtype)


class DeltaUpdate(nn.Module):
    """The additive update of mode "delta": x ↦ s · M(dropout(x)), so that h = W0 x + b + s · M(dropout(x)).

    Merging adds ``s · dense(M)`` to W0 (:meth:`delta_weight`), which equals the unmerged output in eval mode.

    Two execution paths give the same values (see :mod:`surm.execution`): ``"structured"`` applies M's fast
    apply to every row of x; ``"dense"`` builds ``s · dense(M)`` once per call and multiplies by it (gradients reach
    the parameters through ``dense()``). ``"auto"`` picks the cheaper for the call's token count, shape, device
    and whether gradients are needed. A :class:`~surm.peft.layer.SurmLayer` can also fold the dense path into its
    base layer's product (:meth:`path` with ``folded=True``).

    Args:
        matrix: M, of shape (out_features, in_features) of the adapted layer.
        alpha: s, the scale of the update.
        dropout: dropout probability on the input x.
        execution: ``"auto"``, ``"structured"`` or ``"dense"``.

    Raises:
        ValueError: for an unknown ``execution`` (naming the valid ones).
    """

    def __init__(
        self, matrix: StructuredMatrix, alpha: float = 1.0, dropout: float = 0.0, execution: str = "auto"
    ) -> None:
        super().__init__()
        self.matrix = matrix
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.execution = check_execution(execution)
        self._paths: dict[tuple[str, int, bool, bool, bool, str], str] = {}
        self._kept: ParameterCache[Tensor] = ParameterCache()

    def train(self, mode: bool = True) -> DeltaUpdate:
        """Set the mode; switching it forgets the kept s · dense(M) (:func:`forget_on_mode_switch`)."""
        forget_on_mode_switch(self, mode)
        return super().train(mode)

    @property
    def has_dropout(self) -> bool:
        """True if dropout is active (training with p > 0): the update's input then differs from the layer's."""
        return _dropout_is_active(self.dropout)

    def path(self, x: Tensor, folded: bool = False) -> str:
        """``"structured"`` or ``"dense"``: how this update applies to ``x`` now (:func:`remembered_path`)."""
        return remembered_path(self._paths, self.matrix, self.execution, x, folded)

    def forward(self, x: Tensor, path: Optional[str] = None) -> Tensor:
        """(..., in_features) -> (..., out_features), in the dtype of x.

        ``path`` is the execution path when the caller has already asked :meth:`path` for x (a layer does, to
        decide whether to fold); otherwise it is asked here. Identity dropout (p = 0, or eval mode) is skipped
        rather than called: it returns x itself either way. The dense path is :func:`dense_product` (s · dense(M)
        kept between calls that may reuse it, for a small M).
        """
        x = _dropped_out(self.dropout, x)
        if (path or self.path(x)) == "dense":
            return dense_product(self.matrix, self._kept, x, self.alpha)
        y = self.matrix(x)
        return y if self.alpha == 1.0 else self.alpha * y

    def delta_weight(self) -> Tensor:
        """s · dense(M), shape (out_features, in_features), in the adapter's dtype."""
        return scaled_dense(self.matrix, self.alpha)

    def num_parameters(self) -> int:
        return self.matrix.num_parameters()


class OutputAdapter(nn.Module):
    """The increment of mode "adapter" on a sub-layer output h (callers compute h + adapter(h)).

    * no bottleneck (SURM-Adapter): ``act(S · dropout(h)) + b`` with S a structured d x d map and b in R^d; with
      S = 0 and b = 0 at start, the adapted output is h (act(0) = 0 for every allowed act, and act'(0) != 0 so
      S gets a gradient). Parameters: params(S) + d; without the bias (``bias=False``), ``act(S · dropout(h))``
      and params(S): with ``act`` the identity, the adapted output is ``(I + S) h``.
    * ``bottleneck=k`` (Houlsby/Pfeiffer form): ``U act(D · dropout(h))`` with structured D (k x d) and
      U (d x k); U starts at zero (its family's zero init), D random. Parameters: params(D) + params(U).

    Not mergeable: act is non-linear in general, and the linear form (identity act, no bias: ``(I + S) h``) is not
    merged either (its weight would be ``(I + S) W0``, a product, not a sum of deltas).

    Args:
        features: d, the size of h.
        name: the structured family of S (or D and U).
        options: family options.
        bottleneck: k, 1 <= k <= d (a wider "bottleneck" adds parameters, not expressiveness), or None for the
            single d x d map.
        activation: one of ``gelu``, ``tanh``, ``silu``, ``identity``.
        dropout: dropout probability on h before the map.
        identity_init: True for the identity at start; False for a random, non-identity adapter.
        bias: whether the single d x d map has its bias b (the bottleneck form has none).
        execution: how each map applies, as for a :class:`DeltaUpdate` applied on its own (never folded):
            ``"structured"`` (the family's fast apply), ``"dense"`` (``x @ dense(S)^T``, gradients through
            ``dense()``; a small map's dense form kept between eval-mode calls that record no gradient) or
            ``"auto"`` (the cheaper by :func:`~surm.execution.choose_path`, per map and call signature).

    Raises:
        ValueError: for an unknown activation (naming the valid ones), a bottleneck outside 1..d, or an unknown
            ``execution``; all are checked before anything is allocated.
    """

    def __init__(
        self,
        features: int,
        name: str,
        options: dict[str, Any],
        bottleneck: int | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        identity_init: bool = True,
        bias: bool = True,
        execution: str = "auto",
    ) -> None:
        super().__init__()
        self.execution = check_execution(execution)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if bottleneck is not None and not (is_int(bottleneck, minimum=1) and bottleneck <= features):
            raise ValueError(
                f"bottleneck must be None or an integer in 1..{features} (at most the features d={features}), "
                f"got {bottleneck!r}"
            )
        self.features = features
        self.bottleneck = bottleneck
        self.activation = activation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init = "zero" if identity_init else "random"
        if bottleneck is None:
            self.map = structure(name, features, features, init=init, **options)
            self.bias = None
            if bias:
                self.bias = nn.Parameter(torch.zeros(features) if identity_init else 0.01 * torch.randn(features))
            self.down = self.up = None
        else:
            self.map = self.bias = None
            self.down = structure(name, bottleneck, features, init="random", **options)
            self.up = structure(name, features, bottleneck, init=init, **options)
        self._kept_map: ParameterCache[Tensor] = ParameterCache()
        self._kept_down: ParameterCache[Tensor] = ParameterCache()
        self._kept_up: ParameterCache[Tensor] = ParameterCache()
        self._paths: dict[str, dict[tuple, str]] = {"map": {}, "down": {}, "up": {}}

    def train(self, mode: bool = True) -> OutputAdapter:
        """Set the mode; switching it forgets the kept dense maps (:func:`forget_on_mode_switch`)."""
        forget_on_mode_switch(self, mode)
        return super().train(mode)

    def forward(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., d): the increment added to h, in the dtype of h (identity dropout is skipped)."""
        act = _ACTIVATIONS[self.activation]
        x = _dropped_out(self.dropout, h)
        if self.map is not None:
            out = act(_upcast(self._product("map", self.map, self._kept_map, x)))
            return (out if self.bias is None else out + self.bias).to(h.dtype)
        inner = act(_upcast(self._product("down", self.down, self._kept_down, x))).to(h.dtype)
        return self._product("up", self.up, self._kept_up, inner)

    def _product(self, role: str, matrix: StructuredMatrix, kept: ParameterCache[Tensor], x: Tensor) -> Tensor:
        """M x by the path ``execution`` asks for (:func:`remembered_path`, never folded: an adapter's map has no
        base product to share): the family's own apply, or :func:`dense_product` (for a small map, dense(M) kept
        between calls that may reuse it, e.g. the one token of each generation step)."""
        if remembered_path(self._paths[role], matrix, self.execution, x) == "dense":
            return dense_product(matrix, kept, x)
        return matrix(x)

    def num_parameters(self) -> int:
        if self.map is not None:
            return self.map.num_parameters() + (0 if self.bias is None else self.features)
        return self.down.num_parameters() + self.up.num_parameters()
