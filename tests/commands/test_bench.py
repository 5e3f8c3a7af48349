"""``surm bench --quick``: the report's format and its raw numbers (never the timings themselves)."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import surm  # noqa: E402
from surm.cli import main  # noqa: E402
from surm.commands.bench import TABLES, BenchConfig, growth_exponent, iqr_ms, transient_peak_bytes  # noqa: E402

NUMBER = r"-?[0-9][0-9,.e+-]*"


def table_rows(markdown: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under the heading that starts with ``title``."""
    lines = markdown.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2 : end]]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "bench.md"
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--quick", "--threads", "1", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return output.read_text(), json.loads(output.with_suffix(".json").read_text())


@pytest.mark.slow
def test_quick_report_has_every_table_with_numbers(quick_report):
    markdown, data = quick_report
    assert markdown.startswith("## surm bench\n")
    assert "- command: `surm bench --quick --threads 1 --output " in markdown

    train = table_rows(markdown, "### Training step")
    labels = [row[0] for row in train]
    assert labels[:2] == ["floor: classifier only, gradients through the encoder", "PEFT LoRA r=8"]
    assert "surm circulant" in labels
    lora = train[1]
    assert lora[4] == "1.000" and lora[5] == "1.00" and lora[8] == "1.000"  # LoRA is the reference
    for row in train:
        assert len(row) == 10
        assert all(re.fullmatch(NUMBER, cell) for cell in (row[2], row[3], row[4], row[6], row[7], row[8], row[9]))
    assert train[labels.index("surm circulant")][1] in ("structured", "dense")

    inference = table_rows(markdown, "### Inference")
    assert [row[0] for row in inference][:3] == ["base model", "PEFT LoRA r=8, unmerged", "PEFT LoRA r=8, merged"]
    assert inference[0][4] == "1.000"
    assert {"surm circulant, unmerged", "surm circulant, merged"} <= {row[0] for row in inference}

    apply = table_rows(markdown, "16 tokens (ms):")
    kernels = [row[0] for row in apply]
    assert kernels[0] == "dense"
    assert set(kernels[1:]) == set(surm.STRUCTURES)
    assert all(re.fullmatch(NUMBER, cell) for row in apply for cell in row[1:])
    assert "Cost-model rates (surm.execution)" in markdown

    paths = table_rows(markdown, "### Execution paths")
    assert [row[0] for row in paths] == ["bare layer", "PEFT LoRA r=8", "circulant [structured]", "circulant [dense]"]
    assert all(row[4] in ("structured", "dense") and row[7] in ("structured", "dense") for row in paths[2:])

    decoder = table_rows(markdown, "### Decoder, tiny")
    assert [row[0] for row in decoder] == ["PEFT LoRA r=16, all-linear", "surm circulant, all-linear",
                                           "surm circulant, adapter (o_proj, down_proj)", "surm ldr, all-linear",
                                           "surm ldr, adapter (o_proj, down_proj)"]
    assert decoder[0][5] == decoder[0][8] == "1.00"  # LoRA is the reference
    assert all(re.fullmatch(NUMBER, cell) for row in decoder for cell in (row[2], *row[3:]))

    assert set(data) >= {"config", "train", "inference", "paths", "apply", "decoder", "machine", "load_average"}
    assert data["config"]["quick"] is True
    assert len(data["train"]["PEFT LoRA r=8"]["times_s"]) == 2
    assert data["train"]["surm circulant"]["peak_bytes"] > data["train"]["surm circulant"]["state_bytes"] > 0


def test_bad_options_are_reported():
    valid = re.escape(str(TABLES))
    with pytest.raises(ValueError, match=rf"tables must be a non-empty subset of {valid}"):
        BenchConfig(tables=("train", "speed"))
    with pytest.raises(ValueError, match="repeats must be a positive integer, got 0"):
        BenchConfig(repeats=0)
    assert main(["bench", "--tables", "nope"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_report_on_cuda(tmp_path):
    output = tmp_path / "b.md"
    assert main(["bench", "--quick", "--device", "cuda", "--tables", "train,apply", "--output", str(output)]) == 0
    assert "(cuda, " in output.read_text()


def test_helpers():
    assert growth_exponent([10, 100, 1000], [1, 100, 10000]) == pytest.approx(2.0)
    assert iqr_ms([0.001]) == 0.0
    assert iqr_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == pytest.approx(2.0)


def test_memory_probe_measures_the_step_and_prints_nothing(capfd):
    """The CPU probe (the profiler's allocation trace) sees a 4 MB temporary, and the profiler's backend, which
    writes a line to the process's stderr at every start and stop, stays silent."""
    def step():
        temporary = torch.ones(1024, 1024)  # 4 MiB, freed at return
        return float(temporary.sum())

    peak = transient_peak_bytes(step, "cpu")
    assert 4 * 2**20 <= peak < 5 * 2**20
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
