"""The ``surm`` command line (also ``python -m surm``): finetune, compare, demo, search.

With no arguments it runs the main job: ``surm compare``'s quick preset on MiniLM + mr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .errors import RunsFailed, SurmError

FAMILY_FLAGS = {
    "rank": int, "nblocks": int, "block_rank": int, "terms": int, "displacement_rank": int, "bottleneck": int,
    "parameterization": str, "alpha": float, "dropout": float, "block_size": int,
}


def _factors(text: str) -> list[int]:
    try:
        m1, n1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--factors takes two integers 'm1,n1', got {text!r}") from None
    return [m1, n1]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by finetune and compare (everything but the method)."""
    parser.add_argument("--model", default="minilm", help="'minilm', 'efficientnet-lite0', a HF model id or local path")
    parser.add_argument("--dataset", default="mr", help="mr, trec, sms, digits, mnist, a local CSV/TSV/JSONL or HF id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    parser.add_argument("--head-lr", type=float, default=None, help="learning rate of the classifier head")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (truncation)")
    parser.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this many examples")
    parser.add_argument("--eval-size", type=int, default=None, help="evaluate on seeded subsets of this size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--structure", default="circulant", help="a surm family, or lora, c3a, lokr, boft, full")
    parser.add_argument("--mode", default="delta", choices=["delta", "adapter"])
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: query,value)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a surm adapter_config.json (e.g. from surm search): every SurmConfig setting in it is "
                        "used (flags given here win); its provenance entries (peft_type, task_type, "
                        "base_model_name_or_path, revision, inference_mode, auto_mapping, peft_version) are set by "
                        "the run; unknown entries are refused")
    for flag, kind in FAMILY_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--factors", type=_factors, default=None, help="kronecker: 'm1,n1'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"surm {__version__}")
    commands = parser.add_subparsers(dest="command")

    finetune = commands.add_parser("finetune", help="fine-tune one method and write adapter, results.json and log")
    add_run_arguments(finetune)
    add_method_arguments(finetune)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--output", type=Path, required=True)
    finetune.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    finetune.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")

    compare = commands.add_parser("compare", help="several methods x seeds: comparison.md/json and frontier.png")
    add_run_arguments(compare)
    compare.add_argument("--methods", default=None, help="comma-separated; 'name:adapter' for adapter mode")
    compare.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    compare.add_argument("--output", type=Path, default=Path("runs/compare"))
    compare.add_argument("--quick", action="store_true", help="the main job's preset (default when no flag is given)")
    compare.add_argument("--jobs", type=int, default=1, help="runs at the same time (GPU); 1 keeps times comparable")

    demo = commands.add_parser("demo", help="every family on real layer shapes: parameters and apply time")
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--repeats", type=int, default=20)

    search = commands.add_parser("search", help="Optuna search of family, size, targets, mode, lr under a budget")
    add_run_arguments(search)
    search.add_argument("--budget-params", type=int, required=True, help="most adapter parameters (head excluded)")
    search.add_argument("--families", default=None, help="comma-separated surm families (default: all seven)")
    search.add_argument("--modes", default="delta,adapter", help="comma-separated: delta, adapter")
    search.add_argument("--delta-targets", default=None, help="';'-separated module lists to try in delta mode")
    search.add_argument("--adapter-targets", default=None, help="';'-separated module lists to try in adapter mode")
    search.add_argument("--trials", type=int, default=40, help="configurations to train (rejected ones not counted)")
    search.add_argument("--pruner", default="hyperband", choices=["hyperband", "halving", "none"])
    search.add_argument("--storage", default=None, help="SQLAlchemy URL of the study (default: sqlite:///DIR/study.db)")
    search.add_argument("--study-name", default="surm-search")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--output", type=Path, required=True, help="DIR: trials, front.md/png, adapter_config.json")
    search.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    search.add_argument("--heartbeat", type=int, default=60, help="seconds; a trial silent for twice this is retried")
    search.add_argument("--test-front", action="store_true", help="also test every Pareto point, not only the best")

    bench = commands.add_parser("bench", help="speed and memory against PEFT LoRA/C3A: train, inference, apply tables")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 10; --quick 2)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 2; --quick 1)")
    bench.add_argument("--tables", default="train,inference,paths,apply",
                       help="comma-separated: train, inference, paths, apply")
    bench.add_argument("--quick", action="store_true", help="a short run of every table (small batch and grid)")
    bench.add_argument("--paths", action="store_true", help="also time each family with each execution path forced")
    bench.add_argument("--model", default="minilm", help="text model of the train and inference tables")
    bench.add_argument("--output", type=Path, default=None, help="also write the tables to FILE (and FILE.json)")
    return parser


def method_choice(args: argparse.Namespace) -> Any:
    """The MethodChoice of finetune's flags (or of --config)."""
    from .methods import MethodChoice

    options = {flag: getattr(args, flag) for flag in (*FAMILY_FLAGS, "factors") if getattr(args, flag) is not None}
    name, mode = args.structure, args.mode
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
    from .peft import SurmConfig
    from peft.config import PeftConfig

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
    options = {k: v for k, v in data.items()
               if k not in provenance | {"structure", "mode", "target_modules"} and v is not None}
    options.update(overrides)
    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(targets)
    elif targets is not None and not isinstance(targets, str):
        raise ValueError(f"--config {path}: target_modules must be a list of names or a regex, got {targets!r}")
    return data["structure"], data.get("mode", "delta"), targets, options


def run_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in ("model", "dataset", "text_column", "text_pair_column", "label_column",
                                            "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_length",
                                            "train_size", "eval_size", "device")}
    if args.head_lr is not None:
        kwargs["head_lr"] = args.head_lr
    return kwargs


def run_config(args: argparse.Namespace) -> Any:
    """The trainer's RunConfig for finetune's parsed flags.

    Raises:
        ValueError: for an unknown method or mode, or a setting out of range.
    """
    from .trainer import RunConfig

    return RunConfig(method=method_choice(args), output=args.output, seed=args.seed, resume=args.resume,
                     checkpoint_every=args.checkpoint_every, **run_config_kwargs(args))


def forwarded_run_flags(args: argparse.Namespace) -> list[str]:
    """compare's shared flags as finetune arguments."""
    defaults = vars(build_parser().parse_args(["finetune", "--output", "-"]))
    flags = []
    for key, value in run_config_kwargs(args).items():
        if value is not None and value != defaults.get(key):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


#: What to do after Ctrl-C, per command.
RESUME_HINTS = {
    "finetune": "run the same command with --resume to continue from the last checkpoint (or from the start if "
                "none was written yet)",
    "compare": "run the same command again: finished runs are reused and an interrupted one resumes from its checkpoint",
    "search": "run the same command again to resume the study (the trial that was cut off counts as failed and a "
              "new one takes its place)",
}


def error_line(error: BaseException) -> str:
    """One line for an expected failure: the message, or for an OSError the reason and the file."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or type(error).__name__
        return f"{reason}: {error.filename}" if error.filename else reason
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures the command line reports in one line (exit 2); anything else is a bug and shows its traceback."""
    from safetensors import SafetensorError

    return (SurmError, ValueError, OSError, EOFError, pickle.UnpicklingError, SafetensorError)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["compare", "--quick"])
    try:
        return dispatch(args, argv)
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command, "nothing was left half-written")
        print(f"surm {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except expected_errors() as error:
        print(f"surm {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command; expected failures propagate to :func:`main`."""
    if args.command == "finetune":
        from .trainer import finetune

        results = finetune(run_config(args))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process returns the same results
            print(json.dumps({k: results[k] for k in ("method", "trainable_params", "test_accuracy",
                                                      "test_macro_f1", "train_seconds")}, indent=2))
    elif args.command == "compare":
        run_compare(args, quick=args.quick or not argv)
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(tokens=args.tokens, repeats=args.repeats))
    elif args.command == "search":
        from .search import search, settings_from_args

        search(settings_from_args(args))
    elif args.command == "bench":
        from .bench import run_command

        run_command(args, argv[1:])
    return 0


def run_compare(args: argparse.Namespace, quick: bool) -> None:
    from .compare import QUICK_METHODS, QUICK_RUN_ARGS, compare, parse_methods

    specs = parse_methods(args.methods or ",".join(QUICK_METHODS))
    common = forwarded_run_flags(args)
    if quick:
        common = [*QUICK_RUN_ARGS, *common]
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    title = (f"surm compare: model {args.model}, dataset {args.dataset}, {args.seeds} seed(s), "
             f"finetune {' '.join(common) or '(defaults)'}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    table, failed = compare(specs, list(range(args.seeds)), args.output, common, title, jobs=args.jobs)
    print(table)
    print(f"written: {args.output / 'comparison.md'}, {args.output / 'comparison.json'}, {args.output / 'frontier.png'}")
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    sys.exit(main())
