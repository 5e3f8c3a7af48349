"""What every model loader returns: the classifier, how to batch its examples, and what PEFT needs to know."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

Collate = Callable[[Sequence[Any]], dict[str, Tensor]]


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout layer of ``model`` (each ``nn.Dropout``: Transformers' attention and hidden dropouts read
    theirs at call time, a head's too) to ``probability``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability


@dataclass
class LoadedModel:
    """A classifier ready for PEFT.

    ``model(**batch)`` returns logits (or an output with ``.logits``) for ``batch = collate(examples)`` minus its
    ``labels``; ``task_type`` is PEFT's task type (None for plain modules); ``head`` names the freshly initialised
    classifier modules that every method trains; ``default_targets`` are the modules adapted when the user names
    none (None: the BERT-family defaults of :func:`surm.methods.default_targets`); ``pooling`` is how the token
    states reach the head (one of ``surm.models.text.TEXT_POOLINGS`` but ``auto``; ``model`` for image models).
    """

    name: str
    model: nn.Module
    collate: Collate
    task_type: Optional[str]
    head: list[str]
    source: str
    default_targets: Optional[list[str]] = None
    pooling: str = "model"
