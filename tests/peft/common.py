"""Builders and small utilities for the PEFT tests (these import surm and peft; ``helpers`` does not)."""

from __future__ import annotations

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

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


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (width 64, grouped-query attention, vocabulary 100), random weights, no end-of-text token.

    Without an end token every generated row runs to ``max_new_tokens``, so rows generated together and alone
    have the same length.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def make_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A 2+2-layer T5 encoder-decoder (width 32, vocabulary 100), random weights, no end-of-text token."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=None,
    )
    return T5ForConditionalGeneration(config).eval()
