"""Loading the model to fine-tune: a text classifier for text sets, an image classifier for image sets."""

from __future__ import annotations

from typing import Optional

from ..data import DatasetSplits
from .loaded import Collate, LoadedModel
from .text import (
    DEFAULT_POOLING,
    TEXT_MODEL_ALIASES,
    TEXT_POOLINGS,
    declared_pooling,
    load_text_classifier,
    minilm_path,
    text_collate,
)
from .vision import IMAGE_MODELS, load_image_classifier


def load_model(name: str, data: DatasetSplits, max_length: int = 64, pooling: str = DEFAULT_POOLING,
               dropout: Optional[float] = None) -> LoadedModel:
    """The classifier for ``data``: a text model for text sets (``pooling``: one of :data:`TEXT_POOLINGS`), an image
    model for image sets (which average their feature map: ``pooling`` must be ``auto`` or ``model``). ``dropout``,
    where given, replaces the model's dropout probabilities (see the two loaders); None keeps them.

    Raises:
        ValueError: if the model cannot be loaded or does not fit the data's kind, or for a pooling that does not
            apply.
    """
    if data.kind == "image":
        if pooling not in ("auto", "model"):
            raise ValueError(f"pooling {pooling!r} applies to text models; image models average their feature map "
                             "(use pooling 'auto' or 'model')")
        return load_image_classifier(name, data, dropout)
    if name in IMAGE_MODELS:
        raise ValueError(
            f"model {name!r} is an image model but dataset {data.name!r} holds text; use a text model (an alias: "
            f"{', '.join(TEXT_MODEL_ALIASES)}, a local folder or a Hugging Face id)"
        )
    return load_text_classifier(name, data.num_labels, max_length, pooling, dropout)


__all__ = [
    "DEFAULT_POOLING",
    "IMAGE_MODELS",
    "TEXT_MODEL_ALIASES",
    "TEXT_POOLINGS",
    "Collate",
    "LoadedModel",
    "declared_pooling",
    "load_image_classifier",
    "load_model",
    "load_text_classifier",
    "minilm_path",
    "text_collate",
]
