"""SurmLayer: a PEFT tuner layer that wraps one Linear / Conv1D / 1x1 Conv2d and holds named surm adapters."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..insertion import DeltaUpdate, OutputAdapter
from ..structures import structure
from .config import SurmConfig

SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D and torch.nn.Conv2d with a 1x1 kernel and groups=1"
#: The name that sends a row of a mixed batch to the base model alone (PEFT's spelling, shared with LoRA).
BASE_ROWS = "__base__"


class NotMergeableError(ValueError):
    """Raised when an adapter-mode adapter is asked to merge: h + act(S h) is not a linear map of x."""


def _layer_geometry(base_layer: nn.Module) -> tuple[str, int, int]:
    """(kind, in_features, out_features) of a supported base layer, or a TypeError naming what is supported."""
    if isinstance(base_layer, nn.Linear):
        return "linear", base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return "conv1d", in_features, out_features
    if isinstance(base_layer, nn.Conv2d):
        if tuple(base_layer.kernel_size) != (1, 1) or base_layer.groups != 1:
            raise TypeError(
                f"surm supports nn.Conv2d only with kernel_size=(1, 1) and groups=1 (a pointwise linear map), got "
                f"kernel_size={tuple(base_layer.kernel_size)}, groups={base_layer.groups}"
            )
        return "conv2d", base_layer.in_channels, base_layer.out_channels
    raise TypeError(f"surm cannot adapt {type(base_layer).__name__}; supported layers: {SUPPORTED_LAYERS}")


class SurmLayer(nn.Module, BaseTunerLayer):
    """A base layer plus named surm adapters whose effects add (they never chain).

    For input x and base output ``h0 = base(x)``:
    ``h = h0 + Σ_{delta adapters a} s_a · M_a(dropout(x))`` and ``out = h + Σ_{adapter-mode adapters b} f_b(h)``,
    each over the active adapters. Delta adapters merge into the base weight (``get_delta_weight`` is the one
    source of truth for merge, unmerge and export); adapter-mode adapters refuse to merge.

    A delta adapter whose execution path (``SurmConfig.execution``, :mod:`surm.execution`) is dense is folded into
    the base product, ``base(x; W0 + s_a · dense(M_a))``, where the layer allows it (see :meth:`can_fold`);
    the others add ``s_a · M_a(dropout(x))`` to the base output.

    ``forward(x, adapter_names=[n_0, ..., n_{N-1}])`` (a mixed batch, PEFT's ``adapter_names``) gives row i the
    output of adapter n_i alone, or of the base layer for ``"__base__"`` (see :meth:`mixed_batch_forward`).
    """

    adapter_layer_names = ("surm_delta", "surm_adapter")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SurmConfig, settings: dict[str, Any]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind, self.in_features, self.out_features = _layer_geometry(self.get_base_layer())
        self.surm_delta = nn.ModuleDict()
        self.surm_adapter = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, settings)

    def update_layer(self, adapter_name: str, config: SurmConfig, settings: dict[str, Any]) -> None:
        """Create adapter ``adapter_name`` from the resolved per-module ``settings`` (see ``SurmConfig.resolve``)."""
        if adapter_name in self.surm_delta or adapter_name in self.surm_adapter:
            raise ValueError(f"this layer already has an adapter named {adapter_name!r}")
        init = "zero" if config.init_weights else "random"
        if config.mode == "delta":
            matrix = structure(settings["structure"], self.out_features, self.in_features, init=init,
                               **settings["options"])
            self.surm_delta[adapter_name] = DeltaUpdate(matrix, settings["alpha"], config.dropout, config.execution)
        else:
            self.surm_adapter[adapter_name] = OutputAdapter(
                self.out_features,
                settings["structure"],
                settings["options"],
                bottleneck=settings["bottleneck"],
                activation=config.activation,
                dropout=config.dropout,
                identity_init=config.init_weights,
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- merging ---------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> Tensor:
        """s · dense(M) of a delta adapter, in the base weight's layout and dtype."""
        if adapter not in self.surm_delta:
            if adapter in self.surm_adapter:
                raise NotMergeableError(
                    f"adapter {adapter!r} is in mode 'adapter' (h + act(S h)), which has no weight delta and cannot "
                    "be merged or exported; use unload() or disable_adapter() instead"
                )
            raise KeyError(f"no adapter named {adapter!r} on this layer; it has {self._all_available_adapter_names()}")
        weight = self.get_base_layer().weight
        delta = self.surm_delta[adapter].delta_weight()
        if self.kind == "conv1d":
            delta = delta.T
        elif self.kind == "conv2d":
            delta = delta[:, :, None, None]
        return delta.to(device=weight.device, dtype=weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or named) delta adapters to the base weight.

        Every delta is checked for non-finite values before the weight is touched; with ``safe_merge`` the
        merged weight is built in a copy and checked too (catches overflow in float16). Already merged adapters
        are skipped, so merging twice is a no-op.

        Raises:
            NotMergeableError: if one of the adapters is in mode 'adapter'.
            ValueError: if a delta or the merged weight would be non-finite; nothing is merged then.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.surm_adapter:
                self.get_delta_weight(name)  # raises NotMergeableError with the explanation
        base = self.get_base_layer()
        names = [name for name in adapter_names if name in self.surm_delta]
        deltas = [self.get_delta_weight(name) for name in names]
        for name, delta in zip(names, deltas):
            if not torch.isfinite(delta).all():
                raise ValueError(f"adapter {name!r} has non-finite values in its weight delta; refusing to merge it")
        if safe_merge:
            merged = base.weight.data.clone()
            for name, delta in zip(names, deltas):
                merged += delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights; refusing to merge it")
            base.weight.data = merged
        else:
            for delta in deltas:
                base.weight.data += delta
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged delta adapter from the base weight again (restores W0 to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.surm_delta:
                self.get_base_layer().weight.data -= self.get_delta_weight(name)

    # -- forward -------------------------------------------------------------------------------------------

    def _delta_input(self, x: Tensor) -> Tensor:
        """The rows the base layer multiplies by its weight, channel-last: the input of every delta adapter."""
        if self.kind != "conv2d":
            return x
        conv = self.get_base_layer()
        padding = conv.padding if not isinstance(conv.padding, str) else (0, 0)  # 'same' and 'valid' are 0 for 1x1
        if any(padding):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=mode)
        x = x[..., :: conv.stride[0], :: conv.stride[1]]
        return x.movedim(-3, -1)

    def _channels_last(self, h: Tensor) -> Tensor:
        return h.movedim(-3, -1) if self.kind == "conv2d" else h

    def _channels_back(self, h: Tensor) -> Tensor:
        return h.movedim(-1, -3) if self.kind == "conv2d" else h

    def can_fold(self, delta: DeltaUpdate, x: Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether ``delta`` may be applied inside the base layer's product as ``W0 + s · dense(M)``.

        Only for the plain layer types (not subclasses such as quantised layers), without extra call arguments,
        without active dropout on the update's input (it would differ from the base layer's input), and in
        float32/float64 (adding a small update to a half-precision weight would round it away).
        """
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        return (
            not args
            and not kwargs
            and type(base) in (nn.Linear, Conv1D, nn.Conv2d)
            and not delta.has_dropout
            and weight is not None
            and weight.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype
        )

    def _base_forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's forward with ``weight`` in place of its own (same layout, same bias)."""
        base = self.get_base_layer()
        if self.kind == "linear":
            return F.linear(x, weight, base.bias)
        if self.kind == "conv1d":  # transformers' Conv1D: x @ W + b with W of shape (in, out)
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ weight if base.bias is None else torch.addmm(base.bias, flat, weight)
            return out.view(*x.shape[:-1], weight.shape[-1])
        return base._conv_forward(x, weight, base.bias)

    def forward(self, x: Tensor, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Tensor:
        """The base output plus the active adapters' effects, or each row's named adapter alone with ``adapter_names``.

        See the class docstring and :meth:`mixed_batch_forward`; while adapters are disabled, the base output alone.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = self.active_adapters
        # Merged deltas are already in the base weight; the other active ones still apply (after a partial merge).
        names = [n for n in active if n in self.surm_delta and n not in self.merged_adapters]
        rows = self._delta_input(x) if names else x
        # The dense path folds s · dense(M) into the base product (see surm.execution); the rest add their update.
        folded = [
            n
            for n in names
            if self.can_fold(self.surm_delta[n], x, args, kwargs)
            and self.surm_delta[n].path(rows, folded=True) == "dense"
        ]
        if folded:
            weight = self.get_base_layer().weight + sum(self.get_delta_weight(n) for n in folded)
            result = self._base_forward_with_weight(x, weight)
        else:
            result = self.base_layer(x, *args, **kwargs)
        separate = [self.surm_delta[n] for n in names if n not in folded]
        if separate:
            update = sum(delta(rows) for delta in separate)
            result = result + self._channels_back(update).to(result.dtype)
        adapters = [self.surm_adapter[name] for name in active if name in self.surm_adapter]
        if adapters:
            h = self._channels_last(result)
            result = result + self._channels_back(sum(adapter(h) for adapter in adapters)).to(result.dtype)
        return result

    def mixed_batch_forward(self, x: Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Tensor:
        """Row i gets adapter ``adapter_names[i]`` alone, whichever adapters are active.

        With ``h0 = base(x)`` and n_i = ``adapter_names[i]``: ``h_i = h0_i + s_a · M_a(x_i)`` if n_i names a delta
        adapter a, ``h_i = h0_i + f_b(h0_i)`` if it names an adapter-mode adapter b, and ``h_i = h0_i`` for
        :data:`BASE_ROWS` (``"__base__"``) or a name that has no adapter on this layer (an adapter may target only
        some layers; :class:`~surm.peft.model.SurmModel` checks that every name exists somewhere). Rows are
        grouped by name, so each adapter applies once, to its rows. A delta adapter never folds into the base
        weight here (that weight is shared by every row): its dense path multiplies by ``s · dense(M)`` separately.

        Args:
            x: (N, ..., in_features), or (N, in_channels, H, W) for a Conv2d.
            adapter_names: N names, one per row.

        Returns:
            The layer output, (N, ..., out_features) or (N, out_channels, H', W').

        Raises:
            ValueError: for an unbatched x (fewer than 2 dimensions; 4 for a Conv2d), if the number of names is
                not N, or if an adapter is merged into the base weight (every row would get it).
        """
        needed = 4 if self.kind == "conv2d" else 2
        if x.dim() < needed:
            raise ValueError(
                f"adapter_names routes the rows of a batched input, but this {self.kind} layer got an input of shape "
                f"{tuple(x.shape)}; it needs at least {needed} dimensions with the batch first"
            )
        rows = x.shape[0]
        if len(adapter_names) != rows:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} name(s) but the batch has {rows} row(s); pass one adapter "
                f"name (or {BASE_ROWS!r}) per row"
            )
        if self.merged:
            raise ValueError(
                f"adapter_names cannot route rows while adapter(s) {self.merged_adapters} are merged into the base "
                "weight (every row would get them); call unmerge_adapter() first"
            )
        result = self.base_layer(x, *args, **kwargs)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name in self.surm_delta or name in self.surm_adapter:
                groups.setdefault(name, []).append(row)
        if not groups:
            return result
        inputs = self._delta_input(x) if any(name in self.surm_delta for name in groups) else x
        increment = torch.zeros_like(result)
        for name, group in groups.items():
            index = slice(None) if len(group) == rows else torch.tensor(group, device=x.device)
            if name in self.surm_delta:
                effect = self.surm_delta[name](inputs[index])
            else:
                effect = self.surm_adapter[name](self._channels_last(result[index]))
            increment[index] = self._channels_back(effect).to(result.dtype)
        return result + increment

    def __repr__(self) -> str:
        return "surm." + super().__repr__()
