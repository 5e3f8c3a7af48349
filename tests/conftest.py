"""Fixtures shared by the command-line, trainer and compare tests.

``reference_run`` is one uninterrupted ``python -m surm finetune`` (a child process, so the console entry point is
exercised as users run it); several tests compare other runs against it, so it is trained once per session.
"""

from __future__ import annotations

import pytest

from .runs import TINY, Outcome, run_surm

#: circulant in delta mode, 2 epochs of 2 steps: enough for a per-epoch history and a kill in the middle.
REFERENCE_ARGS = ("--structure", "circulant", *TINY, "--epochs", "2", "--seed", "3")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Outcome:
    output = tmp_path_factory.mktemp("reference") / "run"
    completed = run_surm("finetune", *REFERENCE_ARGS, "--output", str(output))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return Outcome(completed.returncode, completed.stdout, completed.stderr, output)
