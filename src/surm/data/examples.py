"""The containers that :func:`surm.data.load_dataset` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TextExample:
    """One text classification example: ``text`` (and optionally ``text_pair``) with a class index ``label``."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True, eq=False)
class ImageExample:
    """One image classification example: a float32 ``image`` (H x W, values in [0, 1]) and a class index ``label``."""

    image: np.ndarray
    label: int


Example = TextExample | ImageExample
SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset split into train/validation/test, with its class names.

    ``label`` values of the examples index into ``label_names``; ``kind`` is ``"text"`` or ``"image"``.
    """

    name: str
    kind: Literal["text", "image"]
    label_names: tuple[str, ...]
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    @property
    def num_labels(self) -> int:
        """The number of classes."""
        return len(self.label_names)

    def split(self, name: str) -> list[Example]:
        """The split called ``name`` (one of ``"train"``, ``"validation"``, ``"test"``)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def labels(self, name: str) -> np.ndarray:
        """The class indices of split ``name`` as an int64 array."""
        return np.array([example.label for example in self.split(name)], dtype=np.int64)
