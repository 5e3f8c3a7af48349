"""The Optuna study behind ``surm search``: its storage (shared by workers, resumable), sampler, pruner, and what
its trials say: their status, the best one, the Pareto front, their folders."""

from __future__ import annotations

import enum
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from ...errors import SurmError
from .settings import SearchSettings


class TrialStatus(str, enum.Enum):
    """What became of a trial. Trained: complete, pruned, diverged (they count towards ``--trials``). Untrained:
    rejected (over the budget), invalid (an option that does not fit a layer), duplicate, surplus (created after the
    study had enough). Under way: training (stored while it trains), running, waiting. Failed: the worker raised."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    DIVERGED = "diverged"
    REJECTED = "rejected"
    INVALID = "invalid"
    DUPLICATE = "duplicate"
    SURPLUS = "surplus"
    TRAINING = "training"
    RUNNING = "running"
    WAITING = "waiting"
    FAILED = "failed"

    # Equal to, hashed and printed like its value, so that it can key the plain-string dicts of reports and JSON.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


#: Statuses that count towards ``--trials``.
TRAINED = (TrialStatus.COMPLETE, TrialStatus.PRUNED, TrialStatus.DIVERGED)
#: Statuses of finished trials that did not train (they do not count towards ``--trials``).
UNTRAINED = (TrialStatus.REJECTED, TrialStatus.INVALID, TrialStatus.DUPLICATE, TrialStatus.SURPLUS)


def make_sampler(seed: int, trials: int, design: Optional[list[dict[str, Any]]] = None) -> Any:
    """Multivariate TPE whose random draws for trial n depend on (seed, n) only; trial n < len(design) takes the
    parameters ``design[n]``.

    One worker is then reproducible, and parallel workers (which see the same seed) never draw the same random
    sequence for two trials. The design is keyed by trial number, which the storage hands out once, so workers
    that join together do not repeat it.
    """
    design = list(design or [])

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
            if trial.number < len(design):
                return {}
            return super().sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, distribution: Any) -> Any:
            if trial.number < len(design) and param_name in design[trial.number]:
                return design[trial.number][param_name]
            return super().sample_independent(study, trial, param_name, distribution)

        def before_trial(self, study: Any, trial: Any) -> None:
            state = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
            # TPESampler keeps two random states (its own, and its start-up RandomSampler's); reseed both.
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TrialSeededTPE(seed=seed, multivariate=True, group=True, constant_liar=True,
                              n_startup_trials=max(4, min(10, trials // 4)))


def make_pruner(name: str, epochs: int) -> Any:
    """Hyperband or successive halving on the per-epoch validation accuracy, or no pruning."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_storage(url: str, heartbeat: int) -> Any:
    """An Optuna RDB storage with heartbeats; a stale trial (its worker died) is retried once.

    Raises:
        ValueError: for a URL that SQLAlchemy cannot parse or a database that cannot be reached.
    """
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage {url!r} is not a database URL; use e.g. sqlite:///DIR/study.db or "
                         "postgresql://user@host/db") from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 120}  # several workers write to one file
    for attempt in range(10):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2, inherit_intermediate_values=True),
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
                # Workers that start together race to create the tables (a unique version row, "table ... already
                # exists", a locked file); the loser finds them on a later try.
                racing = isinstance(error, sqlalchemy.exc.IntegrityError) or any(
                    words in str(error) for words in ("locked", "already exists"))
                if attempt == 9 or not racing:
                    raise ValueError(f"cannot open --storage {url!r}: {str(error).splitlines()[0]}") from None
                time.sleep(0.5 + 0.5 * attempt)
            except (ImportError, sqlalchemy.exc.SQLAlchemyError, OSError, ValueError) as error:
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ValueError(f"cannot open --storage {url!r}: {first}") from None
    raise AssertionError("unreachable")


def open_study(storage: Any, settings: SearchSettings, design: list[dict[str, Any]]) -> Any:
    """Create or join the study ``settings.study_name`` in ``storage``.

    Raises:
        ValueError: if the study was created with other shared settings (naming each difference).
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="maximize",
                                sampler=make_sampler(settings.run.seed, settings.trials, design),
                                pruner=make_pruner(settings.pruner, settings.run.epochs), load_if_exists=True)
    mine = settings.shared()
    theirs = study.user_attrs.get("settings")
    if theirs is None:
        study.set_user_attr("settings", mine)
    elif theirs != mine:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"study {settings.study_name!r} in {settings.storage} was created with other settings "
            f"({', '.join(f'{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here' for k in changed)}); "
            "use the same flags or another --study-name"
        )
    return study


def status_of(trial: Any) -> TrialStatus:
    """A trial's status, from its Optuna state and the status surm stored with it (see :class:`TrialStatus`)."""
    stored = trial.user_attrs.get("status")
    if trial.state == TrialState.COMPLETE:
        return TrialStatus.COMPLETE
    if trial.state == TrialState.FAIL:
        return TrialStatus.SURPLUS if stored == TrialStatus.SURPLUS else TrialStatus.FAILED
    if trial.state == TrialState.WAITING:
        return TrialStatus.WAITING
    if trial.state == TrialState.RUNNING:
        return TrialStatus.RUNNING
    try:
        return TrialStatus(stored) if stored is not None else TrialStatus.PRUNED
    except ValueError:
        raise SurmError(f"trial {trial.number} of the study has the unknown status {stored!r}; the study storage has "
                        "been altered: use another --storage or --study-name") from None


def counts(trials: list[Any]) -> dict[str, int]:
    """How many trials have each status, plus "trained" (towards --trials) and "occupying" (trained or under way)."""
    out: dict[str, int] = {}
    for t in trials:
        s = status_of(t).value
        out[s] = out.get(s, 0) + 1
    out["trained"] = sum(out.get(s, 0) for s in TRAINED)
    out["occupying"] = out["trained"] + out.get(TrialStatus.RUNNING, 0) + out.get(TrialStatus.WAITING, 0)
    return out


def best_trial(trials: list[Any]) -> Optional[Any]:
    """Highest validation accuracy; ties go to fewer parameters, then to the earlier trial."""
    complete = [t for t in trials if status_of(t) is TrialStatus.COMPLETE]
    if not complete:
        return None
    return max(complete, key=lambda t: (t.value, -t.user_attrs["adapter_params"], -t.number))


def pareto_front(trials: list[Any]) -> list[Any]:
    """Completed trials not dominated in (fewer adapter parameters, higher validation accuracy), by size."""
    complete = sorted((t for t in trials if status_of(t) is TrialStatus.COMPLETE),
                      key=lambda t: (t.user_attrs["adapter_params"], -t.value, t.number))
    front, top = [], -math.inf
    for t in complete:
        if t.value > top:
            front.append(t)
            top = t.value
    return front


#: The folder name of a trial under ``--output/trials`` (the number of the trial that first trained it).
TRIAL_FOLDER = re.compile(r"trial-\d{4,9}")


def trial_folder(output: Path, name: Any, number: int) -> Path:
    """``output/trials/name`` for a stored trial folder name, checked to be a trial folder inside ``output/trials``.

    Raises:
        SurmError: if the name is not of the form ``trial-NNNN`` (a tampered or foreign study storage).
    """
    root = (Path(output) / "trials").resolve()
    folder = (root / name).resolve() if isinstance(name, str) else None
    if folder is None or not TRIAL_FOLDER.fullmatch(name) or folder.parent != root:
        raise SurmError(f"trial {number} of the study names the folder {name!r}, which is not a surm trial folder "
                        f"(trial-NNNN inside {root}); the study storage has been altered: use another --storage or "
                        "--study-name")
    return folder
