"""``add_weighted_adapter`` for surm: a new delta adapter whose update is a weighted sum of existing ones.

For adapters a_1..a_k with weights w_i, the new adapter's update in every layer is ΔW = sum_i w_i s_i dense(M_i)
(s_i the adapters' alphas), over the adapters present in that layer (PEFT's convention: the new adapter targets the
union of their layers). Two ways to build it:

* ``"exact"``: within the family, where it can hold the sum exactly (each family says how, in
  :meth:`~surm.structures.StructuredMatrix.combined_options` and ``load_combination``: circulant and plain Toeplitz
  sum their parameters; low rank, Kronecker and LDR concatenate ranks, terms and displacement ranks); every layer's
  adapters must be of one family with compatible options;
* ``"svd"``: any delta adapters, of any families: in every layer the best rank-r approximation of ΔW (Eckart-Young),
  as a ``lowrank`` adapter of rank ``svd_rank``.

Adapter-mode adapters (h + act(S h), on the module's output) cannot be combined.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from peft.utils import ModulesToSaveWrapper

from ..structures import STRUCTURES, declared_options
from ..validation import is_finite_number, is_int
from .config import FAMILY_OPTION_FIELDS, SurmConfig
from .export import low_rank_factors
from .layer import SurmLayer

COMBINATION_TYPES = ("exact", "svd")


def add_weighted_adapter(tuner: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "exact", svd_rank: Optional[int] = None) -> None:
    """Add ``adapter_name`` to ``tuner`` (a :class:`~surm.peft.model.SurmModel`), its update sum_i w_i ΔW_i.

    The new adapter is frozen and inactive, as PEFT's are (``set_adapter`` activates it); it saves, loads, merges and
    exports like any delta adapter.

    Raises:
        ValueError: for unknown or adapter-mode adapters, weights that are not one finite number per adapter, an
            existing ``adapter_name``, an unknown ``combination_type``, a missing or too large ``svd_rank``, adapters
            that share a ``modules_to_save`` module, or (``"exact"``) adapters that their family cannot sum exactly
            (the message says to use ``"svd"``). Nothing is added then.
    """
    adapters = list(adapters)
    _check_arguments(tuner, adapters, weights, adapter_name, combination_type, svd_rank)
    layers = {name: layer for name, layer in tuner.model.named_modules()
              if isinstance(layer, SurmLayer) and any(a in layer.surm_delta for a in adapters)}
    first = tuner.peft_config[adapters[0]]
    if combination_type == "svd":
        too_small = {name: min(layer.in_features, layer.out_features) for name, layer in layers.items()
                     if svd_rank > min(layer.in_features, layer.out_features)}
        if too_small:
            raise ValueError(f"svd_rank={svd_rank} exceeds min(out, in) of {too_small}; use svd_rank <= "
                             f"{min(too_small.values())}")
        options = {**dict.fromkeys(FAMILY_OPTION_FIELDS), "rank": svd_rank}
        config = replace(first, structure="lowrank", **options, alpha=1.0, override_pattern={})
    else:
        config = _exact_config(tuner, adapters, layers, first)
    tuner.peft_config[adapter_name] = replace(config, target_modules=_union_of_targets(tuner, adapters))
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except Exception:  # e.g. a combined rank beyond a layer's bound: take back what was added, then say why
        for layer in tuner.model.modules():
            if isinstance(layer, SurmLayer) and adapter_name in (*layer.surm_delta, *layer.surm_adapter):
                layer.delete_adapter(adapter_name)
        del tuner.peft_config[adapter_name]
        raise
    for parameter_name, parameter in tuner.model.named_parameters():
        if f".{adapter_name}." in parameter_name:
            parameter.requires_grad_(False)
    with torch.no_grad():
        for layer in layers.values():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.surm_delta]
            sources = [layer.surm_delta[a] for a, _ in present]
            scales = [w * source.alpha for (_, w), source in zip(present, sources)]
            target = layer.surm_delta[adapter_name].matrix
            if combination_type == "svd":
                delta = sum(s * source.matrix.dense().to(torch.float64) for s, source in zip(scales, sources))
                up, down, _ = low_rank_factors(delta, svd_rank)
                target.up.copy_(up)
                target.down.copy_(down)
            else:
                target.load_combination([source.matrix for source in sources], scales)


def _check_arguments(tuner: Any, adapters: list[str], weights: Sequence[float], adapter_name: str,
                     combination_type: str, svd_rank: Optional[int]) -> None:
    known = sorted(tuner.peft_config)
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if not adapters or unknown:
        raise ValueError(f"add_weighted_adapter needs existing adapters; unknown: {unknown or 'none given'}, "
                         f"adapters: {known}")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} exists already; choose another adapter_name")
    if len(weights) != len(adapters) or not all(is_finite_number(w) for w in weights):
        raise ValueError(f"weights must be one finite number per adapter ({len(adapters)}), got {list(weights)!r}")
    modes = {a: tuner.peft_config[a].mode for a in adapters}
    if any(mode != "delta" for mode in modes.values()):
        raise ValueError(f"only delta-mode adapters can be combined (their updates are matrices); modes: {modes}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    if combination_type == "svd" and not is_int(svd_rank, minimum=1):
        raise ValueError(f"combination_type='svd' needs svd_rank, a positive integer, got {svd_rank!r}")
    shared = [wrapper for wrapper in tuner.model.modules() if isinstance(wrapper, ModulesToSaveWrapper)
              and sum(a in wrapper.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(f"adapters {adapters} each train their own copy of {len(shared)} module(s) "
                         "(modules_to_save), which cannot be combined")


def _exact_config(tuner: Any, adapters: list[str], layers: dict[str, SurmLayer], first: SurmConfig) -> SurmConfig:
    """The config of the exact combination: every layer's family and combined options (an override per layer whose
    settings differ from the first layer's).

    Raises:
        ValueError: if a layer's adapters are of several families, or its family cannot sum them exactly.
    """
    settings: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.")
        resolved = [tuner.peft_config[a].resolve(key) for a in adapters if a in layer.surm_delta]
        families = {r["structure"] for r in resolved}
        if len(families) > 1:
            raise ValueError(f"layer {key!r} holds adapters of the families {sorted(families)}, which cannot be "
                             "summed exactly within one family; use combination_type='svd'")
        family = STRUCTURES[families.pop()]
        try:
            options = family.combined_options([r["options"] for r in resolved])
        except ValueError as error:
            raise ValueError(f"layer {key!r}: {error}") from None
        settings[key] = (resolved[0]["structure"], declared_options(family, options))
    structure, options = next(iter(settings.values()))
    overrides = {re.escape(key): {"structure": s, **_jsonable(o)} for key, (s, o) in settings.items()
                 if (s, o) != (structure, options)}
    fields = {**dict.fromkeys(FAMILY_OPTION_FIELDS), **_jsonable(options)}
    return replace(first, structure=structure, **fields, alpha=1.0, override_pattern=overrides)


def _union_of_targets(tuner: Any, adapters: list[str]) -> Any:
    """The adapters' target_modules together (sets joined, regexes alternated), as PEFT does."""
    targets = [tuner.peft_config[a].target_modules for a in adapters]
    if all(isinstance(t, (set, list)) for t in targets):
        return set().union(*targets)
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    raise ValueError(f"adapters {adapters} mix target_modules given as names and as a regex; PEFT cannot join them")


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}

