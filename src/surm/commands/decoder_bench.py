"""``surm bench``'s decoder table: surm on the shapes LLM users fine-tune, against PEFT LoRA r=16, in one run.

A Llama stack built from a config (random weights, two blocks, a small vocabulary: the projections are what is
measured) at two sizes: *tiny* (hidden 256, MLP 688, 8 heads, 2 key-value heads) and *TinyLlama* (hidden 2048, MLP
5632, 32 heads, 4 key-value heads: q/o 2048 x 2048, k/v 256 x 2048, gate/up 5632 x 2048, down 2048 x 5632). Every
family in delta mode on all linear layers (``target_modules="all-linear"``) and in adapter mode (its default
placement after o_proj and down_proj) against PEFT LoRA r=16 on all linear layers; a training step (forward, backward,
AdamW) and greedy generation with the key-value cache, every configuration interleaved
(:func:`~surm.commands.measure.time_interleaved`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..peft import SurmConfig
from ..structures import STRUCTURES
from .measure import execution_paths, iqr_ms, median_ms, time_interleaved, trainable_parameters

#: name -> LlamaConfig keyword arguments of each size.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2},
    "TinyLlama": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
}
#: Blocks and vocabulary of the stack (enough to measure the projections; the embedding and head stay small).
BLOCKS, VOCABULARY = 2, 1024
#: Training batch (sequences x tokens), prompt tokens and generated tokens; --quick uses the small ones.
TRAIN_BATCH, PROMPT, GENERATED = (4, 64), 16, 16
QUICK_TRAIN_BATCH, QUICK_GENERATED = (2, 16), 4
QUICK_FAMILIES = ("circulant", "ldr")
LORA_RANK = 16
LORA_LABEL = f"PEFT LoRA r={LORA_RANK}, all-linear"


@dataclass
class DecoderEntry:
    """One row: its label, its PEFT config, and the family and mode where it is surm's."""

    label: str
    config: Any
    family: str = ""
    mode: str = ""


def decoder(size: str) -> nn.Module:
    """The Llama stack of ``size`` with seeded random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[size], num_hidden_layers=BLOCKS, vocab_size=VOCABULARY, bos_token_id=0,
                         eos_token_id=None, pad_token_id=0, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def entries(quick: bool) -> list[DecoderEntry]:
    rows = [DecoderEntry(LORA_LABEL, peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))]
    for family in QUICK_FAMILIES if quick else tuple(STRUCTURES):
        rows.append(DecoderEntry(f"surm {family}, all-linear", SurmConfig(
            structure=family, target_modules="all-linear", task_type="CAUSAL_LM"), family, "delta"))
        rows.append(DecoderEntry(f"surm {family}, adapter (o_proj, down_proj)", SurmConfig(
            structure=family, mode="adapter", task_type="CAUSAL_LM"), family, "adapter"))
    return rows


def run_decoder(device: str, quick: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """Time a training step and a generation of every entry at every size (only *tiny* when ``quick``), each cell
    the ``repeats`` calls after ``warmup`` untimed rounds."""
    sizes = ("tiny",) if quick else tuple(SHAPES)
    batch, sequence = QUICK_TRAIN_BATCH if quick else TRAIN_BATCH
    generated = QUICK_GENERATED if quick else GENERATED
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCABULARY, (batch, sequence), generator=generator).to(device)
    prompt = torch.randint(1, VOCABULARY, (1, PROMPT), generator=generator).to(device)
    results: dict[str, Any] = {}
    for size in sizes:
        base = decoder(size).to(device)
        rows: dict[str, dict[str, Any]] = {}
        steps: dict[str, Callable[[], None]] = {}
        generations: dict[str, Callable[[], None]] = {}
        for entry in entries(quick):
            torch.manual_seed(0)
            model = peft.get_peft_model(copy.deepcopy(base), entry.config).to(device)
            steps[entry.label] = training_step(model, ids)
            generations[entry.label] = _generate(model, prompt, generated)
            rows[entry.label] = {"family": entry.family, "mode": entry.mode,
                                 "trainable_params": trainable_parameters(model),
                                 "path": execution_paths(model, (batch, sequence), device, True)}
        train = time_interleaved(steps, warmup, repeats, device)
        generate = time_interleaved(generations, warmup, repeats, device)
        for label, row in rows.items():
            row.update(train_s=train[label], generate_s=generate[label])
        results[size] = {"shape": SHAPES[size], "batch": [batch, sequence], "generated": generated, "rows": rows}
        del base, steps, generations
    return results


def training_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A causal-LM training step on ``ids`` (its own labels): forward, backward, and AdamW over ``model``'s trainable
    parameters (its own optimizer, made here)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _generate(model: nn.Module, prompt: torch.Tensor, tokens: int) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, use_cache=True)

    return run


def decoder_table(results: dict[str, Any], device: str) -> str:
    """One Markdown table per size: step and generation times and their ratios to LoRA's."""
    sections = []
    for size, result in results.items():
        rows = result["rows"]
        lora_train, lora_generate = median_ms(rows[LORA_LABEL]["train_s"]), median_ms(rows[LORA_LABEL]["generate_s"])
        shape = result["shape"]
        batch, sequence = result["batch"]
        lines = [
            f"### Decoder, {size}: Llama stack of {BLOCKS} blocks, hidden {shape['hidden_size']}, MLP "
            f"{shape['intermediate_size']}, {shape['num_attention_heads']} heads / {shape['num_key_value_heads']} "
            f"key-value heads ({device})",
            "",
            f"Training step: batch {batch} x {sequence} tokens, forward + backward + AdamW. Generation: greedy, "
            f"{PROMPT}-token prompt, {result['generated']} new tokens with the key-value cache.",
            "",
            "| method | path | trainable params | step ms | IQR | step / LoRA | generate ms | IQR | generate / LoRA |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, row in rows.items():
            train, generate = median_ms(row["train_s"]), median_ms(row["generate_s"])
            lines.append(
                f"| {label} | {row['path'] or '-'} | {row['trainable_params']:,} | {train:.1f} | "
                f"{iqr_ms(row['train_s']):.1f} | {train / lora_train:.2f} | {generate:.1f} | "
                f"{iqr_ms(row['generate_s']):.1f} | {generate / lora_generate:.2f} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)
