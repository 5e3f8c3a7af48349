"""Exact adapter parameter counts of the search space's configurations, before any training."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Optional

import peft
import torch

from ...data import load_dataset
from ...insertion import OutputAdapter
from ...methods import MethodChoice, build_peft_config, recommended_method
from ...models import load_model
from ...peft import SurmLayer
from ...recommendation import layer_parameters
from ...structures import STRUCTURES, declared_options, search_space
from .settings import SearchSettings
from .space import Candidate, all_shapes


class ParameterCounter:
    """Exact adapter parameter counts (classifier head excluded) before any training.

    PEFT finds the targeted layers on a copy of the model on the meta device (no memory, no weights); each layer's
    adapter module (``DeltaUpdate`` of the family at the layer's shape, or ``OutputAdapter``) is then built on the
    meta device and its parameters counted. Trials check the count against the real model they train.
    """

    def __init__(self, settings: SearchSettings) -> None:
        run = settings.run
        data = load_dataset(run.dataset, text_column=run.text_column, text_pair_column=run.text_pair_column,
                            label_column=run.label_column, seed=run.seed)
        loaded = load_model(run.model, data, run.max_length, run.pooling)
        self.model = loaded.model.to(torch.device("meta"))
        self.task_type, self.head = loaded.task_type, loaded.head
        self.default_targets = loaded.default_targets
        self._layers: dict[tuple[str, str], list[tuple[str, tuple[int, int]]]] = {}

    def layers(self, mode: str, targets: str) -> list[tuple[int, int]]:
        """(in_features, out_features) of every layer that ``targets`` adapts in ``mode``.

        Raises:
            ValueError: if the targets match no layer of the model.
        """
        return [shape for _, shape in self._adapted(mode, targets)]

    def adapted_modules(self, mode: str, targets: str) -> frozenset[str]:
        """The names of the modules that ``targets`` adapts in ``mode``."""
        return frozenset(name for name, _ in self._adapted(mode, targets))

    def _adapted(self, mode: str, targets: str) -> list[tuple[str, tuple[int, int]]]:
        key = (mode, targets)
        if key not in self._layers:
            probe = MethodChoice("lowrank", targets=targets.split(","), mode=mode, options={"rank": 1})
            config = build_peft_config(probe, self.task_type, self.head, self.default_targets)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = peft.get_peft_model(copy.deepcopy(self.model), config)
            self._layers[key] = [(name.removeprefix("base_model.model."), (m.in_features, m.out_features))
                                 for name, m in wrapped.named_modules() if isinstance(m, SurmLayer)]
        return self._layers[key]

    def recommended(self, settings: SearchSettings) -> Optional[Candidate]:
        """``surm.recommend``'s configuration for the budget as a candidate of the space, or None if the space lacks
        it (delta mode or its family not searched, per-role options, which the space does not hold, no target set
        adapting exactly its layers, an option value not searched, or over the budget)."""
        if "delta" not in settings.modes:
            return None
        try:
            choice, _ = recommended_method(self.model, settings.budget)
        except ValueError:
            return None
        if choice.name not in settings.families or "override_pattern" in choice.options:
            return None
        wanted = self.adapted_modules("delta", ",".join(choice.targets or []))
        targets = next((t for t in settings.target_sets("delta") if self.adapted_modules("delta", t) == wanted), None)
        declared = declared_options(STRUCTURES[choice.name], choice.options)
        space = search_space(choice.name)
        options = tuple(sorted((name, declared[name]) for name in space))
        if targets is None or any(value not in space[name] for name, value in options):
            return None
        candidate = Candidate(choice.name, "delta", targets, options)
        return candidate if self.count(candidate) <= settings.budget else None

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
        kwargs = {k: v for k, v in options if v is not None}
        if mode == "delta":
            return layer_parameters(family, tuple(sorted(kwargs.items())), out_features, in_features)
        with torch.device("meta"):
            adapter = OutputAdapter(out_features, family, kwargs, bottleneck=bottleneck)
        return sum(p.numel() for p in adapter.parameters() if p.requires_grad)

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
                    raise ValueError(f"target set {targets!r} ({mode} mode) does not fit model {settings.run.model!r}: "
                                     f"{str(error).splitlines()[0]}") from None
                if not found:
                    raise ValueError(f"target set {targets!r} ({mode} mode) matches no layer of {settings.run.model!r}")
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
