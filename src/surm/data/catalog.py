"""The datasets embedded in the package (built by scripts/build_datasets.py; see embedded/PROVENANCE.md)."""

from __future__ import annotations

import gzip
import io
import json
from importlib import resources
from typing import Any

import numpy as np

TEXT_SETS = {"mr": "mr.jsonl.gz", "trec": "trec.jsonl.gz", "sms": "sms.jsonl.gz"}
IMAGE_SETS = {"digits": "digits.npz", "mnist": "mnist.npz"}
EMBEDDED = tuple(TEXT_SETS) + tuple(IMAGE_SETS)


def _read(filename: str) -> bytes:
    return resources.files(__package__).joinpath("embedded", filename).read_bytes()


def text_records(name: str) -> list[dict[str, Any]]:
    """The rows of embedded text set ``name`` as dicts with ``text`` and ``label`` (the class name)."""
    with gzip.open(io.BytesIO(_read(TEXT_SETS[name])), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def image_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Embedded image set ``name`` as (float32 images N x H x W scaled to [0, 1], int64 digit labels)."""
    with np.load(io.BytesIO(_read(IMAGE_SETS[name])), allow_pickle=False) as arrays:
        images = arrays["images"].astype(np.float32) / float(arrays["max_value"])
        return images, arrays["labels"].astype(np.int64)
