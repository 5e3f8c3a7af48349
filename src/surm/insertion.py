"""How a structured matrix enters a network: as an additive update ΔW (delta) or as an Adapter on outputs.

Both are plain ``nn.Module`` objects, independent of PEFT; ``surm.peft`` attaches them to layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .execution import check_execution, choose_path
from .structures import StructuredMatrix, structure
from .structures.base import compute_dtype
from .validation import is_int

_ACTIVATIONS = {"gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "identity": lambda h: h}
#: Activations allowed in adapter mode: each has act(0) = 0 and act'(0) != 0 (ReLU would leave a zero S dead).
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)


def _upcast(t: Tensor) -> Tensor:
    """float64 stays float64; every other float dtype is computed in float32."""
    return t if t.dtype == torch.float64 else t.float()


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

    @property
    def has_dropout(self) -> bool:
        """True if dropout is active (training with p > 0): the update's input then differs from the layer's."""
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training

    def path(self, x: Tensor, folded: bool = False) -> str:
        """``"structured"`` or ``"dense"``: how this update applies to ``x`` (..., in_features) now.

        ``folded`` says whether the dense path would share the base layer's product (inside a SurmLayer).
        """
        tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        trainable = x.requires_grad or any(p.requires_grad for p in self.matrix.parameters())
        backward = torch.is_grad_enabled() and trainable
        return choose_path(
            self.execution, self.matrix, tokens, folded=folded, backward=backward, device_type=x.device.type
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features), in the dtype of x."""
        x = self.dropout(x)
        if self.path(x) == "dense":
            dtype = compute_dtype(x, *self.matrix.parameters())
            return F.linear(x.to(dtype), self.delta_weight().to(dtype)).to(x.dtype)
        y = self.matrix(x)
        return y if self.alpha == 1.0 else self.alpha * y

    def delta_weight(self) -> Tensor:
        """s · dense(M), shape (out_features, in_features), in the adapter's dtype."""
        dense = self.matrix.dense()
        return dense if self.alpha == 1.0 else self.alpha * dense

    def num_parameters(self) -> int:
        return self.matrix.num_parameters()


class OutputAdapter(nn.Module):
    """The increment of mode "adapter" on a sub-layer output h (callers compute h + adapter(h)).

    * no bottleneck (SURM-Adapter): ``act(S · dropout(h)) + b`` with S a structured d x d map and b in R^d; with
      S = 0 and b = 0 at start, the adapted output is h (act(0) = 0 for every allowed act, and act'(0) != 0 so
      S gets a gradient). Parameters: params(S) + d.
    * ``bottleneck=k`` (Houlsby/Pfeiffer form): ``U act(D · dropout(h))`` with structured D (k x d) and
      U (d x k); U starts at zero (its family's zero init), D random. Parameters: params(D) + params(U).

    Not mergeable: act is non-linear.

    Args:
        features: d, the size of h.
        name: the structured family of S (or D and U).
        options: family options.
        bottleneck: k, 1 <= k <= d (a wider "bottleneck" adds parameters, not expressiveness), or None for the
            single d x d map.
        activation: one of ``gelu``, ``tanh``, ``silu``, ``identity``.
        dropout: dropout probability on h before the map.
        identity_init: True for the identity at start; False for a random, non-identity adapter.

    Raises:
        ValueError: for an unknown activation (naming the valid ones), or a bottleneck outside 1..d; both are
            checked before anything is allocated.
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
    ) -> None:
        super().__init__()
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
            self.bias = nn.Parameter(torch.zeros(features) if identity_init else 0.01 * torch.randn(features))
            self.down = self.up = None
        else:
            self.map = self.bias = None
            self.down = structure(name, bottleneck, features, init="random", **options)
            self.up = structure(name, features, bottleneck, init=init, **options)

    def forward(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., d): the increment added to h, in the dtype of h."""
        act = _ACTIVATIONS[self.activation]
        x = self.dropout(h)
        if self.map is not None:
            return (act(_upcast(self.map(x))) + self.bias).to(h.dtype)
        return self.up(act(_upcast(self.down(x))).to(h.dtype))

    def num_parameters(self) -> int:
        if self.map is not None:
            return self.map.num_parameters() + self.features
        return self.down.num_parameters() + self.up.num_parameters()
