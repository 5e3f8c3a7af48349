"""DistributedDataParallel: ``torchrun --nproc_per_node=2 -m surm finetune`` on two CPU processes (gloo) against one
process with the same global batch.

Both runs use MiniLM with its dropout set to 0 (a local copy of the model folder whose config says so; ``--model``
takes any local folder). With dropout each process draws its own masks, so the two runs would differ by sampling
noise rather than by float error, and the comparison could not tell a wrong batch split from chance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from surm.models import minilm_path

from .runs import TINY, environment, finetune_main, listing

#: Trains MiniLM end to end (deselect with -m "not slow"); needs gloo.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available")]

def run_args(model):
    """One epoch of 2 global batches of 16: under torchrun each process takes 8 examples of every batch."""
    return ["--model", str(model), "--structure", "circulant", *TINY, "--epochs", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def model_without_dropout(tmp_path_factory):
    """all-MiniLM-L6-v2 with hidden and attention dropout 0: links to the packaged files, a changed config.json."""
    source = Path(minilm_path())
    folder = tmp_path_factory.mktemp("minilm") / "minilm-no-dropout"
    folder.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def two_processes(model_without_dropout, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "surm", "finetune", *run_args(model_without_dropout), "--output", str(output)]
    completed = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed, output


@pytest.fixture(scope="module")
def one_process(model_without_dropout, tmp_path_factory):
    return finetune_main(tmp_path_factory.mktemp("single") / "run", *run_args(model_without_dropout))


def test_two_processes_match_one_process(two_processes, one_process):
    """Same global batches and steps; metrics and trained parameters equal up to float error.

    What differs is the order of float additions: gloo all-reduces the two halves' gradients, and each half is
    padded to its own longest text (other matmul shapes). That moves losses by about 1e-7. Adam divides each
    gradient coordinate by its own running size, so for a coordinate whose gradient is nearly zero that float
    noise reaches the update: we measured at most 7e-7 in the parameters on one machine and, on another (same
    wheels, another CPU), 1.7e-5 in one coordinate of 384 (a 1 % change of that coordinate; the tensor's relative
    difference 2.3e-4, every other tensor's below 5e-6), in parameters that move up to 6e-3 in these two steps
    (lr 3e-3). So each tensor must agree to 1e-3 of its norm and every coordinate to 1e-4: room for BLAS builds,
    and still 30 times below what a wrong split of the batch (another gradient direction, a change of order lr in
    every coordinate, a relative difference of order 1) gives.
    """
    ddp, single = json.loads((two_processes[1] / "results.json").read_text()), one_process.results
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["trainable_params"] == single["trainable_params"]
    assert [(h["epoch"], h["step"]) for h in ddp["validation_history"]] == \
        [(h["epoch"], h["step"]) for h in single["validation_history"]] == [(1, 2)]
    assert abs(ddp["test_accuracy"] - single["test_accuracy"]) <= 1 / 16  # an argmax tie may flip one example
    assert ddp["test_loss"] == pytest.approx(single["test_loss"], abs=1e-5)
    assert ddp["validation_history"][0]["loss"] == pytest.approx(single["validation_history"][0]["loss"], abs=1e-5)
    theirs = load_file(two_processes[1] / "adapter" / "adapter_model.safetensors")
    ours = load_file(one_process.output / "adapter" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-4)
        relative = ((theirs[name] - ours[name]).norm() / ours[name].norm()).item()
        assert relative < 1e-3, f"{name}: relative difference {relative:.2e}"
        # (the adapters start at zero, the head's bias too: a comparison of untrained values would prove nothing)
        assert ours[name].abs().max() > 1e-4, f"{name} did not train"


def test_only_rank_zero_writes(two_processes):
    completed, output = two_processes
    assert listing(output) == {"adapter", "adapter/README.md", "adapter/adapter_config.json",
                               "adapter/adapter_model.safetensors", "checkpoint.pt", "results.json", "train.log"}
    log = (output / "train.log").read_text()
    assert log.count("trainable parameters") == log.count("epoch 1:") == log.count("test accuracy") == 1
    assert completed.stdout.count('"test_accuracy"') == 1  # one summary, not one per process
    assert completed.stderr.count("epoch 1: validation accuracy") == 1
    checkpoint = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # every process's random state, for --resume
