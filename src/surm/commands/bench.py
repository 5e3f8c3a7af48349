"""``surm bench``: how fast and how large surm's adapters are next to PEFT's, in Markdown tables.

* **train**: one training step (forward, backward, AdamW) of MiniLM on a batch of 32 x 64 tokens with query and value
  adapted: every surm family in delta mode at its default size, PEFT LoRA r=8, PEFT C3A (block 64 and 384) and the
  *floor*: only the classifier trained while gradients still flow through the whole frozen encoder (transformers'
  ``enable_input_require_grads``: the word-embedding output requires grad, so backward computes every activation
  gradient but no encoder weight gradient). The floor is what any adapter on layer 0 must pay at least.
* **inference**: forward of the base model, of unmerged adapters and of the merged model (``merge_and_unload``).
* **apply**: each family's fast apply against a dense product ``x @ W.T`` of the same shape, for n = 256 ... 8192
  and 64 ... 4096 tokens, with the growth exponent in n fitted by least squares on log time.
* **paths**: the two execution paths of :mod:`surm.execution` on one adapted 384 x 384 layer (MiniLM's query) and
  2048 tokens, training (forward + backward) and inference, beside PEFT LoRA on the same layer: the measured time
  of each path, the cost model's estimate and the path ``auto`` takes.
* **decoder**: a Llama stack at the tiny and TinyLlama shapes, every family in delta mode on all linear layers and in
  adapter mode, against PEFT LoRA r=16: a training step and greedy generation (:mod:`.decoder_bench`).

Timing: every configuration of a table lives in the same process and the repeats are interleaved (round robin,
rotating the order each round), so a change of machine load hits all of them alike; each cell is the median after
warm-up. Peak memory of a training step: the bytes of the model's tensors (parameters, buffers) and of the optimizer
state, plus the highest amount of tensor memory held during one step above its start. On CUDA that transient part is
``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU it is the peak of the allocator's
running total as PyTorch's profiler records it (``profile_memory=True``: every tensor allocation and free during the
step), because process RSS also counts the allocator's caches and the other configurations living in the process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import peft
import torch
import transformers
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..atomic import write_json, write_text
from ..execution import RATES, path_seconds
from ..insertion import DeltaUpdate
from ..methods import MethodChoice, build_peft_config
from ..models import load_text_classifier
from ..peft import SurmConfig, SurmLayer
from ..structures import STRUCTURES, structure
from ..validation import is_int
from .decoder_bench import decoder_table, run_decoder
from .measure import (OneLinear, execution_paths, iqr_ms, layer_inference, layer_training_step, median_ms,
                      synchronizer, time_interleaved, trainable_parameters)

TABLES: tuple[str, ...] = ("train", "inference", "apply", "paths", "decoder")
DEVICES: tuple[str, ...] = ("cpu", "cuda")

#: The reference workload: MiniLM, batch 32 x 64 tokens, query and value adapted.
BATCH, SEQUENCE = 32, 64
APPLY_SIZES: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
APPLY_TOKENS: tuple[int, ...] = (64, 512, 4096)
#: --quick: a short run that exercises every table (the smoke test of the output format).
QUICK_BATCH, QUICK_SEQUENCE = 4, 16
QUICK_APPLY_SIZES: tuple[int, ...] = (64, 128)
QUICK_APPLY_TOKENS: tuple[int, ...] = (16,)
QUICK_FAMILIES: tuple[str, ...] = ("circulant",)
#: An apply cell stops repeating once its repeats have taken this long (the largest dense products take seconds).
APPLY_CELL_SECONDS = 2.0


@dataclass
class BenchConfig:
    """What ``surm bench`` measures and how.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for PyTorch (``torch.set_num_threads``).
        repeats: timed repeats per configuration (the median is reported).
        warmup: untimed repeats before them.
        tables: which of :data:`TABLES` to run.
        quick: a short version (small batch, few configurations, a small apply grid).
        paths: also time every surm family with each execution path forced, beside ``auto``.
        model: the text model of the train and inference tables.
        command: the command line, written into the report.
    """

    device: str = "cpu"
    threads: int = 2
    repeats: int = 10
    warmup: int = 2
    tables: tuple[str, ...] = TABLES
    quick: bool = False
    paths: bool = False
    model: str = "minilm"
    command: str = ""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("threads", "repeats"):
            value = getattr(self, name)
            if not is_int(value, minimum=1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_int(self.warmup, minimum=0):
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        unknown = [t for t in self.tables if t not in TABLES]
        if unknown or not self.tables:
            raise ValueError(f"tables must be a non-empty subset of {TABLES}, got {list(self.tables)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to this PyTorch")

    @property
    def batch(self) -> tuple[int, int]:
        return (QUICK_BATCH, QUICK_SEQUENCE) if self.quick else (BATCH, SEQUENCE)


# -- timing ------------------------------------------------------------------------------------------------------


def _threads(config: BenchConfig) -> str:
    return f"{config.threads} thread" + ("" if config.threads == 1 else "s")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to the process's stderr (file descriptor 2) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def transient_peak_bytes(step: Callable[[], object], device: str) -> int:
    """The most tensor memory held during ``step()`` above what was held when it started."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - before, 0)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # Kineto writes a "profiler_start" / "profiler_stop" line to fd 2 each time
        prof.start()
    try:
        step()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # "Total Allocated" is the running total of the bytes allocated while profiling (and not yet freed).
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(max(e["args"]["Total Allocated"] for e in memory) - start, 0)


# -- models --------------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One row of a table: its label, the kind of method, and how to build it from the base model."""

    label: str
    kind: str  # "floor", "peft" (a PEFT baseline), "surm", "base", "merged"
    build: Callable[[nn.Module], nn.Module]
    family: Optional[str] = None
    execution: Optional[str] = None


def _peft_model(base: nn.Module, config: Any) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(base), config)


def _lora_config() -> Any:
    return build_peft_config(MethodChoice("lora"), "SEQ_CLS", ["classifier"])


def _c3a_config(block: int) -> Any:
    return build_peft_config(MethodChoice("c3a", options={"block_size": block}), "SEQ_CLS", ["classifier"])


def _surm_config(family: str, execution: str = "auto") -> Any:
    return build_peft_config(MethodChoice(family, options={"execution": execution}), "SEQ_CLS", ["classifier"])


def _floor_model(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in ("classifier", "score"):
        if hasattr(model, name):
            for parameter in getattr(model, name).parameters():
                parameter.requires_grad_(True)
    model.enable_input_require_grads()  # gradients flow from the loss down through every encoder layer
    return model


def _families(config: BenchConfig) -> tuple[str, ...]:
    return QUICK_FAMILIES if config.quick else tuple(STRUCTURES)


def train_entries(config: BenchConfig) -> list[Entry]:
    entries = [
        Entry("floor: classifier only, gradients through the encoder", "floor", _floor_model),
        Entry("PEFT LoRA r=8", "peft", lambda base: _peft_model(base, _lora_config())),
    ]
    for block in (64, 384) if not config.quick else ():
        build = (lambda base, b=block: _peft_model(base, _c3a_config(b)))
        entries.append(Entry(f"PEFT C3A block {block}", "peft", build))
    for family in _families(config):
        executions = ("auto", "structured", "dense") if config.paths else ("auto",)
        for execution in executions:
            label = f"surm {family}" + ("" if execution == "auto" else f" [{execution}]")
            entries.append(
                Entry(label, "surm", lambda base, f=family, e=execution: _peft_model(base, _surm_config(f, e)),
                      family=family, execution=execution)
            )
    return entries


def _batch(config: BenchConfig, device: str) -> dict[str, torch.Tensor]:
    batch, sequence = config.batch
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, sequence), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def _load_base(config: BenchConfig) -> nn.Module:
    # The Transformers sequence classifier, whatever pooling the checkpoint declares: the tables time the encoder and
    # its adapters, and keep one model across runs.
    return load_text_classifier(config.model, num_labels=2, max_length=config.batch[1],
                                pooling="model").model.to(config.device)


def build_entries(
    entries: Sequence[Entry], base: nn.Module, config: BenchConfig, *, training: bool
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Build each entry's model on the device (seed 0, train or eval mode) and its row facts: kind, family, path."""
    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for entry in entries:
        torch.manual_seed(0)
        model = entry.build(base).to(config.device).train(training)
        models[entry.label] = model
        path = execution_paths(model, config.batch, config.device, training) if entry.kind == "surm" else ""
        info[entry.label] = {"kind": entry.kind, "family": entry.family, "path": path}
    return models, info


def run_train(config: BenchConfig, base: nn.Module) -> dict[str, Any]:
    """Time a training step of every :func:`train_entries` configuration, interleaved; then one step each for memory."""
    device = config.device
    batch = _batch(config, device)
    entries = train_entries(config)
    models, info = build_entries(entries, base, config, training=True)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for entry in entries:
        model = models[entry.label]
        optimizers[entry.label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        info[entry.label].update(execution=entry.execution, trainable_params=trainable_parameters(model))

    def step(label: str) -> Callable[[], None]:
        model, optimizer = models[label], optimizers[label]

        def run() -> None:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    steps = {label: step(label) for label in models}
    times = time_interleaved(steps, config.warmup, config.repeats, device)
    for label, model in models.items():
        state = tensor_bytes([*model.parameters(), *model.buffers()])
        state += tensor_bytes(t for s in optimizers[label].state.values() for t in s.values() if torch.is_tensor(t))
        transient = transient_peak_bytes(steps[label], device)
        info[label].update(times_s=times[label], state_bytes=state, transient_peak_bytes=transient,
                           peak_bytes=state + transient)
    return info


def train_table(info: dict[str, dict[str, Any]], config: BenchConfig) -> str:
    lora = median_ms(info["PEFT LoRA r=8"]["times_s"])
    floor_label = next(label for label, row in info.items() if row["kind"] == "floor")
    floor = median_ms(info[floor_label]["times_s"])
    lora_peak = info["PEFT LoRA r=8"]["peak_bytes"]
    batch, sequence = config.batch
    lines = [
        f"### Training step: {config.model}, batch {batch} x {sequence} tokens, query and value adapted, "
        f"forward + backward + AdamW ({config.device}, {_threads(config)})",
        "",
        "| method | path | ms/step | IQR ms | ratio to LoRA | overhead / LoRA's | trainable params | peak MiB "
        "| peak / LoRA | step transient MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in info.items():
        ms = median_ms(row["times_s"])
        overhead = "n/a" if row["kind"] == "floor" or lora == floor else f"{(ms - floor) / (lora - floor):.2f}"
        lines.append(
            f"| {label} | {row['path'] or '-'} | {ms:.1f} | {iqr_ms(row['times_s']):.1f} | {ms / lora:.3f} | "
            f"{overhead} | {row['trainable_params']:,} | {row['peak_bytes'] / 2**20:.1f} | "
            f"{row['peak_bytes'] / lora_peak:.3f} | {row['transient_peak_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


# -- inference -----------------------------------------------------------------------------------------------------


def inference_entries(config: BenchConfig) -> list[Entry]:
    def merged(peft_config: Callable[[], Any]) -> Callable[[nn.Module], nn.Module]:
        return lambda base: _peft_model(base, peft_config()).merge_and_unload()

    entries = [
        Entry("base model", "base", copy.deepcopy),
        Entry("PEFT LoRA r=8, unmerged", "peft", lambda base: _peft_model(base, _lora_config())),
        Entry("PEFT LoRA r=8, merged", "merged", merged(_lora_config)),
    ]
    for family in _families(config):
        entries.append(Entry(f"surm {family}, unmerged", "surm",
                             lambda base, f=family: _peft_model(base, _surm_config(f)), family=family))
        entries.append(Entry(f"surm {family}, merged", "merged", merged(lambda f=family: _surm_config(f)),
                             family=family))
    return entries


def run_inference(config: BenchConfig, base: nn.Module) -> dict[str, Any]:
    device = config.device
    batch = {k: v for k, v in _batch(config, device).items() if k != "labels"}
    models, info = build_entries(inference_entries(config), base, config, training=False)

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**batch)

        return run

    times = time_interleaved({k: forward(m) for k, m in models.items()}, config.warmup, config.repeats, device)
    for label in models:
        info[label]["times_s"] = times[label]
    return info


def inference_table(info: dict[str, dict[str, Any]], config: BenchConfig) -> str:
    base = median_ms(info["base model"]["times_s"])
    batch, sequence = config.batch
    lines = [
        f"### Inference: {config.model}, batch {batch} x {sequence} tokens, eval mode, no gradients "
        f"({config.device}, {_threads(config)})",
        "",
        "| model | path | ms/forward | IQR ms | ratio to base |",
        "|---|---|---:|---:|---:|",
    ]
    for label, row in info.items():
        ms = median_ms(row["times_s"])
        lines.append(f"| {label} | {row['path'] or '-'} | {ms:.1f} | {iqr_ms(row['times_s']):.1f} | {ms / base:.3f} |")
    return "\n".join(lines)


# -- apply kernels -------------------------------------------------------------------------------------------------


def _time_cell(fn: Callable[[], object], config: BenchConfig) -> list[float]:
    """Seconds per call of ``fn``: one warm-up, then up to ``repeats`` calls, at least 3, within a time budget."""
    sync = synchronizer(config.device)
    for _ in range(max(config.warmup, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - start
    repeats = max(min(config.repeats, int(APPLY_CELL_SECONDS / max(first, 1e-9))), min(3, config.repeats))
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def growth_exponent(sizes: Sequence[int], values: Sequence[float]) -> float:
    """The least-squares slope of log(value) against log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(v, 1e-12)) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / denominator if denominator else float("nan")


def run_apply(config: BenchConfig) -> dict[str, Any]:
    """Fast apply of every family (default options, n x n) and a dense product, on a grid of n and token counts."""
    sizes = QUICK_APPLY_SIZES if config.quick else APPLY_SIZES
    token_counts = QUICK_APPLY_TOKENS if config.quick else APPLY_TOKENS
    device = config.device
    results: dict[str, Any] = {"sizes": list(sizes), "tokens": list(token_counts), "ms": {}}
    torch.manual_seed(0)
    with torch.no_grad():
        for n in sizes:
            weight = torch.randn(n, n, device=device) / math.sqrt(n)
            modules = {name: structure(name, n, n, init="random").to(device) for name in STRUCTURES}
            for tokens in token_counts:
                x = torch.randn(tokens, n, device=device)
                cells = {"dense": lambda: x @ weight.T, **{name: (lambda m=m: m(x)) for name, m in modules.items()}}
                for name, fn in cells.items():
                    results["ms"].setdefault(name, {}).setdefault(str(tokens), {})[str(n)] = median_ms(
                        _time_cell(fn, config)
                    )
    results["calibration"] = measure_rates(config)
    return results


def measure_rates(config: BenchConfig) -> dict[str, float]:
    """Throughput of each kind of work of the cost model (surm.execution.RATES) at 2048 x 384, in this run."""
    device, tokens, n = config.device, 2048, 384
    if config.quick:
        tokens, n = 256, 64
    x = torch.randn(tokens, n, device=device)
    weight = torch.randn(n, n, device=device)
    down, up = torch.randn(8, n, device=device), torch.randn(n, 8, device=device)
    h = torch.randn(tokens, 8, device=device)
    spectrum = torch.fft.rfft(x)

    def seconds(fn: Callable[[], object]) -> float:
        return statistics.median(_time_cell(fn, config))

    thin = [lambda: x @ down.T, lambda: h @ up.T, lambda: x @ up, lambda: x.T @ h, lambda: h.T @ x]
    fft_work = tokens * n * math.log2(n)
    return {
        "gemm": 2 * tokens * n * n / seconds(lambda: x @ weight.T),
        "small_gemm": len(thin) * 2 * tokens * n * 8 / sum(seconds(fn) for fn in thin),
        "fft": 2 * fft_work / (seconds(lambda: torch.fft.rfft(x)) + seconds(lambda: torch.fft.irfft(spectrum, n=n))),
        "elementwise": tokens * n / seconds(lambda: x + x),
    }


def apply_tables(results: dict[str, Any], config: BenchConfig) -> str:
    sizes = results["sizes"]
    n_log_n = growth_exponent(sizes, [n * math.log2(n) for n in sizes])
    lines = [
        f"### Apply kernels: y = M x for x of shape (tokens, n), M n x n at each family's default options, forward "
        f"only, float32 ({config.device}, {_threads(config)}); dense = x @ W.T with W n x n",
        "",
        f"Growth exponent: least-squares slope of log(ms) against log(n) over n = {sizes[0]} ... {sizes[-1]}; on this "
        f"grid n log n has exponent {n_log_n:.2f} and n^2 has 2.00. Small sizes are overhead-bound, which lowers "
        "every exponent.",
    ]
    for tokens in results["tokens"]:
        header = " | ".join(f"n={n}" for n in sizes)
        lines += [
            "",
            f"{tokens} tokens (ms):",
            "",
            f"| kernel | {header} | ratio to dense at n={sizes[-1]} | growth exponent |",
            "|---|" + "---:|" * (len(sizes) + 2),
        ]
        dense_last = results["ms"]["dense"][str(tokens)][str(sizes[-1])]
        for name, by_tokens in results["ms"].items():
            values = [by_tokens[str(tokens)][str(n)] for n in sizes]
            cells = " | ".join(f"{v:.3g}" for v in values)
            lines.append(
                f"| {name} | {cells} | {values[-1] / dense_last:.3f} | {growth_exponent(sizes, values):.2f} |"
            )
    measured = results["calibration"]
    model = RATES["cpu" if config.device == "cpu" else "cuda"]
    lines += [
        "",
        "Cost-model rates (surm.execution), as ratios to the large-product rate: "
        + "; ".join(
            f"{kind} measured {measured[kind] / measured['gemm']:.3f}, model {getattr(model, kind) / model.gemm:.3f}"
            for kind in ("small_gemm", "fft", "elementwise")
        )
        + f". Large products measured at {measured['gemm'] / 1e9:.1f} GFLOP/s with {_threads(config)}.",
    ]
    return "\n".join(lines)


# -- execution paths on one layer ---------------------------------------------------------------------------------


def run_paths(config: BenchConfig) -> dict[str, Any]:
    """Each family with each path forced, on one frozen Linear, timed against the bare layer and PEFT LoRA."""
    features, tokens = (64, 64) if config.quick else (384, BATCH * SEQUENCE)
    device = config.device
    torch.manual_seed(0)
    base = OneLinear(features, features).to(device).requires_grad_(False)
    x = torch.randn(tokens, features, device=device)
    probe = torch.randn(tokens, features, device=device)
    layers: dict[str, nn.Module] = {"base layer": base, "PEFT LoRA r=8": peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))}
    rows: dict[str, dict[str, Any]] = {"base layer": {}, "PEFT LoRA r=8": {}}
    for family in _families(config) if config.quick else STRUCTURES:
        for execution in ("structured", "dense"):
            label = f"{family} [{execution}]"
            model = peft.get_peft_model(copy.deepcopy(base), SurmConfig(structure=family, target_modules=["proj"],
                                                                        init_weights=False, execution=execution))
            layers[label] = model
            layer = next(m for m in model.modules() if isinstance(m, SurmLayer))
            matrix = layer.surm_delta["default"].matrix
            rows[label] = {"family": family, "execution": execution, "model_ms": {
                mode: 1e3 * path_seconds(matrix, tokens, folded=True, backward=mode == "train",
                                         reused=mode == "inference", device_type=device)[execution]
                for mode in ("train", "inference")}}
            auto = DeltaUpdate(matrix)  # the same M under execution="auto"
            with torch.enable_grad():
                rows[label]["auto_train"] = auto.path(x.detach().requires_grad_(True), folded=True)
            with torch.no_grad():
                rows[label]["auto_inference"] = auto.eval().path(x, folded=True)
            auto.train()  # the matrix is the layer's: leave it in its mode

    repeats = max(config.repeats, 3 if config.quick else 20)
    train = time_interleaved({k: layer_training_step(m, x, probe) for k, m in layers.items()}, config.warmup,
                             repeats, device)
    for model in layers.values():
        model.eval()  # inference as in evaluation and generation: the families' cached values are reused
    infer = time_interleaved({k: layer_inference(m, x) for k, m in layers.items()}, config.warmup, repeats, device)
    for label in layers:
        rows[label]["train_s"], rows[label]["inference_s"] = train[label], infer[label]
    return {"features": features, "tokens": tokens, "rows": rows}


def paths_table(results: dict[str, Any], config: BenchConfig) -> str:
    rows = results["rows"]
    base_train = median_ms(rows["base layer"]["train_s"])
    base_infer = median_ms(rows["base layer"]["inference_s"])
    lora_train = median_ms(rows["PEFT LoRA r=8"]["train_s"]) - base_train
    n, tokens = results["features"], results["tokens"]
    lines = [
        f"### Execution paths on one {n} x {n} layer, {tokens} tokens ({config.device}, {_threads(config)})",
        "",
        "Added time over the bare frozen layer (whose input gradient is computed in both): training = forward + "
        "backward, inference = forward without gradients in eval mode (the values a family derives from its "
        "parameters alone, e.g. FFT spectra, reused across calls). *model* = the cost model's estimate "
        f"(surm.execution, with its {config.device} rates, fitted on the reference machines); *auto* = the path "
        "`execution=\"auto\"` takes here.",
        "",
        "| adapter | train +ms | train / LoRA's | model train ms | auto (train) | inference +ms | model inference ms "
        "| auto (inference) |",
        "|---|---:|---:|---:|---|---:|---:|---|",
        f"| bare layer | {base_train:.2f} (total) | - | - | - | {base_infer:.2f} (total) | - | - |",
    ]
    for label, row in rows.items():
        if label == "base layer":
            continue
        train = median_ms(row["train_s"]) - base_train
        infer = median_ms(row["inference_s"]) - base_infer
        model = row.get("model_ms", {})
        ratio = f"{train / lora_train:.2f}" if lora_train > 0 else "n/a"
        lines.append(
            f"| {label} | {train:.2f} | {ratio} | {model.get('train', float('nan')):.2f} "
            f"| {row.get('auto_train', '-')} "
            f"| {infer:.2f} | {model.get('inference', float('nan')):.2f} | {row.get('auto_inference', '-')} |"
        )
    return "\n".join(lines)


# -- the report ----------------------------------------------------------------------------------------------------


def machine_description(config: BenchConfig) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs, {_threads(config)} of PyTorch",
             f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}",
             f"Python {platform.python_version()} on {platform.system()} {platform.release()}"]
    if config.device == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass
class BenchReport:
    """The Markdown report and the raw numbers behind it."""

    markdown: str
    data: dict[str, Any] = field(default_factory=dict)


def run_bench(config: BenchConfig) -> BenchReport:
    """Run the tables of ``config`` and return the report (in the order train, inference, paths, apply, decoder)."""
    torch.set_num_threads(config.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = _load_average()
    data: dict[str, Any] = {"config": asdict(config), "started": started}
    sections: list[str] = []
    base = _load_base(config) if {"train", "inference"} & set(config.tables) else None
    if "train" in config.tables:
        data["train"] = run_train(config, base)
        sections.append(train_table(data["train"], config))
    if "inference" in config.tables:
        data["inference"] = run_inference(config, base)
        sections.append(inference_table(data["inference"], config))
    if "paths" in config.tables:
        data["paths"] = run_paths(config)
        sections.append(paths_table(data["paths"], config))
    if "apply" in config.tables:
        data["apply"] = run_apply(config)
        sections.append(apply_tables(data["apply"], config))
    if "decoder" in config.tables:
        data["decoder"] = run_decoder(config.device, config.quick, config.warmup, config.repeats)
        sections.append(decoder_table(data["decoder"], config.device))
    data["machine"] = machine_description(config)
    data["load_average"] = {"start": load_before, "end": _load_average()}
    header = [
        "## surm bench",
        "",
        f"- command: `{config.command or 'surm bench'}`",
        f"- machine: {data['machine']}",
        f"- started {started}; load average (1, 5, 15 min) at start {load_before}, "
        f"at end {data['load_average']['end']}",
        f"- every cell: median of {config.repeats} timed repeats after {config.warmup} warm-up, all configurations of "
        "a table interleaved in one process; IQR = interquartile range of the repeats",
    ]
    return BenchReport("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n", data)


def write_report(report: BenchReport, path: Path) -> Path:
    """Write the Markdown to ``path`` and the raw numbers to ``path`` with suffix ``.json``, atomically.

    Returns the path of the JSON file.
    """
    path = Path(path)
    raw = path.with_suffix(".json")
    write_text(path, report.markdown)
    write_json(raw, report.data)
    return raw
