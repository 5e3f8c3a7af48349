"""What the benchmark tables share: timing interleaved across configurations, medians and spreads, what a
model's adapters are (trainable parameters, the execution path each delta adapter takes), and the one-layer model
and calls that time an execution path on its own."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..peft import SurmLayer


class OneLinear(nn.Module):
    """One ``nn.Linear`` named ``proj`` (``target_modules=["proj"]`` adapts it): the layer an execution path is timed
    or counted on."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_training_step(model: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> Callable[[], None]:
    """A call that runs forward and backward of ``model`` on ``x`` with the output gradient ``probe``, the input
    requiring a gradient as it does below other layers, and clears the parameters' gradients."""
    def run() -> None:
        (model(x.detach().requires_grad_(True)) * probe).sum().backward()
        for parameter in model.parameters():
            parameter.grad = None

    return run


def layer_inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A call that runs ``model`` on ``x`` without gradients."""
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


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
