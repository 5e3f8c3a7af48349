"""The scripts in examples/ run as users run them (a child process, offline) and do what they say: the causal-LM
fine-tuning on a tiny Llama built from a config (random weights), the classifier on the real MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .runs import environment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Each runs a Trainer end to end.
pytestmark = pytest.mark.slow


def run_example(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = Path(args[args.index("--output") + 1])
    return json.loads((output / "report.json").read_text())


@pytest.mark.parametrize("structure, mode", [("monarch", "delta"), ("ldr", "delta"), ("circulant", "adapter")])
def test_causal_lm_fine_tuning_saves_reloads_merges_and_generates(tmp_path, structure, mode):
    report = run_example("sft_causal_lm.py", "--model", "tiny-llama", "--structure", structure, "--mode", mode,
                         "--train-size", "32", "--max-length", "32", "--output", str(tmp_path / "sft"))
    assert report["steps"] == 2 and report["train_loss"] > 0
    assert report["reloaded_answers"] == report["answers"] and len(report["answers"]) == 4
    assert report["merged_answers"] == (report["answers"] if mode == "delta" else None)
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_classification_trains_and_the_reloaded_adapter_agrees(tmp_path):
    report = run_example("classify.py", "--dataset", "trec", "--structure", "kronecker", "--train-size", "48",
                         "--eval-size", "16", "--epochs", "1", "--max-length", "24", "--output", str(tmp_path / "c"))
    assert report["reloaded_predictions_agree"] is True
    assert 0 <= report["validation_accuracy"] <= 1 and report["trainable_parameters"] > 0
