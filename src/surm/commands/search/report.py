"""What a search writes at the end: ``trials.json`` (the summary), ``front.md`` (the Pareto front, the best
configuration with the command that reproduces it, every trial) and ``front.png``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

from ... import atomic
from .settings import SearchSettings
from .space import Candidate
from .study import TrialStatus, counts, status_of


def finetune_flags(s: SearchSettings) -> list[str]:
    """The finetune flags that reproduce a trial's run settings (the method comes from --config and --lr)."""
    return s.run.to_flags(always=("model", "dataset", "epochs", "seed"), exclude=("device", "lr"))


def settings_record(s: SearchSettings) -> dict[str, Any]:
    """The search's settings as plain data, the run settings flattened in (as before they were a type of their
    own), the output folder left out."""
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items() if k not in ("output", "run")}
    return {**s.run.describe(), **record}


def summarise(s: SearchSettings, trials: list[Any], best: Any, front: list[Any], tested: dict[int, dict[str, Any]],
              valid: int, fitting: int) -> dict[str, Any]:
    """Everything ``trials.json``, ``front.md`` and ``front.png`` show: the settings, the counts, the best trial with
    its test results and the command that reproduces it, the Pareto front and every trial."""

    def row(t: Any) -> dict[str, Any]:
        data = {"trial": t.number, "status": status_of(t).value, "adapter_params": t.user_attrs.get("adapter_params"),
                "validation_accuracy": t.value if status_of(t) is TrialStatus.COMPLETE else None,
                "validation_history": [h["accuracy"] for h in t.user_attrs.get("history", [])],
                "config": t.user_attrs.get("config"), "candidate": t.user_attrs.get("candidate"),
                "reason": t.user_attrs.get("reason"),
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None}
        if t.number in tested:
            r = tested[t.number]
            data.update(test_accuracy=r["test_accuracy"], test_macro_f1=r["test_macro_f1"],
                        trainable_params=r["trainable_params"])
        return data

    best_row = row(best)
    candidate = Candidate.from_json(best.user_attrs.get("candidate"))
    command = ["surm", "finetune", "--config", str(s.output / "adapter_config.json"), "--lr", f"{candidate.lr:.6g}",
               *finetune_flags(s), "--output", "runs/best"]
    best_row.update(command=" ".join(command), study=s.study_name, storage=s.storage,
                    validation_examples=tested[best.number]["config"].get("eval_size"),
                    results=tested[best.number])
    return {"settings": settings_record(s), "run_flags": finetune_flags(s), "counts": counts(trials),
            "valid_configurations": valid, "fitting_configurations": fitting, "best": best_row,
            "front": [row(t) for t in front],
            "trials": [row(t) for t in sorted(trials, key=lambda t: t.number)]}


def _pct(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def front_markdown(summary: dict[str, Any]) -> str:
    """front.md: the Pareto front, the best configuration with its test accuracy, and every trial."""
    s, c, best = summary["settings"], summary["counts"], summary["best"]
    budget = s["budget"]
    lines = [
        f"# surm search: {s['model']} on {s['dataset']}, budget {budget:,} adapter parameters", "",
        f"Study `{s['study_name']}`: {c['trained']} trained trials ({c.get('complete', 0)} complete, "
        f"{c.get('pruned', 0)} stopped by the {s['pruner']} pruner, {c.get('diverged', 0)} diverged); "
        f"{c.get('rejected', 0)} configurations rejected before training as over the budget, {c.get('invalid', 0)} "
        f"invalid, {c.get('duplicate', 0)} duplicates, {c.get('surplus', 0) + c.get('failed', 0)} failed or surplus. "
        f"{summary['fitting_configurations']} of the {summary['valid_configurations']} discrete configurations "
        "of the space fit the budget.", "",
        "Objective: validation accuracy after the last epoch. The test split was evaluated once, only for the "
        "configurations that show a test accuracy.", "",
        f"Run settings of every trial: `{' '.join(summary['run_flags'])}`", "",
        "## Pareto front (validation accuracy against adapter parameters)", "",
        "| trial | adapter params | % of budget | validation acc % | test acc % | configuration |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in summary["front"]:
        mark = " **(best)**" if row["trial"] == best["trial"] else ""
        lines.append(f"| {row['trial']} | {row['adapter_params']:,} | {100 * row['adapter_params'] / budget:.1f} | "
                     f"{_pct(row['validation_accuracy'])} | {_pct(row.get('test_accuracy'))} | {row['config']}{mark} |")
    lines += [
        "", "## Best configuration", "",
        f"Trial {best['trial']}: {best['config']}; {best['adapter_params']:,} adapter parameters "
        f"({best['trainable_params']:,} trainable with the classifier head); validation accuracy "
        f"{_pct(best['validation_accuracy'])} %, **test accuracy {_pct(best['test_accuracy'])} %** "
        f"(macro-F1 {_pct(best['test_macro_f1'])} %).", "",
        "Reproduce it (`adapter_config.json` holds the family, options, targets, mode and alpha; the learning rate "
        "is passed on its own):", "", "```bash", best["command"], "```", "",
        "## All trials", "",
        "| trial | status | adapter params | validation acc % per epoch | seconds | configuration / reason |",
        "|---:|---|---:|---|---:|---|",
    ]
    for row in summary["trials"]:
        params = f"{row['adapter_params']:,}" if row["adapter_params"] is not None else ""
        history = " → ".join(_pct(v) for v in row["validation_history"])
        detail = row["config"] or ""
        if row["reason"] and row["status"] != "complete":
            detail = f"{detail} — {row['reason']}" if detail else row["reason"]
        seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else ""
        lines.append(f"| {row['trial']} | {row['status']} | {params} | {history} | {seconds} | {detail} |")
    return "\n".join(lines) + "\n"


def front_plot(summary: dict[str, Any], path: Path) -> None:
    """front.png: every completed trial, the stopped ones at their last validation accuracy, the front, the budget."""
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    complete = [r for r in summary["trials"] if r["status"] == TrialStatus.COMPLETE]
    stopped = [r for r in summary["trials"] if r["status"] in (TrialStatus.PRUNED, TrialStatus.DIVERGED)
               and r["validation_history"]]
    axes.scatter([r["adapter_params"] for r in stopped], [100 * r["validation_history"][-1] for r in stopped],
                 facecolors="none", edgecolors="grey", label="stopped by the pruner (last validation)")
    axes.scatter([r["adapter_params"] for r in complete], [100 * r["validation_accuracy"] for r in complete],
                 color="tab:blue", label="completed")
    front = summary["front"]
    axes.step([r["adapter_params"] for r in front], [100 * r["validation_accuracy"] for r in front], where="post",
              color="tab:orange", label="Pareto front")
    for r in front:
        c = r["candidate"]
        label = f"{c['family']} {'adapter' if c['mode'] == 'adapter' else 'on'} {c['targets']}"
        axes.annotate(label, (r["adapter_params"], 100 * r["validation_accuracy"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)
    best = summary["best"]
    axes.scatter([best["adapter_params"]], [100 * best["validation_accuracy"]], marker="*", s=200, color="tab:red",
                 label=f"best (test {_pct(best['test_accuracy'])} %)", zorder=3)
    axes.axvline(s["budget"], color="black", linestyle="--", linewidth=1, label=f"budget {s['budget']:,}")
    axes.set_xscale("log")
    axes.set_xlabel("adapter parameters (log scale, classifier head excluded)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(textwrap.fill(f"surm search: {s['model']} on {s['dataset']}, {summary['counts']['trained']} "
                                 f"trained trials, budget {s['budget']:,}", 90), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    atomic.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)
