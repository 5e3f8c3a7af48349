"""Learning-rate sweep behind surm's per-method defaults (each family's ``default_lr``, the baselines' in
``surm.methods.BASELINES``).

Runs ``surm compare`` once per learning rate (several at a time with ``--jobs``), then writes ``sweep.md`` and
``sweep.json``: the final-epoch VALIDATION accuracy of every method at every learning rate, and the best rate
per method. The test split plays no part in the choice.

    python benchmarks/lr_sweep.py --output runs/sweep --jobs 7 -- --train-size 4000 --eval-size 1000 --epochs 2

Arguments after ``--`` go to ``surm compare`` (and from there to every ``surm finetune``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_METHODS = (
    "lowrank,circulant,circulant+parameterization=product,toeplitz,toeplitz+parameterization=product,"
    "symmetric_toeplitz,symmetric_toeplitz+parameterization=product,kronecker,kronecker+rank=2,ldr,monarch,"
    "circulant:adapter,monarch:adapter,lora,c3a,lokr,boft,full"
)
DEFAULT_LRS = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"


def run_group(lr: str, group: int, methods: str, output: Path, extra: list[str]) -> Path:
    """One ``surm compare`` of a group of methods at one learning rate (failed runs are listed, not fatal)."""
    folder = output / f"lr_{lr}" / f"group{group}"
    command = [sys.executable, "-m", "surm", "compare", "--methods", methods, "--lr", lr, "--output", str(folder),
               *extra]
    with open(output / f"lr_{lr}_group{group}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    return folder / "comparison.json"


def summarise(results: dict[str, list[dict]], lrs: list[str]) -> tuple[str, dict]:
    methods = sorted({row["method"] for groups in results.values() for data in groups for row in data["rows"]})
    table = {m: {lr: None for lr in lrs} for m in methods}
    for lr, groups in results.items():
        for row in (row for data in groups for row in data["rows"]):
            table[row["method"]][lr] = (row["validation_accuracy_mean"], row["accuracy_mean"], row["adapter_params"])
    lines = ["| method | adapter params | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best lr (validation) |",
             "|---|---:|" + "---:|" * len(lrs) + "---|"]
    best = {}
    for method in methods:
        cells = table[method]
        done = {lr: v for lr, v in cells.items() if v is not None}
        best_lr = max(done, key=lambda lr: done[lr][0])
        best[method] = {"lr": float(best_lr), "validation_accuracy": done[best_lr][0],
                        "test_accuracy": done[best_lr][1]}
        params = next(iter(done.values()))[2]
        row = " | ".join(f"{100 * cells[lr][0]:.1f}" if cells[lr] else "diverged" for lr in lrs)
        lines.append(f"| {method} | {params:,} | {row} | {best_lr} |")
    return "\n".join(lines) + "\n", best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--lrs", default=DEFAULT_LRS)
    parser.add_argument("--jobs", type=int, default=1, help="compare processes at the same time")
    parser.add_argument("--groups", type=int, default=1, help="split the methods into this many compare processes")
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for surm compare")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    lrs = args.lrs.split(",")
    args.output.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    groups = [",".join(methods[g :: args.groups]) for g in range(args.groups)]
    tasks = [(lr, g) for lr in lrs for g in range(args.groups)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        paths = list(pool.map(lambda t: run_group(t[0], t[1], groups[t[1]], args.output, extra), tasks))
    results: dict[str, list[dict]] = {lr: [] for lr in lrs}
    for (lr, _), path in zip(tasks, paths):
        if path.exists():
            results[lr].append(json.loads(path.read_text()))
    table, best = summarise(results, lrs)
    header = (f"Validation accuracy (%, final epoch) per learning rate; compare arguments: {' '.join(extra)}\n\n")
    (args.output / "sweep.md").write_text(header + table)
    (args.output / "sweep.json").write_text(json.dumps({"extra": extra, "best": best}, indent=2) + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
