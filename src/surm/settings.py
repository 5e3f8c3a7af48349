"""The run settings: everything that defines a fine-tuning run besides its method and output folder.

One frozen dataclass, validated once in ``__post_init__``; ``surm finetune``, ``compare`` and ``search`` take it,
their command-line flags are generated from its fields (:func:`surm.cli.add_settings_arguments`), and a comparison
passes it to its child runs as flags (:meth:`RunSettings.to_flags`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from .models.text import DEFAULT_POOLING, TEXT_POOLINGS, check_pooling
from .validation import is_finite_number, is_int, is_number

#: Learning rate of the classifier head, which every method trains. 1e-2 was chosen on validation (seed 0, MiniLM,
#: 4,000 examples, 2 epochs; docs/results/accuracy_per_parameter.md): against 1e-3 it averaged +0.59 points over
#: LoRA and circulant on mr, trec and sms, and it lets trec's rare class (ABBR) be learnt at all in 500 steps.
HEAD_LEARNING_RATE = 1e-2


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunSettings:
    """How a run trains: data, model, schedule, device and seed. ``lr=None`` means the method's default.

    Raises:
        ValueError: for a value out of range, naming the setting, the value and what is valid.
    """

    model: str = _setting("minilm", "'minilm', 'efficientnet-lite0', a Hugging Face model id or a local folder")
    dataset: str = _setting("mr", "mr, trec, sms, digits, mnist, a local CSV/TSV/JSONL file or a Hugging Face id")
    text_column: str = _setting("text", "the text column of a data file")
    text_pair_column: Optional[str] = _setting(None, "a second text column, for sentence-pair tasks")
    label_column: str = _setting("label", "the label column of a data file")
    epochs: int = _setting(3, "passes over the training split")
    batch_size: int = _setting(32, "global batch size (split over processes)")
    lr: Optional[float] = _setting(None, "learning rate of the adapter (default: the method's)")
    head_lr: float = _setting(HEAD_LEARNING_RATE, "learning rate of the classifier head")
    weight_decay: float = _setting(0.0, "AdamW's decoupled weight decay")
    warmup_ratio: float = _setting(0.06, "fraction of the steps with a linear warm-up of the learning rate")
    max_grad_norm: Optional[float] = _setting(None, "clip the global L2 norm of the trainable parameters' gradients "
                                              "to this value before each step (Transformers' Trainer clips at 1.0); "
                                              "default: no clipping")
    model_dropout: Optional[float] = _setting(None, "dropout probability of the model and its head, replacing every "
                                              "dropout of the checkpoint (attention, hidden, head; the image "
                                              "model's drop-connect rate); 0 turns them off; default: the "
                                              "checkpoint's own")
    max_length: int = _setting(64, "tokens per text (longer texts are truncated)")
    pooling: str = _setting(DEFAULT_POOLING, f"text models: how token states reach the head, one of "
                            f"{', '.join(TEXT_POOLINGS)} (the checkpoint's declared pooling, e.g. a sentence-transformers "
                            "model's masked mean; the Transformers classifier's own, e.g. BERT's [CLS] pooler; the "
                            "masked mean)")
    train_size: Optional[int] = _setting(None, "train on a seeded subset of this many examples")
    eval_size: Optional[int] = _setting(None, "evaluate on seeded subsets of this size")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N")
    seed: int = _setting(0, "seed of the data order, the subsets and the initialisation")

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "text_column", "label_column", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.text_pair_column is not None and (not isinstance(self.text_pair_column, str)
                                                  or not self.text_pair_column):
            raise ValueError(f"text_pair_column must be a non-empty string or None, got {self.text_pair_column!r}")
        check_pooling(self.pooling)
        for name in ("epochs", "batch_size", "max_length"):
            if not is_int(getattr(self, name), minimum=1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if value is not None and not is_int(value, minimum=1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not is_int(self.seed, minimum=0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and not (is_finite_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        if self.model_dropout is not None and not (is_number(self.model_dropout) and 0 <= self.model_dropout < 1):
            raise ValueError(f"model_dropout must be in [0, 1) or None, got {self.model_dropout!r}")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                              and self.device[5:].isdigit()):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def describe(self) -> dict[str, Any]:
        """The settings as a plain dict (for results.json and the checks that a run is the same)."""
        return asdict(self)

    def to_flags(self, *, always: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
        """The command-line flags that give these settings: every setting that differs from its default (and those
        in ``always``), except those in ``exclude``."""
        flags: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in exclude or value is None or (value == f.default and f.name not in always):
                continue
            flags += [f"--{f.name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
        return flags


def setting_types() -> dict[str, type]:
    """Each run setting's value type (``int`` for ``Optional[int]``), for parsing command-line text."""
    hints = get_type_hints(RunSettings)
    types = {}
    for name, hint in hints.items():
        if get_origin(hint) is Union:
            hint = next(a for a in get_args(hint) if a is not type(None))
        types[name] = hint
    return types


def setting_defaults() -> dict[str, Any]:
    """Each run setting's default."""
    return {f.name: f.default for f in fields(RunSettings) if f.default is not MISSING}
