"""Fully sharded training (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) of a causal LM with surm adapters,
for models whose frozen weights do not fit one device.

    torchrun --nproc_per_node=8 examples/fsdp_causal_lm.py --model path/to/llama --dtype bfloat16 --output runs/fsdp
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/fsdp_causal_lm.py --model tiny-llama --output runs/fsdp
    python examples/fsdp_causal_lm.py --model tiny-llama --output runs/single   # one process, no FSDP

Under ``torchrun`` every decoder block (the model's ``_no_split_modules`` classes) becomes its own FSDP unit and the
root takes the rest (embeddings, head); frozen base weights and trainable adapter parameters are sharded together.
Started without ``torchrun`` the script trains the same model in one process without FSDP: the reference that the
sharded run matches to float error (same seeded global batches, one optimiser step per batch, dropout off).

``--batch-size`` is the global batch: each process takes a contiguous share of it, and its loss is its summed token
cross-entropy over the global batch's token count, times the world size (FSDP averages gradients over processes),
so the gradient is that of the global token mean.

The adapter is saved once, by rank 0: the full (unsharded) trainable parameters are gathered to its CPU with
``get_model_state_dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)`` (the frozen base weights
are never gathered) and written by PEFT's ``save_pretrained`` into a staging folder that then replaces
``OUTPUT/STRUCTURE-MODE/adapter``. It loads into an unsharded model with ``PeftModel.from_pretrained``.

Every process loads the whole base model into CPU memory before ``fully_shard`` keeps its share on the device: FSDP
divides device memory, not host memory.

The data are the embedded ``trec`` questions as plain text (language modelling on every token). ``tiny-llama`` is a
Llama with **random weights** built from a ``LlamaConfig`` (hidden 64, 2 layers, intermediate 128, 4 heads, 2 KV
heads) whose tokens are ASCII characters (vocabulary 128): it shows the mechanics, not a useful model. Several
``--structure`` and ``--mode`` values train every combination in turn in the same process group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn import functional as F

import surm
from surm.atomic import atomic_directory, write_json
from surm.data import load_dataset

TINY = "tiny-llama"
#: The tiny Llama's vocabulary: ASCII codes; other characters become "?".
ASCII = 128
#: Padding token of the tiny Llama (the NUL character, which the texts do not contain); its labels are ignored.
TINY_PAD = 0
#: End-of-text token of the tiny Llama (ASCII "end of text").
TINY_EOS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE = -100

#: A tokeniser as this script uses it: text to token ids, without special tokens.
Encode = Callable[[str], list[int]]


def tiny_llama(seed: int) -> nn.Module:
    """A 2-layer Llama with random weights (seeded, so every process builds the same one); tokens are ASCII codes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ASCII, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=TINY_PAD, bos_token_id=TINY_EOS, eos_token_id=TINY_EOS, attention_dropout=0.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_ascii(text: str) -> list[int]:
    return [code if code < ASCII else ord("?") for code in map(ord, text)]


def load_base(name: str, dtype: torch.dtype, seed: int) -> tuple[nn.Module, Encode, int, int]:
    """The causal LM, its encoder and its (pad, end-of-text) token ids: ``tiny-llama`` or a local / Hub model."""
    if name == TINY:
        return tiny_llama(seed).to(dtype), encode_ascii, TINY_PAD, TINY_EOS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError(f"the tokenizer of {name} has no end-of-text (eos or sep) token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return model, encode, pad, eos


def tokenize(texts: list[str], encode: Encode, eos: int, max_length: int) -> list[list[int]]:
    """Each text's ids followed by the end-of-text token, cut to ``max_length``."""
    return [(encode(text) + [eos])[:max_length] for text in texts]


def pad_batch(sequences: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` on padding) on ``device``."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad)
    labels = torch.full((len(sequences), width), IGNORE)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = labels[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def predicted_tokens(sequences: list[list[int]]) -> int:
    """How many tokens the batch predicts (every token but each sequence's first)."""
    return sum(len(ids) - 1 for ids in sequences)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (padding ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum",
                           ignore_index=IGNORE)


def share(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch whose size ``world`` divides."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


def global_batches(count: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` global batches of example indices from seeded permutations of ``range(count)`` (one per pass)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes (itself in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def shard(model: nn.Module, param_dtype: Optional[torch.dtype], cpu_offload: bool, device: torch.device) -> int:
    """Apply ``fully_shard`` to every decoder block (the base model's ``_no_split_modules``), then to the root.

    ``param_dtype``: FSDP's mixed precision (gathered parameters in that dtype, gradients reduced in float32).
    ``cpu_offload``: keep the shards and their gradients in CPU memory and step the optimiser there; the memory is
    pinned only when ``device`` is an accelerator (``CPUOffloadPolicy()``'s default ``pin_memory=True`` raises
    "Cannot access accelerator device when none is available" on a machine without one).

    Returns:
        How many blocks became their own FSDP unit.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy(pin_memory=device.type != "cpu") if cpu_offload else OffloadPolicy()
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    for block in blocks:
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return len(blocks)


def save_adapter(model: PeftModel, folder: Path) -> None:
    """Gather the trainable parameters' full values to rank 0's CPU and write them there with ``save_pretrained``.

    Every process must call this (the gather is collective); the folder is replaced atomically.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with atomic_directory(folder) as staging:
            model.save_pretrained(staging, state_dict=state)


def adapted(args: argparse.Namespace, structure: str, mode: str) -> tuple[PeftModel, Encode, int, int]:
    """The base model with a fresh surm adapter, its encoder and its (pad, end-of-text) ids; a one-line error
    (SystemExit) for a model that does not load or a configuration that does not fit it."""
    try:
        base, encode, pad, eos = load_base(args.model, DTYPES[args.dtype], args.seed)
        config = surm.SurmConfig(structure=structure, mode=mode, target_modules=args.target_modules,
                                 task_type="CAUSAL_LM")
        return get_peft_model(base, config), encode, pad, eos
    except (OSError, ValueError, TypeError) as error:
        raise SystemExit(f"{sys.argv[0]}: error: {structure}/{mode}: {str(error).splitlines()[0]}") from None


def train_one(args: argparse.Namespace, structure: str, mode: str, texts: dict[str, list[str]],
              device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Adapt, shard (under torchrun), train and save one (structure, mode) combination; rank 0's report of it."""
    model, encode, pad, eos = adapted(args, structure, mode)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.is_initialized():
        blocks = shard(model, DTYPES.get(args.param_dtype), args.cpu_offload, device)
    else:
        blocks = 0
        model.to(device)
    lr = args.lr if args.lr is not None else surm.STRUCTURES[structure].default_lr
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    train = tokenize(texts["train"], encode, eos, args.max_length)
    losses = []
    model.train()
    for indices in global_batches(len(train), args.batch_size, args.steps, args.seed):
        sequences = [train[i] for i in indices]
        tokens = predicted_tokens(sequences)
        local = summed_loss(model, pad_batch(share(sequences, rank, world), pad, device))
        (local * world / tokens).backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(all_sum(local.detach()).item() / tokens)
    evaluation = tokenize(texts["eval"], encode, eos, args.max_length)
    model.eval()
    with torch.no_grad():
        eval_sum = all_sum(summed_loss(model, pad_batch(share(evaluation, rank, world), pad, device)))
    folder = args.output / f"{structure}-{mode}" / "adapter"
    save_adapter(model, folder)
    return {"structure": structure, "mode": mode, "lr": lr, "trainable_params": trainable, "fsdp_units": blocks,
            "losses": losses, "eval_loss": eval_sum.item() / predicted_tokens(evaluation), "adapter": str(folder)}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse(argv: Optional[list[str]], world: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help=f"a local causal LM folder, a Hub id, or {TINY}")
    parser.add_argument("--structure", nargs="+", default=["monarch"], choices=sorted(surm.STRUCTURES))
    parser.add_argument("--mode", nargs="+", default=["delta"], choices=["delta", "adapter"])
    parser.add_argument("--target-modules", default="all-linear",
                        help="'all-linear' or comma-separated module names (suffix match)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the base weights")
    parser.add_argument("--param-dtype", default=None, choices=sorted(DTYPES),
                        help="FSDP MixedPrecisionPolicy(param_dtype=...): compute dtype of the gathered parameters "
                        "(gradients are reduced in float32); needs torchrun")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="FSDP CPUOffloadPolicy: shards, gradients and optimiser step in CPU memory; "
                        "needs torchrun")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="the global batch (all processes)")
    parser.add_argument("--train-size", type=positive_int, default=512)
    parser.add_argument("--eval-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, default=64, help="tokens per text")
    parser.add_argument("--lr", type=float, default=None, help="default: the family's default_lr")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: each process's GPU (cuda:LOCAL_RANK, NCCL) where CUDA is available, else the CPU "
                        "(gloo)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.lr is not None and not 0 < args.lr < float("inf"):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.max_grad_norm < float("inf"):
        parser.error(f"--max-grad-norm must be 0 (off) or a positive number, got {args.max_grad_norm}")
    if args.max_length < 2:
        parser.error(f"--max-length must be at least 2 (a token and its successor), got {args.max_length}")
    if args.batch_size % world or args.eval_size % world:
        parser.error(f"--batch-size ({args.batch_size}) and --eval-size ({args.eval_size}) must be multiples of the "
                     f"number of processes ({world})")
    if (args.param_dtype is not None or args.cpu_offload) and "LOCAL_RANK" not in os.environ:
        parser.error("--param-dtype and --cpu-offload are FSDP settings; start the script with torchrun")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this PyTorch")
    if args.device == "cuda" and world > torch.cuda.device_count():
        parser.error(f"--device cuda: {world} processes but {torch.cuda.device_count()} GPU(s); one process per GPU")
    if args.model != TINY and not Path(args.model).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        parser.error(f"--model {args.model} is not a folder, and the Hub is offline (HF_HUB_OFFLINE=1)")
    if args.target_modules != "all-linear":
        args.target_modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train every requested combination; rank 0 writes ``OUTPUT/report.json`` and prints it."""
    launched = "LOCAL_RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    args = parse(argv, world)
    data = load_dataset("trec", seed=args.seed)
    texts = {"train": [example.text for example in data.train[:args.train_size]],
             "eval": [example.text for example in data.validation[:args.eval_size]]}
    if len(texts["eval"]) < args.eval_size:
        raise SystemExit(f"{sys.argv[0]}: error: --eval-size {args.eval_size} exceeds the {len(texts['eval'])} "
                         "validation texts")
    device = torch.device("cpu")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if launched:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if launched else 0
    runs = [train_one(args, structure, mode, texts, device, rank, world)
            for structure in args.structure for mode in args.mode]
    report = {"model": args.model, "world_size": world, "batch_size": args.batch_size, "steps": args.steps,
              "runs": runs}
    if rank == 0:
        write_json(args.output / "report.json", report)
        print(json.dumps(report, indent=2))
    if launched:
        # Every rank waits for the others (rank 0 writing the report) before tearing the group down: without it a
        # worker of a CPU-offloaded bfloat16 run aborted at exit about one run in ten on gloo ("terminate called
        # without an active exception", after its work was done); with it, none in 45.
        dist.barrier()
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
