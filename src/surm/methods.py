"""The fine-tuning methods surm can run under one training loop: its own families and PEFT's baselines.

A method turns command-line choices into a PEFT config (or None for full fine-tuning). Default learning rates
and alphas come from the sweep documented in ``docs/sweep.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from peft import BOFTConfig, C3AConfig, LoKrConfig, LoraConfig, PeftConfig

from .peft import SurmConfig
from .structures import STRUCTURES

PEFT_BASELINES = ("lora", "c3a", "lokr", "boft")
#: The SurmConfig settings a surm method's ``options`` may hold: all but the method itself (structure, mode,
#: target_modules, which MethodChoice holds) and PEFT's provenance fields (task type, base model, ...).
SURM_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in fields(SurmConfig)
    if f.name not in {g.name for g in fields(PeftConfig)} | {"structure", "mode", "target_modules"})
METHODS = (*STRUCTURES, *PEFT_BASELINES, "full")

#: Learning rates per method for AdamW (see docs/sweep.md for how they were chosen).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "full": 1e-4,
    "lora": 1e-3,
    "c3a": 1e-1,
    "lokr": 3e-3,
    "boft": 1e-2,
    "lowrank": 3e-3,
    "circulant": 3e-3,
    "toeplitz": 1e-3,
    "symmetric_toeplitz": 3e-3,
    "kronecker": 1e-2,
    "ldr": 3e-3,
    "monarch": 1e-2,
}
#: Learning rate of the classifier head (trained by every method); None means the method's own.
HEAD_LEARNING_RATE = 1e-3


@dataclass
class MethodChoice:
    """What the user asked for: a method name plus the options that apply to it.

    ``options`` holds family options (rank, nblocks, block_rank, factors, terms, displacement_rank,
    parameterization, bottleneck) and ``alpha`` / ``dropout``; ``block_size`` for C3A, ``rank`` / ``alpha`` for
    LoRA and LoKr, ``block_size`` for BOFT.
    """

    name: str
    targets: Optional[list[str]] = None
    mode: str = "delta"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid methods: {', '.join(METHODS)}")
        if self.mode not in ("delta", "adapter"):
            raise ValueError(f"mode must be 'delta' or 'adapter', got {self.mode!r}")
        if self.mode == "adapter" and self.name not in STRUCTURES:
            raise ValueError(f"mode 'adapter' applies to surm structures only, not to {self.name!r}")

    @property
    def label(self) -> str:
        """A short name for tables: the method, its mode if not delta, and its options."""
        parts = [self.name] + ([self.mode] if self.mode != "delta" else [])
        parts += [f"{k}={v}" for k, v in sorted(self.options.items()) if v is not None]
        return " ".join(parts)


def default_targets(mode: str) -> list[str]:
    """BERT-family module names adapted by default: q and v (delta), Houlsby placement (adapter)."""
    return ["query", "value"] if mode == "delta" else ["output.dense"]


def build_peft_config(choice: MethodChoice, task_type: Optional[str], head: list[str],
                      model_targets: Optional[list[str]] = None) -> Optional[PeftConfig]:
    """The PEFT config for ``choice``; None for full fine-tuning.

    Args:
        choice: the method and its options.
        task_type: PEFT's task type (``"SEQ_CLS"`` for Transformers classifiers) or None for plain modules.
        head: modules trained and saved besides the adapters (the classifier), used when task_type is None.
        model_targets: the model's own default targets (e.g. an image model's 1x1 convolutions), used when
            ``choice.targets`` is None; None falls back to :func:`default_targets` (BERT-family names).

    Raises:
        ValueError: for an option that does not apply to the method (naming the valid ones).
    """
    if choice.name == "full":
        if choice.options:
            raise ValueError(f"full fine-tuning takes no method options, got {sorted(choice.options)}")
        return None
    targets = choice.targets or model_targets or default_targets(choice.mode)
    common: dict[str, Any] = {"target_modules": targets, "task_type": task_type}
    if task_type is None:
        common["modules_to_save"] = head
    options = dict(choice.options)
    if choice.name in STRUCTURES:
        unknown = sorted(set(options) - set(SURM_OPTIONS))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to {choice.name}; surm options: {list(SURM_OPTIONS)}")
        if task_type is None or options.get("modules_to_save") is not None:  # the head is always trained and saved
            common["modules_to_save"] = sorted(set(head) | set(options.pop("modules_to_save", None) or []))
        return SurmConfig(structure=choice.name, mode=choice.mode, **options, **common)
    builders = {
        "lora": (LoraConfig, {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}, {"r": 8, "lora_alpha": 16}),
        "c3a": (C3AConfig, {"block_size": "block_size"}, {"block_size": 64}),
        "lokr": (LoKrConfig, {"rank": "r", "alpha": "alpha"}, {"r": 8, "alpha": 16}),
        "boft": (BOFTConfig, {"block_size": "boft_block_size"}, {"boft_block_size": 4}),
    }
    config_cls, renames, defaults = builders[choice.name]
    unknown = sorted(set(options) - set(renames))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to {choice.name}; its options are {sorted(renames)}")
    kwargs = {**defaults, **{renames[k]: v for k, v in options.items() if v is not None}}
    return config_cls(**kwargs, **common)
