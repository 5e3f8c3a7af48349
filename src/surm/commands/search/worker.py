"""``surm search``: which structured family, of which size, where, for a model, a task and a parameter budget.

An Optuna study maximises **validation** accuracy (final epoch) over

* the family (``lowrank``, ``circulant``, ``toeplitz``, ``symmetric_toeplitz``, ``kronecker``, ``ldr``, ``monarch``)
  and its options (:func:`family_space`),
* the insertion mode (``delta`` or ``adapter``; adapters also choose a bottleneck),
* the target modules (:data:`DELTA_TARGET_SETS`, :data:`ADAPTER_TARGET_SETS`),
* the learning rate, log-uniform within a factor :data:`LR_SPAN` of the family's default
  (``methods.DEFAULT_LEARNING_RATES``), and the scale alpha.

The first trials are an initial design, one configuration within the budget per family (:func:`initial_design`);
then the sampler is multivariate TPE (seeded per trial number, with constant liar for parallel workers); a Hyperband or
successive-halving pruner stops trials on the validation accuracy reported after each epoch. Every configuration is
counted exactly before training (:class:`ParameterCounter`: the model's targeted layers, found by PEFT on a copy
of the model on the meta device, and surm's own adapter modules for their shapes); one over the budget is pruned at
once with a reason and a budget constraint (``Trial.set_constraint``), which constraint-aware TPE learns from.
Rejected configurations do not count towards ``--trials``: that many configurations are *trained*.

The study lives in an SQLAlchemy storage (``sqlite:///DIR/study.db`` by default): a second ``surm search`` on the
same storage and study name joins it, a killed one resumes it. Workers send heartbeats; a trial whose worker
died is retried (from its last epoch checkpoint when that worker shared the output folder).

At the end the test split is evaluated once, for the best configuration (and with ``--test-front`` for every
Pareto point), from the trial's own checkpoint; the outputs are ``front.md``, ``front.png``, ``adapter_config.json``
(for ``surm finetune --config``), ``best.json`` and ``trials.json``, all written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import itertools
import json
import math
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import atomic
from .checkpoint import CHECKPOINT, read_checkpoint
from .errors import RunsFailed, SurmError, TrainingDiverged
from .methods import DEFAULT_LEARNING_RATES, HEAD_LEARNING_RATE, MethodChoice, build_peft_config
from .structures import STRUCTURES

FAMILIES = tuple(STRUCTURES)
MODES = ("delta", "adapter")
#: Module sets tried in delta mode (BERT-family names, matched as name suffixes). "output.dense" matches both the
#: attention output and the FFN output projection.
DELTA_TARGET_SETS = (
    "value",
    "query,value",
    "query,key,value",
    "query,value,attention.output.dense",
    "query,value,attention.output.dense,intermediate.dense,output.dense",
)
#: Module outputs that adapters follow: after the attention output only, or Houlsby's two per layer.
ADAPTER_TARGET_SETS = ("attention.output.dense", "output.dense")
#: Adapter bottleneck widths (None: SURM's single d x d map).
BOTTLENECKS = (None, 16, 64)
#: The learning rate is searched in [default / LR_SPAN, default * LR_SPAN], log-uniformly.
LR_SPAN = 10.0
#: alpha is searched log-uniformly in this range.
ALPHA_RANGE = (0.25, 4.0)
#: The study database in the output folder (the default --storage).
STUDY_FILE = "study.db"
DEFAULT_STUDY_NAME = "surm-search"
#: Statuses of finished trials that did not train (they do not count towards --trials).
UNTRAINED = ("rejected", "invalid", "duplicate", "surplus")
#: Search settings that every trial passes on to its RunConfig (the same names and defaults there).
RUN_SETTINGS = ("model", "dataset", "text_column", "text_pair_column", "label_column", "epochs", "batch_size",
                "head_lr", "weight_decay", "warmup_ratio", "max_length", "train_size", "eval_size", "device", "seed")
#: Search settings that must match for a worker to join an existing study (the device may differ per worker).
SHARED_SETTINGS = (*(k for k in RUN_SETTINGS if k != "device"),
                   "budget", "families", "modes", "delta_targets", "adapter_targets", "lr", "pruner")


def family_space(family: str) -> dict[str, tuple[Any, ...]]:
    """The options searched for ``family``: option name -> choices (None: the family's default)."""
    plain_or_product = {"parameterization": ("plain", "product")}
    spaces: dict[str, dict[str, tuple[Any, ...]]] = {
        "lowrank": {"rank": (1, 2, 4, 8, 16)},
        "circulant": plain_or_product,
        "toeplitz": plain_or_product,
        "symmetric_toeplitz": plain_or_product,
        # rank=r: SURM's factor shapes (m/r, r) x (r, n/r), m + n parameters per term; None: near-square factors.
        "kronecker": {"rank": (None, 2, 4, 8, 16, 32), "terms": (1, 2, 4)},
        "ldr": {"displacement_rank": (1, 2, 4)},
        "monarch": {"nblocks": (2, 4, 8, 16), "block_rank": (1, 2, 4, 8)},
    }
    return spaces[family]


# -- settings and candidates -------------------------------------------------------------------------------------


@dataclass
class SearchSettings:
    """What a search explores and how each trial trains (the ``surm search`` flags)."""

    output: Path
    budget: int
    model: str = "minilm"
    dataset: str = "mr"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    epochs: int = 3
    batch_size: int = 32
    head_lr: float = HEAD_LEARNING_RATE
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_length: int = 64
    train_size: Optional[int] = None
    eval_size: Optional[int] = None
    device: str = "auto"
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    modes: tuple[str, ...] = MODES
    delta_targets: Optional[tuple[str, ...]] = None
    adapter_targets: tuple[str, ...] = ADAPTER_TARGET_SETS
    lr: Optional[float] = None
    pruner: str = "hyperband"
    trials: int = 40
    storage: Optional[str] = None
    study_name: str = DEFAULT_STUDY_NAME
    timeout: Optional[float] = None
    heartbeat: int = 60
    test_front: bool = False

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.families = tuple(self.families)
        self.modes = tuple(self.modes)
        if self.delta_targets is not None:
            self.delta_targets = tuple(self.delta_targets)
        self.adapter_targets = tuple(self.adapter_targets)
        unknown = [f for f in self.families if f not in STRUCTURES]
        if unknown or not self.families:
            raise ValueError(f"unknown family {unknown[0] if unknown else '(none)'!r} in --families; "
                             f"valid families: {', '.join(FAMILIES)}")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"--families lists a family twice: {','.join(self.families)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"--modes must be a comma-separated subset of {','.join(MODES)}, "
                             f"got {','.join(self.modes)!r}")
        for name in ("budget", "trials", "heartbeat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = name.replace("budget", "budget-params")
                raise ValueError(f"--{flag} must be a positive integer, got {value!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        for name in ("delta_targets", "adapter_targets"):
            sets = getattr(self, name)
            if sets is not None and (not sets or any(not s or any(not p for p in s.split(",")) for s in sets)):
                raise ValueError(f"--{name.replace('_', '-')} must be ';'-separated lists of module names, "
                                 f"got {sets!r}")
        if self.storage is None:
            self.storage = f"sqlite:///{(self.output / STUDY_FILE).resolve()}"
        if not self.study_name:
            raise ValueError("--study-name must not be empty")

    def shared(self) -> dict[str, Any]:
        """The settings every worker of one study must agree on (stored with the study)."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if k in SHARED_SETTINGS}

    def target_sets(self, mode: str) -> tuple[str, ...]:
        if mode == "adapter":
            return self.adapter_targets
        return self.delta_targets if self.delta_targets is not None else DELTA_TARGET_SETS

    def run_kwargs(self) -> dict[str, Any]:
        """RunConfig keyword arguments shared by every trial."""
        return {k: getattr(self, k) for k in RUN_SETTINGS}


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    family: str
    mode: str
    targets: str
    options: tuple[tuple[str, Any], ...]
    bottleneck: Optional[int] = None
    lr: float = 1e-3
    alpha: float = 1.0

    @property
    def structure_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options if v is not None}

    def method(self) -> MethodChoice:
        options: dict[str, Any] = {**self.structure_options, "alpha": self.alpha}
        if self.bottleneck is not None:
            options["bottleneck"] = self.bottleneck
        return MethodChoice(self.family, targets=self.targets.split(","), mode=self.mode, options=options)

    def describe(self) -> str:
        """A short, table-friendly summary."""
        parts = [self.family] + [f"{k}={v}" for k, v in self.options if v is not None]
        if self.mode == "adapter":
            parts.append(f"adapter (bottleneck {self.bottleneck})" if self.bottleneck else "adapter")
        return f"{' '.join(parts)} on {self.targets}; lr {self.lr:.3g}, alpha {self.alpha:.3g}"

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "mode": self.mode, "targets": self.targets, "options": dict(self.options),
                "bottleneck": self.bottleneck, "lr": self.lr, "alpha": self.alpha}

    @classmethod
    def from_json(cls, data: Any) -> "Candidate":
        """The candidate stored in a study by :meth:`to_json`.

        Raises:
            SurmError: if ``data`` is not such a record (a foreign or altered study storage).
        """
        try:
            candidate = cls(data["family"], data["mode"], data["targets"], tuple(sorted(data["options"].items())),
                            data["bottleneck"], float(data["lr"]), float(data["alpha"]))
            if not (isinstance(candidate.family, str) and isinstance(candidate.targets, str)
                    and all(isinstance(k, str) for k, _ in candidate.options)):
                raise TypeError
        except (KeyError, TypeError, AttributeError, ValueError):
            raise SurmError(f"the study holds a malformed trial configuration {data!r}; it was not written by surm "
                            "search: use another --storage or --study-name") from None
        return candidate


def sample_candidate(trial: Any, settings: SearchSettings) -> Candidate:
    """Draw a configuration from ``trial`` (define-by-run: option names are prefixed by their family)."""
    family = trial.suggest_categorical("family", settings.families)
    mode = trial.suggest_categorical("mode", settings.modes)
    targets = trial.suggest_categorical(f"targets.{mode}", settings.target_sets(mode))
    bottleneck = trial.suggest_categorical("bottleneck", BOTTLENECKS) if mode == "adapter" else None
    options = tuple(sorted((name, trial.suggest_categorical(f"{family}.{name}", choices))
                           for name, choices in family_space(family).items()))
    if settings.lr is not None:
        lr = settings.lr
    else:
        lr = DEFAULT_LEARNING_RATES[family] * trial.suggest_float("lr_scale", 1 / LR_SPAN, LR_SPAN, log=True)
    alpha = trial.suggest_float("alpha", *ALPHA_RANGE, log=True)
    return Candidate(family, mode, targets, options, bottleneck, lr, alpha)


def all_shapes(settings: SearchSettings) -> Iterator[Candidate]:
    """Every discrete configuration of the space (lr and alpha at their defaults)."""
    for family in settings.families:
        space = family_space(family)
        for values in itertools.product(*space.values()):
            options = tuple(sorted(zip(space, values)))
            for mode in settings.modes:
                for targets in settings.target_sets(mode):
                    for bottleneck in (BOTTLENECKS if mode == "adapter" else (None,)):
                        yield Candidate(family, mode, targets, options, bottleneck)


# -- exact parameter counts --------------------------------------------------------------------------------------


class ParameterCounter:
    """Exact adapter parameter counts (classifier head excluded) before any training.

    PEFT finds the targeted layers on a copy of the model on the meta device (no memory, no weights); each layer's
    adapter module (``DeltaUpdate`` of the family at the layer's shape, or ``OutputAdapter``) is then built on the
    meta device and its parameters counted. Trials check the count against the real model they train.
    """

    def __init__(self, settings: SearchSettings) -> None:
        import torch

        from .data import load_dataset
        from .models import load_model

        data = load_dataset(settings.dataset, text_column=settings.text_column,
                            text_pair_column=settings.text_pair_column, label_column=settings.label_column,
                            seed=settings.seed)
        loaded = load_model(settings.model, data, settings.max_length)
        self.model = loaded.model.to(torch.device("meta"))
        self.task_type, self.head = loaded.task_type, loaded.head
        self.default_targets = loaded.default_targets
        self._layers: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def layers(self, mode: str, targets: str) -> list[tuple[int, int]]:
        """(in_features, out_features) of every layer that ``targets`` adapts in ``mode``.

        Raises:
            ValueError: if the targets match no layer of the model.
        """
        key = (mode, targets)
        if key not in self._layers:
            import peft

            from .peft import SurmLayer

            probe = MethodChoice("lowrank", targets=targets.split(","), mode=mode, options={"rank": 1})
            config = build_peft_config(probe, self.task_type, self.head, self.default_targets)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = peft.get_peft_model(copy.deepcopy(self.model), config)
            self._layers[key] = [(m.in_features, m.out_features) for m in wrapped.modules() if isinstance(m, SurmLayer)]
        return self._layers[key]

    def count(self, candidate: Candidate) -> int:
        """The adapter parameters of ``candidate``.

        Raises:
            ValueError: if an option does not fit a layer's shape (e.g. a Kronecker rank that does not divide it).
        """
        return sum(self._layer_count(candidate.family, candidate.options, candidate.mode, candidate.bottleneck, i, o)
                   for i, o in self.layers(candidate.mode, candidate.targets))

    @functools.lru_cache(maxsize=None)
    def _layer_count(self, family: str, options: tuple, mode: str, bottleneck: Optional[int], in_features: int,
                     out_features: int) -> int:
        import torch

        from .insertion import DeltaUpdate, OutputAdapter
        from .structures import structure

        kwargs = {k: v for k, v in options if v is not None}
        with torch.device("meta"):
            if mode == "delta":
                module = DeltaUpdate(structure(family, out_features, in_features, **kwargs))
            else:
                module = OutputAdapter(out_features, family, kwargs, bottleneck=bottleneck)
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def smallest(self, settings: SearchSettings) -> tuple[int, Candidate, list[Candidate], int]:
        """The cheapest valid configuration of the space: (params, candidate, those within the budget, how many
        are valid).

        Raises:
            ValueError: if a target set matches no layer, or no configuration of the space is valid.
        """
        for mode in settings.modes:
            for targets in settings.target_sets(mode):
                try:
                    found = self.layers(mode, targets)
                except ValueError as error:
                    raise ValueError(f"target set {targets!r} ({mode} mode) does not fit model {settings.model!r}: "
                                     f"{str(error).splitlines()[0]}") from None
                if not found:
                    raise ValueError(f"target set {targets!r} ({mode} mode) matches no layer of {settings.model!r}")
        best: Optional[tuple[int, Candidate]] = None
        fits: list[Candidate] = []
        valid = 0
        for candidate in all_shapes(settings):
            try:
                n = self.count(candidate)
            except ValueError:  # an option that does not fit a layer's shape
                continue
            valid += 1
            if n <= settings.budget:
                fits.append(candidate)
            if best is None or n < best[0]:
                best = (n, candidate)
        if best is None:
            raise ValueError("no configuration of the search space is valid for this model")
        return best[0], best[1], fits, valid


# -- the study ---------------------------------------------------------------------------------------------------

PRUNERS = ("hyperband", "halving", "none")


class _StopAfterValidation(Exception):
    """Raised by the epoch callback after the last epoch: a trial never evaluates the test split."""


class _Surplus(Exception):
    """A trial created after the study already had enough (a race between workers); it fails untrained."""


def initial_design(settings: SearchSettings, fitting: list[Candidate]) -> list[dict[str, Any]]:
    """The parameters of the study's first trials: one configuration within the budget per family (drawn with the
    seed among that family's fitting ones, in delta and adapter mode by turns, at the family's default learning
    rate and alpha 1), at most half of ``--trials``.

    Without it, TPE's random start-up is spent mostly on configurations over the budget (a small budget rejects
    most of the space), and whole families are never trained.
    """
    rng = np.random.default_rng([settings.seed, 1])
    design = []
    for index, family in enumerate(settings.families):
        mine = [c for c in fitting if c.family == family]
        if not mine:
            continue
        # Modes alternate between families (adapter variants would otherwise dominate the draw).
        preferred = [c for c in mine if c.mode == settings.modes[index % len(settings.modes)]]
        mine = preferred or mine
        c = mine[int(rng.integers(len(mine)))]
        params: dict[str, Any] = {"family": c.family, "mode": c.mode, f"targets.{c.mode}": c.targets}
        if c.mode == "adapter":
            params["bottleneck"] = c.bottleneck
        params.update({f"{c.family}.{name}": value for name, value in c.options})
        if settings.lr is None:
            params["lr_scale"] = 1.0
        params["alpha"] = 1.0
        design.append(params)
    return design[: max(1, settings.trials // 2)]


def make_sampler(seed: int, trials: int, design: Optional[list[dict[str, Any]]] = None) -> Any:
    """Multivariate TPE whose random draws for trial n depend on (seed, n) only; trial n < len(design) takes the
    parameters ``design[n]``.

    One worker is then reproducible, and parallel workers (which see the same seed) never draw the same random
    sequence for two trials. The design is keyed by trial number, which the storage hands out once, so workers
    that join together do not repeat it.
    """
    import optuna

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
    import optuna

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
    import optuna
    import sqlalchemy

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


def status_of(trial: Any) -> str:
    """complete, pruned, diverged (trained) / rejected, invalid, duplicate, surplus (untrained) / running..."""
    from optuna.trial import TrialState

    status = trial.user_attrs.get("status")
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.FAIL:
        return status if status == "surplus" else "failed"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if trial.state == TrialState.RUNNING:
        return "running"
    return status or "pruned"


def counts(trials: list[Any]) -> dict[str, int]:
    """How many trials have each status, plus "trained" (towards --trials) and "occupying" (trained or under way)."""
    out: dict[str, int] = {}
    for t in trials:
        s = status_of(t)
        out[s] = out.get(s, 0) + 1
    out["trained"] = sum(out.get(s, 0) for s in ("complete", "pruned", "diverged"))
    out["occupying"] = out["trained"] + out.get("running", 0) + out.get("waiting", 0)
    return out


def best_trial(trials: list[Any]) -> Optional[Any]:
    """Highest validation accuracy; ties go to fewer parameters, then to the earlier trial."""
    complete = [t for t in trials if status_of(t) == "complete"]
    if not complete:
        return None
    return max(complete, key=lambda t: (t.value, -t.user_attrs["adapter_params"], -t.number))


def pareto_front(trials: list[Any]) -> list[Any]:
    """Completed trials not dominated in (fewer adapter parameters, higher validation accuracy), by size."""
    complete = sorted((t for t in trials if status_of(t) == "complete"),
                      key=lambda t: (t.user_attrs["adapter_params"], -t.value, t.number))
    front, top = [], -math.inf
    for t in complete:
        if t.value > top:
            front.append(t)
            top = t.value
    return front


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
        self.design = initial_design(settings, fitting)
        if smallest > settings.budget:
            raise ValueError(
                f"--budget-params {settings.budget:,} is below the smallest configuration of the search space "
                f"({smallest:,} adapter parameters: {cheapest.family} {cheapest.mode} on {cheapest.targets}); "
                "raise the budget or widen --families / --modes / the target sets"
            )
        self.study = self._open_study()
        self.started = time.monotonic()
        self.ran: list[int] = []

    def _open_study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.create_study(storage=self.storage, study_name=self.settings.study_name, direction="maximize",
                                    sampler=make_sampler(self.settings.seed, self.settings.trials, self.design),
                                    pruner=make_pruner(self.settings.pruner, self.settings.epochs),
                                    load_if_exists=True)
        mine = self.settings.shared()
        theirs = study.user_attrs.get("settings")
        if theirs is None:
            study.set_user_attr("settings", mine)
        elif theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"study {self.settings.study_name!r} in {self.settings.storage} was created with other settings "
                f"({', '.join(f'{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here' for k in changed)}); "
                "use the same flags or another --study-name"
            )
        return study

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train trials until the study has ``--trials`` trained ones (or ``--timeout``), then write the outputs."""
        import optuna

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
            if tally.get("waiting", 0) or tally["occupying"] < settings.trials:
                if tally.get("rejected", 0) + tally.get("invalid", 0) > 50 * settings.trials:
                    raise SurmError(f"more than {50 * settings.trials} configurations were rejected; the budget "
                                       "leaves too little of the space")
                self.study.optimize(self._objective, n_trials=1, catch=(_Surplus,), gc_after_trial=True)
                waited = False
            elif tally.get("running", 0):
                if not waited:
                    self._say(f"waiting for {tally['running']} trial(s) running in other workers")
                    waited = True
                time.sleep(min(5.0, settings.heartbeat))
            else:
                break
        return self.finish()

    def _objective(self, trial: Any) -> float:
        import optuna
        from optuna.trial import TrialState

        settings = self.settings
        frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        me = frozen[trial.number]
        # A race between workers can create a trial after the study already had enough: fail it untrained.
        ahead = [t for t in frozen.values() if t.number < trial.number and
                 (status_of(t) in ("complete", "pruned", "diverged", "waiting") or
                  (t.state == TrialState.RUNNING and t.user_attrs.get("status") not in UNTRAINED))]
        if len(ahead) >= settings.trials:
            trial.set_user_attr("status", "surplus")
            raise _Surplus(f"the study already has {settings.trials} trials")
        candidate = sample_candidate(trial, settings)
        trial.set_user_attr("candidate", candidate.to_json())
        trial.set_user_attr("config", candidate.describe())
        try:
            params = self.counter.count(candidate)
        except ValueError as error:
            return self._untrained(trial, "invalid", str(error))
        trial.set_user_attr("adapter_params", params)
        if "budget" not in me.constraints:
            trial.set_constraint("budget", params - settings.budget)
        if params > settings.budget:
            reason = f"over budget: {params:,} > {settings.budget:,} adapter parameters"
            return self._untrained(trial, "rejected", reason)
        for other in frozen.values():
            if other.number != trial.number and other.params == trial.params and status_of(other) in (
                    "complete", "pruned", "diverged", "running"):
                return self._untrained(trial, "duplicate", f"same parameters as trial {other.number}", other.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(me)
        folder = trial_folder(self.settings.output, f"trial-{(retried[0] if retried else trial.number):04d}",
                              trial.number)
        trial.set_user_attr("status", "training")
        trial.set_user_attr("folder", folder.name)
        return self._train(trial, candidate, params, folder)

    def _untrained(self, trial: Any, status: str, reason: str, duplicate_of: Optional[int] = None) -> float:
        import optuna

        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
        if duplicate_of is not None:
            trial.set_user_attr("duplicate_of", duplicate_of)
        self._report(trial.number, status, reason)
        raise optuna.TrialPruned(reason)

    def _train(self, trial: Any, candidate: Candidate, params: int, folder: Path) -> float:
        import optuna

        from .trainer import RunConfig

        settings = self.settings
        config = RunConfig(method=candidate.method(), output=folder, lr=candidate.lr, resume=True,
                           **settings.run_kwargs())
        history, finished = _checkpoint_history(folder, config)
        if not finished:
            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                history.append({"epoch": epoch, **metrics})
                trial.report(metrics["accuracy"], epoch)
                trial.set_user_attr("history", history)
                if epoch < settings.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (validation accuracy "
                                             f"{metrics['accuracy']:.4f})")
                if epoch == settings.epochs:
                    raise _StopAfterValidation

            try:
                with _quiet(folder):
                    run = _make_run(config)
                    real = run_adapter_params(run)
                    if real != params:
                        raise RuntimeError(f"parameter count mismatch for {candidate.describe()}: counted {params:,} "
                                           f"before training, the model has {real:,}")
                    run.execute(on_epoch)
            except _StopAfterValidation:
                pass
            except optuna.TrialPruned as pruned:
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("reason", str(pruned))
                self._report(trial.number, "pruned", f"{candidate.describe()}: {pruned}")
                raise
            except TrainingDiverged as error:
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("reason", str(error))
                self._report(trial.number, "diverged", candidate.describe())
                raise optuna.TrialPruned(str(error)) from None
        trial.set_user_attr("history", history)
        trial.set_user_attr("status", "complete")
        value = history[-1]["accuracy"]
        self.ran.append(trial.number)
        self._report(trial.number, "complete", f"validation {value:.4f}, {params:,} params, {candidate.describe()}",
                     value=value)
        return value

    # -- progress ----------------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        print(f"[search] {message}", file=self.log, flush=True)

    def _report(self, number: int, status: str, detail: str, value: Optional[float] = None) -> None:
        trials = self.study.get_trials(deepcopy=False)
        tally = counts(trials)
        # This trial is still RUNNING in storage: count it as finished with its status.
        tally["trained"] += status in ("complete", "pruned", "diverged")
        best = best_trial(trials)
        best_value = best.value if best is not None else None
        if value is not None and (best_value is None or value > best_value):
            best_text = f"best {value:.4f} (#{number})"
        else:
            best_text = f"best {best_value:.4f} (#{best.number})" if best is not None else "best -"
        pruned = tally.get("pruned", 0) + (status == "pruned")
        rejected = tally.get("rejected", 0) + tally.get("invalid", 0) + (status in ("rejected", "invalid"))
        self._say(f"trial {number} {status}: {detail} | trained {tally['trained']}/{self.settings.trials}, "
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
            summary = self._summary(trials, best, front, tested)
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
        from .trainer import RunConfig

        folder = self._folder(trial)
        results = folder / "results.json"
        if not results.exists():
            candidate = Candidate.from_json(trial.user_attrs["candidate"])
            config = RunConfig(method=candidate.method(), output=folder, lr=candidate.lr, resume=True,
                               **self.settings.run_kwargs())
            self._say(f"evaluating trial {trial.number} on the test split"
                      + ("" if (folder / CHECKPOINT).exists() else " (no checkpoint here: training it again)"))
            with _quiet(folder):
                _make_run(config).execute()
        return json.loads(results.read_text())

    def _summary(self, trials: list[Any], best: Any, front: list[Any], tested: dict[int, dict[str, Any]]) -> dict:
        s = self.settings

        def row(t: Any) -> dict[str, Any]:
            data = {"trial": t.number, "status": status_of(t), "adapter_params": t.user_attrs.get("adapter_params"),
                    "validation_accuracy": t.value if status_of(t) == "complete" else None,
                    "validation_history": [h["accuracy"] for h in t.user_attrs.get("history", [])],
                    "config": t.user_attrs.get("config"), "candidate": t.user_attrs.get("candidate"),
                    "reason": t.user_attrs.get("reason"),
                    "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start else None}
            if t.number in tested:
                r = tested[t.number]
                data.update(test_accuracy=r["test_accuracy"], test_macro_f1=r["test_macro_f1"],
                            trainable_params=r["trainable_params"])
            return data

        best_row = row(best)
        candidate = Candidate.from_json(best.user_attrs["candidate"])
        command = ["surm", "finetune", "--config", str(s.output / "adapter_config.json"), "--lr", f"{candidate.lr:.6g}",
                   *_run_flags(s), "--output", "runs/best"]
        best_row.update(command=" ".join(command), study=s.study_name, storage=s.storage,
                        validation_examples=tested[best.number]["config"].get("eval_size"),
                        results=tested[best.number])
        return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()
                             if k not in ("output",)},
                "run_flags": _run_flags(s), "counts": counts(trials), "valid_configurations": self.valid,
                "fitting_configurations": self.fitting, "best": best_row, "front": [row(t) for t in front],
                "trials": [row(t) for t in sorted(trials, key=lambda t: t.number)]}


def run_adapter_params(run: Any) -> int:
    """Trainable parameters of a :class:`~surm.trainer.Run`'s model, the classifier head excluded."""
    from .trainer import head_parameter_names

    head = head_parameter_names(run.model, run.loaded.head)
    return sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and n not in head)


def _make_run(config: Any) -> Any:
    from .trainer import Run

    return Run(config)


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


def _checkpoint_history(folder: Path, config: Any) -> tuple[list[dict[str, float]], bool]:
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
    return list(checkpoint["history"]), checkpoint["epoch"] == config.epochs


@contextlib.contextmanager
def _quiet(folder: Path) -> Iterator[None]:
    """Send a trial's own progress bars and log lines to ``folder/console.log`` (the search prints one line per
    trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "console.log", "a", encoding="utf-8") as stream, contextlib.redirect_stderr(stream):
        yield


def _run_flags(s: SearchSettings) -> list[str]:
    """The finetune flags that reproduce a trial's run settings (the method comes from --config and --lr)."""
    flags = ["--model", s.model, "--dataset", s.dataset]
    defaults = SearchSettings(output=Path("."), budget=1)
    for key in (k for k in RUN_SETTINGS if k not in ("model", "dataset", "device")):
        value = getattr(s, key)
        if value is not None and value != getattr(defaults, key) or key in ("epochs", "seed"):
            flags += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


# -- reports -----------------------------------------------------------------------------------------------------


def _pct(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def front_markdown(summary: dict[str, Any]) -> str:
    """front.md: the Pareto front, the best configuration with its test accuracy, and every trial."""
    s, c, best = summary["settings"], summary["counts"], summary["best"]
    budget = s["budget"]
    lines = [
        f"# surm search: {s['model']} on {s['dataset']}, budget {budget:,} adapter parameters", "",
        f"Study `{s['study_name']}`: {c['trained']} trained trials ({c.get('complete', 0)} complete, "
        f"{c.get('pruned', 0)} stopped by the {s['pruner']} pruner, {c.get('diverged', 0)} diverged); "
        f"{c.get('rejected', 0)} configurations rejected before training as over the budget, {c.get('invalid', 0)} "
        f"invalid, {c.get('duplicate', 0)} duplicates, {c.get('surplus', 0) + c.get('failed', 0)} failed or surplus. "
        f"{summary['fitting_configurations']} of the {summary['valid_configurations']} discrete configurations "
        "of the space fit the budget.", "",
        "Objective: validation accuracy after the last epoch. The test split was evaluated once, only for the "
        "configurations that show a test accuracy.", "",
        f"Run settings of every trial: `{' '.join(summary['run_flags'])}`", "",
        "## Pareto front (validation accuracy against adapter parameters)", "",
        "| trial | adapter params | % of budget | validation acc % | test acc % | configuration |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in summary["front"]:
        mark = " **(best)**" if row["trial"] == best["trial"] else ""
        lines.append(f"| {row['trial']} | {row['adapter_params']:,} | {100 * row['adapter_params'] / budget:.1f} | "
                     f"{_pct(row['validation_accuracy'])} | {_pct(row.get('test_accuracy'))} | {row['config']}{mark} |")
    lines += [
        "", "## Best configuration", "",
        f"Trial {best['trial']}: {best['config']}; {best['adapter_params']:,} adapter parameters "
        f"({best['trainable_params']:,} trainable with the classifier head); validation accuracy "
        f"{_pct(best['validation_accuracy'])} %, **test accuracy {_pct(best['test_accuracy'])} %** "
        f"(macro-F1 {_pct(best['test_macro_f1'])} %).", "",
        "Reproduce it (`adapter_config.json` holds the family, options, targets, mode and alpha; the learning rate "
        "is passed on its own):", "", "```bash", best["command"], "```", "",
        "## All trials", "",
        "| trial | status | adapter params | validation acc % per epoch | seconds | configuration / reason |",
        "|---:|---|---:|---|---:|---|",
    ]
    for row in summary["trials"]:
        params = f"{row['adapter_params']:,}" if row["adapter_params"] is not None else ""
        history = " → ".join(_pct(v) for v in row["validation_history"])
        detail = row["config"] or ""
        if row["reason"] and row["status"] != "complete":
            detail = f"{detail} — {row['reason']}" if detail else row["reason"]
        seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else ""
        lines.append(f"| {row['trial']} | {row['status']} | {params} | {history} | {seconds} | {detail} |")
    return "\n".join(lines) + "\n"


def front_plot(summary: dict[str, Any], path: Path) -> None:
    """front.png: every completed trial, the stopped ones at their last validation accuracy, the front, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    complete = [r for r in summary["trials"] if r["status"] == "complete"]
    stopped = [r for r in summary["trials"] if r["status"] in ("pruned", "diverged") and r["validation_history"]]
    axes.scatter([r["adapter_params"] for r in stopped], [100 * r["validation_history"][-1] for r in stopped],
                 facecolors="none", edgecolors="grey", label="stopped by the pruner (last validation)")
    axes.scatter([r["adapter_params"] for r in complete], [100 * r["validation_accuracy"] for r in complete],
                 color="tab:blue", label="completed")
    front = summary["front"]
    axes.step([r["adapter_params"] for r in front], [100 * r["validation_accuracy"] for r in front], where="post",
              color="tab:orange", label="Pareto front")
    for r in front:
        c = r["candidate"]
        label = f"{c['family']} {'adapter' if c['mode'] == 'adapter' else 'on'} {c['targets']}"
        axes.annotate(label, (r["adapter_params"], 100 * r["validation_accuracy"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)
    best = summary["best"]
    axes.scatter([best["adapter_params"]], [100 * best["validation_accuracy"]], marker="*", s=200, color="tab:red",
                 label=f"best (test {_pct(best['test_accuracy'])} %)", zorder=3)
    axes.axvline(s["budget"], color="black", linestyle="--", linewidth=1, label=f"budget {s['budget']:,}")
    axes.set_xscale("log")
    axes.set_xlabel("adapter parameters (log scale, classifier head excluded)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(textwrap.fill(f"surm search: {s['model']} on {s['dataset']}, {summary['counts']['trained']} "
                                 f"trained trials, budget {s['budget']:,}", 90), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    atomic.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def search(settings: SearchSettings) -> dict[str, Any]:
    """Run (or join, or resume) a search and return the summary written to ``trials.json``."""
    return Search(settings).run()


def settings_from_args(args: Any) -> SearchSettings:
    """SearchSettings from ``surm search``'s parsed flags.

    Raises:
        ValueError: for an unknown family or mode, a non-positive count, or a malformed target list.
    """
    def split(text: Optional[str], sep: str) -> Optional[tuple[str, ...]]:
        return None if text is None else tuple(part.strip() for part in text.split(sep) if part.strip())

    kwargs = {k: getattr(args, k) for k in ("model", "dataset", "text_column", "text_pair_column", "label_column",
                                            "epochs", "batch_size", "weight_decay", "warmup_ratio", "max_length",
                                            "train_size", "eval_size", "device", "seed", "lr", "pruner", "trials",
                                            "storage", "study_name", "timeout", "heartbeat", "test_front")}
    if args.head_lr is not None:
        kwargs["head_lr"] = args.head_lr
    if args.adapter_targets is not None:
        kwargs["adapter_targets"] = split(args.adapter_targets, ";")
    # Checked here too (RunConfig checks them only when the first trial starts).
    for name in ("epochs", "batch_size", "max_length"):
        if kwargs[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {kwargs[name]}")
    for name in ("train_size", "eval_size"):
        if kwargs[name] is not None and kwargs[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {kwargs[name]}")
    if kwargs["lr"] is not None and not kwargs["lr"] > 0:
        raise ValueError(f"--lr must be positive, got {kwargs['lr']}")
    return SearchSettings(output=args.output, budget=args.budget_params,
                          families=split(args.families, ",") if args.families is not None else FAMILIES,
                          modes=split(args.modes, ","), delta_targets=split(args.delta_targets, ";"), **kwargs)
