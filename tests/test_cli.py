"""The command line (``python -m surm`` and ``surm.__main__.main``): finetune end to end, and bad input.

Bad input must stop before training with exit status 2 and a message that names the problem; the output folder
is then never created, which shows that no training started (the trainer creates it just before its first step).
"""

from __future__ import annotations

import csv
import json
from importlib import metadata

import pytest

from .conftest import REFERENCE_ARGS
from .runs import TINY, call_main, comparable, finetune_main


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("surm") == "surm.__main__:main"


def test_module_finetune_writes_its_output_folder(reference_run):
    assert reference_run.code == 0
    summary = json.loads(reference_run.stdout)  # the summary is the only thing on stdout
    results = reference_run.results
    assert summary == {k: results[k] for k in ("method", "trainable_params", "test_accuracy", "test_macro_f1",
                                               "train_seconds")}
    assert "epoch 2/2" in reference_run.stderr and "samples_per_s" in reference_run.stderr  # the progress bar
    names = {p.name for p in reference_run.output.iterdir()}
    assert names == {"adapter", "checkpoint.pt", "results.json", "train.log"}


def test_main_function_gives_identical_results(reference_run, tmp_path):
    """The same seed and settings, once in a child process and once in this one: the same training, bit for bit."""
    outcome = finetune_main(tmp_path / "again", *REFERENCE_ARGS)
    assert json.loads(outcome.stdout)["test_accuracy"] == reference_run.results["test_accuracy"]
    assert comparable(outcome.results) == comparable(reference_run.results)
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference_run.output / "adapter" / "adapter_model.safetensors").read_bytes()


# -- bad input ----------------------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def reviews(n=20):
    return [(f"review number {i} of the film", ["good", "bad"][i % 2]) for i in range(n)]


def latin1_csv(folder):
    path = folder / "d.csv"
    path.write_bytes("text,label\ncaf\xe9 noir,good\n".encode("latin-1"))
    return path


def dataset_case(make, *flags):
    """A finetune argument list for a data file made by ``make(folder)``."""
    return lambda folder: ["--dataset", str(make(folder)), *flags]


BAD_FINETUNE = {
    "missing file": (lambda folder: ["--dataset", str(folder / "absent.csv")], "file not found"),
    "missing text column": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["sentence", "label"], reviews())),
        "column 'text' (text_column) not found; columns found: 'sentence', 'label'"),
    "misnamed label column": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], reviews()), "--label-column", "sentiment"),
        "column 'sentiment' (label_column) not found"),
    "missing text pair column": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], reviews()), "--text-pair-column", "b"),
        "column 'b' (text_pair_column) not found"),
    "empty dataset": (dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], [])), "empty dataset"),
    "continuous labels": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], [(t, i / 7) for i, (t, _) in
                                                                          enumerate(reviews())])),
        "non-integer numbers"),
    "missing label": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], [*reviews(), ("no label here", "NaN")])),
        "missing or empty labels (empty, null or NaN) in rows 21"),
    "single class": (
        dataset_case(lambda f: write_csv(f / "d.csv", ["text", "label"], [(t, "good") for t, _ in reviews()])),
        "only the class 'good'"),
    "non-UTF-8 text": (dataset_case(latin1_csv), "is not valid UTF-8: byte b'\\xe9' at byte offset 14 (line 2)"),
    "unknown structure": (lambda folder: ["--structure", "hexagonal"], "unknown method 'hexagonal'; valid methods"),
    "zero blocks": (lambda folder: ["--structure", "monarch", "--nblocks", "0"], "nblocks must be a positive"),
    "factors that do not divide": (lambda folder: ["--structure", "kronecker", "--factors", "5,5"],
                                   "5 does not divide out_features=384"),
    "option of another family": (lambda folder: ["--structure", "circulant", "--rank", "4"],
                                 "option(s) ['rank'] do not apply to structure 'circulant'"),
    "option foreign to a PEFT method": (lambda folder: ["--structure", "lora", "--nblocks", "4"],
                                        "option(s) ['nblocks'] do not apply to lora"),
    "adapter mode of a PEFT method": (lambda folder: ["--structure", "lora", "--mode", "adapter"],
                                      "mode 'adapter' applies to surm structures only"),
    "zero epochs": (lambda folder: ["--epochs", "0"], "epochs must be a positive integer, got 0"),
    "negative checkpoint interval": (lambda folder: ["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    "unknown model offline": (lambda folder: ["--model", "no-such-org/no-such-model"],
                              "HF_HUB_OFFLINE=1 forbids downloading it"),
    "image model on text": (lambda folder: ["--model", "efficientnet-lite0"], "is an image model"),
}


@pytest.mark.parametrize("case", BAD_FINETUNE)
def test_bad_finetune_input_stops_before_training(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_args, message = BAD_FINETUNE[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    output = tmp_path / "out"
    outcome = call_main("finetune", *TINY, "--epochs", "1", *make_args(inputs), "--output", str(output))
    assert outcome.code == 2
    assert outcome.stderr.startswith("surm finetune: error: ")
    assert message in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert not output.exists()


@pytest.mark.parametrize("args, message", [
    (["finetune", "--output", "x", "--factors", "5"], "--factors takes two integers"),
    (["finetune", "--output", "x", "--mode", "sideways"], "invalid choice: 'sideways'"),
    (["finetune", "--structure", "lora"], "the following arguments are required: --output"),
])
def test_malformed_command_lines_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = call_main(*args)
    assert outcome.code == 2 and message in outcome.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--methods", "lora,hexagonal"], "unknown method 'hexagonal' in --methods"),
    (["--methods", "lora,lora"], "--methods lists 'lora' twice"),
])
def test_bad_compare_input_stops_before_any_run(args, message, tmp_path):
    output = tmp_path / "cmp"
    outcome = call_main("compare", *args, "--output", str(output))
    assert outcome.code == 2
    assert outcome.stderr.startswith("surm compare: error: ") and message in outcome.stderr
    assert not output.exists()
