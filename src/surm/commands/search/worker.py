"""One ``surm search`` worker: joins (or creates) the study, trains trials until the study has enough, then tests
the best configuration once and writes the report.

Every configuration is counted exactly before training (:mod:`.counting`); one over the budget is pruned at once
with a reason and a budget constraint (``Trial.set_constraint``), which constraint-aware TPE learns from. Rejected
configurations do not count towards ``--trials``: that many configurations are *trained*. Workers send heartbeats;
a trial whose worker died is retried (from its last epoch checkpoint when that worker shared the output folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from ... import atomic
from ...checkpoint import CHECKPOINT, read_checkpoint
from ...errors import RunsFailed, SurmError, TrainingDiverged
from ..finetune import RESULTS, Run, RunConfig, head_parameter_names
from .counting import ParameterCounter
from .report import front_markdown, front_plot, summarise
from .settings import SearchSettings
from .space import Candidate, initial_design, sample_candidate
from .study import (TRAINED, UNTRAINED, TrialStatus, best_trial, counts, open_storage, open_study, pareto_front,
                    status_of, trial_folder)


class StopAfterValidation(Exception):
    """Raised by the epoch callback after the last epoch: a trial never evaluates the test split."""


class Surplus(Exception):
    """A trial created after the study already had enough (a race between workers); it fails untrained."""


class Search:
    """One ``surm search`` worker: joins (or creates) the study, trains trials until the study has enough, then
    writes the outputs."""

    def __init__(self, settings: SearchSettings, log: Any = None) -> None:
        self.settings = settings
        self.log = log or sys.stderr
        # Everything that can fail on bad input happens here, before any training.
        atomic.check_writable(settings.output)
        self.storage = open_storage(settings.storage, settings.heartbeat)
        self.counter = ParameterCounter(settings)
        smallest, cheapest, fitting, self.valid = self.counter.smallest(settings)
        self.fitting = len(fitting)
        self.design = initial_design(settings, fitting, self.counter.recommended(settings))
        if smallest > settings.budget:
            raise ValueError(
                f"--budget-params {settings.budget:,} is below the smallest configuration of the search space "
                f"({smallest:,} adapter parameters: {cheapest.family} {cheapest.mode} on {cheapest.targets}); "
                "raise the budget or widen --families / --modes / the target sets"
            )
        self.study = open_study(self.storage, settings, self.design)
        self.started = time.monotonic()
        self.ran: list[int] = []

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train trials until the study has ``--trials`` trained ones (or ``--timeout``), then write the outputs."""
        settings = self.settings
        self._say(f"study {settings.study_name!r} in {settings.storage}: {self.valid} valid discrete configurations, "
                  f"{self.fitting} within the budget of {settings.budget:,} adapter parameters")
        waited = False
        while True:
            if settings.timeout is not None and time.monotonic() - self.started > settings.timeout:
                self._say(f"--timeout {settings.timeout:g} s reached; writing the outputs of the study as it is")
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            tally = counts(trials)
            if tally.get(TrialStatus.WAITING, 0) or tally["occupying"] < settings.trials:
                if tally.get(TrialStatus.REJECTED, 0) + tally.get(TrialStatus.INVALID, 0) > 50 * settings.trials:
                    raise SurmError(f"more than {50 * settings.trials} configurations were rejected; the budget "
                                    "leaves too little of the space")
                self.study.optimize(self._objective, n_trials=1, catch=(Surplus,), gc_after_trial=True)
                waited = False
            elif tally.get(TrialStatus.RUNNING, 0):
                if not waited:
                    self._say(f"waiting for {tally[TrialStatus.RUNNING]} trial(s) running in other workers")
                    waited = True
                time.sleep(min(5.0, settings.heartbeat))
            else:
                break
        return self.finish()

    def _objective(self, trial: Any) -> float:
        settings = self.settings
        frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        me = frozen[trial.number]
        # A race between workers can create a trial after the study already had enough: fail it untrained.
        ahead = [t for t in frozen.values() if t.number < trial.number and
                 (status_of(t) in (*TRAINED, TrialStatus.WAITING) or
                  (t.state == TrialState.RUNNING and t.user_attrs.get("status") not in UNTRAINED))]
        if len(ahead) >= settings.trials:
            trial.set_user_attr("status", TrialStatus.SURPLUS.value)
            raise Surplus(f"the study already has {settings.trials} trials")
        candidate = sample_candidate(trial, settings)
        trial.set_user_attr("candidate", candidate.to_json())
        trial.set_user_attr("config", candidate.describe())
        try:
            params = self.counter.count(candidate)
        except ValueError as error:
            return self._untrained(trial, TrialStatus.INVALID, str(error))
        trial.set_user_attr("adapter_params", params)
        if "budget" not in me.constraints:
            trial.set_constraint("budget", params - settings.budget)
        if params > settings.budget:
            reason = f"over budget: {params:,} > {settings.budget:,} adapter parameters"
            return self._untrained(trial, TrialStatus.REJECTED, reason)
        for other in frozen.values():
            if other.number != trial.number and other.params == trial.params and status_of(other) in (
                    *TRAINED, TrialStatus.RUNNING):
                return self._untrained(trial, TrialStatus.DUPLICATE, f"same parameters as trial {other.number}",
                                       other.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(me)
        folder = trial_folder(self.settings.output, f"trial-{(retried[0] if retried else trial.number):04d}",
                              trial.number)
        trial.set_user_attr("status", TrialStatus.TRAINING.value)
        trial.set_user_attr("folder", folder.name)
        return self._train(trial, candidate, params, folder)

    def _untrained(self, trial: Any, status: TrialStatus, reason: str, duplicate_of: Optional[int] = None) -> float:
        trial.set_user_attr("status", status.value)
        trial.set_user_attr("reason", reason)
        if duplicate_of is not None:
            trial.set_user_attr("duplicate_of", duplicate_of)
        self._report(trial.number, status, reason)
        raise optuna.TrialPruned(reason)

    def _train(self, trial: Any, candidate: Candidate, params: int, folder: Path) -> float:
        settings = self.settings
        config = RunConfig(method=candidate.method(), output=folder, settings=replace(settings.run, lr=candidate.lr),
                           resume=True)
        history, finished = checkpoint_history(folder, config)
        if not finished:
            def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
                history.append({"epoch": epoch, **metrics})
                trial.report(metrics["accuracy"], epoch)
                trial.set_user_attr("history", history)
                if epoch < settings.run.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (validation accuracy "
                                             f"{metrics['accuracy']:.4f})")
                if epoch == settings.run.epochs:
                    raise StopAfterValidation

            try:
                with _quiet(folder):
                    run = Run(config)
                    real = run_adapter_params(run)
                    if real != params:
                        raise RuntimeError(f"parameter count mismatch for {candidate.describe()}: counted {params:,} "
                                           f"before training, the model has {real:,}")
                    run.execute(on_epoch)
            except StopAfterValidation:
                pass
            except optuna.TrialPruned as pruned:
                trial.set_user_attr("status", TrialStatus.PRUNED.value)
                trial.set_user_attr("reason", str(pruned))
                self._report(trial.number, TrialStatus.PRUNED, f"{candidate.describe()}: {pruned}")
                raise
            except TrainingDiverged as error:
                trial.set_user_attr("status", TrialStatus.DIVERGED.value)
                trial.set_user_attr("reason", str(error))
                self._report(trial.number, TrialStatus.DIVERGED, candidate.describe())
                raise optuna.TrialPruned(str(error)) from None
        trial.set_user_attr("history", history)
        trial.set_user_attr("status", TrialStatus.COMPLETE.value)
        value = history[-1]["accuracy"]
        self.ran.append(trial.number)
        self._report(trial.number, TrialStatus.COMPLETE,
                     f"validation {value:.4f}, {params:,} params, {candidate.describe()}",
                     value=value)
        return value

    # -- progress ----------------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        print(f"[search] {message}", file=self.log, flush=True)

    def _report(self, number: int, status: TrialStatus, detail: str, value: Optional[float] = None) -> None:
        trials = self.study.get_trials(deepcopy=False)
        tally = counts(trials)
        # This trial is still RUNNING in storage: count it as finished with its status.
        tally["trained"] += status in TRAINED
        best = best_trial(trials)
        best_value = best.value if best is not None else None
        if value is not None and (best_value is None or value > best_value):
            best_text = f"best {value:.4f} (#{number})"
        else:
            best_text = f"best {best_value:.4f} (#{best.number})" if best is not None else "best -"
        pruned = tally.get(TrialStatus.PRUNED, 0) + (status is TrialStatus.PRUNED)
        rejected = (tally.get(TrialStatus.REJECTED, 0) + tally.get(TrialStatus.INVALID, 0)
                    + (status in (TrialStatus.REJECTED, TrialStatus.INVALID)))
        self._say(f"trial {number} {status.value}: {detail} | trained {tally['trained']}/{self.settings.trials}, "
                  f"pruned {pruned}, rejected {rejected}, {best_text}")

    # -- the end -----------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Test the chosen configuration(s) once and write front.md, front.png, adapter_config.json, best.json."""
        output = self.settings.output
        output.mkdir(parents=True, exist_ok=True)
        with open(output / ".finish.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # workers sharing this folder finish one after the other
            trials = self.study.get_trials(deepcopy=True)
            best = best_trial(trials)
            if best is None:
                raise RunsFailed(f"no trial completed in study {self.settings.study_name!r}: nothing to report "
                                 f"({json.dumps(counts(trials))})")
            front = pareto_front(trials)
            tested = {best.number: self._test(best)}
            if self.settings.test_front:
                for t in front:
                    if t.number not in tested:
                        tested[t.number] = self._test(t)
            summary = summarise(self.settings, trials, best, front, tested, self.valid, self.fitting)
            atomic.write_text(output / "adapter_config.json",
                              (self._folder(best) / "adapter" / "adapter_config.json").read_text())
            atomic.write_json(output / "best.json", summary["best"])
            atomic.write_json(output / "trials.json", summary)
            atomic.write_text(output / "front.md", front_markdown(summary))
            front_plot(summary, output / "front.png")
        self._say(f"best: trial {best.number}, validation {best.value:.4f}, test "
                  f"{summary['best']['test_accuracy']:.4f}, {best.user_attrs['adapter_params']:,} adapter parameters "
                  f"({best.user_attrs['config']})")
        self._say(f"written: {output / 'front.md'}, front.png, adapter_config.json, best.json, trials.json")
        return summary

    def _folder(self, trial: Any) -> Path:
        """The trial's folder under ``--output/trials``, from the name stored in the study, checked: a tampered
        storage must not make a worker read or write outside ``--output``."""
        return trial_folder(self.settings.output, trial.user_attrs.get("folder"), trial.number)

    def _test(self, trial: Any) -> dict[str, Any]:
        """The trial's test results: from its checkpoint (training it again only if this machine lacks it)."""
        folder = self._folder(trial)
        results = folder / RESULTS
        if not results.exists():
            candidate = Candidate.from_json(trial.user_attrs.get("candidate"))
            config = RunConfig(method=candidate.method(), output=folder,
                               settings=replace(self.settings.run, lr=candidate.lr), resume=True)
            self._say(f"evaluating trial {trial.number} on the test split"
                      + ("" if (folder / CHECKPOINT).exists() else " (no checkpoint here: training it again)"))
            with _quiet(folder):
                Run(config).execute()
        return json.loads(results.read_text())


def run_adapter_params(run: Run) -> int:
    """Trainable parameters of a :class:`~surm.commands.finetune.Run`'s model, the classifier head excluded."""
    head = head_parameter_names(run.model, run.loaded.head)
    return sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and n not in head)


def checkpoint_history(folder: Path, config: RunConfig) -> tuple[list[dict[str, Any]], bool]:
    """The validation history in the checkpoint that a retried trial resumes from, and whether that run already
    trained every epoch (its worker died after the last checkpoint); ([], False) without a checkpoint of these
    settings. The checkpoint is read safely (see :func:`surm.checkpoint.read_checkpoint`).

    Raises:
        CheckpointError: if the checkpoint cannot be read or is not a surm checkpoint.
    """
    path = folder / CHECKPOINT
    if not path.exists():
        return [], False
    checkpoint = read_checkpoint(path)
    if checkpoint["settings"] != config.describe():
        return [], False
    return list(checkpoint["history"]), checkpoint["epoch"] == config.settings.epochs


@contextlib.contextmanager
def _quiet(folder: Path) -> Iterator[None]:
    """Send a trial's own progress bars and log lines to ``folder/console.log`` (the search prints one line per
    trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "console.log", "a", encoding="utf-8") as stream, contextlib.redirect_stderr(stream):
        yield


def search(settings: SearchSettings) -> dict[str, Any]:
    """Run (or join, or resume) a search and return the summary written to ``trials.json``."""
    return Search(settings).run()
