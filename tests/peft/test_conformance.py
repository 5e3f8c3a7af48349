"""PEFT's own custom-model tests on surm (scripts/peft_conformance.py, docs/peft_conformance.md) as part of the suite.

The script fetches the tests of the installed PEFT version from the package index; this test skips only when the
index cannot be reached (the script's exit status EXIT_UNREACHABLE), and fails on any other error.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peft_conformance.py"


def script_constant(name: str) -> object:
    """A constant of the conformance script (running it is left to a child process)."""
    return runpy.run_path(str(SCRIPT), run_name="peft_conformance")[name]


@pytest.mark.slow
def test_peft_custom_model_tests_pass_or_are_listed_not_applicable():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1800)
    if done.returncode == script_constant("EXIT_UNREACHABLE"):
        pytest.skip(f"the package index is unreachable, PEFT's tests could not be fetched: {done.stderr[-1000:]}")
    summary = [line for line in done.stdout.splitlines() if line.startswith("surm conformance, PEFT")]
    assert done.returncode == 0, f"{summary}\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    counts = {outcome: int(n) for n, outcome in re.findall(r"(\d+) (\w+)", summary[-1].partition(": ")[2])}
    assert counts["passed"] > 0 and counts["failed"] == counts["xpassed"] == counts["error"] == 0, summary
