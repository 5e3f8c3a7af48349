"""Datasets for fine-tuning: embedded real data sets, local CSV/TSV/JSON(L) files, seeded stratified splits,
and numpy-only metrics.

>>> from surm.data import load_dataset
>>> data = load_dataset("trec")  # doctest: +SKIP
>>> data.num_labels, len(data.train), data.train[0].text  # doctest: +SKIP
"""

from .catalog import EMBEDDED
from .examples import DatasetSplits, Example, ImageExample, TextExample
from .loading import load_dataset
from .metrics import accuracy, confusion_matrix, is_imbalanced, macro_f1, macro_f1_of, recall_per_class
from .readers import SUPPORTED

__all__ = [
    "EMBEDDED",
    "SUPPORTED",
    "DatasetSplits",
    "Example",
    "ImageExample",
    "TextExample",
    "accuracy",
    "confusion_matrix",
    "is_imbalanced",
    "load_dataset",
    "macro_f1",
    "macro_f1_of",
    "recall_per_class",
]
