"""The search space: which structured family, of which size and mode, where, at which learning rate and scale.

A point of it is a :class:`Candidate`. The family options and the values tried come from each family's own
declarations (:func:`surm.structures.search_space`); the learning rate is searched log-uniformly within a factor
:data:`LR_SPAN` of the family's ``default_lr``, alpha within :data:`ALPHA_RANGE`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...errors import SurmError
from ...methods import MethodChoice
from ...structures import STRUCTURES, search_space
from .settings import SearchSettings

#: Adapter bottleneck widths (None: SURM's single d x d map).
BOTTLENECKS = (None, 16, 64)
#: The learning rate is searched in [default / LR_SPAN, default * LR_SPAN], log-uniformly.
LR_SPAN = 10.0
#: alpha is searched log-uniformly in this range.
ALPHA_RANGE = (0.25, 4.0)


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
                           for name, choices in search_space(family).items()))
    if settings.run.lr is not None:
        lr = settings.run.lr
    else:
        lr = STRUCTURES[family].default_lr * trial.suggest_float("lr_scale", 1 / LR_SPAN, LR_SPAN, log=True)
    alpha = trial.suggest_float("alpha", *ALPHA_RANGE, log=True)
    return Candidate(family, mode, targets, options, bottleneck, lr, alpha)


def all_shapes(settings: SearchSettings) -> Iterator[Candidate]:
    """Every discrete configuration of the space (lr and alpha at their defaults)."""
    for family in settings.families:
        space = search_space(family)
        for values in itertools.product(*space.values()):
            options = tuple(sorted(zip(space, values)))
            for mode in settings.modes:
                for targets in settings.target_sets(mode):
                    for bottleneck in (BOTTLENECKS if mode == "adapter" else (None,)):
                        yield Candidate(family, mode, targets, options, bottleneck)


def initial_design(settings: SearchSettings, fitting: list[Candidate],
                   recommended: Optional[Candidate] = None) -> list[dict[str, Any]]:
    """The parameters of the study's first trials: one configuration within the budget per family (drawn with the
    seed among that family's fitting ones, in delta and adapter mode by turns, at the family's default learning
    rate and alpha 1), at most half of ``--trials``. The ``recommended`` candidate (``surm.recommend``'s, when
    the space holds it) is trial 0 and its family's configuration.

    Without it, TPE's random start-up is spent mostly on configurations over the budget (a small budget rejects
    most of the space), and whole families are never trained.
    """
    rng = np.random.default_rng([settings.run.seed, 1])
    design = []
    families = list(settings.families)
    if recommended is not None:
        families.remove(recommended.family)
        families.insert(0, recommended.family)
    for index, family in enumerate(families):
        mine = [c for c in fitting if c.family == family]
        if not mine:
            continue
        # Modes alternate between families (adapter variants would otherwise dominate the draw).
        preferred = [c for c in mine if c.mode == settings.modes[index % len(settings.modes)]]
        mine = preferred or mine
        c = mine[int(rng.integers(len(mine)))]
        if recommended is not None and family == recommended.family:
            c = recommended
        params: dict[str, Any] = {"family": c.family, "mode": c.mode, f"targets.{c.mode}": c.targets}
        if c.mode == "adapter":
            params["bottleneck"] = c.bottleneck
        params.update({f"{c.family}.{name}": value for name, value in c.options})
        if settings.run.lr is None:
            params["lr_scale"] = 1.0
        params["alpha"] = 1.0
        design.append(params)
    return design[: max(1, settings.trials // 2)]
