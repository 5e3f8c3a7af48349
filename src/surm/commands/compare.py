"""``surm compare``: several methods x seeds under identical data, steps and seeds; a table and a frontier plot.

Each run is a separate ``surm finetune`` process (so peak memory is per run, and a crash in one run does not
take the others down); a run whose ``results.json`` exists is reused if it was made with the same settings, so an
interrupted comparison continues.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .. import atomic
from ..checkpoint import CHECKPOINT
from ..data import recall_per_class
from ..methods import METHODS, MethodChoice, default_learning_rate, method_options
from ..settings import RunSettings, setting_defaults, setting_types
from ..structures import STRUCTURES
from ..validation import is_int
from .finetune import FORWARDED_CTRL_C, RESULTS, RunConfig
from .paired import paired_difference
from .tuning import lr_grid, pick_rate, require_grid_points

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
    options among them, ``overrides`` the run settings (e.g. ``lora+lr=3e-4``), both parsed; ``targets`` the
    adapted modules (``+targets=query,value``), None for the model's default.
    """

    name: str
    mode: str = "delta"
    pieces: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    targets: Optional[list[str]] = None

    @property
    def key(self) -> str:
        """A folder-safe identifier, unique per (method, mode, pieces)."""
        parts = [self.name] + ([self.mode] if self.mode != "delta" else []) + [p for pair in self.pieces for p in pair]
        return "_".join(parts).replace("/", "-").replace(",", "-").replace("=", "-")

    def method(self) -> MethodChoice:
        return MethodChoice(self.name, targets=self.targets, mode=self.mode, options=dict(self.options))

    def with_lr(self, rate: float) -> MethodSpec:
        """This method at learning rate ``rate`` (same key and folder name: a tuned rate is not one of its pieces)."""
        return replace(self, overrides={**self.overrides, "lr": rate})

    def run_settings(self, settings: RunSettings, seed: int) -> RunSettings:
        """The settings of this method's run of ``seed``."""
        return replace(settings, **self.overrides, seed=seed)

    def option_flags(self) -> list[str]:
        """The method options (and targets) as ``surm finetune`` flags, as written."""
        return [text for flag, value in self.pieces if flag.replace("-", "_") in self.options or flag == "targets"
                for text in (f"--{flag}", value)]


def parse_methods(text: str) -> list[MethodSpec]:
    """Parse ``--methods``: comma-separated ``name[:adapter][+flag=value...]`` items.

    ``monarch:adapter`` selects the adapter mode; ``+flag=value`` sets a method option or a run setting for that
    method only (e.g. ``circulant+parameterization=product``, ``monarch+nblocks=8+block-rank=2``,
    ``lora+lr=3e-4``), ``+targets=a,b`` the adapted modules. A value may hold commas (``kronecker+factors=4,8``,
    ``circulant+targets=query,value``): a piece after a comma that does not start with a letter, or that follows
    ``+targets=`` and is not a method name, continues the item before it.

    Raises:
        ValueError: for an unknown method, mode, option or setting, a value that does not parse, a malformed
            piece, or an item listed twice (its runs would share a folder and count twice in the mean and std),
            naming the valid forms.
    """
    items: list[str] = []
    for piece in (part.strip() for part in text.split(",")):
        in_targets = bool(items) and items[-1].split("+")[-1].startswith("targets=")
        if items and piece and (not piece[0].isalpha()
                                or (in_targets and re.split(r"[:+]", piece)[0] not in METHODS)):
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
            if key == "targets":
                spec.targets = [t.strip() for t in value.split(",") if t.strip()]
                spec.pieces.append((key, value))
                continue
            if key not in parsers and key not in settings:
                raise ValueError(f"unknown option {flag!r} in --methods item {item!r}; method options: "
                                 f"{', '.join(sorted(parsers))}; run settings: {', '.join(settings)}; or targets")
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


#: The variables that set the CPU threads of a child's PyTorch (OpenMP and MKL pools).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_environment(jobs: int, cpus: Optional[int] = None) -> dict[str, str]:
    """The environment of a child run when ``jobs`` run at once: the CPUs divided between them.

    Each PyTorch process otherwise starts one thread per CPU, and ``jobs`` of them oversubscribe the machine (two
    runs of two threads on two CPUs trained 3-4 times slower than two of one thread). Thread variables the user has
    set are kept as they are, and with one job none is set. :data:`~surm.commands.finetune.FORWARDED_CTRL_C` tells the
    run that each Ctrl-C reaches it twice (:meth:`Children.stop` forwards it).
    """
    environment = dict(os.environ, **{FORWARDED_CTRL_C: "1"})
    if jobs > 1 and not any(name in environment for name in THREAD_VARIABLES):
        threads = str(max(1, (cpus or os.cpu_count() or 1) // jobs))
        environment.update({name: threads for name in THREAD_VARIABLES})
    return environment


class Children:
    """The ``surm finetune`` processes a comparison runs (``jobs`` at a time, the CPUs divided between them: see
    :func:`child_environment`); on Ctrl-C none starts any more and the running ones are interrupted too (each writes
    nothing half-done and keeps its last checkpoint)."""

    def __init__(self, jobs: int = 1) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._environment = child_environment(jobs)
        self.stopped = False

    def run(self, command: list[str]) -> int:
        """Run ``command`` to its end and return its exit status; KeyboardInterrupt once stopped."""
        with self._lock:
            if self.stopped:
                raise KeyboardInterrupt
            process = subprocess.Popen(command, env=self._environment)
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
            children: Optional[Children] = None, evaluate_test: bool = True) -> Optional[dict[str, Any]]:
    """Run (or reuse) one ``surm finetune`` and return its results, or None if it failed (e.g. diverged).

    ``evaluate_test=False`` makes it a tuning run (``finetune --no-test``): it never reads the test split.

    Finished results are reused only if they were made with the same settings; results of other settings (an
    earlier comparison in the same folder with other flags) count as a failed run instead of being mixed in.
    A run interrupted by Ctrl-C raises KeyboardInterrupt.
    """
    children = children or Children()
    run_settings = spec.run_settings(settings, seed)
    results = output / RESULTS
    if results.exists():
        finished = json.loads(results.read_text())
        changed = changed_settings(finished, RunConfig(method=spec.method(), output=output, settings=run_settings,
                                                       evaluate_test=evaluate_test))
        if not changed:
            return finished
        print(f"[compare] FAILED: {spec.key} seed {seed}: {results} was made with other settings "
              f"({', '.join(changed)}); delete {output} or choose another --output", file=sys.stderr)
        return None
    command = [sys.executable, "-m", "surm", "finetune", "--structure", spec.name, "--mode", spec.mode,
               *run_settings.to_flags(always=("seed",)), *spec.option_flags(), "--output", str(output)]
    if not evaluate_test:
        command.append("--no-test")
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


def final_validation_accuracy(results: dict[str, Any]) -> float:
    """A run's validation accuracy after its last epoch (what tuning compares; there is no early stopping)."""
    return results["validation_history"][-1]["accuracy"]


def summarise(runs: dict[str, list[dict[str, Any]]], reference: Optional[str] = None) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each method; with a ``reference`` method key, each row's paired
    difference in test accuracy to it over the seeds both have (:func:`paired_difference`)."""
    by_seed = {key: {r["seed"]: r["test_accuracy"] for r in results} for key, results in runs.items()}
    rows = []
    for key, results in runs.items():
        accuracies = [r["test_accuracy"] for r in results]
        validation = [final_validation_accuracy(r) for r in results]
        f1s = [r["test_macro_f1"] for r in results]
        difference = (paired_difference(by_seed[key], by_seed[reference])
                      if reference in by_seed and key != reference else None)
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
            "difference": asdict(difference) if difference is not None else None,
            "imbalanced": bool(results[0].get("imbalanced")),
            "recall_per_class": mean_recall_per_class(results),
        })
    return rows


def mean_recall_per_class(results: list[dict[str, Any]]) -> Optional[dict[str, Optional[float]]]:
    """Each class's test recall (by label name), averaged over the runs; None if a run has no confusion matrix
    (results written before surm recorded it)."""
    if any(r.get("test_confusion") is None for r in results):
        return None
    recalls = [recall_per_class(r["test_confusion"]) for r in results]
    return {name: (statistics.fmean(scores) if None not in scores else None)
            for name, scores in zip(results[0]["label_names"], zip(*recalls))}


def recall_table(rows: list[dict[str, Any]]) -> str:
    """Each method's test recall per class (mean over seeds, %), best accuracy first: where the accuracy of an
    imbalanced set is won or lost. Empty if a row lacks the per-class scores."""
    if not rows or any(row["recall_per_class"] is None for row in rows):
        return ""
    names = list(rows[0]["recall_per_class"])
    lines = ["Test recall per class % (mean over seeds: the share of each class's examples predicted as it):", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in sorted(rows, key=lambda r: -r["accuracy_mean"]):
        cells = [f"{100 * v:.1f}" if v is not None else "—" for v in row["recall_per_class"].values()]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference_cell(difference: Optional[dict[str, Any]]) -> str:
    if difference is None:
        return "—"
    text = f"{100 * difference['mean']:+.2f}"
    if difference["low"] is None:
        return text + " (1 seed)"
    return f"{text} [{100 * difference['low']:+.2f}, {100 * difference['high']:+.2f}]"


def markdown_table(rows: list[dict[str, Any]], header: str, reference: Optional[str] = None) -> str:
    """The comparison table, best test accuracy first; with a reference, a column of paired differences."""
    extra = f" Δ vs {reference} (95 % CI) |" if reference else ""
    lines = [header, "",
             "| method | adapter params | trainable params | lr | accuracy % (mean ± std) |" + extra
             + " macro-F1 % | train s | peak MB |",
             "|---|---:|---:|---:|---:|" + ("---:|" if reference else "") + "---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: -r["accuracy_mean"]):
        cell = f" {_difference_cell(row['difference'])} |" if reference else ""
        lines.append(
            f"| {row['label']} | {row['adapter_params']:,} | {row['trainable_params']:,} | {row['lr']:g} | "
            f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} |{cell} "
            f"{100 * row['macro_f1_mean']:.2f} ± {100 * row['macro_f1_std']:.2f} | "
            f"{row['train_seconds_mean']:.1f} | {row['peak_memory_mb_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def tuning_table(tuning: dict[str, dict[str, Any]]) -> str:
    """Each method's validation accuracy (mean over tuning seeds) per grid rate; the chosen rate in bold."""
    lines = ["Learning rates chosen on the validation split (mean validation accuracy % over the tuning seeds; "
             "the test split was not read by these runs):", "",
             "| method | rate: validation accuracy % |", "|---|---|"]
    for key, record in tuning.items():
        cells = []
        for rate in record["grid"]:
            scores = record["validation"].get(f"{rate:g}", [])
            text = f"{rate:g}: " + (f"{100 * statistics.fmean(scores):.2f}" if scores else "failed")
            cells.append(f"**{text}**" if rate == record["chosen"] else text)
        lines.append(f"| {key} | {', '.join(cells)} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (parameters, accuracy) that no other point beats: none has at most as many parameters
    and a higher accuracy, or fewer parameters and the same accuracy. Ordered by parameters."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front


#: Where a label may go around its point, in points (tried in this order, then the same farther out).
LABEL_OFFSETS = ((6, 4), (6, -12), (-6, 4), (-6, -12), (0, 10), (0, -16))


#: Characters per line of a label on the frontier plot: a longer label (a method with its targets) is wrapped after
#: its spaces and commas, so that it fits beside its point.
LABEL_WIDTH = 40


def plot_label(label: str) -> str:
    """``label`` wrapped to :data:`LABEL_WIDTH` characters per line, breaking at spaces and after commas (a list of
    targets such as ``query,key,value`` has no spaces); every character is kept (a break replaces a space or follows
    a comma), and a piece longer than a line stays whole."""
    pieces = re.findall(r"[^ ,]*,|[^ ,]+ ?| ", label)  # "a,", "word " and the like, in order
    lines, line = [], ""
    for piece in pieces:
        if line and len(line + piece.rstrip(" ")) > LABEL_WIDTH:
            lines.append(line.rstrip(" "))
            line = ""
        line += piece
    return "\n".join(lines + [line.rstrip(" ")])


def text_box(annotation: Any, renderer: Any) -> Any:
    """The display-space box of an annotation's text, without its leader line (placed where it will be drawn)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def place_labels(axes: Any, renderer: Any, anchors: list[tuple[float, float]], labels: list[str]) -> list[Any]:
    """Annotate each anchor (data coordinates) with its label where the label's box stays inside the plot area,
    overlaps no label placed before it and covers no point: the first free offset of :data:`LABEL_OFFSETS`, scaled
    out 1x to 4x (with a leader line to its point unless it is at the first offset); if none is free, the first
    offset (a label is never dropped). Returns the annotations, in the order of ``labels``."""
    placed: list[Any] = []
    area = axes.get_window_extent(renderer)  # labels stay inside the plot area
    markers = [axes.transData.transform(anchor) for anchor in anchors]
    annotations: dict[int, Any] = {}
    candidates = [(dx * scale, dy * scale, (scale, dx, dy) != (1, *LABEL_OFFSETS[0]))
                  for scale in (1, 2, 3, 4) for dx, dy in LABEL_OFFSETS]
    for index in sorted(range(len(anchors)), key=lambda i: (-anchors[i][1], anchors[i][0])):
        for attempt, (dx, dy, leader) in enumerate(candidates + [(*LABEL_OFFSETS[0], False)]):
            text = axes.annotate(labels[index], anchors[index], textcoords="offset points", xytext=(dx, dy),
                                 fontsize=8, ha="left" if dx >= 0 else "right",
                                 arrowprops={"arrowstyle": "-", "alpha": 0.5, "lw": 0.6} if leader else None)
            box = text_box(text, renderer).expanded(1.05, 1.15)
            inside = (area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1)
            free = inside and not any(box.overlaps(other) for other in placed) and not any(
                box.contains(*m) for m in markers)
            if free or attempt == len(candidates):
                placed.append(box)
                annotations[index] = text
                break
            text.remove()
    return [annotations[i] for i in range(len(anchors))]


def frontier_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against trainable parameters (log scale): one labelled point per method, its labels never on top of
    each other, and the Pareto front (the best accuracy reached with at most so many parameters) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    points = [(row["trainable_params"], 100 * row["accuracy_mean"]) for row in rows]
    for row, (x, y) in zip(rows, points):
        axes.errorbar(x, y, yerr=100 * row["accuracy_std"], fmt="o", capsize=3, color="tab:blue")
    front = pareto_front(points)
    axes.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="tab:orange",
              alpha=0.8, label="Pareto front (best accuracy for at most so many parameters)")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale, classifier head included)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(textwrap.fill(title, 100), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.margins(x=0.15, y=0.12)
    figure.tight_layout()
    place_labels(axes, figure.canvas.get_renderer(), points, [plot_label(row["label"]) for row in rows])
    atomic.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


@dataclass(frozen=True)
class Protocol:
    """How a comparison chooses learning rates and what it compares against.

    Attributes:
        tune_lr: grid points per method (0: each method's own or given rate, no tuning); see
            :mod:`surm.commands.tuning`.
        tune_seeds: seeds (0 .. tune_seeds - 1) of each tuning run, whose mean validation accuracy picks the rate.
        reference: the key of a method (as listed in ``--methods``) to which every row's paired difference is
            reported, or None.
    """

    tune_lr: int = 0
    tune_seeds: int = 1
    reference: Optional[str] = None

    def check(self, specs: list[MethodSpec], settings: RunSettings) -> None:
        """Raise a ValueError, before any run, for a protocol that cannot apply to ``specs`` and ``settings``."""
        if self.tune_lr:
            require_grid_points(self.tune_lr)
            if not is_int(self.tune_seeds, minimum=1):
                raise ValueError(f"--tune-seeds must be at least 1, got {self.tune_seeds!r}")
            if settings.lr is not None:
                raise ValueError(f"--lr {settings.lr:g} fixes every method's rate, which --tune-lr would choose; "
                                 "drop one of them")
            fixed = [spec.key for spec in specs if "lr" in spec.overrides]
            if fixed:
                raise ValueError(f"--methods fixes the rate of {', '.join(fixed)} (+lr=...), which --tune-lr would "
                                 "choose; drop one of them")
        elif self.tune_seeds != 1:
            raise ValueError("--tune-seeds applies only with --tune-lr")
        keys = [spec.key for spec in specs]
        if self.reference is not None and self.reference not in keys:
            raise ValueError(f"--reference {self.reference!r} is not one of the compared methods: {', '.join(keys)}")


def run_all(tasks: list[tuple[MethodSpec, int, Path]], settings: RunSettings, jobs: int, children: Children,
            evaluate_test: bool = True) -> list[Optional[dict[str, Any]]]:
    """Run (or reuse) every (method, seed, folder) with up to ``jobs`` at a time; None for a failed run.

    Ctrl-C starts nothing new, interrupts what runs and propagates KeyboardInterrupt.
    """
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, spec, seed, folder, settings, children, evaluate_test)
                   for spec, seed, folder in tasks]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            children.stop()
            for future in futures:
                future.cancel()
            raise


def tune(specs: list[MethodSpec], output: Path, settings: RunSettings, protocol: Protocol, jobs: int,
         children: Children) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The tuning stage: every method at every rate of its grid with every tuning seed, without the test split.

    Returns each method's record (grid, validation accuracies per rate, chosen rate or None if every tuning run
    failed) and the failed tuning runs.
    """
    tuning: dict[str, dict[str, Any]] = {}
    tasks = []
    for spec in specs:
        default = default_learning_rate(spec.name)
        tuning[spec.key] = {"default": default, "grid": lr_grid(default, protocol.tune_lr), "validation": {},
                            "chosen": None}
        for rate in tuning[spec.key]["grid"]:
            for seed in range(protocol.tune_seeds):
                tasks.append((spec.with_lr(rate), seed,
                              output / "runs" / spec.key / "tune" / f"lr-{rate:g}" / f"seed{seed}"))
    finished = run_all(tasks, settings, jobs, children, evaluate_test=False)
    failed = []
    for (spec, seed, _), result in zip(tasks, finished):
        rate = spec.overrides["lr"]
        if result is None:
            failed.append(f"{spec.key} lr {rate:g} seed {seed} (tuning)")
        else:
            tuning[spec.key]["validation"].setdefault(f"{rate:g}", []).append(final_validation_accuracy(result))
    for record in tuning.values():
        scores = {float(rate): accuracies for rate, accuracies in record["validation"].items()}
        record["chosen"] = pick_rate(scores, record["default"]) if scores else None
    return tuning, failed


def compare(specs: list[MethodSpec], seeds: list[int], output: Path, settings: RunSettings,
            jobs: int = 1, protocol: Protocol = Protocol()) -> tuple[str, list[str]]:
    """Run every (method, seed) with ``settings`` (each run with its own seed), then write comparison.md,
    comparison.json and frontier.png.

    With ``protocol.tune_lr``, each method's learning rate is first chosen on the validation split
    (:func:`tune`; those runs never read the test split), then the chosen rate is run with every seed: only these
    final runs are tested. With ``protocol.reference``, the table gives each method's paired difference to it.
    ``jobs`` runs go at the same time (useful on a GPU; train times are then not comparable between methods).
    Returns the table and the list of failed runs (which are left out of the table and listed under it).

    Raises:
        ValueError: for bad arguments (no seed, jobs < 1, a protocol that does not apply) or an output that cannot
            be written, before any run.
    """
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if not is_int(jobs, minimum=1):
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    protocol.check(specs, settings)
    common = settings.to_flags(exclude=PER_RUN_SETTINGS)
    title = (f"surm compare: model {settings.model}, dataset {settings.dataset}, {len(seeds)} seed(s), "
             f"finetune {' '.join(common) or '(defaults)'}")
    if protocol.tune_lr:
        title += (f"; learning rate tuned on validation ({protocol.tune_lr} rates per method, "
                  f"{protocol.tune_seeds} tuning seed(s))")
    atomic.check_writable(output)
    output.mkdir(parents=True, exist_ok=True)
    children = Children(jobs)
    tuning: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    finals = [(spec, output / "runs" / spec.key) for spec in specs]
    if protocol.tune_lr:
        tuning, failed = tune(specs, output, settings, protocol, jobs, children)
        chosen = {key: record["chosen"] for key, record in tuning.items() if record["chosen"] is not None}
        finals = [(spec.with_lr(chosen[spec.key]), output / "runs" / spec.key / f"lr-{chosen[spec.key]:g}")
                  for spec in specs if spec.key in chosen]
    tasks = [(spec, seed, folder / f"seed{seed}") for spec, folder in finals for seed in seeds]
    finished = run_all(tasks, settings, jobs, children)
    runs: dict[str, list[dict[str, Any]]] = {}
    for (spec, seed, _), result in zip(tasks, finished):
        if result is None:  # (a tuned spec keeps the listed method's key: MethodSpec.with_lr)
            failed.append(f"{spec.key} seed {seed}")
        else:
            runs.setdefault(spec.key, []).append(result)
    rows = summarise(runs, protocol.reference)
    table = markdown_table(rows, title, protocol.reference)
    recalls = recall_table(rows) if any(row["imbalanced"] for row in rows) else ""
    if recalls:
        table += "\n" + recalls
    if tuning:
        table += "\n" + tuning_table(tuning)
    if failed:
        table += "\nFailed runs (diverged or errored; see their train.log): " + ", ".join(failed) + "\n"
    if jobs > 1:
        table += f"\n{jobs} runs shared the machine at a time: train times are not comparable across methods.\n"
    atomic.write_text(output / "comparison.md", table)
    atomic.write_json(output / "comparison.json",
                      {"title": title, "common_args": common, "seeds": seeds, "rows": rows, "failed": failed,
                       "reference": protocol.reference, "tuning": tuning})
    if rows:
        frontier_plot(rows, output / "frontier.png", title)
    else:  # nothing to plot: a plot of an earlier comparison would contradict the table
        (output / "frontier.png").unlink(missing_ok=True)
    return table, failed
