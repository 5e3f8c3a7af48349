"""Read a local CSV, TSV, JSON lines or JSON file into a list of records (dicts), with clear errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
SUPPORTED = tuple(READERS)

Records = list[dict[str, Any]]


def _decode(path: Path) -> str:
    """The file's text; ValueError naming the byte offset and line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = bom + error.start
        line = data[:offset].count(b"\n") + 1
        raise ValueError(f"{path} is not valid UTF-8: byte {data[offset:offset + 1]!r} at byte offset {offset} "
                         f"(line {line}); re-save the file as UTF-8") from None


def _columns(records: Records) -> list[str]:
    """Every key found in the records, in first-seen order."""
    return list(dict.fromkeys(key for record in records for key in record))


def _read_delimited(path: Path, text: str, delimiter: str) -> tuple[Records, list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [row for row in reader if row]
    except csv.Error as error:
        raise ValueError(f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} near line "
                         f"{reader.line_num}: {error}") from None
    if not rows:
        return [], []
    header, records = [name.strip() for name in rows[0]], []
    for number, row in enumerate(rows[1:], start=1):
        if len(row) > len(header):
            raise ValueError(f"{path}: row {number} has {len(row)} fields but the header has {len(header)} "
                             f"({', '.join(header)}); check the delimiter and the quoting of text fields")
        records.append(dict(zip(header, row)))  # short rows simply lack the trailing columns
    return records, header


def _json_records(path: Path, data: Any) -> Records:
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: the columns of this JSON object have different lengths {sorted(lengths)}")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return data
    raise ValueError(f"{path}: expected a JSON list of objects (one per example) or an object mapping column names "
                     f"to equal-length lists, got {type(data).__name__}")


def _read_jsonl(path: Path, text: str) -> Records:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise ValueError(f"{path}: line {number} is a JSON {kind}, expected an object")  # noqa: TRY004
        records.append(record)
    return records


def read_records(path: Path) -> tuple[Records, list[str]]:
    """Read ``path`` (``.csv``, ``.tsv``, ``.jsonl`` or ``.json``) into ``(records, columns)``.

    A ``.json`` file may hold a list of objects, an object of equal-length column lists, or JSON lines.
    """
    kind = READERS[path.suffix.lower()]
    text = _decode(path)
    if kind in ("csv", "tsv"):
        return _read_delimited(path, text, "," if kind == "csv" else "\t")
    if kind == "json" and text.strip():
        try:
            records = _json_records(path, json.loads(text))
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data" after the first value: JSON lines in a .json file
                raise ValueError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}") from None
            records = _read_jsonl(path, text)
    else:
        records = _read_jsonl(path, text)
    return records, _columns(records)
