"""Optional fallback: load a dataset by name with the Hugging Face ``datasets`` package."""

from __future__ import annotations

import importlib.util
from typing import Any


def datasets_available() -> bool:
    """Whether the ``datasets`` package can be imported."""
    return importlib.util.find_spec("datasets") is not None


def hub_records(name: str, label_column: str) -> tuple[list[dict[str, Any]], list[str]]:
    """All labelled rows of every split of ``datasets.load_dataset(name)``, and the column names.

    A ``ClassLabel`` label column is turned into its class names; rows labelled -1 (unlabelled test splits, as in
    GLUE) are dropped. The caller re-splits the pooled rows with its own seeded, stratified split.
    """
    import datasets

    loaded = datasets.load_dataset(name)
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    records: list[dict[str, Any]] = []
    columns: list[str] = []
    for split in splits:
        columns += [c for c in split.column_names if c not in columns]
        feature = split.features.get(label_column)
        names = getattr(feature, "names", None)
        for row in split:
            label = row.get(label_column)
            if names is not None and isinstance(label, int):
                if label < 0:
                    continue
                row = {**row, label_column: names[label]}
            records.append(row)
    return records, columns
