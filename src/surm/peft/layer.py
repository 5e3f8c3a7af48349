"""SurmLayer: a PEFT tuner layer that wraps one Linear / Conv1D / 1x1 Conv2d and holds named surm adapters.

The base layer may be quantised (bitsandbytes 8-bit / 4-bit, torchao, HQQ, ...): PEFT's quantisation backends
(``peft.utils.resolve_quantization_backend``) dequantise and requantise its weight for merging; surm's update is
then always added outside the base product.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from peft.utils.quantization_utils import QuantizationBackend
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..execution import KEPT_DENSE_MAX_NUMBERS
from ..insertion import DeltaUpdate, OutputAdapter
from ..structures import structure
from ..structures._reuse import ParameterCache, forget_on_mode_switch, reusable
from ..structures.base import cast
from .config import SurmConfig

SUPPORTED_LAYERS = (
    "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv2d with a 1x1 kernel and groups=1, and linear layers of a "
    "quantisation library that PEFT knows (bitsandbytes, torchao, HQQ, GPTQ, AQLM, EETQ)"
)
#: The name that sends a row of a mixed batch to the base model alone (PEFT's spelling, shared with LoRA).
BASE_ROWS = "__base__"


#: The flag bitsandbytes sets on a 4-bit weight's quant_state when a CPU inference forward (eval mode, no gradient,
#: a CPU with AVX512-BF16) has repacked the weight in place for its fused kernel. That kernel has no backward (no
#: gradient reaches the layer's input); ``dequantize_4bit`` of a packed weight returns garbage; and bitsandbytes' own
#: unpacking (which ``state_dict()`` runs) leaves the block scales transposed unless they are double-quantised,
#: corrupting every layer with in_features > 64 (bitsandbytes 0.50.2; see also bitsandbytes issue #2078). surm reads
#: such a weight through the layer's forward (:func:`read_linear_weight`) and unpacks it itself
#: (:func:`unpack_cpu_packed`) before a training forward and before saving.
CPU_PACKING_FLAG = "packing_format_for_cpu"
#: Identity rows per forward call when a weight is read through its layer's forward (bounds the probe's memory).
PROBE_ROWS = 1024


class NotMergeableError(ValueError):
    """Raised when an adapter cannot be merged into its base weight.

    Either the adapter is in mode 'adapter' (h + act(S h) acts on the module's output and is not merged, even in
    its linear form), or the base weight is not a plain floating-point tensor and no quantisation backend can
    dequantise and requantise it (an integer weight of an unknown ``nn.Linear`` subclass, a forward-only GPTQ /
    AQLM / EETQ layer).
    """


def is_plain_float(weight: object) -> bool:
    """True for a plain floating-point tensor or ``nn.Parameter``: one whose values are the weight itself.

    Quantised weights are integer codes (bitsandbytes' ``Int8Params`` and ``Params4bit``) or tensor subclasses that
    report a float dtype while storing codes (torchao); neither may be added to or multiplied as it is.
    """
    return type(weight) in (Tensor, nn.Parameter) and weight.is_floating_point()


def _layer_geometry(base_layer: nn.Module, backend: Optional[QuantizationBackend]) -> tuple[str, int, int]:
    """(kind, in_features, out_features) of a supported base layer, or a TypeError naming what is supported.

    A layer that is no ``nn.Linear`` but has a quantisation ``backend`` of layer type "linear" (HQQ, GPTQ, ...)
    is a linear layer with its ``in_features`` and ``out_features``.
    """
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
    sizes = (getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None))
    if backend is not None and backend.layer_type == "linear" and all(isinstance(n, int) for n in sizes):
        return "linear", sizes[0], sizes[1]
    raise TypeError(f"surm cannot adapt {type(base_layer).__name__}; supported layers: {SUPPORTED_LAYERS}")


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether ``module``'s 4-bit weight is in bitsandbytes' CPU inference packing (see :data:`CPU_PACKING_FLAG`)."""
    return bool(getattr(getattr(getattr(module, "weight", None), "quant_state", None), CPU_PACKING_FLAG, False))


def read_linear_weight(module: nn.Module, in_features: int) -> Tensor:
    """W (out_features, in_features) of a linear (affine) ``module`` as its forward applies it: (f(I) - f(0))ᵀ.

    Used for a weight that cannot be dequantised where it lies (a 4-bit weight repacked for CPU inference): the
    layer's own kernel computes it. The identity goes through in blocks of :data:`PROBE_ROWS` rows, in the layer's
    compute dtype (float32 if it has none); f(0) is the bias.
    """
    device = module.weight.device
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    with torch.no_grad():
        offset = module(torch.zeros(1, in_features, device=device, dtype=dtype))
        columns = []
        for start in range(0, in_features, PROBE_ROWS):
            rows = min(PROBE_ROWS, in_features - start)
            identity = F.pad(torch.eye(rows, in_features - start, device=device, dtype=dtype), (start, 0))
            columns.append(module(identity) - offset)
    return torch.cat(columns).T.contiguous()


class _LayerView:
    """What PEFT's bitsandbytes backends use of a tuner layer in ``set_base_weight``: ``get_base_layer()``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def get_base_layer(self) -> nn.Module:
        return self.module


def unpack_cpu_packed(module: nn.Module) -> bool:
    """Give a 4-bit weight repacked for CPU inference (:data:`CPU_PACKING_FLAG`) its standard layout back.

    The weight is read through the layer's forward (:func:`read_linear_weight`) and quantised again by PEFT's
    backend for the layer; that gives back the packed weight's codes (the read differs from them by the output
    rounding, far below half a 4-bit step) and its block scales, so the layer computes exactly what it computed
    packed. Double-quantised scales (``bnb_4bit_use_double_quant``), which the packing turned into bfloat16, are
    quantised to 8 bits again, as bitsandbytes' own unpacking does (0.3 % of the logits of a tiny Llama).
    bitsandbytes packs the weight again at its next CPU inference forward. Needed before a forward that must pass
    gradients through the layer (the packed kernel has none) and before saving (bitsandbytes' own unpacking
    corrupts the block scales); a no-op for any other module.

    Returns:
        True if the weight was unpacked.
    """
    if not is_cpu_packed(module):
        return False
    backend = resolve_quantization_backend(module)
    if backend is None or not backend.supports_merge:
        return False
    backend.set_base_weight(_LayerView(module), read_linear_weight(module, module.in_features))
    return True


def _total(tensors: Iterable[Tensor]) -> Tensor:
    """The sum of one or more tensors, left to right. ``sum()`` starts from the integer 0, which costs one more
    addition on every layer call; it gives the same values (up to the sign of a zero)."""
    return functools.reduce(operator.add, tensors)


def _unpack_before_saving(layer: SurmLayer, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook of a quantised SurmLayer: unpack a repacked 4-bit base weight before it is saved.

    bitsandbytes would otherwise unpack it itself, and its unpacking corrupts the weight in memory (see
    :data:`CPU_PACKING_FLAG`); ``PeftModel.save_pretrained`` reads the whole model's state dict.
    """
    unpack_cpu_packed(layer.get_base_layer())


class SurmLayer(nn.Module, BaseTunerLayer):
    """A base layer plus named surm adapters whose effects add (they never chain).

    For input x and base output ``h0 = base(x)``:
    ``h = h0 + Σ_{delta adapters a} s_a · M_a(dropout(x))`` and ``out = h + Σ_{adapter-mode adapters b} f_b(h)``,
    each over the active adapters. Delta adapters merge into the base weight (``get_delta_weight`` is the one
    source of truth for merge, unmerge and export); adapter-mode adapters refuse to merge.

    A delta adapter whose execution path (``SurmConfig.execution``, :mod:`surm.execution`) is dense is folded into
    the base product, ``base(x; W0 + s_a · dense(M_a))``, where the layer allows it (see :meth:`can_fold`);
    the others add ``s_a · M_a(dropout(x))`` to the base output. A small layer keeps that folded weight between
    eval-mode calls that record no gradient (:meth:`_forward_folded`).

    A base layer whose weight is not a plain float tensor (a quantised layer, whose ``quantization_backend`` is
    PEFT's backend for its library, or an integer weight that no backend knows) computes ``h0 = base(x)`` with its
    own kernel, and the updates are always added to h0, never folded into its weight. Merging dequantises W0, adds
    the deltas and quantises again through the backend (:meth:`get_base_weight`, :meth:`set_base_weight`); a
    weight that no backend can write back refuses to merge (:meth:`merge_refusal`).

    ``forward(x, adapter_names=[n_0, ..., n_{N-1}])`` (a mixed batch, PEFT's ``adapter_names``) gives row i the
    output of adapter n_i alone, or of the base layer for ``"__base__"`` (see :meth:`mixed_batch_forward`).
    """

    adapter_layer_names = ("surm_delta", "surm_adapter")
    other_param_names = ()
    #: The layer types whose product a dense update may be folded into (see :meth:`can_fold`).
    FOLDABLE = (nn.Linear, Conv1D, nn.Conv2d)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SurmConfig,
        settings: dict[str, Any],
        quantization_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        """Wrap ``base_layer`` and add adapter ``adapter_name``.

        ``quantization_kwargs`` are what a quantisation backend needs besides the layer
        (``peft.utils.get_quantization_kwargs(model)``: torchao's ``get_apply_tensor_subclass``).
        """
        super().__init__()
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer(), **(quantization_kwargs or {}))
        self.kind, self.in_features, self.out_features = _layer_geometry(
            self.get_base_layer(), self.quantization_backend
        )
        if self.quantization_backend is not None:
            self.register_state_dict_pre_hook(_unpack_before_saving)
        self.surm_delta = nn.ModuleDict()
        self.surm_adapter = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self._folded_weight: ParameterCache[Tensor] = ParameterCache()
        self.update_layer(adapter_name, config, settings)

    def train(self, mode: bool = True) -> SurmLayer:
        """Set the mode; switching it forgets the kept folded weight (:meth:`_forward_folded`,
        :func:`~surm.structures._reuse.forget_on_mode_switch`)."""
        forget_on_mode_switch(self, mode)
        return super().train(mode)

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer, unwrapped through nested tuner layers (PEFT's, without probing the innermost layer
        for a ``base_layer`` attribute: that probe raises and catches an AttributeError on every forward)."""
        base = self.base_layer
        while isinstance(base, BaseTunerLayer):
            base = base.base_layer
        return base

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
                bias=config.adapter_bias,
                execution=config.execution,
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- merging ---------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> Tensor:
        """s · dense(M) of a delta adapter, in the base weight's layout and on its device.

        In the base weight's dtype when that weight is a plain float tensor; otherwise (a quantised or integer
        weight, which has no float dtype of its own, or none named ``weight``) in the adapter's dtype.
        """
        if adapter not in self.surm_delta:
            if adapter in self.surm_adapter:
                raise NotMergeableError(
                    f"adapter {adapter!r} is in mode 'adapter' (h + act(S h)), which has no weight delta and cannot "
                    "be merged or exported; use unload() or disable_adapter() instead"
                )
            raise KeyError(f"no adapter named {adapter!r} on this layer; it has {self._all_available_adapter_names()}")
        weight = getattr(self.get_base_layer(), "weight", None)
        delta = self.surm_delta[adapter].delta_weight()
        if self.kind == "conv1d":
            delta = delta.T
        elif self.kind == "conv2d":
            delta = delta[:, :, None, None]
        if not isinstance(weight, Tensor):  # a quantised layer that keeps its codes under another name (HQQ, GPTQ)
            return delta
        dtype = weight.dtype if is_plain_float(weight) else delta.dtype
        return delta.to(device=weight.device, dtype=dtype)

    def merge_refusal(self) -> Optional[str]:
        """Why delta adapters cannot be merged into this layer's base weight, or None if they can.

        They can if the weight is a plain float tensor (merged in place), or if a quantisation backend can
        dequantise and requantise it (bitsandbytes 8-bit and 4-bit, torchao, HQQ); not for a forward-only backend
        (GPTQ, AQLM, EETQ, ...) nor for a non-float weight that no backend knows.
        """
        base = self.get_base_layer()
        backend = self.quantization_backend
        if backend is not None:
            if backend.supports_merge:
                return None
            return (
                f"its base layer {type(base).__name__} is quantised by {backend.backend_name}, which cannot "
                "dequantise and requantise its weight"
            )
        weight = getattr(base, "weight", None)
        if is_plain_float(weight):
            return None
        return (
            f"its base layer {type(base).__name__} holds a weight of type {type(weight).__name__} and dtype "
            f"{getattr(weight, 'dtype', None)}, which is not a plain float tensor, and no quantisation backend "
            "(bitsandbytes 8-bit or 4-bit, torchao, HQQ) can dequantise and requantise it"
        )

    def get_base_weight(self) -> Tensor:
        """W0 as a float tensor, in :meth:`get_delta_weight`'s layout ((out_features, in_features) when quantised).

        For a plain weight, its own storage (merging adds to it in place); for a quantised one, a dequantised copy
        made by the quantisation backend. A bitsandbytes 4-bit weight that a CPU inference forward has repacked in
        place (see :data:`CPU_PACKING_FLAG`) is read through the layer's own forward instead
        (:func:`read_linear_weight`, ``W0ᵀ = base(I) - base(0)``), which is exactly the map its packed kernel
        applies; the packed weight is left as it is (a merge replaces it by a freshly quantised one).
        """
        base = self.get_base_layer()
        if is_cpu_packed(base):
            return read_linear_weight(base, self.in_features)
        return super().get_base_weight()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or named) delta adapters to the base weight: W0 <- W0 + Σ_a s_a · dense(M_a).

        Every delta is checked for non-finite values before the weight is touched; with ``safe_merge`` the
        merged weight is built in a copy and checked too (catches overflow in float16). Already merged adapters
        are skipped, so merging twice is a no-op.

        A quantised weight is dequantised, the deltas are added in float32 (or wider) and checked for non-finite
        values, and the sum is quantised again by the backend: ``W0 <- Q(deq(W0) + Σ_a s_a · dense(M_a))``. The
        merged layer then differs from the unmerged one by that rounding (a UserWarning says so).

        Raises:
            NotMergeableError: if one of the adapters is in mode 'adapter', or the base weight cannot be written
                back (see :meth:`merge_refusal`); nothing is merged then.
            ValueError: if a delta or the merged weight would be non-finite; nothing is merged then.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.surm_adapter:
                self.get_delta_weight(name)  # raises NotMergeableError with the explanation
        names = [name for name in adapter_names if name in self.surm_delta]
        if not names:
            return
        refusal = self.merge_refusal()
        if refusal is not None:
            raise NotMergeableError(
                f"cannot merge surm adapter(s) {names}: {refusal}; keep them unmerged (they run outside the base "
                "product) or use unload()"
            )
        deltas = [self.get_delta_weight(name) for name in names]
        for name, delta in zip(names, deltas):
            if not torch.isfinite(delta).all():
                raise ValueError(f"adapter {name!r} has non-finite values in its weight delta; refusing to merge it")
        quantised = self.quantization_backend is not None
        weight = self.get_base_weight()
        stored = weight.dtype
        if quantised:
            weight = weight.to(torch.promote_types(stored, torch.float32))
        elif safe_merge:
            weight = weight.clone()
        for name, delta in zip(names, deltas):
            weight += delta.to(weight.dtype)
            if (safe_merge or quantised) and not torch.isfinite(weight).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; refusing to merge it")
        if quantised:
            warnings.warn(
                f"merging surm adapters into a {self.quantization_backend.backend_name} weight quantises "
                "W0 + delta again: the merged layer differs from the unmerged one by that rounding (and unmerge "
                "rounds again)",
                UserWarning,
                stacklevel=2,
            )
            self.set_base_weight(weight.to(stored))
        elif safe_merge:
            self.get_base_layer().weight.data = weight
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged delta adapter from the base weight again.

        Restores W0 to float rounding; a quantised W0 is dequantised, the deltas subtracted and the result quantised
        again once, so W0 comes back to within the quantisation rounding.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        names = [name for name in reversed(self.merged_adapters) if name in self.surm_delta]
        self.merged_adapters.clear()
        if not names:
            return
        if self.quantization_backend is None:
            for name in names:
                self.get_base_layer().weight.data -= self.get_delta_weight(name)
            return
        weight = self.get_base_weight()
        restored = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for name in names:
            restored -= self.get_delta_weight(name).to(restored.dtype)
        self.set_base_weight(restored.to(weight.dtype))

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

        Only for the plain layer types (not subclasses such as quantised layers) holding a plain float weight (not
        a quantised tensor subclass, which torchao puts into a plain ``nn.Linear``) and no quantisation backend,
        without extra call arguments, without active dropout on the update's input (it would differ from the base
        layer's input), and in float32/float64 (adding a small update to a half-precision weight would round it
        away). Everywhere else the update is added to the base output.
        """
        if args or kwargs or self.quantization_backend is not None or x.dtype not in (torch.float32, torch.float64):
            return False
        base = self.get_base_layer()
        if type(base) not in self.FOLDABLE:
            return False
        weight = base.weight
        return is_plain_float(weight) and x.dtype == weight.dtype and not delta.has_dropout

    def _plan(self, delta: DeltaUpdate, rows: Tensor, x: Tensor, args: tuple, kwargs: dict) -> str:
        """How delta adapter ``delta`` applies to input ``x`` (``rows``: its input as the delta sees it):
        ``"folded"`` into the base product, or ``"dense"`` / ``"structured"`` added to the base output.

        The execution path is asked for the option that exists: folded dense against structured where
        :meth:`can_fold` accepts the call, separate dense against structured where it does not.
        """
        foldable = self.can_fold(delta, x, args, kwargs)
        path = delta.path(rows, folded=foldable)
        return "folded" if foldable and path == "dense" else path

    def _forward_folded(self, x: Tensor, names: Sequence[str]) -> Tensor:
        """The base layer's forward with ``W0 + sum_a s_a · dense(M_a)`` over the delta adapters ``names``.

        A layer with at most :data:`~surm.execution.KEPT_DENSE_MAX_NUMBERS` weights keeps that weight for the next
        call while it may be reused (:func:`~surm.structures._reuse.reusable`: eval mode, nothing records a
        gradient) and W0, the adapters' parameters, their scales and the adapters folded are unchanged
        (:class:`~surm.structures._reuse.ParameterCache`); switching mode forgets it.
        """
        base_weight = self.get_base_layer().weight

        def folded() -> Tensor:
            return base_weight + _total(self.get_delta_weight(n) for n in names)

        if base_weight.numel() > KEPT_DENSE_MAX_NUMBERS:
            return self._base_forward_with_weight(x, folded())
        deltas = [self.surm_delta[n] for n in names]
        params = (base_weight, *(p for delta in deltas for p in delta.matrix.parameters()))
        if not reusable(x, params, self.training):
            return self._base_forward_with_weight(x, folded())
        scales = tuple((n, delta.alpha) for n, delta in zip(names, deltas))
        return self._base_forward_with_weight(x, self._folded_weight.get(params, scales, folded))

    def _base_forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's forward with ``weight`` in place of its own (same layout, same bias).

        Only for a layer that :meth:`can_fold` accepts: a plain Linear, Conv1D or Conv2d with a plain float weight.
        """
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
        if self.quantization_backend is not None and torch.is_grad_enabled() and x.requires_grad:
            unpack_cpu_packed(self.get_base_layer())  # a repacked 4-bit weight passes no gradient to x
        deltas, merged = self.surm_delta, self.merged_adapters
        # Merged deltas are already in the base weight; the other active ones still apply (after a partial merge).
        # The dense path folds s · dense(M) into the base product (see surm.execution); the rest add their update.
        rows: Optional[Tensor] = None  # the deltas' input, built for the first delta that applies
        folded: list[str] = []
        separate: list[tuple[DeltaUpdate, str]] = []
        adapters: list[OutputAdapter] = []
        for name in self.active_adapters:
            if name in deltas:
                if name in merged:
                    continue
                if rows is None:
                    rows = self._delta_input(x)
                delta = deltas[name]
                plan = self._plan(delta, rows, x, args, kwargs)
                if plan == "folded":
                    folded.append(name)
                else:
                    separate.append((delta, plan))
            elif name in self.surm_adapter:
                adapters.append(self.surm_adapter[name])
        result = self._forward_folded(x, folded) if folded else self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None and (separate or adapters):
            result = self.quantization_backend.maybe_clone_base_result(result)  # PEFT copies bnb 4-bit outputs
        if separate:
            update = _total(delta(rows, path) for delta, path in separate)
            result = result + cast(self._channels_back(update), result.dtype)
        if adapters:
            h = self._channels_last(result)
            result = result + cast(self._channels_back(_total(adapter(h) for adapter in adapters)), result.dtype)
        return result

    def mixed_batch_forward(self, x: Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Tensor:
        """Row i gets adapter ``adapter_names[i]`` alone, whichever adapters are active.

        With ``h0 = base(x)`` and n_i = ``adapter_names[i]``: ``h_i = h0_i + s_a · M_a(x_i)`` if n_i names a delta
        adapter a, ``h_i = h0_i + f_b(h0_i)`` if it names an adapter-mode adapter b, and ``h_i = h0_i`` for
        :data:`BASE_ROWS` (``"__base__"``) or a name that has no adapter on this layer (an adapter may target only
        some layers; :class:`~surm.peft.model.SurmModel` checks that every name exists somewhere). Rows are
        grouped by name, so each adapter applies once, to its rows. Each group is computed as :meth:`forward`
        with that adapter alone would compute it for the whole batch, so a row's output does not depend on its
        neighbours' adapters (beyond the base product's own rounding): where that forward folds the delta into
        the base weight (the dense path, decided on the whole batch), the group's rows are multiplied by
        ``W + s · dense(M)``; otherwise ``s · M_a(x_i)`` is added to ``h0_i``.

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
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name in self.surm_delta or name in self.surm_adapter:
                groups.setdefault(name, []).append(row)
        if not groups:
            return result
        inputs = self._delta_input(x) if any(name in self.surm_delta for name in groups) else x
        output = result.clone()
        for name, group in groups.items():
            index = slice(None) if len(group) == rows else torch.tensor(group, device=x.device)
            if name in self.surm_delta:
                delta = self.surm_delta[name]
                plan = self._plan(delta, inputs, x, args, kwargs)
                if plan == "folded":
                    output[index] = cast(self._forward_folded(x[index], [name]), result.dtype)
                    continue
                effect = delta(inputs[index], plan)
            else:
                effect = self.surm_adapter[name](self._channels_last(result[index]))
            output[index] = result[index] + cast(self._channels_back(effect), result.dtype)
        return output

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "surm." + super().__repr__()
