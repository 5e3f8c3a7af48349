"""The fine-tuning methods surm can run under one training loop: its own families and PEFT's baselines.

A method turns the user's choices into a PEFT config (or None for full fine-tuning). Default learning rates come
from the sweep documented in ``docs/sweep.md``: a family declares its own (``default_lr``), a baseline's is in
:data:`BASELINES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft import BOFTConfig, C3AConfig, FourierFTConfig, LoKrConfig, LoraConfig, PeftConfig, VeraConfig

from .peft import SurmConfig
from .recommendation import recommended_recipe
from .structures import STRUCTURES, option_declarations


@dataclass(frozen=True)
class Baseline:
    """A PEFT method surm compares against.

    Attributes:
        config: its PEFT config class.
        options: surm's option name -> (the config's field, the value type), e.g. ``rank -> ("r", int)``.
        defaults: the config fields surm sets unless an option overrides them.
        lr: the AdamW learning rate that works for it (``docs/sweep.md``).
    """

    config: type[PeftConfig]
    options: dict[str, tuple[str, type]]
    defaults: dict[str, Any]
    lr: float


#: PEFT's own methods, beside surm's families.
BASELINES: dict[str, Baseline] = {
    "lora": Baseline(LoraConfig, {"rank": ("r", int), "alpha": ("lora_alpha", float),
                               "dropout": ("lora_dropout", float)}, {"r": 8, "lora_alpha": 16}, 1e-3),
    "c3a": Baseline(C3AConfig, {"block_size": ("block_size", int)}, {"block_size": 64}, 1e-1),
    "lokr": Baseline(LoKrConfig, {"rank": ("r", int), "alpha": ("alpha", float)}, {"r": 8, "alpha": 16}, 3e-3),
    "boft": Baseline(BOFTConfig, {"block_size": ("boft_block_size", int)}, {"boft_block_size": 4}, 1e-2),
    # VeRA: frozen random A, B shared by all layers, trained scalings diag(b) B diag(d) A: r + out numbers per layer.
    "vera": Baseline(VeraConfig, {"rank": ("r", int)}, {"r": 256}, 1e-2),
    # FourierFT: n trained entries of ΔW's 2-D spectrum at random frequencies, ΔW = scaling * Re(IDFT2(S)).
    "fourierft": Baseline(FourierFTConfig, {"n_frequency": ("n_frequency", int), "scaling": ("scaling", float)},
                          {"n_frequency": 1000, "scaling": 150.0}, 1e-1),
}
#: Learning rate of full fine-tuning (every weight trained).
FULL_FINETUNING_LR = 1e-4
METHODS = (*STRUCTURES, *BASELINES, "full")
#: The SurmConfig settings a surm method's ``options`` may hold: all but the method itself (structure, mode,
#: target_modules, which MethodChoice holds) and PEFT's provenance fields (task type, base model, ...).
SURM_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in fields(SurmConfig)
    if f.name not in {g.name for g in fields(PeftConfig)} | {"structure", "mode", "target_modules"})


def default_learning_rate(method: str) -> float:
    """The AdamW learning rate a method gets when none is given: a family's ``default_lr``, a baseline's ``lr``,
    :data:`FULL_FINETUNING_LR` for ``"full"`` (how they were chosen: ``docs/sweep.md``)."""
    if method in STRUCTURES:
        return STRUCTURES[method].default_lr
    if method in BASELINES:
        return BASELINES[method].lr
    if method == "full":
        return FULL_FINETUNING_LR
    raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


@dataclass(frozen=True)
class MethodOption:
    """A method option of the command line: how to read its text, and what it means (per method)."""

    parse: Callable[[str], Any]
    help: str


def method_options() -> dict[str, MethodOption]:
    """Every method option the command line takes: the families' declared options, SurmConfig's settings marked for
    the command line (alpha, dropout, ...), and the baselines' own options (``block_size``).

    Raises:
        TypeError: if two of them give the same name different types.
    """
    kinds: dict[str, Any] = {}
    parsers: dict[str, Callable[[str], Any]] = {}
    helps: dict[str, list[str]] = {}

    def add(name: str, kind: Any, parse: Callable[[str], Any], text: str) -> None:
        if kinds.setdefault(name, kind) is not kind:
            raise TypeError(f"method option {name!r} is of kind {kind.__name__} in one method, of kind "
                            f"{kinds[name].__name__} in another")
        parsers.setdefault(name, parse)
        helps.setdefault(name, []).append(text)

    for name, declared in option_declarations().items():
        for family, option in declared.items():
            add(name, option.kind, option.parse, f"{family}: {option.help} (default {option.default!r})")
    for f in fields(SurmConfig):
        if "cli" in f.metadata:
            add(f.name, f.metadata["cli"], f.metadata["cli"], f"surm: {f.metadata['help']}")
    for method, baseline in BASELINES.items():
        for name, (field_name, kind) in baseline.options.items():
            add(name, kind, kind, f"{method}: {baseline.config.__name__}.{field_name}")
    return {name: MethodOption(parsers[name], "; ".join(helps[name])) for name in parsers}


@dataclass
class MethodChoice:
    """What the user asked for: a method name plus the options that apply to it.

    For a surm family, ``options`` holds SurmConfig settings (:data:`SURM_OPTIONS`: the family's options, alpha,
    dropout, bottleneck, execution, ...); for a baseline, the options of :data:`BASELINES` (``rank``, ``alpha``,
    ``dropout``, ``block_size``).
    """

    name: str
    targets: Optional[Union[list[str], str]] = None  # module names, or a regex (a --config file's target_modules)
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
        """A short name for tables: the method, its mode if not delta, its options, and its targets if given."""
        parts = [self.name] + ([self.mode] if self.mode != "delta" else [])
        parts += [f"{k}={v}" for k, v in sorted(self.options.items()) if v is not None]
        if self.targets:
            parts.append(f"on {self.targets if isinstance(self.targets, str) else ','.join(self.targets)}")
        return " ".join(parts)


def recommended_method(model: Any, budget_params: int) -> tuple[MethodChoice, float]:
    """The method :func:`surm.recommend` builds for ``model`` and ``budget_params`` as a MethodChoice (its targets in
    the recommendation's priority order), and the recipe's learning rate."""
    recipe, targets = recommended_recipe(model, budget_params)
    return MethodChoice(recipe.family, targets=targets, options=recipe.settings(targets)), recipe.lr


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
    baseline = BASELINES[choice.name]
    unknown = sorted(set(options) - set(baseline.options))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to {choice.name}; its options are "
                         f"{sorted(baseline.options)}")
    kwargs = {**baseline.defaults, **{baseline.options[k][0]: v for k, v in options.items() if v is not None}}
    return baseline.config(**kwargs, **common)
