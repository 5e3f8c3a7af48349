"""The ``surm`` command line (also ``python -m surm``): finetune, compare, search, bench, demo.

With no arguments it runs the main job: ``surm compare``'s quick preset on MiniLM + mr.

Flags come from the types they fill: the run settings from :class:`surm.settings.RunSettings`, the method options from
the families' declarations and the baselines (:func:`surm.methods.method_options`). Expected failures print one line
and exit with status 2; Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from peft.config import PeftConfig
from safetensors import SafetensorError

from . import __version__
from .commands.bench import BenchConfig, run_bench, write_report
from .commands.compare import PER_RUN_SETTINGS, QUICK_METHODS, Protocol, compare, parse_methods, quick_settings
from .commands.demo import run_demo
from .commands.finetune import RunConfig, ctrl_c_arrives_twice, finetune, ignore_next_ctrl_c
from .commands.search import SearchSettings, search
from .commands.search.settings import FAMILIES, PRUNERS
from .errors import RunsFailed, SurmError
from .methods import METHODS, SURM_OPTIONS, MethodChoice, method_options
from .peft import SurmConfig
from .settings import RunSettings, setting_types

#: What to do after Ctrl-C, per command.
RESUME_HINTS = {
    "finetune": "run the same command with --resume to continue from the last checkpoint (or from the start if "
                "none was written yet)",
    "compare": "run the same command again: finished runs are reused and an interrupted one resumes from its "
               "checkpoint",
    "search": "run the same command again to resume the study (the trial that was cut off counts as failed and a "
              "new one takes its place)",
}


# -- flags from types ------------------------------------------------------------------------------------------------


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError message becomes argparse's own error line."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_settings_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per :class:`RunSettings` field (``--batch-size`` for ``batch_size``), with its type, default, help."""
    types = setting_types()
    for field in dataclasses.fields(RunSettings):
        if field.name not in exclude:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=types[field.name], default=field.default,
                                help=field.metadata["help"])


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The :class:`RunSettings` of parsed flags (a field without a flag, as compare's seed, keeps its default)."""
    names = [f.name for f in dataclasses.fields(RunSettings) if hasattr(args, f.name)]
    return RunSettings(**{name: getattr(args, name) for name in names})


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--structure, --mode, --targets, --config, and one flag per method option (families' and baselines')."""
    parser.add_argument("--structure", default=None, help=f"the method: {', '.join(METHODS)} (default: circulant)")
    parser.add_argument("--mode", default=None, choices=["delta", "adapter"], help="default: delta")
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: query,value)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a surm adapter_config.json (e.g. from surm search): every SurmConfig setting in it is "
                        "used (flags given here win); its provenance entries (peft_type, task_type, "
                        "base_model_name_or_path, revision, inference_mode, auto_mapping, peft_version) are set by "
                        "the run; unknown entries are refused")
    for name, option in method_options().items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=argument_type(option.parse), default=None,
                            help=option.help.replace("%", "%%"))


def method_choice(args: argparse.Namespace) -> MethodChoice:
    """The MethodChoice of finetune's flags (or of --config, the flags winning).

    Raises:
        ValueError: if --budget-params is given with a method flag (the recommendation chooses the method).
    """
    options = {name: getattr(args, name) for name in method_options() if getattr(args, name) is not None}
    given = [flag for flag, value in (("--structure", args.structure), ("--mode", args.mode),
                                      ("--targets", args.targets), ("--config", args.config)) if value is not None]
    if getattr(args, "budget_params", None) is not None and (given or options):
        flags = given + [f"--{name.replace('_', '-')}" for name in options]
        raise ValueError(f"--budget-params builds the recommended method itself (surm.recommend); drop "
                         f"{', '.join(flags)} or --budget-params")
    name, mode = args.structure or "circulant", args.mode or "delta"
    targets = args.targets.split(",") if args.targets else None
    if args.config is not None:
        name, mode, targets, options = config_method(args.config, options)
    return MethodChoice(name, targets=targets, mode=mode, options=options)


def config_method(path: Path, overrides: dict[str, Any]) -> tuple[str, str, Optional[list[str]], dict[str, Any]]:
    """Method settings from a surm adapter_config.json: every SurmConfig setting in it; flags given on the command
    line win. Entries that say where the file came from (PEFT's own config fields) are set by the run instead.

    Raises:
        ValueError: if the file cannot be read, is not a JSON object of a surm config, or has unknown entries.
    """
    if not path.is_file():
        raise ValueError(f"--config {path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a JSON {type(data).__name__}, not an object of SurmConfig settings")
    if data.get("peft_type") != "SURM":
        raise ValueError(f"--config {path} is not a surm adapter config (peft_type={data.get('peft_type')!r})")
    provenance = {f.name for f in dataclasses.fields(PeftConfig)}
    known = {f.name for f in dataclasses.fields(SurmConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path} has unknown setting(s) {unknown}; SurmConfig's settings are "
                         f"{sorted(known - provenance)}")
    if not isinstance(data.get("structure"), str):
        raise ValueError(f"--config {path} names no structure (its 'structure' is {data.get('structure')!r})")
    options = {k: v for k, v in data.items() if k in SURM_OPTIONS and v is not None}
    options.update(overrides)
    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(targets)
    elif targets is not None and not isinstance(targets, str):
        raise ValueError(f"--config {path}: target_modules must be a list of names or a regex, got {targets!r}")
    return data["structure"], data.get("mode", "delta"), targets, options


def split(text: Optional[str], separator: str) -> Optional[tuple[str, ...]]:
    """``"a,b"`` -> ``("a", "b")`` (None stays None)."""
    return None if text is None else tuple(part.strip() for part in text.split(separator) if part.strip())


# -- the parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"surm {__version__}")
    commands = parser.add_subparsers(dest="command")

    finetune_ = commands.add_parser("finetune", help="fine-tune one method and write adapter, results.json and log")
    add_settings_arguments(finetune_)
    add_method_arguments(finetune_)
    finetune_.add_argument("--output", type=Path, required=True)
    finetune_.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    finetune_.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    finetune_.add_argument("--budget-params", type=int, default=None, metavar="N",
                           help="no method flags: train surm.recommend's delta-mode config with at most N adapter "
                           "parameters for this model (a fixed rule, no search; see docs/recommend.md)")
    finetune_.add_argument("--no-test", dest="evaluate_test", action="store_false",
                           help="do not evaluate (or read) the test split: a run for choosing settings on validation")

    compare_ = commands.add_parser("compare", help="several methods x seeds: comparison.md/json and frontier.png")
    add_settings_arguments(compare_, exclude=PER_RUN_SETTINGS)
    compare_.add_argument("--methods", default=None, help="comma-separated; 'name:adapter' for adapter mode, "
                          "'+flag=value' for an option or setting of one method (default: the quick preset's)")
    compare_.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    compare_.add_argument("--output", type=Path, default=Path("runs/compare"))
    compare_.add_argument("--quick", action="store_true", help="the main job's preset (default when no flag is given)")
    compare_.add_argument("--jobs", type=int, default=1,
                          help="runs at the same time, the CPUs divided between them; 1 keeps times comparable")
    compare_.add_argument("--tune-lr", type=int, default=0, metavar="N",
                          help="choose each method's learning rate on the validation split among N rates of the "
                          "1-3 ladder centred on its default (tuning runs never read the test split), then run the "
                          "chosen rate with every seed (default 0: no tuning)")
    compare_.add_argument("--tune-seeds", type=int, default=1, help="seeds of each tuning run (with --tune-lr)")
    compare_.add_argument("--reference", default=None, metavar="METHOD",
                          help="report each method's paired difference to this one (as listed in --methods) with "
                          "a 95%% interval over seeds")

    demo = commands.add_parser("demo", help="every family on real layer shapes: parameters and apply time")
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--repeats", type=int, default=20)

    search_ = commands.add_parser("search", help="Optuna search of family, size, targets, mode, lr under a budget")
    add_settings_arguments(search_)
    search_.add_argument("--budget-params", type=int, required=True, help="most adapter parameters (head excluded)")
    search_.add_argument("--families", default=None,
                         help=f"comma-separated surm families (default: {','.join(FAMILIES)})")
    search_.add_argument("--modes", default="delta,adapter", help="comma-separated: delta, adapter")
    search_.add_argument("--delta-targets", default=None, help="';'-separated module lists to try in delta mode")
    search_.add_argument("--adapter-targets", default=None, help="';'-separated module lists to try in adapter mode")
    search_.add_argument("--trials", type=int, default=40, help="configurations to train (rejected ones not counted)")
    search_.add_argument("--pruner", default="hyperband", choices=PRUNERS)
    search_.add_argument("--storage", default=None,
                         help="SQLAlchemy URL of the study (default: sqlite:///DIR/study.db)")
    search_.add_argument("--study-name", default="surm-search")
    search_.add_argument("--output", type=Path, required=True, help="DIR: trials, front.md/png, adapter_config.json")
    search_.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    search_.add_argument("--heartbeat", type=int, default=60, help="seconds; a trial silent for twice this is retried")
    search_.add_argument("--test-front", action="store_true", help="also test every Pareto point, not only the best")

    bench = commands.add_parser("bench", help="speed and memory against PEFT LoRA/C3A: train, inference, apply tables")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 10; --quick 2)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 2; --quick 1)")
    bench.add_argument("--tables", default="train,inference,paths,apply,decoder",
                       help="comma-separated: train, inference, paths, apply, decoder")
    bench.add_argument("--quick", action="store_true", help="a short run of every table (small batch and grid)")
    bench.add_argument("--paths", action="store_true", help="also time each family with each execution path forced")
    bench.add_argument("--model", default="minilm", help="text model of the train and inference tables")
    bench.add_argument("--output", type=Path, default=None, help="also write the tables to FILE (and FILE.json)")
    return parser


# -- the commands ----------------------------------------------------------------------------------------------------


def run_finetune(args: argparse.Namespace) -> None:
    config = RunConfig(method=method_choice(args), output=args.output, settings=settings_from_args(args),
                       resume=args.resume, checkpoint_every=args.checkpoint_every, evaluate_test=args.evaluate_test,
                       budget_params=args.budget_params)
    results = finetune(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process returns the same results
        print(json.dumps({k: results[k] for k in ("method", "trainable_params", "test_accuracy", "test_macro_f1",
                                                  "train_seconds")}, indent=2))


def run_compare(args: argparse.Namespace, quick: bool) -> None:
    specs = parse_methods(args.methods or ",".join(QUICK_METHODS))
    settings = settings_from_args(args)
    if quick:
        settings = quick_settings(settings)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    protocol = Protocol(tune_lr=args.tune_lr, tune_seeds=args.tune_seeds, reference=args.reference)
    table, failed = compare(specs, list(range(args.seeds)), args.output, settings, jobs=args.jobs, protocol=protocol)
    print(table)
    print(f"written: {args.output / 'comparison.md'}, {args.output / 'comparison.json'}, "
          f"{args.output / 'frontier.png'}")
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def run_search(args: argparse.Namespace) -> None:
    settings = SearchSettings(
        output=args.output, budget=args.budget_params, run=settings_from_args(args),
        families=split(args.families, ",") if args.families is not None else FAMILIES,
        modes=split(args.modes, ","), delta_targets=split(args.delta_targets, ";"),
        **({"adapter_targets": split(args.adapter_targets, ";")} if args.adapter_targets is not None else {}),
        pruner=args.pruner, trials=args.trials, storage=args.storage, study_name=args.study_name,
        timeout=args.timeout, heartbeat=args.heartbeat, test_front=args.test_front)
    search(settings)


def run_bench_command(args: argparse.Namespace, argv: Sequence[str]) -> None:
    config = BenchConfig(
        device=args.device,
        threads=args.threads,
        repeats=args.repeats if args.repeats is not None else (2 if args.quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        tables=tuple(t.strip() for t in args.tables.split(",") if t.strip()),
        quick=args.quick,
        paths=args.paths,
        model=args.model,
        command="surm bench" + "".join(" " + shlex.quote(a) for a in argv),
    )
    report = run_bench(config)
    print(report.markdown, end="")
    if args.output is not None:
        raw = write_report(report, args.output)
        print(f"written: {args.output}, {raw}")


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command; expected failures propagate to :func:`main`."""
    if args.command == "finetune":
        run_finetune(args)
    elif args.command == "compare":
        run_compare(args, quick=args.quick or not argv)
    elif args.command == "demo":
        print(run_demo(tokens=args.tokens, repeats=args.repeats))
    elif args.command == "search":
        run_search(args)
    elif args.command == "bench":
        run_bench_command(args, argv[1:])
    return 0


# -- failures --------------------------------------------------------------------------------------------------------

#: The failures reported in one line (exit 2); anything else is a bug and shows its traceback.
EXPECTED_ERRORS = (SurmError, ValueError, OSError, EOFError, pickle.UnpicklingError, SafetensorError)


def error_line(error: BaseException) -> str:
    """One line for an expected failure: the message, or for an OSError the reason and the file."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or type(error).__name__
        return f"{reason}: {error.filename}" if error.filename else reason
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["compare", "--quick"])
    try:
        return dispatch(args, argv)
    except KeyboardInterrupt:
        if ctrl_c_arrives_twice() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            ignore_next_ctrl_c()  # compare's copy of this Ctrl-C may still come while the process exits
        hint = RESUME_HINTS.get(args.command, "nothing was left half-written")
        print(f"surm {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        print(f"surm {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
