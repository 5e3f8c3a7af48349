"""Export surm delta adapters as a standard PEFT LoRA adapter (best rank-r SVD approximation per layer).

The written folder is plain LoRA: ``peft.PeftModel.from_pretrained(base, folder)`` loads it without surm, so
adapters can be served by LoRA-only stacks (vLLM and others).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_directory
from ..validation import is_int
from .layer import SurmLayer

Rank = Union[int, str]


@dataclass
class LayerExport:
    """How well one layer's ΔW is approximated: ``relative_error = ||ΔW - B A||_F / ||ΔW||_F`` (0 if ΔW = 0)."""

    module: str
    out_features: int
    in_features: int
    rank: int
    relative_error: float


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors (B, A) of ``delta`` (Eckart-Young, by SVD in float64) and the relative error.

    B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, so B A is the truncated SVD and both factors have equal scale.
    """
    matrix = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    norm = matrix.norm()
    error = float((matrix - up @ down).norm() / norm) if norm > 0 else 0.0
    return up, down, error


def _surm_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, SurmLayer]:
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, SurmLayer) and adapter_name in module.surm_delta
    }
    if not layers:
        modes = {n: c.mode for n, c in peft_model.peft_config.items()}
        raise ValueError(
            f"no surm delta adapter named {adapter_name!r} to export (adapters and modes: {modes}); only mode "
            "'delta' has a weight update that LoRA can represent"
        )
    return layers


def _layer_ranks(layers: dict[str, SurmLayer], rank: Rank) -> dict[str, int]:
    if rank == "full":
        return {name: min(layer.in_features, layer.out_features) for name, layer in layers.items()}
    if not is_int(rank, minimum=1):
        raise ValueError(f"rank must be a positive integer or 'full', got {rank!r}")
    largest = {name: min(layer.in_features, layer.out_features) for name, layer in layers.items()}
    too_small = {name: limit for name, limit in largest.items() if rank > limit}
    if too_small:
        raise ValueError(
            f"rank={rank} exceeds the largest possible rank min(out, in) of {too_small}; use rank <= "
            f"{min(too_small.values())} or rank='full'"
        )
    return {name: rank for name in layers}


def export_lora(
    peft_model: PeftModel, rank: Rank, output_dir: Union[str, os.PathLike], adapter_name: str = "default",
    overwrite: bool = False,
) -> list[LayerExport]:
    """Write ``adapter_name`` of a surm ``PeftModel`` as a PEFT LoRA adapter folder and report the error per layer.

    Each delta adapter's ``s · dense(M)`` is replaced by its best rank-r approximation B A (``lora_alpha = r``, so
    LoRA's scale is 1); ``modules_to_save`` are copied as they are. The folder holds ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``export_report.json``; it is built in a temporary folder and renamed into
    place, so it is never half-written.

    Args:
        peft_model: a ``PeftModel`` with surm adapters.
        rank: r for every layer, or ``"full"`` for min(out, in) per layer (an exact export).
        output_dir: the folder to create.
        adapter_name: which adapter to export.
        overwrite: replace ``output_dir`` if it exists.

    Returns:
        One :class:`LayerExport` per adapted layer.

    Raises:
        ValueError: for an adapter that is not a delta adapter, or a rank above some layer's min(out, in).
        FileExistsError: if ``output_dir`` exists and ``overwrite`` is False.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}")
    config = peft_model.peft_config[adapter_name]
    layers = _surm_layers(peft_model, adapter_name)
    ranks = _layer_ranks(layers, rank)
    target = Path(output_dir)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")

    state: dict[str, Tensor] = {
        key: value
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
        if not any(f"{container}." in key for container in SurmLayer.adapter_layer_names)
    }
    report = []
    for name, layer in layers.items():
        delta = layer.surm_delta[adapter_name].delta_weight()
        up, down, error = low_rank_factors(delta, ranks[name])
        if layer.kind == "conv2d":
            up, down = up[:, :, None, None], down[:, :, None, None]
        state[f"base_model.model.{name}.lora_A.weight"] = down.to(torch.float32).contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = up.to(torch.float32).contiguous()
        report.append(LayerExport(name, layer.out_features, layer.in_features, ranks[name], error))

    common = max(set(ranks.values()), key=list(ranks.values()).count)
    lora_config = LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(layers),
        rank_pattern={f"^{n}$": r for n, r in ranks.items() if r != common},
        alpha_pattern={f"^{n}$": r for n, r in ranks.items() if r != common},
        fan_in_fan_out=any(layer.kind == "conv1d" for layer in layers.values()),
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        bias="none",
    )

    with atomic_directory(target) as staging:
        lora_config.save_pretrained(staging)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "export_report.json").write_text(json.dumps([asdict(r) for r in report], indent=2) + "\n")
    return report
