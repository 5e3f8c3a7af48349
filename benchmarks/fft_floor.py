"""How close to LoRA's training step a family applied by transforms can come on this machine, measured.

A Toeplitz update T (m x n, its m + n - 1 diagonals the parameters) applied to a token in a training step needs at
least four real transforms of a length L >= m + n - 1 and three products of spectra: forward, X = rfft(x) and
y = irfft(X K)[:m] (K the kernel's spectrum, made once per call); backward, G = rfft(g) and the input's gradient
irfft(G conj(K))[:n], and the weight gradient, one inverse transform (per call, not per token) of the sum over tokens
of conj(X) G, both spectra already made. A circulant (N = max(m, n) values) needs the same at length N.

LDR with r terms (N = max(m, n), L >= N + n - 1 the length that holds the linear convolution s_i * x) needs per token
2 + 2r transforms of length L and 2 + 2r of length N: forward X = rfft(x, L), z_i = irfft(S_i X, L), U_i =
rfft(fold(z_i), N), y = irfft(sum_i C_i U_i, N)[:m]; backward G = rfft(g, N), irfft(conj(C_i) G, N),
W_i = rfft(unfold(.), L), grad_x = irfft(sum_i conj(S_i) W_i, L)[:n]; and 6r products, the weight gradients'
sum_t conj(U_i) G and sum_t conj(X) W_i among them (X and U_i kept from forward). Fourier with K frequencies needs
four transforms, two of the input's length n (rfft(x), the input gradient's irfft) and two of the output's m (the
output's irfft, rfft(g)), and three products of K bins per token (the update's bins forward, its transpose's
backward, the coefficients' gradient sum_t X[in_k] G[out_k]); here they are timed on bins already in place, into
buffers made beforehand, so that gathering and scattering the bins, which any implementation must also do, is left
out. Padding, folds, casts and copies are left out of every family's count.

A layer may instead take the dense path: fold the update into the frozen weight (W0 + M, one pass over m n numbers
forward), which leaves the layer's two products as they are, and map the weight's gradient g^T x back onto the
parameters; its least work is that product (tokens x m x n multiply-adds) and two passes over m n numbers (the fold,
the gradient's reduction onto the parameters), which is all a Toeplitz or circulant M needs (built by a copy of its
diagonals, its gradient their sums). Fourier's M is one real 2-D transform of its sparse spectrum, and its gradient
one more; LDR's, built the cheapest way known (its displacement equation, :func:`displacement_dense`), a product, a
running sum and a copy over N n numbers, and backward a copy, a running sum and two matrix-vector products: these
are timed too and added (:attr:`Floor.dense_form`). Each layer shape is timed both ways, alone, and counted at the
smaller. So a step of a stack with such an update on every linear layer costs at least

    floor = (the step of the stack with no adapter, gradients through every layer)
            + (sum over its layers of the less of the layer's least spectral work and least dense work)

and floor / (LoRA's step) bounds what any implementation of the family reaches here, by transforms or by the dense
path on each layer, whatever its code: padding, copies, allocations, the parameter's own transforms and, unless the
input's spectrum is kept from forward to backward, one more transform come on top. The rows are the Llama stacks of
``surm bench``'s decoder table (:mod:`surm.commands.decoder_bench`: two blocks, every linear layer adapted with the
family's default options, training batch 4 x 64 tokens), all timed in one process, interleaved
(:func:`surm.commands.measure.time_interleaved`).

    python benchmarks/fft_floor.py --repeats 10 --output runs/fft_floor.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import peft
import torch
from torch import Tensor

from surm.atomic import write_text
from surm.commands.decoder_bench import (BLOCKS, LORA_LABEL, SHAPES, TRAIN_BATCH, VOCABULARY, decoder, entries,
                                         training_step)
from surm.commands.measure import iqr_ms, median_ms, time_interleaved
from surm.structures._fft import fast_fft_length, toeplitz_length
from surm.structures.fourier import distinct_frequencies
from surm.structures.ldr import LowDisplacementRank

Shapes = Sequence[tuple[int, int]]


class Floor(NamedTuple):
    """A family's least spectral work (module docstring): ``transforms(m, n)``, the (length, count) pairs of its
    transforms per token of an (m, n) layer, and ``build(shapes, tokens)``, a call that does that work once on every
    layer of ``shapes`` (random operands made beforehand, kernel spectra once); and ``dense_form(shape)``, where
    building M from the parameters and mapping its gradient back takes more than the one pass the dense path's
    least work counts, a call that does that extra work once (None: one pass, a copy of diagonals and its sums)."""

    transforms: Callable[[int, int], tuple[tuple[int, int], ...]]
    build: Callable[[Shapes, int], Callable[[], None]]
    dense_form: Optional[Callable[[tuple[int, int]], Callable[[], None]]] = None


def convolution_least_work(shapes: Shapes, length: Callable[[int, int], int], tokens: int) -> Callable[[], None]:
    """A Toeplitz or circulant update's least work per layer and step: X = rfft(x), y = irfft(X K)[:m];
    G = rfft(g), grad_x = irfft(G conj(K))[:n]; the weight gradient's spectrum sum over tokens of conj(X) G. Four
    transforms of ``length(m, n)`` and three products per token (the last two in place)."""
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


def _convolution_floor(length: Callable[[int, int], int]) -> Floor:
    return Floor(lambda m, n: ((length(m, n), 4),),
                 lambda shapes, tokens: convolution_least_work(shapes, length, tokens))


#: r, LDR's displacement rank in the decoder table (the family's default).
LDR_RANK = next(option.default for option in LowDisplacementRank.options if option.name == "displacement_rank")


def ldr_lengths(m: int, n: int) -> tuple[int, int]:
    """(L, N) of an (m, n) LDR update: N = max(m, n), L the 5-smooth length >= N + n - 1 (its skew convolution)."""
    size = max(m, n)
    return fast_fft_length(size + n - 1), size


def ldr_least_work(shapes: Shapes, tokens: int, rank: int = LDR_RANK) -> Callable[[], None]:
    """An LDR update's least work per layer and step (module docstring): 2 + 2r transforms of length L and 2 + 2r of
    length N per token, 6r products; the fold and unfold between the two lengths are left out (z_i cut to N)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for m, n in shapes:
        length, size = ldr_lengths(m, n)
        skew = torch.fft.rfft(torch.randn(rank, size, generator=generator), n=length)
        circulant = torch.fft.rfft(torch.randn(rank, size, generator=generator), n=size)
        layers.append((torch.randn(tokens, n, generator=generator), torch.randn(tokens, m, generator=generator),
                       skew, skew.conj().resolve_conj(), circulant, circulant.conj().resolve_conj(), length, size,
                       m, n))

    def run() -> None:
        for x, g, skew, skew_conj, circulant, circulant_conj, length, size, m, n in layers:
            x_hat = torch.fft.rfft(x, n=length).unsqueeze(-2)  # (T, 1, L/2+1)
            folded_hat = torch.fft.rfft(torch.fft.irfft(skew * x_hat, n=length)[..., :size], n=size)
            torch.fft.irfft((circulant * folded_hat).sum(-2), n=size)[..., :m]
            g_hat = torch.fft.rfft(g, n=size).unsqueeze(-2)  # (T, 1, N/2+1)
            weights = torch.fft.rfft(torch.fft.irfft(circulant_conj * g_hat, n=size), n=length)  # (T, r, L/2+1)
            torch.conj_physical_(folded_hat).mul_(g_hat).sum(0)
            torch.fft.irfft((skew_conj * weights).sum(-2), n=length)[..., :n]
            weights.mul_(torch.conj_physical_(x_hat)).sum(0)

    return run


def fourier_frequencies(m: int, n: int) -> int:
    """K, the default frequency count of an (m, n) Fourier update: max(m, n), or as many as there are."""
    return min(max(m, n), distinct_frequencies(m, n))


def fourier_least_work(shapes: Shapes, tokens: int) -> Callable[[], None]:
    """A Fourier update's least work per layer and step: X = rfft(x) (length n), y = irfft(H) (length m), G = rfft(g)
    (m), grad_x = irfft(.) (n), and three real products of the K bins in their two planes per token (each bin
    weighted forward and backward, X[in_k] G[out_k] for the coefficients), on bins already gathered and into buffers
    made beforehand: a lower bound that leaves out moving the bins between the spectra (module docstring)."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for m, n in shapes:
        count = fourier_frequencies(m, n)
        bins = [torch.randn(tokens, count, 2, generator=generator) for _ in range(3)]
        layers.append((torch.randn(tokens, n, generator=generator), torch.randn(tokens, m, generator=generator),
                       torch.fft.rfft(torch.randn(tokens, m, generator=generator)),
                       torch.fft.rfft(torch.randn(tokens, n, generator=generator)),
                       torch.randn(count, 2, generator=generator), bins, m, n))

    def run() -> None:
        for x, g, half, back, weights, (x_bins, g_bins, out), m, n in layers:
            torch.fft.rfft(x)
            torch.mul(x_bins, weights, out=out)
            torch.fft.irfft(half, n=m)
            torch.fft.rfft(g)
            torch.mul(g_bins, weights, out=out)
            torch.fft.irfft(back, n=n)
            torch.mul(x_bins, g_bins, out=out).sum(0)

    return run


def displacement_dense(circulant: Tensor, skew: Tensor, out_features: int, in_features: int) -> Tensor:
    """M, the (m, n) block of sum_i Z_1(c_i) Z_{-1}(s_i) (:class:`~surm.structures.ldr.LowDisplacementRank`), from its
    displacement equation: A[d, j] = b[d] + sum_{k <= j} E[d, k] with E[d, k] = -2 sum_i s_i[-k mod N] c_i[(d + k)
    mod N] and b = sum_i circ(c_i) s'_i (s'_i: s_i with s_i[0] tripled, so that A[:, 0] is M's first column), and
    M[i, j] = A[(i - j) mod N, j]. O(r N n) work, no transform per column: the construction
    :func:`ldr_dense_form` times (the tests check it against the family's own dense form)."""
    rank, size = circulant.shape
    cols = in_features
    tripled = skew.clone()
    tripled[:, 0] *= 3
    first = torch.fft.irfft(torch.fft.rfft(circulant) * torch.fft.rfft(tripled), n=size).sum(0)
    weights = -2 * torch.cat([skew[:, :1], skew[:, 1:].flip(-1)], dim=-1)[:, :cols]  # -2 s_i[-k mod N]
    windows = torch.cat([circulant, circulant[:, : cols - 1]], dim=-1).unfold(-1, cols, 1)  # c_i[(d + k) mod N]
    running = (windows * weights.unsqueeze(-2)).sum(0).cumsum(1) + first.unsqueeze(-1)  # A (N, n)
    rows = (torch.arange(out_features).unsqueeze(-1) - torch.arange(cols)) % size
    return running[rows, torch.arange(cols)]


def ldr_dense_form(shape: tuple[int, int], rank: int = LDR_RANK) -> Callable[[], None]:
    """The least work known for building an LDR update's M, and mapping its gradient back, beyond one pass: the
    displacement equation Z_1 M - M Z_{-1} = 2 sum_i c_i (s_i[N-1], ..., s_i[0]) makes A[d, j] = M[(d + j) mod N, j]
    a running sum along j of E[d, k] = -2 sum_i s_i[-k mod N] c_i[(d + k) mod N] (from M's first column,
    sum_i circ(c_i) s_i; :func:`displacement_dense` builds M this way). Forward, on N x n numbers (N = max(m, n)):
    the product E, the running sum, and M gathered from A (one copy); backward: the gradient gathered onto the
    diagonals (one copy), its running sum, and the two products that give the parameters' gradients (one matrix-vector
    product each). The per-column transforms of the dense form ``surm`` ships are more work than this."""
    m, n = shape
    size = max(m, n)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(rank, size + n - 1, generator=generator).unfold(-1, n, 1)  # (r, N, n) views
    weights = torch.randn(rank, 1, n, generator=generator)
    vectors = torch.randn(rank, size, generator=generator), torch.randn(rank, n, generator=generator)
    terms, running, gathered = torch.empty(rank, size, n), torch.empty(size, n), torch.empty(size, n)

    def run() -> None:
        torch.mul(windows, weights, out=terms)
        torch.cumsum(terms.sum(0) if rank > 1 else terms[0], 1, out=running)
        gathered.copy_(running)
        running.copy_(gathered)
        torch.cumsum(running, 1, out=gathered)
        vectors[0] @ gathered, gathered @ vectors[1].T

    return run


def fourier_dense_form(shape: tuple[int, int]) -> Callable[[], None]:
    """A Fourier update's M from its K coefficients and back, beyond one pass: one real 2-D inverse transform of the
    half spectrum (m x (n/2 + 1)) forward, one 2-D transform of the gradient backward; placing the K coefficients in
    the half spectrum and reading them back are left out."""
    m, n = shape
    generator = torch.Generator().manual_seed(0)
    half = torch.fft.rfft2(torch.randn(m, n, generator=generator))
    gradient = torch.randn(m, n, generator=generator)

    def run() -> None:
        torch.fft.irfft2(half, s=(m, n))
        torch.fft.rfft2(gradient)

    return run


#: family -> its least spectral work (module docstring).
FLOORS: dict[str, Floor] = {
    "toeplitz": _convolution_floor(toeplitz_length),
    "symmetric_toeplitz": _convolution_floor(toeplitz_length),
    "circulant": _convolution_floor(max),
    "ldr": Floor(lambda m, n: tuple((length, 2 + 2 * LDR_RANK) for length in ldr_lengths(m, n)),
                 lambda shapes, tokens: ldr_least_work(shapes, tokens), ldr_dense_form),
    "fourier": Floor(lambda m, n: ((n, 2), (m, 2)) if m != n else ((n, 4),), fourier_least_work,
                     fourier_dense_form),
}
NO_ADAPTER = "no adapter: embeddings trained, gradients through every layer"


def dense_least_work(shape: tuple[int, int], tokens: int) -> Callable[[], None]:
    """The dense path's least work on one (m, n) layer and step: the fold W0 + M, the weight's gradient g^T x and one
    pass of its reduction onto the parameters, into buffers made beforehand (module docstring)."""
    m, n = shape
    generator = torch.Generator().manual_seed(0)
    x, g = torch.randn(tokens, n, generator=generator), torch.randn(tokens, m, generator=generator)
    frozen, update = torch.randn(m, n, generator=generator), torch.randn(m, n, generator=generator)
    merged, gradient = torch.empty(m, n), torch.empty(m, n)

    def run() -> None:
        torch.add(frozen, update, out=merged)
        torch.mm(g.T, x, out=gradient)
        gradient.sum(0)

    return run


def layer_shapes(size: str) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer of the decoder stack at ``size``, from its configuration:
    q, k, v, o, gate, up, down per block (k and v at the key-value heads' width)."""
    shape = SHAPES[size]
    hidden, mlp = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
            (hidden, mlp)] * BLOCKS


def spectral_label(family: str, shape: tuple[int, int]) -> str:
    return f"{family}'s least spectral work, one {shape[0]} x {shape[1]} layer"


def dense_label(shape: tuple[int, int]) -> str:
    return f"least dense work, one {shape[0]} x {shape[1]} layer"


def dense_form_label(family: str, shape: tuple[int, int]) -> str:
    return f"{family}'s dense form beyond one pass, one {shape[0]} x {shape[1]} layer"


def describe_transforms(transforms: Sequence[tuple[int, int]]) -> str:
    """"4 of 4096", "4 of 7680 + 4 of 5632": a layer's transforms per token."""
    return " + ".join(f"{count} of {length}" for length, count in transforms)


def step_label(family: str) -> str:
    """The row of ``family`` in delta mode on every linear layer: its label in ``surm bench``'s decoder table."""
    return f"surm {family}, all-linear"


def measure(size: str, families: Sequence[str], warmup: int, repeats: int,
            batch: tuple[int, int] = TRAIN_BATCH) -> dict[str, list[float]]:
    """Seconds per call of every row at ``size``: the LoRA, no-adapter and surm steps, and per layer shape the dense
    path's least work, each family's least spectral work and, where it has one, its dense form's extra work."""
    base = decoder(size)
    ids = torch.randint(1, VOCABULARY, batch, generator=torch.Generator().manual_seed(0))
    configs = {entry.label: entry.config for entry in entries(quick=False)}  # the decoder table's own rows
    bare = copy.deepcopy(base).requires_grad_(False)
    bare.get_input_embeddings().weight.requires_grad_(True)
    calls = {LORA_LABEL: training_step(peft.get_peft_model(copy.deepcopy(base), configs[LORA_LABEL]), ids),
             NO_ADAPTER: training_step(bare, ids)}
    tokens = batch[0] * batch[1]
    shapes = list(dict.fromkeys(layer_shapes(size)))
    for shape in shapes:
        calls[dense_label(shape)] = dense_least_work(shape, tokens)
    for family in families:
        model = peft.get_peft_model(copy.deepcopy(base), configs[step_label(family)])
        calls[step_label(family)] = training_step(model, ids)
        for shape in shapes:
            calls[spectral_label(family, shape)] = FLOORS[family].build([shape], tokens)
            if FLOORS[family].dense_form is not None:
                calls[dense_form_label(family, shape)] = FLOORS[family].dense_form(shape)
    return time_interleaved(calls, warmup, repeats)


def report(size: str, families: Sequence[str], times: dict[str, list[float]],
           batch: tuple[int, int] = TRAIN_BATCH) -> str:
    """The measured rows, then each family's step and floor as ratios to LoRA's step, and the path counted per
    layer shape."""
    lora, bare = median_ms(times[LORA_LABEL]), median_ms(times[NO_ADAPTER])
    hidden, mlp = SHAPES[size]["hidden_size"], SHAPES[size]["intermediate_size"]
    layers = layer_shapes(size)
    shapes = list(dict.fromkeys(layers))
    lines = [f"### {size}: Llama stack of {BLOCKS} blocks, hidden {hidden}, MLP {mlp}, every linear layer adapted; "
             f"training step, batch {batch[0]} x {batch[1]} tokens", "",
             "| row | ms | IQR | / LoRA's step |", "|---|---:|---:|---:|"]
    for label, samples in times.items():
        lines.append(f"| {label} | {median_ms(samples):.2f} | {iqr_ms(samples):.2f} | "
                     f"{median_ms(samples) / lora:.3f} |")
    lines += ["", "Floor = no-adapter step + per layer the less of its least spectral and least dense work (the latter "
              "with the family's dense form where it has one; module docstring); the path counted for each layer "
              "shape (m x n):", "",
              f"| family | transforms per token, {hidden} x {hidden} / {mlp} x {hidden} layers | step / LoRA's, "
              "measured | floor / LoRA's | path counted |", "|---|---|---:|---:|---|"]
    for family in families:
        least = {}
        for shape in shapes:
            spectral, dense = median_ms(times[spectral_label(family, shape)]), median_ms(times[dense_label(shape)])
            if FLOORS[family].dense_form is not None:
                dense += median_ms(times[dense_form_label(family, shape)])
            least[shape] = ("spectral", spectral) if spectral <= dense else ("dense", dense)
        floor = bare + sum(least[shape][1] for shape in layers)
        step = median_ms(times[step_label(family)])
        sizes = " / ".join(describe_transforms(FLOORS[family].transforms(*shape))
                           for shape in ((hidden, hidden), (mlp, hidden)))
        paths = ", ".join(f"{m} x {n}: {least[(m, n)][0]}" for m, n in shapes)
        lines.append(f"| {family} | {sizes} | {step / lora:.3f} | {floor / lora:.3f} | {paths} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SHAPES), default="TinyLlama")
    parser.add_argument("--families", default=",".join(FLOORS),
                        help=f"comma-separated, of: {', '.join(FLOORS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in families if name not in FLOORS]
    if unknown or not families:
        parser.error(f"--families {args.families!r}: expected some of {', '.join(FLOORS)}")
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
