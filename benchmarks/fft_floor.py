"""How close to LoRA's training step a family applied by transforms can come on this machine, measured.

A Toeplitz update T (m x n, its m + n - 1 diagonals the parameters) applied to a token in a training step needs at
least four real transforms of a length L >= m + n - 1 and three products of spectra: forward, X = rfft(x) and
y = irfft(X K)[:m] (K the kernel's spectrum, made once per call); backward, G = rfft(g) and the input's gradient
irfft(G conj(K))[:n], and the weight gradient, one inverse transform (per call, not per token) of the sum over tokens
of conj(X) G, both spectra already made. A circulant (N = max(m, n) values) needs the same at length N. So a step of
a stack with such an update on every linear layer costs at least

    floor = (the step of the stack with no adapter, gradients through every layer) + (that spectral work alone)

and floor / (LoRA's step) bounds what any implementation of the family that applies by transforms reaches here,
whatever its code: padding, copies, allocations, the parameter's own transforms and, unless the input's spectrum is
kept from forward to backward, a fifth transform come on top. The rows are the Llama stacks of ``surm bench``'s
decoder table (:mod:`surm.commands.decoder_bench`: two blocks, every linear layer adapted, training batch 4 x 64
tokens), all timed in one process, interleaved (:func:`surm.commands.measure.time_interleaved`).

    python benchmarks/fft_floor.py --repeats 10 --output runs/fft_floor.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import peft
import torch
from torch import nn

from surm.atomic import write_text
from surm.commands.decoder_bench import (BLOCKS, LORA_LABEL, SHAPES, TRAIN_BATCH, VOCABULARY, decoder, entries,
                                         training_step)
from surm.commands.measure import iqr_ms, median_ms, time_interleaved
from surm.structures._fft import toeplitz_length

#: Transforms and spectral products per token and layer of a training step at the least (module docstring).
TRANSFORMS_PER_TOKEN, PRODUCTS_PER_TOKEN = 4, 3
#: family -> its transform length for an (out_features, in_features) layer.
LENGTHS: dict[str, Callable[[int, int], int]] = {
    "toeplitz": toeplitz_length,
    "symmetric_toeplitz": toeplitz_length,
    "circulant": max,
}
NO_ADAPTER = "no adapter: embeddings trained, gradients through every layer"


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer of the decoder blocks (the head excluded)."""
    return [(module.out_features, module.in_features) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name]


def least_work(shapes: Sequence[tuple[int, int]], length: Callable[[int, int], int],
               tokens: int) -> Callable[[], None]:
    """Each layer's least spectral work per training step (module docstring), with a kernel spectrum made once:
    X = rfft(x), y = irfft(X K)[:m]; G = rfft(g), grad_x = irfft(G conj(K))[:n]; the weight gradient's spectrum
    sum over tokens of conj(X) G. Four transforms and three products per token (the last two in place)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for m, n in shapes:
        size = length(m, n)
        kernel = torch.fft.rfft(torch.randn(size, generator=generator), n=size)
        layers.append((torch.randn(tokens, n, generator=generator), torch.randn(tokens, m, generator=generator),
                       kernel, kernel.conj().resolve_conj(), size, m, n))

    def run() -> None:
        for x, g, kernel, kernel_conj, size, m, n in layers:
            x_hat = torch.fft.rfft(x, n=size)
            torch.fft.irfft(x_hat * kernel, n=size)[..., :m]
            g_hat = torch.fft.rfft(g, n=size)
            torch.conj_physical_(x_hat).mul_(g_hat).sum(0)
            torch.fft.irfft(g_hat.mul_(kernel_conj), n=size)[..., :n]

    return run


def step_label(family: str) -> str:
    """The row of ``family`` in delta mode on every linear layer: its label in ``surm bench``'s decoder table."""
    return f"surm {family}, all-linear"


def measure(size: str, families: Sequence[str], warmup: int, repeats: int,
            batch: tuple[int, int] = TRAIN_BATCH) -> dict[str, list[float]]:
    """Seconds per call of every row at ``size``: the LoRA, no-adapter and surm steps, each family's transforms."""
    base = decoder(size)
    ids = torch.randint(1, VOCABULARY, batch, generator=torch.Generator().manual_seed(0))
    configs = {entry.label: entry.config for entry in entries(quick=False)}  # the decoder table's own rows
    bare = copy.deepcopy(base).requires_grad_(False)
    bare.get_input_embeddings().weight.requires_grad_(True)
    calls = {LORA_LABEL: training_step(peft.get_peft_model(copy.deepcopy(base), configs[LORA_LABEL]), ids),
             NO_ADAPTER: training_step(bare, ids)}
    for family in families:
        model = peft.get_peft_model(copy.deepcopy(base), configs[step_label(family)])
        calls[step_label(family)] = training_step(model, ids)
        calls[f"{family}'s least spectral work"] = least_work(linear_shapes(base), LENGTHS[family],
                                                              batch[0] * batch[1])
    return time_interleaved(calls, warmup, repeats)


def report(size: str, families: Sequence[str], times: dict[str, list[float]],
           batch: tuple[int, int] = TRAIN_BATCH) -> str:
    """The measured rows, then each family's step and floor as ratios to LoRA's step."""
    lora, bare = median_ms(times[LORA_LABEL]), median_ms(times[NO_ADAPTER])
    hidden, mlp = SHAPES[size]["hidden_size"], SHAPES[size]["intermediate_size"]
    lines = [f"### {size}: Llama stack of {BLOCKS} blocks, hidden {hidden}, MLP {mlp}, every linear layer adapted; "
             f"training step, batch {batch[0]} x {batch[1]} tokens", "",
             "| row | ms | IQR | / LoRA's step |", "|---|---:|---:|---:|"]
    for label, samples in times.items():
        lines.append(f"| {label} | {median_ms(samples):.1f} | {iqr_ms(samples):.1f} | "
                     f"{median_ms(samples) / lora:.3f} |")
    lines += ["", f"Floor = no-adapter step + the least spectral work ({TRANSFORMS_PER_TOKEN} transforms and "
              f"{PRODUCTS_PER_TOKEN} products per token and layer, module docstring):", "",
              f"| family | transform length, {hidden} x {hidden} / {mlp} x {hidden} layers | step / LoRA's, measured | "
              "floor / LoRA's |", "|---|---|---:|---:|"]
    for family in families:
        floor = bare + median_ms(times[f"{family}'s least spectral work"])
        step = median_ms(times[step_label(family)])
        sizes = f"{LENGTHS[family](hidden, hidden)} / {LENGTHS[family](mlp, hidden)}"
        lines.append(f"| {family} | {sizes} | {step / lora:.3f} | {floor / lora:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SHAPES), default="TinyLlama")
    parser.add_argument("--families", default=",".join(LENGTHS),
                        help=f"comma-separated, of: {', '.join(LENGTHS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in families if name not in LENGTHS]
    if unknown or not families:
        parser.error(f"--families {args.families!r}: expected some of {', '.join(LENGTHS)}")
    if args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        parser.error(f"--warmup {args.warmup}, --repeats {args.repeats}, --threads {args.threads}: expected "
                     "warmup >= 0, repeats >= 1, threads >= 1")
    torch.set_num_threads(args.threads)
    text = report(args.size, families, measure(args.size, families, args.warmup, args.repeats))
    print(text)
    if args.output:
        write_text(Path(args.output), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
