"""SurmConfig: the PEFT configuration of a structured adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ..execution import EXECUTIONS
from ..insertion import ACTIVATIONS
from ..structures import STRUCTURES, option_declarations, structure_options
from ..validation import is_finite_number, is_int, is_number, parse_bool
from .registration import SURM_PEFT_TYPE

MODES = ("delta", "adapter")
#: Config fields forwarded to the family constructor when set (None: the family's default): one per option name
#: that some registered family declares (:attr:`surm.structures.StructuredMatrix.options`).
FAMILY_OPTION_FIELDS: tuple[str, ...] = tuple(option_declarations())
#: Keys an ``override_pattern`` entry may set.
OVERRIDABLE = ("structure", *FAMILY_OPTION_FIELDS, "alpha", "bottleneck")
#: The field annotation of each kind of family option.
_OPTION_ANNOTATIONS = {int: "Optional[int]", str: "Optional[str]", tuple: "Optional[list[int]]"}


def _with_family_options(cls: type) -> type:
    """Add one field per family option name of the registry to ``cls`` before ``@dataclass`` makes it a dataclass.

    Each is None by default (the family's own default) and its help names every family that has the option.
    """
    for name, declarations in option_declarations().items():
        kind = next(iter(declarations.values())).kind
        text = " ".join(f"{family}: {option.help} (default {option.default!r})."
                        for family, option in declarations.items())
        cls.__annotations__[name] = _OPTION_ANNOTATIONS[kind]
        setattr(cls, name, field(default=None, metadata={"help": text}))
    return cls


@dataclass
@_with_family_options
class SurmConfig(PeftConfig):
    """Configuration of a surm adapter: a structured matrix as LoRA's ΔW ("delta") or as an Adapter ("adapter").

    Mode ``"delta"``: ``h = W0 x + b + alpha · M(dropout(x))`` on ``nn.Linear``, Transformers' ``Conv1D`` and 1x1
    ``nn.Conv2d``; mergeable. Mode ``"adapter"``: on the output h of each targeted module,
    ``h <- h + act(S · dropout(h)) + b`` with S a structured d x d map (SURM-Adapter, the identity at start), or
    with ``bottleneck=k``, ``h <- h + U act(D · dropout(h))`` with structured D (k x d), U (d x k), U = 0 at start.
    With ``adapter_bias=False`` there is no b; with ``activation="identity"`` too, the adapter is the linear
    ``h <- (I + S) h``, a multiplicative update of the module (W0 x + b0 -> (I + S)(W0 x + b0)).

    The family's options (``rank``, ``nblocks``, ``block_rank``, ``factors``, ``terms``, ``displacement_rank``,
    ``parameterization``, ...) are fields too, one per option name a registered family declares; None means the
    family's default.

    Raises:
        ValueError: for a field of the wrong type or outside its range (``dropout="0.1"``, NaN dropout, ``rank=8.0``),
            naming the field, the value and what is valid. Values that depend on a layer's shape (``rank`` <=
            max(m, n), divisors, ``bottleneck`` <= d) are checked when the adapter is added to that layer.
    """

    structure: str = field(
        default="circulant",
        metadata={"help": f"Structured family of M (or S): one of {sorted(STRUCTURES)}."},
    )
    mode: Literal["delta", "adapter"] = field(
        default="delta", metadata={"help": "'delta' (structured ΔW, mergeable) or 'adapter' (on module outputs)."}
    )
    # Settings marked "cli" are also ``surm finetune`` flags (of that type).
    alpha: float = field(
        default=1.0, metadata={"cli": float, "help": "Scale s of the update: h = W0 x + s · M x (delta mode)."}
    )
    dropout: float = field(default=0.0, metadata={"cli": float, "help": "Dropout probability on the adapter's input."})
    bottleneck: Optional[int] = field(
        default=None,
        metadata={"cli": int,
                  "help": "Adapter mode: bottleneck width k (h + U act(D h)); None for SURM's single d x d map."},
    )
    activation: str = field(
        default="gelu", metadata={"cli": str, "help": f"Adapter mode: the non-linearity act, one of {ACTIVATIONS}."}
    )
    adapter_bias: bool = field(
        default=True,
        metadata={"cli": parse_bool,
                  "help": "Adapter mode without a bottleneck: train the bias b of h + act(S h) + b (d more parameters "
                  "per adapter); false leaves it out (with activation identity: h <- (I + S) h)."},
    )
    execution: str = field(
        default="auto",
        metadata={
            "cli": str,
            "help": f"How M (adapter mode: S) is applied, one of {EXECUTIONS}. 'structured': the family's fast "
            "apply on every token (FFT, small products). 'dense': dense(M) built once per forward (gradients reach "
            "M's parameters through dense()); in delta mode folded into the base layer's product, W0 + alpha · "
            "dense(M); a small matrix's kept between eval-mode calls that record no gradient (generation). 'auto': "
            "per layer and call, the cheaper by surm.execution's cost model (tokens, shape, device, training or "
            "not). All give the same values; only speed and memory differ."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match), a regex (full match) or 'all-linear'. Default for BERT-like "
            "models: query, value (delta) or output.dense (adapter: after attention output and FFN output)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of target_modules."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save, e.g. ['classifier']."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layer') used with layers_to_transform."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the adapted model equals the base model at start. False: random non-zero (tests)."},
    )
    override_pattern: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module overrides, like PEFT's rank_pattern: regex matched against the end of the module "
            f"name -> dict of {list(OVERRIDABLE)}, e.g. {{'value': {{'structure': 'monarch', 'nblocks': 2}}}}. "
            "An entry "
            "that changes the structure does not inherit the config's family options."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SURM_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        for name in FAMILY_OPTION_FIELDS:  # pairs are stored as lists, as JSON gives them back
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:  # NaN fails the comparison too
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.bottleneck is not None and self.mode != "adapter":
            raise ValueError(f"bottleneck={self.bottleneck!r} needs mode='adapter', got mode={self.mode!r}")
        if not isinstance(self.adapter_bias, bool):
            raise ValueError(f"adapter_bias must be True or False, got {self.adapter_bias!r}")
        if not self.adapter_bias and self.mode != "adapter":
            raise ValueError(f"adapter_bias=False needs mode='adapter' (delta mode has no adapter bias), got "
                             f"mode={self.mode!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if not isinstance(self.override_pattern, dict):
            raise ValueError(f"override_pattern must be a dict, got {type(self.override_pattern).__name__}")
        self._check_settings(self._base_settings(), "SurmConfig")  # the defaults, before any pattern is matched
        for pattern, overrides in self.override_pattern.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"override_pattern key {pattern!r} is not a valid regex: {error}") from None
            if not isinstance(overrides, dict):
                raise ValueError(f"override_pattern[{pattern!r}] must be a dict, got {overrides!r}")
            unknown = sorted(set(overrides) - set(OVERRIDABLE))
            if unknown:
                raise ValueError(f"override_pattern[{pattern!r}] has unknown key(s) {unknown}; "
                                 f"valid: {list(OVERRIDABLE)}")
            if overrides.get("bottleneck") is not None and self.mode != "adapter":
                raise ValueError(
                    f"override_pattern[{pattern!r}] sets bottleneck={overrides['bottleneck']!r}, which needs "
                    f"mode='adapter', got mode={self.mode!r}"
                )
            self._check_settings(self._overridden_settings(overrides), f"override_pattern[{pattern!r}]")

    def _base_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OVERRIDABLE}

    def _overridden_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The config's settings updated by one ``override_pattern`` entry.

        An entry that switches to another family inherits none of the config's family options: they describe the
        config's family (``rank`` of ``lowrank`` is not ``rank`` of ``kronecker``), so only the entry's own apply.
        """
        settings = self._base_settings()
        if overrides.get("structure", self.structure) != self.structure:
            settings.update(dict.fromkeys(FAMILY_OPTION_FIELDS))
        settings.update(overrides)
        return settings

    def resolve(self, module_name: str) -> dict[str, Any]:
        """The settings for one module: the config's, updated by the first matching ``override_pattern`` entry.

        Patterns match whole trailing name segments (``"up"`` matches ``"encoder.layers.0.up"``, not ``"...setup"``).

        Returns a dict with ``structure``, ``options`` (the family keyword arguments that are set), ``alpha`` and
        ``bottleneck``.
        """
        settings = self._base_settings()
        for pattern, overrides in self.override_pattern.items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module_name):
                settings = self._overridden_settings(overrides)
                break
        return self._check_settings(settings, "SurmConfig")

    @staticmethod
    def _check_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
        name = settings["structure"]
        if name not in STRUCTURES:
            raise ValueError(f"{where}: unknown structure {name!r}; valid structures: {sorted(STRUCTURES)}")
        valid = structure_options(name)
        options = {k: settings[k] for k in FAMILY_OPTION_FIELDS if settings.get(k) is not None}
        invalid = sorted(set(options) - set(valid))
        if invalid:
            raise ValueError(
                f"{where}: option(s) {invalid} do not apply to structure {name!r}; "
                f"its options are {[o for o in valid if o != 'init']}"
            )
        # Kinds here; values against the layer's shape (rank <= max(m, n), divisors, ...) when the family is built.
        declared = {option.name: option for option in STRUCTURES[name].options}
        options = {key: declared[key].check_type(value, where) for key, value in options.items()}
        bottleneck = settings.get("bottleneck")
        if bottleneck is not None and not (is_int(bottleneck, minimum=1)):
            raise ValueError(f"{where}: bottleneck must be a positive integer or None, got {bottleneck!r}")
        alpha = settings.get("alpha")
        if not is_finite_number(alpha):
            raise ValueError(f"{where}: alpha must be a finite number, got {alpha!r}")
        return {"structure": name, "options": options, "alpha": float(alpha), "bottleneck": bottleneck}

