"""Fit the execution cost model's rates (:data:`surm.execution.RATES`) to path times measured on this machine.

For every layer shape and token count of a grid, and for each mode of :data:`MODES` (training: forward + backward
of a frozen Linear whose input gradient is needed, as inside a network; inference: forward without gradients in
train mode, nothing reused; eval: forward without gradients in eval mode, as in generation, where the FFT families
and Monarch reuse what they derive from their parameters), each surm family at its default options is timed
inside a PEFT-wrapped Linear with each execution path forced, against the bare Linear, all configurations of a cell
interleaved (:func:`surm.commands.measure.time_interleaved`). A path's *added* time is its
median minus the bare layer's; its work, by kind, is :func:`surm.execution.path_costs` (folded, as in a SurmLayer),
computed by the code that fits (not stored with the times), so a change of the cost model is fitted again from
saved measurements with ``--fit``.

The fit: with x_k = 1 / rate_k >= 0, the model predicts t_i = sum_k c_ik x_k for cell i; the x minimising the
weighted squares sum_i w_i^2 (t_i - a_i)^2, a_i the measured added time and w_i = 1 / (a_i + 0.1 b_i) (b_i the bare
layer's time, so that near-zero differences, which are mostly noise, do not dominate), is found exactly by solving
the unconstrained problem on every subset of kinds and keeping the best whose solution is positive (5 kinds: 32
subsets). A kind whose best x is 0 gets the rate :data:`UNBOUNDED_RATE`.

What matters is the choice ``execution="auto"`` makes, so the report gives, for the current rates and the fitted
ones, how often the model picks the path measured faster, and the time lost where it does not; and the same for
rates fitted without each shape in turn and judged on that shape alone (leave one shape out: how the fit does on
shapes it has not seen).

    python benchmarks/path_rates.py --device cuda --output runs/path_rates_cuda.json
    python benchmarks/path_rates.py --fit runs/path_rates_cuda.json    # fit and report again from saved measurements
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import peft
import torch
from torch import nn

from surm.atomic import write_json, write_text
from surm.commands.measure import OneLinear, layer_inference, layer_training_step, time_interleaved
from surm.execution import PATHS, RATES, DeviceRates, path_costs
from surm.peft import SurmConfig
from surm.structures import STRUCTURES, structure
from surm.structures.base import Cost

#: (out_features, in_features) of the grid: MiniLM's projections, a Llama's q/o, GQA k/v, MLP up and down.
SHAPES: tuple[tuple[int, int], ...] = ((384, 384), (2048, 2048), (256, 2048), (5632, 2048), (2048, 5632))
TOKENS: tuple[int, ...] = (1, 16, 256, 2048, 8192)
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((32, 48),)
QUICK_TOKENS: tuple[int, ...] = (4, 64)
KINDS: tuple[str, ...] = tuple(f.name for f in fields(DeviceRates))
#: The measured modes (module docstring); a saved file may hold any of them.
MODES: tuple[str, ...] = ("train", "inference", "eval")
#: What a measured cell holds (its costs are computed by the code that fits).
CELL_KEYS = ("out_features", "in_features", "tokens", "mode", "family", "path", "bare_s", "added_s")
#: The rate of a kind whose fitted time per unit is zero (its work was never measurable next to the others').
UNBOUNDED_RATE = 1e18


def measure_cell(
    shape: tuple[int, int], tokens: int, device: str, warmup: int, repeats: int, modes: Sequence[str] = MODES,
    families: Sequence[str] = tuple(STRUCTURES),
) -> list[dict]:
    """Added times of each of ``families`` (default: all) and path on one shape and token count, in each of
    ``modes``."""
    out_features, in_features = shape
    torch.manual_seed(0)
    base = OneLinear(out_features, in_features).to(device).requires_grad_(False)
    x = torch.randn(tokens, in_features, device=device)
    probe = torch.randn(tokens, out_features, device=device)
    models: dict[str, nn.Module] = {"bare": base}
    for family in families:
        for path in PATHS:
            models[f"{family}/{path}"] = peft.get_peft_model(copy.deepcopy(base), SurmConfig(
                structure=family, target_modules=["proj"], init_weights=False, execution=path)).to(device)

    cells = []
    calls = {"train": lambda model: layer_training_step(model, x, probe),
             "inference": lambda model: layer_inference(model, x),
             "eval": lambda model: layer_inference(model, x)}
    for mode in modes:
        for model in models.values():
            model.train(mode != "eval")
        times = time_interleaved({name: calls[mode](model) for name, model in models.items()}, warmup, repeats,
                                 device)
        bare = statistics.median(times["bare"])
        for family in families:
            for path in PATHS:
                cells.append({"out_features": out_features, "in_features": in_features, "tokens": tokens,
                              "mode": mode, "family": family, "path": path, "bare_s": bare,
                              "added_s": statistics.median(times[f"{family}/{path}"]) - bare})
    return cells


@functools.lru_cache(maxsize=None)
def _costs(family: str, out_features: int, in_features: int, tokens: int, mode: str) -> dict[str, Cost]:
    return path_costs(structure(family, out_features, in_features), tokens, folded=True, backward=mode == "train",
                      reused=mode == "eval")


def cell_cost(cell: dict) -> Cost:
    """The work of a measured path by the cost model of this code (the family at its default options)."""
    return _costs(cell["family"], cell["out_features"], cell["in_features"], cell["tokens"], cell["mode"])[cell["path"]]


def measure(shapes: Sequence[tuple[int, int]], token_counts: Sequence[int], device: str, warmup: int,
            repeats: int, modes: Sequence[str] = MODES, families: Sequence[str] = tuple(STRUCTURES)) -> list[dict]:
    cells = []
    for shape in shapes:
        for tokens in token_counts:
            cells += measure_cell(shape, tokens, device, warmup, repeats, modes, families)
            print(f"measured {shape[0]} x {shape[1]}, {tokens} tokens", file=sys.stderr, flush=True)
    return cells


def fit(cells: list[dict]) -> DeviceRates:
    """The positive rates minimising the weighted squared error of the predicted added times (module docstring)."""
    costs = np.array([[getattr(cell_cost(cell), kind) for kind in KINDS] for cell in cells], dtype=np.float64)
    added = np.array([cell["added_s"] for cell in cells], dtype=np.float64)
    weights = 1.0 / (np.abs(added) + 0.1 * np.array([cell["bare_s"] for cell in cells]) + 1e-9)
    scale = costs.max(axis=0)
    scale[scale == 0] = 1.0
    a, b = costs / scale * weights[:, None], added * weights
    best, best_residual = np.zeros(len(KINDS)), float(np.sum(b**2))
    for size in range(1, len(KINDS) + 1):
        for subset in itertools.combinations(range(len(KINDS)), size):
            solution, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (solution <= 0).any():
                continue
            x = np.zeros(len(KINDS))
            x[list(subset)] = solution
            residual = float(np.sum((a @ x - b) ** 2))
            if residual < best_residual:
                best, best_residual = x, residual
    per_unit = best / scale
    return DeviceRates(*(float(1.0 / u) if u > 0 else UNBOUNDED_RATE for u in per_unit))


def decisions(cells: list[dict], rates: DeviceRates) -> dict[str, Any]:
    """How often the cheaper path by ``rates`` is the one measured faster, and the added time lost where not."""
    groups: dict[tuple, dict[str, dict]] = {}
    for cell in cells:
        key = (cell["out_features"], cell["in_features"], cell["tokens"], cell["mode"], cell["family"])
        groups.setdefault(key, {})[cell["path"]] = cell
    right, lost, best_total, misses = 0, 0.0, 0.0, []
    for key, paths in groups.items():
        measured = {path: cell["added_s"] for path, cell in paths.items()}
        predicted = {path: rates.seconds(cell_cost(cell)) for path, cell in paths.items()}
        chosen, fastest = min(predicted, key=predicted.get), min(measured, key=measured.get)
        best_total += max(measured[fastest], 0.0)
        if chosen == fastest:
            right += 1
        else:
            lost += measured[chosen] - measured[fastest]
            misses.append({"cell": list(key), "chosen": chosen,
                           "lost_ms": 1e3 * (measured[chosen] - measured[fastest])})
    return {"right": right, "total": len(groups), "lost_ms": 1e3 * lost, "best_ms": 1e3 * best_total,
            "misses": misses}


def held_out_decisions(cells: list[dict]) -> dict[str, Any]:
    """:func:`decisions` on each shape by rates fitted on the other shapes, summed (one shape: fitted on itself)."""
    shapes = sorted({(c["out_features"], c["in_features"]) for c in cells})
    total = {"right": 0, "total": 0, "lost_ms": 0.0, "best_ms": 0.0}
    for shape in shapes:
        own = [c for c in cells if (c["out_features"], c["in_features"]) == shape]
        others = [c for c in cells if (c["out_features"], c["in_features"]) != shape] or own
        made = decisions(own, fit(others))
        for key in total:
            total[key] += made[key]
    return total


def report(cells: list[dict], device: str) -> tuple[str, dict[str, Any]]:
    """The Markdown report (fitted and current rates, the choices each makes) and its numbers."""
    current, fitted = RATES.get(device, RATES["cuda"]), fit(cells)
    results = {"current": asdict(current), "fitted": asdict(fitted),
               "decisions": {"current": decisions(cells, current), "fitted": decisions(cells, fitted),
                             "left_out": held_out_decisions(cells)}}
    shapes = sorted({(c["out_features"], c["in_features"]) for c in cells})
    tokens = sorted({c["tokens"] for c in cells})
    lines = [f"### Cost-model rates fitted on {device}: {len(cells)} measured paths", "",
             f"Shapes (out x in) {', '.join(f'{o} x {i}' for o, i in shapes)}; tokens {', '.join(map(str, tokens))}; "
             f"modes {', '.join(sorted({c['mode'] for c in cells}))}; every family at its default options, "
             "both paths.", "",
             "| rates | " + " | ".join(KINDS) + " | auto picks the faster path | added ms lost / fastest paths' ms |",
             "|---|" + "---:|" * (len(KINDS) + 2)]
    for name in ("current", "fitted"):
        rates, made = results[name], results["decisions"][name]
        lines.append(f"| {name} | " + " | ".join(f"{rates[kind]:.3g}" for kind in KINDS)
                     + f" | {made['right']} of {made['total']} | {made['lost_ms']:.2f} / {made['best_ms']:.2f} |")
    made = results["decisions"]["left_out"]
    lines.append("| fitted, each shape left out of its own fit | " + " | ".join("-" for _ in KINDS)
                 + f" | {made['right']} of {made['total']} | {made['lost_ms']:.2f} / {made['best_ms']:.2f} |")
    misses = sorted(results["decisions"]["fitted"]["misses"], key=lambda m: -m["lost_ms"])[:10]
    if misses:
        lines += ["", "Largest losses under the fitted rates (out, in, tokens, mode, family: path taken, ms lost):", ""]
        lines += [f"- {', '.join(map(str, m['cell']))}: {m['chosen']}, {m['lost_ms']:.3f}" for m in misses]
    return "\n".join(lines) + "\n", results


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"384x384,5632x2048"`` -> ((384, 384), (5632, 2048)); anything else is an argparse error naming it."""
    try:
        shapes = tuple((int(o), int(i)) for o, i in (item.split("x") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must be OUTxIN,... with positive integers, got {text!r}") from None
    if not shapes or min(min(s) for s in shapes) < 1:
        raise argparse.ArgumentTypeError(f"shapes must be OUTxIN,... with positive integers, got {text!r}")
    return shapes


def token_list(text: str) -> tuple[int, ...]:
    """``"1,16,256"`` -> (1, 16, 256); anything else is an argparse error naming it."""
    try:
        counts = tuple(int(item) for item in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"tokens must be N,... with positive integers, got {text!r}")
    return counts


def _distinct_names(kind: str, valid: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: ``"a,b"`` -> ("a", "b") if they are distinct members of ``valid``, else an argparse error
    naming the text and the valid names."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        if not set(names) <= set(valid) or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{kind} must be distinct names among {','.join(valid)}, got {text!r}")
        return names

    return parse


#: ``"train,eval"`` -> ("train", "eval"); ``"kronecker,ldr"`` -> ("kronecker", "ldr").
mode_list = _distinct_names("modes", MODES)
family_list = _distinct_names("families", tuple(STRUCTURES))


def read_measurements(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A file this script wrote with ``--output``, or an argparse error naming what is wrong with it."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"--fit {path}: cannot read it as JSON ({error})")
    if not (isinstance(saved, dict) and isinstance(saved.get("cells"), list) and saved.get("device") in ("cpu", "cuda")
            and all(isinstance(c, dict) and all(k in c for k in CELL_KEYS) and c["mode"] in MODES
                    for c in saved["cells"])):
        parser.error(f"--fit {path}: not measurements written by this script (a device and cells with {CELL_KEYS}, "
                     f"modes among {MODES})")
    saved["cells"] = [{key: cell[key] for key in CELL_KEYS} for cell in saved["cells"]]  # the measurements only
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a tiny grid (a smoke test of the script)")
    parser.add_argument("--shapes", type=shape_list,
                        help="OUTxIN,... (default: %s)" % ",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--tokens", type=token_list, help="N,... (default: %s)" % ",".join(map(str, TOKENS)))
    parser.add_argument("--modes", type=mode_list, default=MODES,
                        help="M,... among %s (default: all)" % ",".join(MODES))
    parser.add_argument("--families", type=family_list, default=tuple(STRUCTURES),
                        help="F,... among %s (default: all; e.g. to measure again a family whose code changed)"
                        % ",".join(STRUCTURES))
    parser.add_argument("--output", type=Path, help="write the measurements and the fit to FILE (JSON) and FILE.md")
    parser.add_argument("--fit", type=Path, nargs="+", metavar="FILE",
                        help="no measuring: fit and report from saved FILEs (of one device)")
    args = parser.parse_args(argv)
    if args.fit is not None:
        saved = [read_measurements(path, parser) for path in args.fit]
        devices = {s["device"] for s in saved}
        if len(devices) != 1:
            parser.error(f"--fit: the files hold measurements of several devices {sorted(devices)}; fit one at a time")
        cells, device = [cell for s in saved for cell in s["cells"]], devices.pop()
        torch_version = ", ".join(sorted({str(s.get("torch")) for s in saved}))
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to this PyTorch")
        torch.set_num_threads(args.threads)
        shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
        token_counts = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
        cells = measure(shapes, token_counts, args.device, args.warmup, args.repeats, args.modes, args.families)
        device = args.device
        torch_version = torch.__version__
    markdown, results = report(cells, device)
    print(markdown)
    if args.output is not None:
        write_json(args.output, {"device": device, "torch": torch_version, "cells": cells, **results})
        write_text(args.output.with_suffix(".md"), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
