"""The embedded data sets: sizes, class counts, provenance hashes, and the seeded stratified splits."""

import hashlib
import math
import re
from collections import Counter
from functools import cache
from importlib import resources

import numpy as np
import pytest

from surm.data import EMBEDDED, ImageExample, TextExample, load_dataset

# The counts documented in src/surm/data/embedded/PROVENANCE.md.
EXPECTED = {
    "mr": {"negative": 5325, "positive": 5241},
    "trec": {"ENTY": 1245, "HUM": 1215, "DESC": 1153, "NUM": 858, "LOC": 824, "ABBR": 86},
    "sms": {"ham": 4518, "spam": 641},
    "digits": {"0": 178, "1": 182, "2": 177, "3": 183, "4": 181, "5": 182, "6": 181, "7": 179, "8": 174, "9": 180},
    "mnist": {str(d): 500 for d in range(10)},
}
TOTALS = {"mr": 10566, "trec": 5381, "sms": 5159, "digits": 1797, "mnist": 5000}


@cache
def load(name, seed=0):
    return load_dataset(name, seed=seed)


def key(example):
    return example.text if isinstance(example, TextExample) else example.image.tobytes()


def test_embedded_names():
    assert set(EMBEDDED) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sizes_and_class_counts(name):
    data = load(name)
    assert data.name == name
    assert data.kind == ("image" if name in ("digits", "mnist") else "text")
    assert data.label_names == tuple(sorted(EXPECTED[name]))
    assert data.num_labels == len(EXPECTED[name])
    everything = data.train + data.validation + data.test
    assert len(everything) == TOTALS[name] == sum(EXPECTED[name].values())
    counts = Counter(data.label_names[e.label] for e in everything)
    assert counts == EXPECTED[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_splits_disjoint_and_stratified(name):
    data = load(name)
    keys = [{key(e) for e in data.split(s)} for s in ("train", "validation", "test")]
    assert sum(map(len, keys)) == TOTALS[name]  # no text or image repeats, within or across splits
    for split in ("validation", "test"):
        counts = np.bincount(data.labels(split), minlength=data.num_labels)
        for label, total in enumerate(EXPECTED[name][n] for n in data.label_names):
            assert counts[label] == max(1, math.floor(total * 0.1 + 0.5))


def test_examples_have_the_right_types():
    text = load("trec").train[0]
    assert isinstance(text, TextExample) and isinstance(text.text, str) and text.text_pair is None
    image = load("mnist").test[0]
    assert isinstance(image, ImageExample) and image.image.dtype == np.float32 and image.image.shape == (28, 28)
    assert 0.0 <= image.image.min() and image.image.max() <= 1.0
    assert load("digits").train[0].image.shape == (8, 8)
    assert max(float(e.image.max()) for e in load("digits").train) == 1.0


def test_same_seed_same_splits_other_seed_different():
    a, b, c = load_dataset("trec", seed=0), load("trec", seed=0), load("trec", seed=1)
    assert a.train == b.train and a.validation == b.validation and a.test == b.test
    assert {e.text for e in a.test} != {e.text for e in c.test}
    assert len(a.test) == len(c.test)


def test_split_is_pinned():
    """The seed-0 split of trec must not change across machines or numpy versions (RandomState is frozen)."""
    digest = hashlib.sha256("\n".join(e.text for e in load("trec").test).encode()).hexdigest()
    assert digest == PINNED_TREC_TEST


def test_fractions():
    data = load_dataset("mr", validation_fraction=0.2, test_fraction=0.0)
    assert len(data.test) == 0
    assert len(data.validation) == 1065 + 1048  # round(5325 * 0.2), round(5241 * 0.2)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_dataset("mr", validation_fraction=1.2)
    with pytest.raises(ValueError, match="below 1"):
        load_dataset("mr", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("mr", seed=-1)


def test_provenance_hashes_match_the_files():
    embedded = resources.files("surm.data").joinpath("embedded")
    provenance = embedded.joinpath("PROVENANCE.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([\w.]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", provenance, re.MULTILINE))
    assert len(listed) == 5
    total = 0
    for filename, digest in listed.items():
        data = embedded.joinpath(filename).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, filename
    assert total < 3_000_000
    for name, count in TOTALS.items():
        assert f"**{count:,}**" in provenance, name


PINNED_TREC_TEST = "1739b935a30efbb52995cc395118ca1819b62a03269a547d5aeea880d24e85f1"
