"""FSDP2 (``fully_shard``): ``examples/fsdp_causal_lm.py`` under ``torchrun --nproc_per_node=2`` on two CPU processes
(gloo) against the same script in one process without FSDP, for every family in delta and in adapter mode.

The model is the script's ``tiny-llama``: a 2-layer Llama with random weights (seeded, so both runs and the reload
build the same one) and no dropout. Each launch trains every (family, mode) combination in turn inside one process
group, so the start-up cost is paid once: 3 steps of a global batch of 8 texts, gradient clipping on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file

import surm
from surm.data import load_dataset

from .runs import environment
from .scripts import ROOT, load_script

EXAMPLE_SCRIPT = "examples/fsdp_causal_lm.py"
EXAMPLE = ROOT / EXAMPLE_SCRIPT
SETTINGS = ["--steps", "3", "--batch-size", "8", "--eval-size", "8", "--max-length", "32", "--seed", "3"]
#: The CPU runs stay on the CPU (gloo) on a machine with a GPU too.
CPU = ["--device", "cpu"]
COMBINATIONS = [(structure, mode) for structure in sorted(surm.STRUCTURES) for mode in ("delta", "adapter")]

#: Two launches that train 14 adapters each (deselect with -m "not slow"); needs gloo.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available")]


def launch(output: Path, *args: str, processes: int = 0) -> subprocess.CompletedProcess:
    """The example with ``args`` and ``--output OUTPUT``: under torchrun with ``processes`` CPU processes, or plain."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    command = [sys.executable, *runner, str(EXAMPLE), *args, "--output", str(output)]
    return subprocess.run(command, env={**environment(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def trained(output: Path, *args: str, processes: int = 0) -> dict[tuple[str, str], dict]:
    """Run every combination (on the CPU unless ``args`` name a device); each one's report by (structure, mode)."""
    structures = sorted({structure for structure, _ in COMBINATIONS})
    device = [] if "--device" in args else CPU
    completed = launch(output, "--structure", *structures, "--mode", "delta", "adapter", *SETTINGS, *device, *args,
                       processes=processes)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((output / "report.json").read_text())
    assert report["world_size"] == (processes or 1)
    return {(run["structure"], run["mode"]): run for run in report["runs"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[tuple[str, str], dict]:
    return trained(tmp_path_factory.mktemp("single") / "run")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[tuple[str, str], dict]:
    return trained(tmp_path_factory.mktemp("fsdp") / "run", processes=2)


@pytest.fixture(scope="module")
def example():
    """The example script as a module (its tiny Llama, tokenisation and loss)."""
    return load_script(EXAMPLE_SCRIPT)


def assert_sharded_matches_single(sharded: dict, single: dict) -> dict[str, torch.Tensor]:
    """The sharded run of a combination against the one-process run: the same trainable count, losses and evaluation
    loss within 1e-5, the saved adapters' tensors within lr / 50 (see test_two_processes_match_one_process), and a
    loss that fell. Returns the one-process run's saved tensors."""
    assert sharded["trainable_params"] == single["trainable_params"] > 0
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    assert sharded["eval_loss"] < sharded["losses"][0]  # it learnt something
    theirs = load_file(Path(sharded["adapter"]) / "adapter_model.safetensors")
    ours = load_file(Path(single["adapter"]) / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=single["lr"] / 50)
    return ours


def reloaded(example, adapter: str) -> tuple[PeftModel, float]:
    """The saved adapter loaded into a fresh unsharded tiny Llama on the CPU, and its mean token loss on the first
    8 validation texts (the runs' evaluation batch)."""
    model = PeftModel.from_pretrained(example.tiny_llama(seed=3), adapter).eval()
    texts = [item.text for item in load_dataset("trec", seed=3).validation[:8]]
    sequences = example.tokenize(texts, example.encode_ascii, example.TINY_EOS, 32)
    with torch.no_grad():
        total = example.summed_loss(model, example.pad_batch(sequences, example.TINY_PAD, torch.device("cpu")))
    return model, total.item() / example.predicted_tokens(sequences)


def test_every_combination_ran_sharded(two_processes, one_process):
    assert sorted(two_processes) == sorted(one_process) == sorted(COMBINATIONS)
    for run in two_processes.values():
        assert run["fsdp_units"] == 2  # both decoder blocks are units of their own, besides the root
    assert {run["fsdp_units"] for run in one_process.values()} == {0}


@pytest.mark.parametrize("structure, mode", COMBINATIONS)
def test_two_processes_match_one_process(two_processes, one_process, structure, mode):
    """Same global batches and steps: losses and the saved adapters equal up to float error.

    The order of float additions differs (gloo reduce-scatters the halves' gradients, each half is padded to its own
    longest text): the losses moved by at most 1.1e-6. Adam divides each gradient coordinate by its own running
    size, so where a gradient is nearly zero that noise reaches the update: we measured at most lr / 500 in the
    parameters (2e-5 in a monarch adapter-mode bias, lr 1e-2). The tolerance lr / 50 is still far below what a
    wrong split of the batch or a lost gradient gives (coordinates that step the other way, a change of order lr).
    """
    single = one_process[structure, mode]
    ours = assert_sharded_matches_single(two_processes[structure, mode], single)
    assert all("surm_" in name for name in ours)  # the frozen base weights were neither gathered nor saved
    assert sum(tensor.numel() for tensor in ours.values()) == single["trainable_params"]
    # Every adapter starts as the identity map (zero update), so trained values must have moved.
    assert max(tensor.abs().max().item() for tensor in ours.values()) > 1e-3


@pytest.mark.parametrize("structure, mode", COMBINATIONS)
def test_saved_adapter_reloads_in_one_process(two_processes, example, structure, mode):
    """The adapter written by rank 0, loaded into a fresh unsharded tiny Llama, gives the sharded model's loss."""
    run = two_processes[structure, mode]
    model, loss = reloaded(example, run["adapter"])
    assert model.peft_config["default"].structure == structure and model.peft_config["default"].mode == mode
    assert loss == pytest.approx(run["eval_loss"], abs=1e-5)


def test_bfloat16_base_mixed_precision_and_cpu_offload_run(tmp_path, one_process):
    """A bfloat16 base with float32 adapters in the same units, ``MixedPrecisionPolicy(param_dtype=bfloat16)`` and
    ``CPUOffloadPolicy(pin_memory=False)`` on gloo: training runs, the losses stay near the float32 run's (bfloat16
    rounds the weights and the forward: about 1e-2 here), and the saved adapter is float32."""
    output = tmp_path / "mixed"
    completed = launch(output, "--structure", "monarch", "--mode", "delta", *SETTINGS, *CPU, "--dtype", "bfloat16",
                       "--param-dtype", "bfloat16", "--cpu-offload", processes=2)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (run,) = json.loads((output / "report.json").read_text())["runs"]
    assert run["losses"] == pytest.approx(one_process["monarch", "delta"]["losses"], abs=5e-2)
    assert run["eval_loss"] < run["losses"][0]
    saved = load_file(Path(run["adapter"]) / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


@pytest.mark.skipif(torch.accelerator.is_available(), reason="only a machine without an accelerator raises this")
def test_pinned_cpu_offload_needs_an_accelerator(tmp_path):
    """Why the script pins offloaded shards only on an accelerator: FSDP2's default ``CPUOffloadPolicy()``
    (``pin_memory=True``) fails in ``fully_shard`` itself on a CPU-only machine."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="Cannot access accelerator device"):
            fully_shard(torch.nn.Linear(4, 4), offload_policy=CPUOffloadPolicy())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nccl_fsdp_with_pinned_cpu_offload_matches_one_process_and_reloads(tmp_path, example):
    """What a CPU cannot run: FSDP2 over NCCL with ``CPUOffloadPolicy()``'s pinned host memory. One process per GPU
    (``torchrun --nproc_per_node=1`` where there is one GPU), every family and mode, against the same script on the
    GPU without FSDP; the saved adapters reload into an unsharded model on the CPU with the sharded run's loss."""
    sharded = trained(tmp_path / "fsdp", "--device", "cuda", "--cpu-offload", processes=1)
    single = trained(tmp_path / "single", "--device", "cuda")
    assert sorted(sharded) == sorted(single) == sorted(COMBINATIONS)
    for key, run in sharded.items():
        assert run["fsdp_units"] == 2, key
        assert_sharded_matches_single(run, single[key])
        _, loss = reloaded(example, run["adapter"])  # on the CPU
        assert loss == pytest.approx(run["eval_loss"], abs=1e-4), key


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such-model"], "is not a folder, and the Hub is offline"),
    (["--cpu-offload"], "start the script with torchrun"),
    (["--batch-size", "0"], "must be a positive integer"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device is available")]),
])
def test_bad_input_is_a_one_line_error(example, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stop:
        example.main([*args, "--output", str(tmp_path / "run")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
