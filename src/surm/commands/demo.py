"""A quick look at every family on real transformer layer shapes: parameters and apply time against dense."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..structures import STRUCTURES, structure

#: (out_features, in_features) of MiniLM / BERT-small layers: attention, FFN up, FFN down.
LAYER_SHAPES: tuple[tuple[int, int], ...] = ((384, 384), (1536, 384), (384, 1536))


def median_milliseconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(tokens: int = 2048, repeats: int = 20) -> str:
    """Build every family at its default options on each layer shape; return a Markdown table."""
    lines = [
        f"Apply of M to {tokens} tokens (batch 32 x 64), float32, {torch.get_num_threads()} threads; "
        "dense = x @ W.T with W of the same shape, timed in the same run.",
        "",
        "| structure | shape (out x in) | params | dense params | apply ms | dense ms | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        for out_features, in_features in LAYER_SHAPES:
            x = torch.randn(tokens, in_features)
            weight = torch.randn(out_features, in_features)
            dense_ms = median_milliseconds(lambda: x @ weight.T, repeats)
            for name in STRUCTURES:
                module = structure(name, out_features, in_features, init="random")
                apply_ms = median_milliseconds(lambda: module(x), repeats)
                lines.append(
                    f"| {name} | {out_features} x {in_features} | {module.num_parameters():,} | "
                    f"{out_features * in_features:,} | {apply_ms:.2f} | {dense_ms:.2f} | {apply_ms / dense_ms:.2f} |"
                )
    return "\n".join(lines)
