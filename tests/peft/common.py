"""Builders and small utilities for the PEFT tests (these import surm and peft; ``helpers`` does not)."""

from __future__ import annotations

import peft
import torch

import surm

from .helpers import TINY_TARGETS, make_tiny

#: Every registered family: a family added to surm.STRUCTURES is in every PEFT test.
FAMILIES = list(surm.STRUCTURES)

#: (mode, bottleneck): delta, SURM-Adapter (one d x d map) and the Houlsby bottleneck form.
MODES: list[tuple[str, int | None]] = [("delta", None), ("adapter", None), ("adapter", 4)]

#: Every family in every mode, as pytest parameters.
FAMILY_MODES: list[tuple[str, str, int | None]] = [(f, m, b) for f in FAMILIES for m, b in MODES]


def mode_id(family: str, mode: str, bottleneck: int | None) -> str:
    return f"{family}-{mode}" + (f"-k{bottleneck}" if bottleneck else "")


FAMILY_MODE_IDS = [mode_id(*case) for case in FAMILY_MODES]


def tiny_peft(family: str, mode: str = "delta", bottleneck: int | None = None, adapter_name: str = "default", **kwargs):
    """``get_peft_model(make_tiny(), SurmConfig(...))`` on TinyNet's mix/up/down layers."""
    kwargs.setdefault("target_modules", list(TINY_TARGETS))
    config = surm.SurmConfig(structure=family, mode=mode, bottleneck=bottleneck, **kwargs)
    return peft.get_peft_model(make_tiny(), config, adapter_name=adapter_name)


def surm_layers(model: torch.nn.Module) -> dict[str, surm.SurmLayer]:
    """Every SurmLayer of a model, by its name relative to the base model (``encoder.layers.0.mix``)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, surm.SurmLayer)
    }


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The surm adapter parameters (everything under ``surm_delta`` / ``surm_adapter``)."""
    return {n: p for n, p in model.named_parameters() if ".surm_delta." in n or ".surm_adapter." in n}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()
