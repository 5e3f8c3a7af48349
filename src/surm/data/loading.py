"""``load_dataset``: one entry point for embedded sets, local files and (optionally) Hugging Face datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import catalog, hub
from .examples import DatasetSplits, ImageExample, TextExample
from .labels import encode_labels
from .readers import SUPPORTED, read_records
from .splitting import check_fractions, stratified_split

# Suffixes that mark a string as a file name rather than a Hub dataset name, even when no such file exists.
_FILE_SUFFIXES = set(SUPPORTED) | {".txt", ".parquet", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".npz", ".npy"}


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in _FILE_SUFFIXES or name.startswith(("/", "./", "../", "~", ".\\"))


def _text_column(records: list[dict[str, Any]], column: str, role: str, source: str) -> list[str]:
    """The non-empty strings of ``column``; ValueError naming the first rows (from 1) that lack one."""
    values = [record.get(column) for record in records]
    bad = [row for row, value in enumerate(values, 1) if not isinstance(value, str) or not value.strip()]
    if bad:
        value = values[bad[0] - 1]
        what = "no value" if value is None else "an empty string" if isinstance(value, str) else \
            f"a {type(value).__name__} ({value!r}), not a string"
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise ValueError(f"{source}: row {bad[0]} has {what} in {role} column {column!r}{more}")
    return values


def _text_splits(name: str, records: list[dict[str, Any]], columns: list[str], *, source: str, text_column: str,
                 text_pair_column: str | None, label_column: str, seed: int, validation_fraction: float,
                 test_fraction: float) -> DatasetSplits:
    """Validate columns, texts and labels of ``records``, then split them."""
    if not records:
        raise ValueError(f"empty dataset: {source} has no rows")
    wanted = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    for argument, column in wanted.items():
        if column is not None and column not in columns:
            raise ValueError(f"{source}: column {column!r} ({argument}) not found; columns found: "
                             f"{', '.join(map(repr, columns))}")
    texts = _text_column(records, text_column, "text", source)
    pairs = _text_column(records, text_pair_column, "text pair", source) if text_pair_column else None
    labels, label_names = encode_labels([r.get(label_column) for r in records], column=label_column, source=source)
    parts = stratified_split(labels, label_names, seed=seed, validation_fraction=validation_fraction,
                             test_fraction=test_fraction, source=source)
    train, validation, test = ([TextExample(texts[i], labels[i], pairs[i] if pairs else None) for i in part]
                               for part in parts)
    return DatasetSplits(name, "text", label_names, train, validation, test)


def _image_splits(name: str, *, seed: int, validation_fraction: float, test_fraction: float) -> DatasetSplits:
    images, labels = catalog.image_arrays(name)
    label_names = tuple(str(d) for d in range(int(labels.max()) + 1))
    parts = stratified_split(labels, label_names, seed=seed, validation_fraction=validation_fraction,
                             test_fraction=test_fraction, source=name)
    train, validation, test = ([ImageExample(images[i], int(labels[i])) for i in part] for part in parts)
    return DatasetSplits(name, "image", label_names, train, validation, test)


def load_dataset(name_or_path: str | Path, *, text_column: str = "text", text_pair_column: str | None = None,
                 label_column: str = "label", seed: int = 0, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> DatasetSplits:
    """Load a classification dataset and split it into train/validation/test.

    ``name_or_path`` is, in order of precedence:

    * an embedded name: ``mr``, ``trec``, ``sms`` (text; columns ``text`` and ``label``) or ``digits``, ``mnist``
      (images; the column arguments are ignored); see ``surm/data/embedded/PROVENANCE.md``;
    * a local ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file, whose columns are chosen by ``text_column``,
      ``text_pair_column`` (optional second text) and ``label_column``; labels may be strings or integers and
      are numbered in sorted order (numerically for numbers, by name otherwise);
    * any other name is passed to ``datasets.load_dataset`` when the ``datasets`` package is installed (text only;
      all labelled rows of all its splits are pooled and re-split).

    Splits are stratified by label and depend only on ``seed`` (the same seed gives the same splits on any
    machine); each class contributes ``round(n * fraction)`` examples (at least 1) to validation and test.

    Raises:
        ValueError: before any training, for a missing file, an unsupported extension, a missing column, an
            empty dataset, unusable labels, text that is not UTF-8, a class too small to stratify, or an unknown
            name.
    """
    check_fractions(validation_fraction, test_fraction)
    split_args = {"seed": seed, "validation_fraction": validation_fraction, "test_fraction": test_fraction}
    name = str(name_or_path)
    columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    if not isinstance(name_or_path, Path) and name in catalog.TEXT_SETS:
        return _text_splits(name, catalog.text_records(name), ["text", "label"], source=f"embedded dataset {name!r}",
                            **columns, **split_args)
    if not isinstance(name_or_path, Path) and name in catalog.IMAGE_SETS:
        return _image_splits(name, **split_args)
    path = Path(name).expanduser()
    if path.is_dir() and not hub.datasets_available():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED)[:5]
        raise ValueError(f"dataset {name!r} is a folder; surm reads one data file ({', '.join(SUPPORTED)}): "
                         "pass a file "
                         f"inside it{' (found: ' + ', '.join(files) + ')' if files else ''}, or an embedded dataset "
                         f"({', '.join(catalog.EMBEDDED)}); a folder can be read only through the 'datasets' package, "
                         "which is not installed")
    if path.is_file() or isinstance(name_or_path, Path) or _looks_like_path(name):
        if not path.exists():
            raise ValueError(f"file not found: {path}")
        if not path.is_file():
            raise ValueError(f"not a file: {path}")
        if path.suffix.lower() not in SUPPORTED:
            raise ValueError(f"unsupported file extension {path.suffix or '(none)'!r} for {path}; "
                             f"supported: {', '.join(SUPPORTED)}")
        records, found = read_records(path)
        return _text_splits(path.stem, records, found, source=str(path), **columns, **split_args)
    unknown = (f"{name!r} is neither an embedded dataset ({', '.join(catalog.EMBEDDED)}) nor an existing local "
               f"file ({', '.join(SUPPORTED)})")
    if not hub.datasets_available():
        raise ValueError(f"{unknown}, and it cannot be loaded from the Hugging Face Hub because the 'datasets' "
                         "package is not installed (and the Hub may be offline)")
    try:
        records, found = hub.hub_records(name, label_column)
    except Exception as error:  # any failure of the optional loader becomes one clear message
        raise ValueError(f"{unknown}, and datasets.load_dataset({name!r}) failed (is the Hub reachable?): "
                         f"{type(error).__name__}: {error}") from error
    return _text_splits(name, records, found, source=f"Hugging Face dataset {name!r}", **columns, **split_args)
