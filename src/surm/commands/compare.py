"""``surm compare``: several methods x seeds under identical data, steps and seeds; a table and a frontier plot.

Each run is a separate ``surm finetune`` process (so peak memory is per run, and a crash in one run does not
take the others down); a run whose ``results.json`` exists is reused if it was made with the same settings, so an
interrupted comparison continues.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .. import atomic
from ..checkpoint import CHECKPOINT
from ..methods import METHODS, MethodChoice, method_options
from ..settings import RunSettings, setting_defaults, setting_types
from ..structures import STRUCTURES
from ..validation import is_int
from .finetune import RESULTS, RunConfig

#: The README's main job: every surm family (but those PEFT has itself) against PEFT's LoRA and C3A and full
#: fine-tuning, on MiniLM + mr, sized to finish in about 10 minutes on 2 CPU cores.
QUICK_METHODS = ("lora", "c3a", "full", *(name for name, family in STRUCTURES.items() if not family.peft_equivalent))
#: The main job's run settings (where the user left the default). Batch 16 gives 96 updates instead of 48 in about
#: the same time; at batch 32 LoRA (lr 1e-3), C3A, Toeplitz and Kronecker were all still at chance after 48 steps.
QUICK_SETTINGS = {"train_size": 768, "eval_size": 400, "epochs": 2, "batch_size": 16}
#: Run settings a comparison does not pass on from its own flags: the seed is the run's (0 .. --seeds - 1).
PER_RUN_SETTINGS = ("seed",)


def quick_settings(settings: RunSettings) -> RunSettings:
    """``settings`` with :data:`QUICK_SETTINGS` wherever the user kept the default."""
    defaults = setting_defaults()
    return replace(settings, **{k: v for k, v in QUICK_SETTINGS.items() if getattr(settings, k) == defaults[k]})


@dataclass
class MethodSpec:
    """One column of the comparison: a method, its mode, its options and the run settings it changes.

    ``pieces`` are the ``+flag=value`` items as written (they name the run folder); ``options`` are the method
    options among them, ``overrides`` the run settings (e.g. ``lora+lr=3e-4``), both parsed.
    """

    name: str
    mode: str = "delta"
    pieces: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A folder-safe identifier, unique per (method, mode, pieces)."""
        parts = [self.name] + ([self.mode] if self.mode != "delta" else []) + [p for pair in self.pieces for p in pair]
        return "_".join(parts).replace("/", "-").replace(",", "-").replace("=", "-")

    def method(self) -> MethodChoice:
        return MethodChoice(self.name, mode=self.mode, options=dict(self.options))

    def run_settings(self, settings: RunSettings, seed: int) -> RunSettings:
        """The settings of this method's run of ``seed``."""
        return replace(settings, **self.overrides, seed=seed)

    def option_flags(self) -> list[str]:
        """The method options as ``surm finetune`` flags, as written."""
        return [text for flag, value in self.pieces if flag.replace("-", "_") in self.options
                for text in (f"--{flag}", value)]


def parse_methods(text: str) -> list[MethodSpec]:
    """Parse ``--methods``: comma-separated ``name[:adapter][+flag=value...]`` items.

    ``monarch:adapter`` selects the adapter mode; ``+flag=value`` sets a method option or a run setting for that
    method only (e.g. ``circulant+parameterization=product``, ``monarch+nblocks=8+block-rank=2``,
    ``lora+lr=3e-4``). A value may hold commas (``kronecker+factors=4,8``): a piece after a comma that does not
    start with a letter (as every method name does) continues the item before it.

    Raises:
        ValueError: for an unknown method, mode, option or setting, a value that does not parse, a malformed
            piece, or an item listed twice (its runs would share a folder and count twice in the mean and std),
            naming the valid forms.
    """
    items: list[str] = []
    for piece in (part.strip() for part in text.split(",")):
        if items and piece and not piece[0].isalpha():
            items[-1] += "," + piece
        elif piece:
            items.append(piece)
    parsers = {name: option.parse for name, option in method_options().items()}
    settings = {name: kind for name, kind in setting_types().items() if name not in PER_RUN_SETTINGS}
    specs: list[MethodSpec] = []
    for item in items:
        head, *extras = item.split("+")
        name, _, mode = head.partition(":")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in --methods; valid methods: {', '.join(METHODS)}")
        if mode not in ("", "delta", "adapter"):
            raise ValueError(f"unknown mode {mode!r} in --methods item {item!r}; use name or name:adapter")
        spec = MethodSpec(name, mode or "delta")
        for extra in extras:
            flag, equals, value = extra.partition("=")
            if not equals or not flag or not value:
                raise ValueError(f"malformed option {extra!r} in --methods item {item!r}; use +flag=value")
            key = flag.replace("-", "_")
            if key not in parsers and key not in settings:
                raise ValueError(f"unknown option {flag!r} in --methods item {item!r}; method options: "
                                 f"{', '.join(sorted(parsers))}; run settings: {', '.join(settings)}")
            try:
                parsed = parsers[key](value) if key in parsers else settings[key](value)
            except ValueError:
                raise ValueError(f"cannot read {flag}={value!r} in --methods item {item!r}") from None
            spec.pieces.append((flag.replace("_", "-"), value))
            (spec.options if key in parsers else spec.overrides)[key] = parsed
        if any(other.key == spec.key for other in specs):
            raise ValueError(f"--methods lists {item!r} twice")
        specs.append(spec)
    if not specs:
        raise ValueError("--methods is empty")
    return specs


def changed_settings(finished: dict[str, Any], wanted: RunConfig) -> list[str]:
    """The settings in which a finished run's results differ from the run ``wanted`` describes.

    The output folder is left out (the same comparison may be named by a relative or an absolute path).
    """
    described = json.loads(json.dumps(wanted.describe(), default=str))
    recorded = finished.get("config", {})
    return sorted(k for k in set(described) | set(recorded) if k != "output" and described.get(k) != recorded.get(k))


class Children:
    """The ``surm finetune`` processes a comparison runs; on Ctrl-C none starts any more and the running ones are
    interrupted too (each writes nothing half-done and keeps its last checkpoint)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, command: list[str]) -> int:
        """Run ``command`` to its end and return its exit status; KeyboardInterrupt once stopped."""
        with self._lock:
            if self.stopped:
                raise KeyboardInterrupt
            process = subprocess.Popen(command)
            self._running.add(process)
        try:
            return process.wait()
        finally:
            with self._lock:
                self._running.discard(process)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for process in self._running:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)


def run_one(spec: MethodSpec, seed: int, output: Path, settings: RunSettings,
            children: Optional[Children] = None) -> Optional[dict[str, Any]]:
    """Run (or reuse) one ``surm finetune`` and return its results, or None if it failed (e.g. diverged).

    Finished results are reused only if they were made with the same settings; results of other settings (an
    earlier comparison in the same folder with other flags) count as a failed run instead of being mixed in.
    A run interrupted by Ctrl-C raises KeyboardInterrupt.
    """
    children = children or Children()
    run_settings = spec.run_settings(settings, seed)
    results = output / RESULTS
    if results.exists():
        finished = json.loads(results.read_text())
        changed = changed_settings(finished, RunConfig(method=spec.method(), output=output, settings=run_settings))
        if not changed:
            return finished
        print(f"[compare] FAILED: {spec.key} seed {seed}: {results} was made with other settings "
              f"({', '.join(changed)}); delete {output} or choose another --output", file=sys.stderr)
        return None
    command = [sys.executable, "-m", "surm", "finetune", "--structure", spec.name, "--mode", spec.mode,
               *run_settings.to_flags(always=("seed",)), *spec.option_flags(), "--output", str(output)]
    if (output / CHECKPOINT).exists():
        command.append("--resume")
    print(f"[compare] {spec.key} seed {seed}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    code = children.run(command)
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if code != 0:
        print(f"[compare] FAILED: {spec.key} seed {seed} (exit {code}); see {output}", file=sys.stderr)
        return None
    return json.loads(results.read_text())


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each method."""
    rows = []
    for key, results in runs.items():
        accuracies = [r["test_accuracy"] for r in results]
        validation = [r["validation_history"][-1]["accuracy"] for r in results]
        f1s = [r["test_macro_f1"] for r in results]
        rows.append({
            "method": key,
            "label": results[0]["label"],
            "trainable_params": results[0]["trainable_params"],
            "adapter_params": results[0]["trainable_params"] - results[0].get("head_params", 0),
            "seeds": [r["seed"] for r in results],
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "validation_accuracy_mean": statistics.fmean(validation),
            "macro_f1_mean": statistics.fmean(f1s),
            "macro_f1_std": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in results),
            "peak_memory_mb_mean": statistics.fmean(r["peak_memory_mb"] for r in results),
            "lr": results[0]["config"]["lr"],
        })
    return rows


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| method | adapter params | trainable params | lr | accuracy % (mean ± std) | macro-F1 % | train s "
             "| peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: -r["accuracy_mean"]):
        lines.append(
            f"| {row['label']} | {row['adapter_params']:,} | {row['trainable_params']:,} | {row['lr']:g} | "
            f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} | "
            f"{100 * row['macro_f1_mean']:.2f} ± {100 * row['macro_f1_std']:.2f} | "
            f"{row['train_seconds_mean']:.1f} | {row['peak_memory_mb_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def frontier_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against trainable parameters (log scale), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        axes.errorbar(row["trainable_params"], 100 * row["accuracy_mean"], yerr=100 * row["accuracy_std"], fmt="o",
                      capsize=3)
        axes.annotate(row["label"], (row["trainable_params"], 100 * row["accuracy_mean"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale, classifier head included)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(textwrap.fill(title, 90), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    atomic.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def compare(specs: list[MethodSpec], seeds: list[int], output: Path, settings: RunSettings,
            jobs: int = 1) -> tuple[str, list[str]]:
    """Run every (method, seed) with ``settings`` (each run with its own seed), then write comparison.md,
    comparison.json and frontier.png.

    ``jobs`` runs go at the same time (useful on a GPU; train times are then not comparable between methods).
    Returns the table and the list of failed runs (which are left out of the table and listed under it).

    Raises:
        ValueError: for bad arguments (no seed, jobs < 1) or an output that cannot be written, before any run.
    """
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if not is_int(jobs, minimum=1):
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    common = settings.to_flags(exclude=PER_RUN_SETTINGS)
    title = (f"surm compare: model {settings.model}, dataset {settings.dataset}, {len(seeds)} seed(s), "
             f"finetune {' '.join(common) or '(defaults)'}")
    atomic.check_writable(output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = [(spec, seed) for spec in specs for seed in seeds]
    children = Children()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, spec, seed, output / "runs" / spec.key / f"seed{seed}", settings, children)
                   for spec, seed in tasks]
        try:
            finished = [future.result() for future in futures]
        except KeyboardInterrupt:  # Ctrl-C: start nothing new, interrupt what runs, then say how to continue
            children.stop()
            for future in futures:
                future.cancel()
            raise
    runs: dict[str, list[dict[str, Any]]] = {}
    failed = []
    for (spec, seed), result in zip(tasks, finished):
        if result is None:
            failed.append(f"{spec.key} seed {seed}")
        else:
            runs.setdefault(spec.key, []).append(result)
    rows = summarise(runs)
    table = markdown_table(rows, title)
    if failed:
        table += "\nFailed runs (diverged or errored; see their train.log): " + ", ".join(failed) + "\n"
    if jobs > 1:
        table += f"\n{jobs} runs shared the machine at a time: train times are not comparable across methods.\n"
    atomic.write_text(output / "comparison.md", table)
    atomic.write_json(output / "comparison.json",
                      {"title": title, "common_args": common, "seeds": seeds, "rows": rows, "failed": failed})
    if rows:
        frontier_plot(rows, output / "frontier.png", title)
    else:  # nothing to plot: a plot of an earlier comparison would contradict the table
        (output / "frontier.png").unlink(missing_ok=True)
    return table, failed
