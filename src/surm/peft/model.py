"""SurmModel: the PEFT tuner that finds target modules and wraps them in SurmLayer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
)
from peft.utils.quantization_utils import get_quantization_kwargs
from torch import Tensor, nn

from ..validation import is_int
from .config import SurmConfig
from .layer import BASE_ROWS, NotMergeableError, SurmLayer, unpack_cpu_packed
from .weighted import add_weighted_adapter

#: Default Adapter placement (Houlsby, as in SURM): after the attention output projection and after the MLP / FFN
#: output projection of every block (PEFT matches these names as suffixes). BERT-like encoders end both in
#: "output.dense"; Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3) name them o_proj and down_proj;
#: Phi-1/2 dense and fc2; GPT-2 c_proj (attn.c_proj and mlp.c_proj).
ADAPTER_MODE_TARGET_MODULES: dict[str, list[str]] = {
    **{name: ["output.dense"]
       for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "data2vec-text")},
    **{name: ["o_proj", "down_proj"]
       for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "phi": ["self_attn.dense", "fc2"],
    "gpt2": ["c_proj"],
}
#: Checkpoint key fragments that make a tensor surm's own, whichever module it names: those keys load strictly.
SURM_KEY_MARKS = tuple(f"{container}." for container in SurmLayer.adapter_layer_names)
#: How many keys of each kind a load error lists.
KEYS_SHOWN = 3
#: The generate() settings whose maximum is how many rows transformers makes of each prompt (beams, returned samples).
ROW_COPY_SETTINGS = ("num_beams", "num_return_sequences")
#: Keyword arguments that hold a call's batch when it has no positional input (``generate(input_ids=...)``; the
#: input of a SurmLayer or a modules_to_save copy called by keyword).
BATCH_ARGUMENTS = ("input_ids", "inputs_embeds", "x", "input")


class SurmModel(BaseTuner):
    """Attaches surm adapters (see :class:`~surm.peft.config.SurmConfig`) to a model; created by ``get_peft_model``.

    On a model quantised with bitsandbytes 4-bit on the CPU, a forward in eval mode without gradients repacks the
    weights for a fused inference kernel that has no backward and that bitsandbytes cannot unpack correctly (see
    :data:`surm.peft.layer.CPU_PACKING_FLAG`). A training forward and saving therefore first restore every
    repacked 4-bit layer of the model, adapted or not, to the standard layout (:meth:`unpack_quantized_weights`);
    otherwise gradients would stop at every repacked layer and saving would corrupt the base weights in memory.
    """

    prefix: str = "surm_"
    tuner_layer_cls = SurmLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(
        self,
        model: nn.Module,
        peft_config: SurmConfig | dict[str, SurmConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, Tensor]] = None,
    ) -> None:
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.register_state_dict_pre_hook(_unpack_before_saving)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in training mode with gradients, after :meth:`unpack_quantized_weights`."""
        if self.training and torch.is_grad_enabled():
            self.unpack_quantized_weights()
        return super().forward(*args, **kwargs)

    def unpack_quantized_weights(self) -> int:
        """Restore every bitsandbytes 4-bit weight that a CPU inference forward repacked; return how many.

        See :func:`surm.peft.layer.unpack_cpu_packed`: the layers then compute what they computed packed (up to
        the 8-bit rounding of double-quantised scales), pass gradients again and save correctly; bitsandbytes packs
        them again at the next CPU inference forward.
        """
        return sum(unpack_cpu_packed(module) for module in self.model.modules())

    def _prepare_adapter_config(self, peft_config: SurmConfig, model_config: dict) -> SurmConfig:
        if peft_config.target_modules is not None:
            return peft_config
        model_type = model_config.get("model_type")
        defaults = self.target_module_mapping if peft_config.mode == "delta" else ADAPTER_MODE_TARGET_MODULES
        if model_type not in defaults:
            raise ValueError(
                f"SurmConfig(mode={peft_config.mode!r}) has no default target_modules for model_type={model_type!r}; "
                "pass target_modules (module names, a regex or 'all-linear')"
            )
        peft_config.target_modules = set(defaults[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: SurmConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: Optional[str] = None,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must be the module's full name")
        settings = peft_config.resolve(current_key)
        try:
            if isinstance(target, SurmLayer):
                target.update_layer(adapter_name, peft_config, settings)
                return
            new_module = SurmLayer(
                target, adapter_name, peft_config, settings, quantization_kwargs=get_quantization_kwargs(self)
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"cannot add surm adapter {adapter_name!r} to {current_key!r}: {error}") from error
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: ``...surm_delta.<adapter>.matrix.column`` -> ``...surm_delta.matrix.column``.

        PEFT's default only strips the adapter name from the last two segments; surm's adapters are modules with
        nested parameters, so the name sits right after the container. Used for both saving and loading.
        """
        pattern = rf"(^|\.)({'|'.join(SurmLayer.adapter_layer_names)})\.{re.escape(adapter_name)}\."
        stripped, count = re.subn(pattern, r"\1\2.", key, count=1)
        return stripped if count else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SurmConfig, adapter_name: str, state_dict: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """PEFT's key remapping, then a strict check of surm's own tensors against the adapter the config built.

        PEFT loads with ``strict=False`` and only warns about missing keys, so a folder whose adapter_config.json
        does not describe its adapter_model.safetensors (another structure, mode, size or set of targets) would load
        with the fresh initial weights in place of the trained ones. Here every tensor of adapter ``adapter_name``
        that the model holds (found structurally, on its SurmLayers) must be in the checkpoint
        with the same shape, a floating dtype and finite values, and no checkpoint tensor under ``surm_delta.`` or
        ``surm_adapter.`` may be left over. Other keys (``modules_to_save`` copies such as a classifier) keep PEFT's
        behaviour.

        Raises:
            ValueError: naming the adapter and the first missing and unexpected keys (in the checkpoint's spelling),
                or the tensor whose shape, dtype or values are wrong.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = _adapter_tensors(model, adapter_name)
        described = (
            f"surm adapter {adapter_name!r} (structure={getattr(config, 'structure', None)!r}, "
            f"mode={getattr(config, 'mode', None)!r})"
        )
        missing = [cls._remove_adapter_name_from_key(key, adapter_name) for key in expected if key not in remapped]
        unexpected = [key for key in remapped if key not in expected and any(m in key for m in SURM_KEY_MARKS)]
        if missing or unexpected:
            raise ValueError(
                f"{described}: its adapter_config.json does not match its weights: {len(missing)} missing key(s) "
                f"{_first_keys(missing)}, {len(unexpected)} unexpected key(s) {_first_keys(unexpected)}; load the "
                "weights with the config they were saved with"
            )
        for key, target in expected.items():
            value, saved = remapped[key], cls._remove_adapter_name_from_key(key, adapter_name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{described}: its adapter_config.json does not match its weights: {saved!r} has shape "
                    f"{tuple(value.shape)} in the weights but {tuple(target.shape)} in the adapter the config builds"
                )
            if not value.is_floating_point():
                raise ValueError(f"{described}: {saved!r} has dtype {value.dtype}; surm weights are floating point")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{described}: {saved!r} holds non-finite values (NaN or inf); refusing to load it")
        return remapped

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route the rows of a mixed batch while ``PeftModel.forward`` or ``generate`` runs (PeftModel calls this).

        With ``adapter_names=[n_0, ..., n_{B-1}]`` among the call's keyword arguments, row i of the batch gets
        adapter n_i alone, or the base model for ``"__base__"``, in every surm layer
        (:meth:`SurmLayer.mixed_batch_forward`) and every ``modules_to_save`` copy; without it, nothing changes.
        ``generate`` turns each row into e = max(num_beams, num_return_sequences) adjacent rows (the call's
        settings, else its ``generation_config``, else the model's): a module whose batch has e · B rows gives
        row j the name n_{j // e}, one whose batch has B rows (an encoder) gives row i the name n_i. The routing
        is removed when the call returns or raises.

        Raises:
            TypeError: if ``adapter_names`` is not a list or tuple of str.
            ValueError: if the model is in training mode, a name is neither an adapter of this model nor
                ``"__base__"``, an adapter is merged, or the call's input (where it shows one) does not have B
                rows; during the call, if a module's input has neither B nor e · B rows.
        """
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        names = self._check_adapter_names(names)
        copies = generation_row_copies(self.model, kwargs)
        rows = leading_rows(args, kwargs)
        if rows is not None and rows != len(names):
            raise ValueError(_count_mismatch(len(names), "the input", rows, copies))
        handles = []
        try:
            for name, module in self.model.named_modules():
                if isinstance(module, (SurmLayer, AuxiliaryTrainingWrapper)):
                    route = partial(_route_rows, names=names, copies=copies, where=name)
                    handles.append(module.register_forward_pre_hook(route, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, names: object) -> tuple[str, ...]:
        """``names`` as a tuple, if this model can route a mixed batch by them now (see the hook above)."""
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"adapter_names must be a list of adapter names (str), one per row of the batch, got {names!r}"
            )
        if self.training:
            raise ValueError(
                f"adapter_names={list(names)!r} is for inference, but the model is in training mode; call "
                "model.eval() first (or train each adapter on its own with set_adapter)"
            )
        layers = [module for module in self.model.modules() if isinstance(module, SurmLayer)]
        available = sorted({name for layer in layers for name in (*layer.surm_delta, *layer.surm_adapter)})
        unknown = sorted({name for name in names if name != BASE_ROWS and name not in available})
        if unknown:
            raise ValueError(
                f"adapter_names names unknown adapter(s) {unknown}; valid names: {available} and {BASE_ROWS!r} "
                "(the base model alone)"
            )
        merged = sorted({name for layer in layers for name in layer.merged_adapters})
        if merged:
            raise ValueError(
                f"adapter_names cannot route rows while adapter(s) {merged} are merged into the base weights (every "
                "row would get them); call unmerge_adapter() first"
            )
        return tuple(names)

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        """Refuse a merge before any layer is touched, so that a refused merge never leaves a partial one.

        Raises:
            NotMergeableError: if an adapter is in mode 'adapter', or if a layer holding one of the delta adapters
                has a base weight that cannot be written back (:meth:`SurmLayer.merge_refusal`: a non-float weight
                that no quantisation backend knows, a forward-only backend); naming that layer and its weight type.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        adapter_mode = [n for n in names if n in self.peft_config and self.peft_config[n].mode == "adapter"]
        if adapter_mode:
            raise NotMergeableError(
                f"adapter(s) {adapter_mode} are in mode 'adapter' (h + act(S h) acts on the module's output) and "
                "cannot be merged; use unload() to remove them or disable_adapter() to bypass them"
            )
        for key, layer in self.model.named_modules():
            if not isinstance(layer, SurmLayer):
                continue
            pending = [n for n in names if n in layer.surm_delta and n not in layer.merged_adapters]
            refusal = layer.merge_refusal() if pending else None
            if refusal is not None:
                raise NotMergeableError(
                    f"cannot merge surm adapter(s) {pending} into {key!r}: {refusal}; keep them unmerged (they run "
                    "outside the base product) or use unload()"
                )

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "exact", svd_rank: Optional[int] = None) -> None:
        """Add a delta adapter whose update is sum_i weights[i] * (adapter i's update), exactly within the family
        (``combination_type="exact"``) or as its best rank-``svd_rank`` approximation (``"svd"``); see
        :mod:`surm.peft.weighted`."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def generation_row_copies(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """e = max(num_beams, num_return_sequences) of a ``generate(**kwargs)`` call on ``model``, at least 1.

    Each setting comes from ``kwargs``, else from ``kwargs["generation_config"]``, else from the model's
    ``generation_config`` (transformers' order of precedence); transformers repeats each prompt e times.
    """
    configs = [kwargs.get("generation_config"), getattr(model, "generation_config", None)]
    copies = 1
    for setting in ROW_COPY_SETTINGS:
        value = kwargs.get(setting)
        for config in configs:
            if value is None and config is not None:
                value = getattr(config, setting, None)
        if is_int(value):
            copies = max(copies, value)
    return copies


def leading_rows(args: tuple, kwargs: dict[str, Any]) -> Optional[int]:
    """The rows (first dimension) of a call's input: its first positional argument, else the first of
    :data:`BATCH_ARGUMENTS` among its keyword arguments; None if that is not a tensor with a dimension."""
    x = args[0] if args else next((kwargs[key] for key in BATCH_ARGUMENTS if kwargs.get(key) is not None), None)
    return x.shape[0] if isinstance(x, Tensor) and x.dim() else None


def _count_mismatch(names: int, where: str, rows: int, copies: int) -> str:
    """The one-line error for ``names`` adapter names and an input of ``rows`` rows."""
    repeated = f"; generate repeats each row's name for its {copies} beams or returned sequences" if copies > 1 else ""
    return (
        f"adapter_names has {names} name(s) but {where} has {rows} row(s); pass one adapter name (or {BASE_ROWS!r}) "
        f"per row{repeated}"
    )


def _route_rows(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], names: tuple[str, ...], copies: int, where: str
) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of module ``where``: pass ``adapter_names`` for the rows of this call's input.

    B names route an input of B rows as given and one of ``copies`` · B rows (generation) with each name
    repeated ``copies`` times in place. A ``modules_to_save`` copy exists only for the adapters whose config
    names the module; rows of the other adapters get the original module there, as they do with that adapter
    set alone (PEFT's own routing would look their copy up and fail).

    Raises:
        ValueError: if the input has another number of rows.
    """
    rows = leading_rows(args, kwargs)
    if rows is None or rows == len(names):
        routed = list(names)
    elif copies > 1 and rows == copies * len(names):
        routed = [name for name in names for _ in range(copies)]
    else:
        raise ValueError(_count_mismatch(len(names), f"the input of {where!r}", rows, copies))
    if isinstance(module, ModulesToSaveWrapper):
        routed = [name if name in module.modules_to_save else BASE_ROWS for name in routed]
    return args, {**kwargs, "adapter_names": routed}


def _unpack_before_saving(model: SurmModel, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook of a SurmModel: unpack repacked 4-bit weights before bitsandbytes saves them itself."""
    model.unpack_quantized_weights()


def _first_keys(keys: list[str]) -> str:
    """The first :data:`KEYS_SHOWN` of ``keys`` (sorted), and how many more there are."""
    shown = sorted(keys)[:KEYS_SHOWN]
    return f"{shown}" + (f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else "")


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """Every parameter and buffer of adapter ``adapter_name`` on the SurmLayers of ``model``, by state-dict key."""
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, SurmLayer):
            continue
        for container in SurmLayer.adapter_layer_names:
            adapters = getattr(module, container)
            if adapter_name in adapters:
                prefix = f"{name}.{container}.{adapter_name}."
                tensors.update({prefix + key: value for key, value in adapters[adapter_name].state_dict().items()})
    return tensors
