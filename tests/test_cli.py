"""The command line (``python -m surm`` and ``surm.cli.main``): finetune end to end, and bad input.

Bad input must stop before training with exit status 2 and a message that names the problem; the output folder
is then never created, which shows that no training started (the trainer creates it just before its first step).
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import resource
import signal
import subprocess
from importlib import metadata

import pytest
from safetensors.torch import load_file

import surm.cli as cli_module
from surm.commands.finetune import FORWARDED_CTRL_C

from .conftest import REFERENCE_ARGS
from .runs import (TINY, call_main, comparable, environment, finetune_main, interrupted_stderr, surm_command,
                   wait_for)


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("surm") == "surm.cli:main"


@pytest.mark.slow
def test_module_finetune_writes_its_output_folder(reference_run):
    assert reference_run.code == 0
    summary = json.loads(reference_run.stdout)  # the summary is the only thing on stdout
    results = reference_run.results
    assert summary == {k: results[k] for k in ("method", "trainable_params", "test_accuracy", "test_macro_f1",
                                               "train_seconds")}
    assert "epoch 2/2" in reference_run.stderr and "samples_per_s" in reference_run.stderr  # the progress bar
    names = {p.name for p in reference_run.output.iterdir()}
    assert names == {"adapter", "checkpoint.pt", "results.json", "train.log"}


@pytest.mark.slow
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


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_text(path, text):
    path.write_text(text)
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
    "infinite weight decay": (lambda folder: ["--weight-decay", "inf"], "weight_decay must be a finite number >= 0"),
    "max length beyond the model's positions": (lambda folder: ["--max-length", "100000"],
                                                "--max-length 100000 exceeds the 512 positions of model 'minilm'"),
    "a folder as dataset": (lambda folder: ["--dataset", str(write_csv(folder / "d.csv", ["text", "label"],
                                                                       reviews()).parent)],
                            "is a folder; surm reads one data file (.csv, .tsv, .jsonl, .json): pass a file inside it "
                            "(found: d.csv)"),
    "an option no surm setting has": (lambda folder: ["--structure", "circulant", "--block-size", "4"],
                                      "option(s) ['block_size'] do not apply to circulant"),
    "config that is a JSON list": (lambda folder: ["--config", str(write_json(folder / "c.json", ["structure"]))],
                                   "holds a JSON list, not an object of SurmConfig settings"),
    "config without structure": (lambda folder: ["--config", str(write_json(folder / "c.json",
                                                                            {"peft_type": "SURM"}))],
                                 "names no structure"),
    "config with an unknown setting": (
        lambda folder: ["--config", str(write_json(folder / "c.json", {"peft_type": "SURM", "structure": "circulant",
                                                                       "overide_pattern": {}}))],
        "has unknown setting(s) ['overide_pattern']; SurmConfig's settings are"),
    "config that is not JSON": (lambda folder: ["--config", str(write_text(folder / "c.json", "{structure"))],
                                "is not readable JSON"),
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
    (["finetune", "--output", "x", "--adapter-bias", "maybe"], "expected true or false (or yes/no, 1/0), got 'maybe'"),
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


@pytest.mark.slow
def test_config_takes_every_surmconfig_setting(tmp_path):
    """No setting of an adapter_config.json is dropped: each reaches the run's PEFT config (flags still win)."""
    config = {
        "peft_type": "SURM", "task_type": "SEQ_CLS", "base_model_name_or_path": "elsewhere", "inference_mode": True,
        "structure": "circulant", "mode": "delta", "target_modules": ["query", "value", "key"],
        "exclude_modules": ["key"], "layers_to_transform": [0, 2], "layers_pattern": "layer", "execution": "dense",
        "override_pattern": {"value": {"structure": "toeplitz"}}, "dropout": 0.1, "alpha": 0.5, "init_weights": True,
    }
    path = write_json(tmp_path / "adapter_config.json", config)
    outcome = finetune_main(tmp_path / "run", *TINY, "--epochs", "1", "--config", str(path), "--alpha", "2")
    used = outcome.results["peft_config"]
    for key in ("structure", "mode", "layers_to_transform", "layers_pattern", "execution", "override_pattern",
                "dropout", "init_weights"):
        assert used[key] == config[key], key
    assert used["alpha"] == 2.0  # the flag wins over the file
    assert sorted(used["target_modules"]) == ["key", "query", "value"] and used["exclude_modules"] == ["key"]
    assert used["inference_mode"] is False  # provenance entries are the run's own
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".surm_delta.")[0] for k in keys if ".surm_delta." in k}
    assert adapted == {f"base_model.model.encoder.encoder.layer.{i}.attention.self.{m}" for i in (0, 2)  # mean-pooled
                       for m in ("query", "value")}
    assert any("outer_values" in k for k in keys if ".value." in k)  # the override made value Toeplitz


def test_config_with_a_regex_target_adapts_exactly_the_layers_it_matches(tmp_path):
    """A regex target_modules (PEFT's full match) reaches the run whole and names the method in the results."""
    regex = r".*\.(attention\.self\.value|layer\.[12]\.attention\.self\.query)"
    path = write_json(tmp_path / "adapter_config.json", {"peft_type": "SURM", "structure": "circulant",
                                                          "target_modules": regex})
    outcome = finetune_main(tmp_path / "run", *TINY, "--epochs", "1", "--config", str(path))
    assert outcome.results["label"] == f"circulant on {regex}"
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".surm_delta.")[0].split("encoder.encoder.layer.")[1] for k in keys if ".surm_delta." in k}
    assert adapted == {f"{i}.attention.self.value" for i in range(6)} | {f"{i}.attention.self.query" for i in (1, 2)}


# -- failures of the machine and the user, in a child process: one line, the right exit status ---------------------


def spawn_finetune(output, *extra, preexec_fn=None):
    """``python -m surm finetune`` of the reference settings in a child process."""
    command = surm_command("finetune", *REFERENCE_ARGS, "--output", str(output), *extra)
    return subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_resume_hint_and_the_resume_finishes(tmp_path, reference_run):
    output = tmp_path / "run"
    process = spawn_finetune(output, "--checkpoint-every", "1")
    wait_for(output / "checkpoint.pt", process)
    process.send_signal(signal.SIGINT)
    stderr = interrupted_stderr(process)
    assert stderr.strip().splitlines()[-1] == (
        "surm finetune: interrupted; run the same command with --resume to continue from the last checkpoint (or "
        "from the start if none was written yet)")
    assert not [p.name for p in output.iterdir() if p.name.endswith(".surm-tmp")]
    resumed = finetune_main(output, *REFERENCE_ARGS, "--resume")
    assert resumed.results["test_accuracy"] == reference_run.results["test_accuracy"]


@pytest.mark.parametrize("under_compare", [True, False])
def test_a_command_interrupted_under_compare_ignores_the_copy_while_it_exits(monkeypatch, under_compare):
    """A Ctrl-C before training starts (or after it stopped) ends the command with 130; under compare the copy,
    still to come, is ignored; elsewhere nothing is."""
    if under_compare:
        monkeypatch.setenv(FORWARDED_CTRL_C, "1")
    else:
        monkeypatch.delenv(FORWARDED_CTRL_C, raising=False)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "dispatch", interrupted)
    try:
        outcome = call_main("finetune", "--output", "unused")
        assert outcome.code == 130 and "surm finetune: interrupted" in outcome.stderr
        assert (signal.getsignal(signal.SIGINT) is signal.default_int_handler) is not under_compare
    finally:
        if under_compare:
            os.kill(os.getpid(), signal.SIGINT)  # the copy: ignored, and the default handler back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def limit_file_size(size):
    """For a child: files may not grow beyond ``size`` bytes (the kernel answers EFBIG, as a full disk answers
    ENOSPC); SIGXFSZ is ignored so that the write fails instead of killing the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


@pytest.mark.slow
def test_a_write_the_disk_refuses_is_one_line_and_leaves_no_partial_file(tmp_path):
    output = tmp_path / "run"
    process = spawn_finetune(output, preexec_fn=limit_file_size(32 * 1024))  # the checkpoint is ~70 kB
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"surm finetune: error: File too large: {output / 'checkpoint.pt'}"
    assert sorted(p.name for p in output.iterdir()) == ["train.log"]


def without_root_file_access():
    """For a child run as root: drop the capabilities that let root write through any file mode
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that a folder of mode 0555 is read-only for it as for anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.slow
def test_a_read_only_output_is_refused_before_the_model_loads(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        # The model does not exist: had it been loaded first, the error would name it instead of the output.
        process = spawn_finetune(folder / "run", "--model", "/no/such/model",
                                 preexec_fn=without_root_file_access if os.geteuid() == 0 else None)
        _, stderr = process.communicate(timeout=300)
    finally:
        os.chmod(folder, 0o755)
    assert process.returncode == 2, stderr[-3000:]
    assert stderr.strip() == (f"surm finetune: error: --output {folder / 'run'} is not writable: cannot create files "
                              f"in {folder} (Permission denied)")
    assert list(folder.iterdir()) == []
