"""Loading the model to fine-tune: a text classifier for text sets, an image classifier for image sets."""

from __future__ import annotations

from ..data import DatasetSplits
from .loaded import Collate, LoadedModel
from .text import TEXT_MODEL_ALIASES, load_text_classifier, minilm_path, text_collate
from .vision import IMAGE_MODELS, load_image_classifier


def load_model(name: str, data: DatasetSplits, max_length: int = 64) -> LoadedModel:
    """The classifier for ``data``: a text model for text sets, an image model for image sets.

    Raises:
        ValueError: if the model cannot be loaded or does not fit the data's kind.
    """
    if data.kind == "image":
        return load_image_classifier(name, data)
    if name in IMAGE_MODELS:
        raise ValueError(
            f"model {name!r} is an image model but dataset {data.name!r} holds text; use a text model (an alias: "
            f"{', '.join(TEXT_MODEL_ALIASES)}, a local folder or a Hugging Face id)"
        )
    return load_text_classifier(name, data.num_labels, max_length)


__all__ = [
    "IMAGE_MODELS",
    "TEXT_MODEL_ALIASES",
    "Collate",
    "LoadedModel",
    "load_image_classifier",
    "load_model",
    "load_text_classifier",
    "minilm_path",
    "text_collate",
]
