"""What the benchmark tables share: timing interleaved across configurations, medians and spreads, and what a
model's adapters are (trainable parameters, the execution path each delta adapter takes)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..peft import SurmLayer


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_interleaved(
    functions: dict[str, Callable[[], object]], warmup: int, repeats: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` per function after ``warmup`` untimed rounds, interleaved round robin.

    The order rotates every round so that no function always runs right after the same neighbour.
    """
    sync = synchronizer(device)
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            functions[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


def iqr_ms(times: Sequence[float]) -> float:
    """The interquartile range in milliseconds (0 with fewer than 2 samples): the spread under the machine's load."""
    if len(times) < 2:
        return 0.0
    quartiles = statistics.quantiles(times, n=4, method="inclusive")
    return 1e3 * (quartiles[2] - quartiles[0])


def execution_paths(model: nn.Module, rows: tuple[int, ...], device: str, training: bool) -> str:
    """The paths the delta adapters of ``model`` take on inputs of shape ``rows + (in_features,)``.

    Returns ``"structured"``, ``"dense"`` (folded into the base product, or ``"dense (separate)"``), several joined
    by ``/``, or ``""`` when the model has no surm delta adapter.
    """
    found: set[str] = set()
    with torch.set_grad_enabled(training):
        for module in model.modules():
            if not isinstance(module, SurmLayer):
                continue
            x = torch.empty(*rows, module.in_features, device=device)
            for name, delta in module.surm_delta.items():
                folded = module.can_fold(delta, x, (), {})
                path = delta.path(x, folded=folded)
                found.add(path if path == "structured" or folded else "dense (separate)")
    return "/".join(sorted(found))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
