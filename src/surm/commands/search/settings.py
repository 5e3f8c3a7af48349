"""What a search explores and how its trials train: the ``surm search`` settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...settings import RunSettings
from ...structures import STRUCTURES
from ...validation import is_int

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
PRUNERS = ("hyperband", "halving", "none")
#: The study database in the output folder (the default --storage).
STUDY_FILE = "study.db"
DEFAULT_STUDY_NAME = "surm-search"
#: Search settings (besides the run settings but the device) that must match for a worker to join a study.
SHARED_SETTINGS = ("budget", "families", "modes", "delta_targets", "adapter_targets", "pruner")


@dataclass
class SearchSettings:
    """What a search explores (budget, families, modes, target sets), how its study runs, and how every trial trains
    (``run``; ``run.lr`` set fixes the learning rate instead of searching it).

    Raises:
        ValueError: for an unknown family or mode, a non-positive count, or a malformed target list.
    """

    output: Path
    budget: int
    run: RunSettings = field(default_factory=RunSettings)
    families: tuple[str, ...] = FAMILIES
    modes: tuple[str, ...] = MODES
    delta_targets: Optional[tuple[str, ...]] = None
    adapter_targets: tuple[str, ...] = ADAPTER_TARGET_SETS
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
            if not is_int(value, minimum=1):
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
        """The settings every worker of one study must agree on (stored with the study): the run settings but the
        device (which may differ per worker), and the space."""
        data = {k: v for k, v in self.run.describe().items() if k != "device"}
        for name in SHARED_SETTINGS:
            value = getattr(self, name)
            data[name] = list(value) if isinstance(value, tuple) else value
        return data

    def target_sets(self, mode: str) -> tuple[str, ...]:
        """The target sets tried in ``mode``."""
        if mode == "adapter":
            return self.adapter_targets
        return self.delta_targets if self.delta_targets is not None else DELTA_TARGET_SETS
