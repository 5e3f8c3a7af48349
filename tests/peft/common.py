"""Builders and small utilities for the PEFT tests (these import surm and peft; ``helpers`` does not)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def assert_generation_follows_training(models: Sequence[torch.nn.Module], kept: Callable[[], bool],
                                       forgotten: Callable[[], bool]) -> None:
    """Greedy generation (6 tokens, with scores) of the first model, which keeps values between calls, equals the
    second's (nothing kept), before and after a training step of both taken between the two generations
    (eval() -> train() -> eval(), as a train-and-sample loop does); ``kept()`` holds after each generation and
    ``forgotten()`` after the step, and the step changed the first scores."""
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in models]
    prompt = torch.tensor([[5, 17, 42, 8]])
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    first_scores = None
    for round_ in range(2):
        outputs = []
        for model in models:
            model.eval()
            with torch.no_grad():
                outputs.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=6, do_sample=False, output_scores=True,
                                              return_dict_in_generate=True))
        assert kept()
        assert torch.equal(outputs[0].sequences, outputs[1].sequences)
        for got, want in zip(outputs[0].scores, outputs[1].scores):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        if first_scores is not None:  # the step changed what the kept values must give
            assert not torch.allclose(outputs[0].scores[0], first_scores)
        if round_ == 0:
            first_scores = outputs[0].scores[0]
            for model, optimizer in zip(models, optimizers):
                model.train()
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            assert forgotten()


def assert_change_is_seen(module: torch.nn.Module, change: Callable[[torch.nn.Module], None], x: torch.Tensor,
                          fresh: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """After ``change(module)``, the eval-mode output on ``x`` (in the module's dtype then) differs from before and
    equals ``fresh(module, x)``, what the module computes with every kept value forgotten."""
    with torch.no_grad():
        before = module(x)
    change(module)
    x = x.to(next(module.parameters()).dtype)
    with torch.no_grad():
        after = module(x)
    assert not torch.equal(after.double(), before)
    assert torch.equal(after, fresh(module, x))
