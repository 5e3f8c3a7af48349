"""The training loop (surm.commands.finetune): what a run writes, every kind of method under one loop, resume after
SIGKILL, divergence, and the output folders it refuses to touch."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import surm  # noqa: F401  (registers the SURM PEFT type, so that PeftModel can load surm adapters)
from surm.checkpoint import read_checkpoint
from surm.data import load_dataset, macro_f1
from surm.models import load_text_classifier, minilm_path, text_collate
from surm.errors import TrainingDiverged
from surm.methods import MethodChoice
import surm.commands.finetune as finetune_module
from surm.commands.finetune import LossWatch, Run, RunConfig, StepBoundaryInterrupt, logits_of, subset
from surm.settings import RunSettings

from ..conftest import REFERENCE_ARGS
from ..runs import TINY, call_main, environment, finetune_main, listing, surm_command, wait_for

RESULT_FIELDS = {
    "method", "label", "mode", "config", "pooling", "peft_config", "trainable_params", "head_params", "total_params",
    "test_accuracy", "test_macro_f1", "test_loss", "test_confusion", "imbalanced", "validation_history",
    "train_seconds", "peak_memory_mb", "samples_per_second", "seed", "versions", "dataset", "num_labels", "label_names",
    "world_size", "device",
}


def evaluate_saved(adapter, results):
    """Load ``adapter`` onto a fresh MiniLM with PeftModel.from_pretrained; its predictions on the run's test subset.

    The base is the one the run used (its results' ``pooling``): Transformers' sequence classifier or surm's mean-pooled
    one (MiniLM's declared pooling, so the default's).
    Returns (accuracy, macro-F1, mean loss), computed here from scratch.
    """
    config = results["config"]
    data = load_dataset(config["dataset"], seed=config["seed"])
    examples = subset(data.test, config["eval_size"], config["seed"])
    if results["pooling"] == "mean":
        base = load_text_classifier("minilm", data.num_labels, pooling="mean").model
    else:
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data.num_labels)
    model = PeftModel.from_pretrained(base, adapter).eval()
    batch = text_collate(AutoTokenizer.from_pretrained(minilm_path()), config["max_length"])(examples)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = logits_of(model(**batch)).float()
    preds = logits.argmax(-1).numpy()
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return float(np.mean(preds == labels.numpy())), macro_f1(preds, labels.numpy(), data.num_labels), loss


def trainable_count(adapter):
    return sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())


# -- what a run writes --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_results_json_has_what_the_issue_lists(reference_run):
    results = reference_run.results
    assert RESULT_FIELDS <= set(results)
    assert results["method"] == "circulant" and results["mode"] == "delta" and results["seed"] == 3
    config = results["config"]
    assert config["method"] == {"name": "circulant", "mode": "delta", "options": {}, "targets": None}
    assert {k: config[k] for k in ("dataset", "epochs", "batch_size", "max_length", "train_size", "eval_size")} == \
        {"dataset": "mr", "epochs": 2, "batch_size": 16, "max_length": 16, "train_size": 32, "eval_size": 16}
    assert config["lr"] == pytest.approx(3e-3)  # the method's default learning rate, resolved
    assert results["peft_config"]["peft_type"] == "SURM"
    assert results["peft_config"]["target_modules"] == ["query", "value"]  # a sorted list, not a set's repr
    # circulant on q and v of 6 layers: one 384-vector each; the head is 384 x 2 + 2
    assert results["head_params"] == 770 and results["trainable_params"] == 12 * 384 + 770
    assert 22_000_000 < results["total_params"] < 23_000_000
    assert [(h["epoch"], h["step"]) for h in results["validation_history"]] == [(1, 2), (2, 4)]
    for entry in results["validation_history"]:
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["macro_f1"] <= 1 and entry["loss"] > 0
        counts = np.array(entry["confusion"])  # rows: true classes, columns: predictions
        assert counts.shape == (2, 2) and counts.sum() == 16 and np.trace(counts) / 16 == entry["accuracy"]
    assert results["test_accuracy"] in {i / 16 for i in range(17)}  # 16 test examples
    counts = np.array(results["test_confusion"])
    assert counts.shape == (2, 2) and counts.sum() == 16 and np.trace(counts) / 16 == results["test_accuracy"]
    assert results["imbalanced"] is False  # mr is balanced
    assert results["train_seconds"] > 0 and results["peak_memory_mb"] > 100
    assert results["samples_per_second"] == pytest.approx(4 * 16 / results["train_seconds"])
    assert set(results["versions"]) == {"surm", "torch", "transformers", "peft", "python"}
    assert results["versions"]["surm"] == surm.__version__
    assert results["world_size"] == 1 and results["device"] == "cpu"


@pytest.mark.slow
def test_log_records_the_run(reference_run):
    lines = (reference_run.output / "train.log").read_text().splitlines()
    messages = [line.split(" ", 2)[2] for line in lines]  # without the date and time
    assert messages[0] == "method circulant: 5,378 trainable parameters; 32 train / 16 validation / 16 test " \
                          "examples; 4 steps"
    assert [m.split(":")[0] for m in messages[1:3]] == ["epoch 1", "epoch 2"]
    assert messages[3].startswith(f"test accuracy {reference_run.results['test_accuracy']:.4f}")
    assert len(messages) == 4


@pytest.mark.slow
def test_adapter_folder_loads_with_peft_and_reproduces_test_metrics(reference_run):
    adapter = reference_run.output / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "SURM"
    results = reference_run.results
    assert trainable_count(adapter) == results["trainable_params"]
    accuracy, f1, loss = evaluate_saved(adapter, results)
    assert accuracy == results["test_accuracy"] and f1 == pytest.approx(results["test_macro_f1"])
    assert loss == pytest.approx(results["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_output_files_get_default_permissions(reference_run):
    umask = os.umask(0)
    os.umask(umask)
    for path in reference_run.output.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path  # safetensors alone would write 0600


# -- every method under the same loop -----------------------------------------------------------------------------


@pytest.mark.slow
def test_peft_lora_on_an_imbalanced_set_reports_macro_f1(tmp_path):
    outcome = finetune_main(tmp_path / "lora", "--structure", "lora", "--dataset", "sms", *TINY, "--epochs", "1")
    results = outcome.results
    assert results["method"] == "lora" and results["peft_config"]["peft_type"] == "LORA"
    assert results["peft_config"]["r"] == 8 and results["config"]["lr"] == pytest.approx(1e-3)
    assert results["label_names"] == ["ham", "spam"] and results["imbalanced"] is True
    # LoRA r=8 on q and v: 6 layers x 2 modules x 8 x (384 + 384), plus the 770 of the head
    assert results["trainable_params"] == 12 * 8 * 768 + 770 == trainable_count(tmp_path / "lora" / "adapter")
    accuracy, f1, _ = evaluate_saved(tmp_path / "lora" / "adapter", results)
    assert accuracy == results["test_accuracy"] and f1 == pytest.approx(results["test_macro_f1"])
    assert [h["step"] for h in results["validation_history"]] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("flags, peft_type, option, adapter_params", [
    # VeRA: per adapted layer a scaling of its r rows and one of its 384 outputs (A and B are frozen, shared)
    (["--structure", "vera", "--rank", "16"], "VERA", ("r", 16), 12 * (16 + 384)),
    # FourierFT: n trained spectral entries per adapted layer
    (["--structure", "fourierft", "--n-frequency", "50", "--scaling", "100"], "FOURIERFT", ("scaling", 100.0),
     12 * 50),
], ids=["vera", "fourierft"])
def test_peft_tiny_budget_baselines_train_under_the_same_loop_and_reload(tmp_path, flags, peft_type, option,
                                                                       adapter_params):
    outcome = finetune_main(tmp_path / "run", *flags, *TINY, "--epochs", "1")
    results = outcome.results
    assert results["peft_config"]["peft_type"] == peft_type
    assert results["peft_config"][option[0]] == option[1]
    assert results["trainable_params"] == adapter_params + 770  # q and v of 6 layers, plus the head
    adapter = tmp_path / "run" / "adapter"
    accuracy, f1, loss = evaluate_saved(adapter, results)
    assert accuracy == results["test_accuracy"] and f1 == pytest.approx(results["test_macro_f1"])
    assert loss == pytest.approx(results["test_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["model", "auto"])
def test_full_finetuning_trains_and_saves_the_whole_model(tmp_path, pooling):
    """``model``: a Transformers folder; the default (MiniLM's mean pooling, a plain module): its state dict as
    model.safetensors, which loads strictly into ``load_text_classifier(..., pooling="mean").model``."""
    outcome = finetune_main(tmp_path / "full", "--structure", "full", "--pooling", pooling, *TINY, "--epochs", "1")
    results = outcome.results
    assert results["method"] == "full" and results["peft_config"] is None
    assert results["trainable_params"] == results["total_params"] > 22_000_000
    assert results["config"]["lr"] == pytest.approx(1e-4)
    model = tmp_path / "full" / "model"
    assert not (tmp_path / "full" / "adapter").exists()
    if pooling == "model":
        reloaded = AutoModelForSequenceClassification.from_pretrained(model).state_dict()
        original = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).state_dict()
        name = "bert.encoder.layer.0.attention.self.query.weight"
    else:
        assert results["pooling"] == "mean"
        fresh = load_text_classifier("minilm", 2, pooling="mean").model
        original = {k: v.clone() for k, v in fresh.state_dict().items()}
        fresh.load_state_dict(load_file(model / "model.safetensors"), strict=True)
        reloaded = fresh.state_dict()
        name = "encoder.encoder.layer.0.attention.self.query.weight"
    assert sum(v.numel() for v in reloaded.values()) >= results["total_params"]
    assert not torch.equal(reloaded[name], original[name])  # trained: it moved away from the pretrained value


@pytest.mark.slow
def test_adapter_mode_runs_under_the_same_loop(tmp_path):
    outcome = finetune_main(tmp_path / "adapter", "--structure", "circulant", "--mode", "adapter", *TINY,
                            "--epochs", "1")
    results = outcome.results
    assert results["mode"] == "adapter" and results["label"] == "circulant adapter"
    saved = json.loads((tmp_path / "adapter" / "adapter" / "adapter_config.json").read_text())
    assert saved["mode"] == "adapter" and saved["target_modules"] == ["output.dense"]
    assert results["trainable_params"] == trainable_count(tmp_path / "adapter" / "adapter")
    accuracy, _, loss = evaluate_saved(tmp_path / "adapter" / "adapter", results)
    assert accuracy == results["test_accuracy"] and loss == pytest.approx(results["test_loss"], rel=1e-5)


# -- resume after SIGKILL -----------------------------------------------------------------------------------------

#: What a killed atomic write can leave behind (surm's own temporary names)...
LEFTOVERS = {".checkpoint.pt.k2j4h1_a.surm-tmp": "file", ".results.json.a81x0q2b.surm-tmp": "file",
             ".adapter.x7y2mz0c.surm-tmp": "folder", ".adapter.old.q9w8e7r6.surm-tmp": "folder"}
#: ... and the user's files that merely start like them, which must stay (hidden files, backups, a folder).
LOOKALIKES = {".keep": "file", ".model.notes": "file", ".results.json.bak": "file", ".checkpoint.pt.k2j4h1_a": "file",
              ".adapter.v1": "folder", ".adapter.x7y2mz0c.surm-tmp.mine": "file"}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The reference run, checkpointing every step, killed with SIGKILL as soon as its first checkpoint is there."""
    output = tmp_path_factory.mktemp("resume") / "run"
    command = surm_command("finetune", *REFERENCE_ARGS, "--checkpoint-every", "1", "--output", str(output))
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(output / "checkpoint.pt", process)
    finally:
        process.kill()  # SIGKILL, as soon as the first checkpoint is there
    process.wait()
    return {"output": output, "returncode": process.returncode, "entries": listing(output),
            "checkpoint": read_checkpoint(output / "checkpoint.pt")}


@pytest.fixture(scope="module")
def resumed_run(killed_run):
    """The killed run, moved to another folder (which must not matter), littered with leftovers, and resumed."""
    output = killed_run["output"].with_name("moved")
    killed_run["output"].rename(output)
    for name, kind in {**LEFTOVERS, **LOOKALIKES}.items():
        if kind == "folder":
            (output / name).mkdir()
            (output / name / "adapter_model.safetensors").write_bytes(b"half")
        else:
            (output / name).write_bytes(b"half")
    return finetune_main(output, *REFERENCE_ARGS, "--resume")


@pytest.mark.slow
def test_kill_leaves_only_complete_files(killed_run):
    assert killed_run["returncode"] == -signal.SIGKILL
    checkpoint = killed_run["checkpoint"]  # it loads: it was written whole
    assert 1 <= checkpoint["global_step"] < 4 and checkpoint["settings"]["seed"] == 3
    finals = {"results.json", "adapter"}
    assert not finals & killed_run["entries"], "a final output exists although the run was killed"
    for entry in killed_run["entries"] - {"checkpoint.pt", "train.log"}:
        assert entry.startswith(".checkpoint.pt."), entry  # at most the temporary file of an interrupted write


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(reference_run, resumed_run):
    resumed, reference = resumed_run.results, reference_run.results
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["test_macro_f1"] == pytest.approx(reference["test_macro_f1"])
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    assert len(resumed["validation_history"]) == len(reference["validation_history"]) == 2
    for ours, theirs in zip(resumed["validation_history"], reference["validation_history"]):
        assert (ours["epoch"], ours["step"], ours["accuracy"]) == (theirs["epoch"], theirs["step"], theirs["accuracy"])
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert resumed["trainable_params"] == reference["trainable_params"]
    ours = load_file(resumed_run.output / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference_run.output / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    log = (resumed_run.output / "train.log").read_text()
    assert "resumed from" in log and "test accuracy" in log


@pytest.mark.slow
def test_resume_removes_leftovers_of_the_killed_writes_and_nothing_else(resumed_run):
    entries = {p.name for p in resumed_run.output.iterdir()}
    assert entries == {"adapter", "checkpoint.pt", "results.json", "train.log", *LOOKALIKES}
    assert (resumed_run.output / ".adapter.v1" / "adapter_model.safetensors").read_bytes() == b"half"
    log = (resumed_run.output / "train.log").read_text()
    assert all(name in log for name in LEFTOVERS)  # the log says what was removed


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused(resumed_run):
    output = resumed_run.output
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    outcome = call_main("finetune", *REFERENCE_ARGS, "--lr", "0.5", "--resume", "--output", str(output))
    assert outcome.code == 2
    assert "cannot resume" in outcome.stderr and "settings changed since it was written (lr)" in outcome.stderr
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


# -- output folders a run must not touch --------------------------------------------------------------------------


@pytest.mark.slow
def test_finished_output_is_refused(reference_run):
    before = {p: p.read_bytes() for p in reference_run.output.rglob("*") if p.is_file()}
    outcome = call_main("finetune", *REFERENCE_ARGS, "--output", str(reference_run.output))
    assert outcome.code == 2 and "holds a checkpoint of an earlier run; pass --resume" in outcome.stderr
    assert {p: p.read_bytes() for p in reference_run.output.rglob("*") if p.is_file()} == before


def test_results_without_checkpoint_are_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    outcome = call_main("finetune", *REFERENCE_ARGS, "--output", str(tmp_path))
    assert outcome.code == 2 and "already holds results.json" in outcome.stderr
    assert listing(tmp_path) == {"results.json"}


@pytest.mark.parametrize("folder", ["adapter", "model"])
def test_foreign_model_folder_is_refused(tmp_path, folder):
    """A model folder without a checkpoint is not a surm run's: saving would replace it whole."""
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "mine.txt").write_text("precious")
    outcome = call_main("finetune", *REFERENCE_ARGS, "--output", str(tmp_path))
    assert outcome.code == 2 and f"already holds {folder!r}" in outcome.stderr
    assert listing(tmp_path) == {folder, f"{folder}/mine.txt"}


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    outcome = call_main("finetune", *REFERENCE_ARGS, "--output", str(tmp_path / "out"))
    assert outcome.code == 2 and "exists and is not a folder" in outcome.stderr


# -- divergence ----------------------------------------------------------------------------------------------------


def test_loss_watch_flags_non_finite_and_sustained_blow_ups_only():
    watch = LossWatch()
    assert watch.observe(0.3, num_labels=4) is None  # an easy first batch: the bar is ln(4), not 0.3
    assert watch.start == pytest.approx(np.log(4))
    for loss in (30.0, 30.0, 1.0, 30.0, 30.0):  # spikes shorter than PATIENCE steps are not a divergence
        assert watch.observe(loss, num_labels=4) is None
    assert watch.observe(30.0, num_labels=4).startswith("loss 30 above 10 x the starting loss 1.386 for 3 steps")
    assert LossWatch().observe(float("nan"), 2) == "non-finite loss nan"
    resumed = LossWatch.from_state({**watch.state(), "above": 2})
    assert resumed.observe(13.0, 4) is None and resumed.above == 0  # the count restarts below the bar
    with pytest.raises(ValueError, match="malformed loss watch state"):
        LossWatch.from_state({"start": "x", "above": 0})


@pytest.mark.slow
@pytest.mark.parametrize("flags, cause", [
    (["--lr", "1000", "--head-lr", "1000"], "likely cause: the learning rate: try a smaller --lr (now 1000) or "
                                            "--head-lr (now 1000)"),
    (["--lr", "1", "--head-lr", "1", "--weight-decay", "5"],
     "likely cause: the weight decay: --weight-decay 5 x learning rate 1 = 5 >= 1 flips the sign of every weight"),
])
def test_a_finite_blow_up_stops_the_run_and_names_the_cause(tmp_path, flags, cause):
    output = tmp_path / "run"
    outcome = call_main("finetune", *REFERENCE_ARGS, "--epochs", "3", *flags, "--output", str(output))
    assert outcome.code == 2
    line = outcome.stderr.strip().splitlines()[-1]
    assert line.startswith("surm finetune: error: training diverged at step ")
    assert "above 10 x the starting loss" in line
    assert cause in line
    assert not (output / "results.json").exists() and not (output / "adapter").exists()


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(tmp_path):
    run = Run(RunConfig(method=MethodChoice("circulant"), output=tmp_path / "run",
                        settings=RunSettings(train_size=32, eval_size=16, batch_size=16, max_length=16, epochs=1)))
    name, parameter = next((n, p) for n, p in run.model.named_parameters() if p.requires_grad and "surm_delta" in n)
    with torch.no_grad():
        parameter[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=f"1 trainable tensor\\(s\\) hold NaN or inf \\(first: {name}\\); "
                                               "not writing the checkpoint"):
        run._save_checkpoint({})
    assert not (tmp_path / "run").exists()


# -- runs for choosing settings, and the recommended method ---------------------------------------------------------


@pytest.mark.slow
def test_no_test_never_touches_the_test_split(tmp_path, monkeypatch):
    """``--no-test`` (compare's tuning runs): the test examples are never even drawn, the metrics are None."""
    from surm.commands import finetune as module

    data = load_dataset("mr", seed=0)
    drawn = []
    original = module.subset

    def spy(examples, size, seed):
        drawn.append(len(examples))
        return original(examples, size, seed)

    monkeypatch.setattr(module, "subset", spy)
    outcome = finetune_main(tmp_path / "run", "--structure", "circulant", *TINY, "--epochs", "1", "--no-test")
    assert drawn == [len(data.train), len(data.validation)]  # no draw from the test split
    results = outcome.results
    assert results["test_accuracy"] is None and results["test_macro_f1"] is None and results["test_loss"] is None
    assert results["config"]["evaluate_test"] is False and len(results["validation_history"]) == 1
    assert "the test split was not evaluated (--no-test)" in (tmp_path / "run" / "train.log").read_text()
    assert '"test_accuracy": null' in outcome.stdout


@pytest.mark.slow
def test_budget_params_trains_the_recommended_method_within_the_budget(tmp_path):
    outcome = finetune_main(tmp_path / "run", "--budget-params", "7372", *TINY, "--epochs", "1")
    results = outcome.results
    assert results["config"]["budget_params"] == 7372 and results["config"]["lr"] == 3e-2  # the recipe's rate
    assert results["config"]["method"] == {"name": "fourier", "mode": "delta", "options": {"frequencies": 614},
                                           "targets": ["attention.self.query", "attention.self.value"]}
    assert results["trainable_params"] - results["head_params"] == 7368 <= 7372
    assert trainable_count(tmp_path / "run" / "adapter") == 7368 + 770
    given = finetune_main(tmp_path / "given", "--budget-params", "7372", "--lr", "5e-4", *TINY, "--epochs", "1")
    assert given.results["config"]["lr"] == 5e-4  # --lr wins


@pytest.mark.slow
def test_mean_pooling_trains_the_recommendation_and_the_saved_adapter_reproduces_the_run(tmp_path):
    """The default pooling, ``auto``, reads MiniLM's declaration (a sentence-transformers mean): the encoder's masked
    mean feeds the head; the recommendation finds the same roles under the wrapper, and the adapter with its head
    reloads onto a fresh mean-pooled MiniLM with the run's test metrics."""
    outcome = finetune_main(tmp_path / "run", "--budget-params", "7372", *TINY, "--epochs", "1")
    results = outcome.results
    assert results["config"]["pooling"] == "auto" and results["pooling"] == "mean"
    assert results["peft_config"]["task_type"] is None and results["peft_config"]["modules_to_save"] == ["classifier"]
    assert results["config"]["method"]["targets"] == ["attention.self.query", "attention.self.value"]
    assert results["trainable_params"] == 7368 + 770 == trainable_count(tmp_path / "run" / "adapter")
    accuracy, f1, loss = evaluate_saved(tmp_path / "run" / "adapter", results)
    assert accuracy == results["test_accuracy"] and f1 == pytest.approx(results["test_macro_f1"])
    assert loss == pytest.approx(results["test_loss"], rel=1e-5)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_max_grad_norm_clips_the_global_gradient_norm_before_the_step(tmp_path, max_grad_norm):
    """With --max-grad-norm the step's gradients (adapter and head together) have at most that L2 norm; without it
    the same batch's are far larger, so the clip is what bounds them."""
    settings = RunSettings(train_size=32, eval_size=16, batch_size=16, max_length=16, max_grad_norm=max_grad_norm)
    run = Run(RunConfig(MethodChoice("circulant"), tmp_path / "run", settings))
    run._step(run.model, np.arange(16), run.optimizer, run.scheduler)
    gradients = [p.grad for p in run._trainable_parameters().values()]
    assert all(g is not None for g in gradients)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients])))
    if max_grad_norm is None:
        assert norm > 1e-2
    else:
        assert norm == pytest.approx(max_grad_norm, rel=1e-4)


def test_model_dropout_reaches_every_dropout_of_the_run_model(tmp_path):
    """--model-dropout 0 turns off the checkpoint's dropouts in the model the run trains (the adapters' own dropout,
    a method option, is not a model dropout: 0 by default here)."""
    settings = RunSettings(train_size=32, eval_size=16, batch_size=16, max_length=16, model_dropout=0.0)
    run = Run(RunConfig(MethodChoice("circulant"), tmp_path / "run", settings))
    dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    default = Run(RunConfig(MethodChoice("circulant"), tmp_path / "default", replace(settings, model_dropout=None)))
    assert {m.p for m in default.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


@pytest.mark.parametrize("flags, named", [
    (["--structure", "lora"], "--structure"),
    (["--mode", "delta"], "--mode"),
    (["--targets", "query"], "--targets"),
    (["--nblocks", "4"], "--nblocks"),
])
def test_budget_params_refuses_method_flags(tmp_path, flags, named):
    outcome = call_main("finetune", "--budget-params", "7372", *flags, "--output", str(tmp_path / "run"))
    assert outcome.code == 2
    assert outcome.stderr.strip() == (f"surm finetune: error: --budget-params builds the recommended method itself "
                                      f"(surm.recommend); drop {named} or --budget-params")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("budget, message", [
    ("0", "budget_params must be a positive integer, got 0"),
    ("100", "budget_params=100 is below the cheapest recommendation (circulant on attention.self.query: 2,304 "
            "parameters); give at least 2,304"),
])
def test_a_budget_too_small_is_refused_before_training(tmp_path, budget, message):
    outcome = call_main("finetune", "--budget-params", budget, *TINY, "--output", str(tmp_path / "run"))
    assert outcome.code == 2 and outcome.stderr.strip() == f"surm finetune: error: {message}"
    assert not (tmp_path / "run" / "train.log").exists()


def test_one_ctrl_c_delivered_twice_stops_at_the_step_boundary_and_a_later_one_interrupts_at_once(monkeypatch):
    """A terminal's Ctrl-C reaches a compare's run twice (the process group, then compare's forward): the second
    SIGINT within StepBoundaryInterrupt.SAME_CTRL_C_SECONDS is the same Ctrl-C; a real second press interrupts."""
    clock = iter([10.0, 10.1, 10.8])
    monkeypatch.setattr(finetune_module.time, "monotonic", lambda: next(clock))
    with StepBoundaryInterrupt() as interrupt:
        assert interrupt.enabled  # pytest runs tests in the main thread
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's
        os.kill(os.getpid(), signal.SIGINT)  # compare's forward, 0.1 s later: no KeyboardInterrupt here
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()  # at the step boundary
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # 0.8 s after the first: a second press, at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_compare_the_copy_of_a_ctrl_c_is_ignored_however_late_it_comes_and_a_third_interrupts(monkeypatch):
    """On a busy machine compare's forwarded copy can come seconds after the terminal's SIGINT: still the same Ctrl-C
    (the race that made a compare's interrupted run print a KeyboardInterrupt traceback while it exited)."""
    clock = iter([10.0, 15.0, 15.1])
    monkeypatch.setattr(finetune_module.time, "monotonic", lambda: next(clock))
    with StepBoundaryInterrupt(forwarded=True) as interrupt:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's
        os.kill(os.getpid(), signal.SIGINT)  # compare's copy, 5 s later: no KeyboardInterrupt here
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a real second press, at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the copy came: nothing left to ignore


def test_under_compare_a_run_that_stopped_before_the_copy_came_ignores_it_afterwards_once():
    with pytest.raises(KeyboardInterrupt):
        with StepBoundaryInterrupt(forwarded=True) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    os.kill(os.getpid(), signal.SIGINT)  # the copy, after the run stopped: ignored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # anything later: Python's default

