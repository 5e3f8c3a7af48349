"""Local CSV/TSV/JSON(L) files: columns, text pairs, label mapping, and every bad-input error."""

import csv
import json

import pytest

from surm.data import hub, load_dataset

LABELS = ["pos", "neg", "neutral"] * 10  # 10 per class


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_csv_custom_columns(tmp_path):
    rows = [(f"sentence number {i}, with a comma", label, i) for i, label in enumerate(LABELS)]
    path = write_csv(tmp_path / "reviews.csv", ["sentence", "sentiment", "id"], rows)
    data = load_dataset(path, text_column="sentence", label_column="sentiment")
    assert data.name == "reviews" and data.kind == "text"
    assert data.label_names == ("neg", "neutral", "pos")  # sorted names
    assert [len(data.train), len(data.validation), len(data.test)] == [24, 3, 3]
    by_text = {e.text: data.label_names[e.label] for e in data.train + data.validation + data.test}
    assert by_text == {text: label for text, label, _ in rows}
    assert load_dataset(str(path), text_column="sentence", label_column="sentiment") == data


def test_tsv_and_text_pairs(tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}", i % 2) for i in range(20)]
    path = write_csv(tmp_path / "pairs.tsv", ["a", "b", "y"], rows, delimiter="\t")
    data = load_dataset(path, text_column="a", text_pair_column="b", label_column="y")
    assert data.label_names == ("0", "1")
    for example in data.train + data.validation + data.test:
        i = int(example.text.split()[1])
        assert example.text_pair == f"hypothesis {i}" and example.label == i % 2


def test_jsonl_int_labels_sorted_numerically(tmp_path):
    records = [{"q": f"question {i}", "c": [2, 10, 7][i % 3]} for i in range(30)]
    data = load_dataset(write_jsonl(tmp_path / "q.jsonl", records), text_column="q", label_column="c")
    assert data.label_names == ("2", "7", "10")
    index = {2: 0, 7: 1, 10: 2}
    assert {(e.text, e.label) for e in data.train + data.validation + data.test} == \
        {(r["q"], index[r["c"]]) for r in records}


def test_json_list_columns_and_jsonl_in_json(tmp_path):
    records = [{"text": f"t{i}", "label": "yes" if i % 2 else "no", "pair": f"p{i}"} for i in range(12)]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(records), encoding="utf-8")
    as_columns = tmp_path / "columns.json"
    as_columns.write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}), encoding="utf-8")
    as_lines = write_jsonl(tmp_path / "lines.json", records)
    loaded = [load_dataset(p, text_pair_column="pair", seed=3) for p in (as_list, as_columns, as_lines)]
    assert loaded[0].train == loaded[1].train == loaded[2].train
    assert loaded[0].label_names == ("no", "yes") and loaded[0].train[0].text_pair.startswith("p")


def test_local_split_seeds(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"x{i}", "label": i % 2} for i in range(200)])
    a, b, c = load_dataset(path, seed=7), load_dataset(path, seed=7), load_dataset(path, seed=8)
    assert a == b and a.test != c.test


# ---- errors ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*nope.csv"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="file not found: .*nope.csv"):
        load_dataset(str(tmp_path / "nope.csv"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.txt").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file extension '.txt'.*\.csv, \.tsv, \.jsonl, \.json"):
        load_dataset(tmp_path / "data.txt")


def test_missing_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["sentence", "label"], [("a", 0), ("b", 1)])
    with pytest.raises(ValueError, match=r"column 'text' \(text_column\) not found; columns found: 'sentence', "
                                         r"'label'"):
        load_dataset(path)
    with pytest.raises(ValueError, match=r"column 'lbl' \(label_column\) not found"):
        load_dataset(path, text_column="sentence", label_column="lbl")
    with pytest.raises(ValueError, match=r"column 'hyp' \(text_pair_column\) not found"):
        load_dataset(path, text_column="sentence", text_pair_column="hyp")


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_dataset(tmp_path, content):
    (tmp_path / "empty.csv").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty dataset: .*empty.csv has no rows"):
        load_dataset(tmp_path / "empty.csv")


def test_empty_jsonl(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty dataset"):
        load_dataset(tmp_path / "e.jsonl")


@pytest.mark.parametrize(("labels", "message"), [
    (["a"] * 9, "only the class 'a'.*at least 2 classes"),
    ([0, 1, None] * 3, r"missing or empty labels .* rows 3, 6, 9"),
    ([0, 1, float("nan")] * 3, r"missing or empty labels .* rows 3, 6, 9"),
    ([0.5, 1.0, 0.0] * 3, r"non-integer numbers \(e.g. 0.5 in row 1\)"),
    ([[1], 0, 1] * 3, "not class labels"),
])
def test_unusable_labels_jsonl(tmp_path, labels, message):
    records = [{"text": f"t{i}", "label": label} for i, label in enumerate(labels)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # NaN written as NaN
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


@pytest.mark.parametrize(("labels", "message"), [
    (["0.5", "1", "0"] * 3, "non-integer numbers"),
    (["x", "", "y"] * 3, r"missing or empty labels .* rows 2, 5, 8"),
])
def test_unusable_labels_csv(tmp_path, labels, message):
    path = write_csv(tmp_path / "bad.csv", ["text", "label"], [(f"t{i}", v) for i, v in enumerate(labels)])
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_integer_valued_float_labels_are_classes(tmp_path):
    path = write_csv(tmp_path / "f.csv", ["text", "label"], [(f"t{i}", ["0.0", "1.0"][i % 2]) for i in range(10)])
    assert load_dataset(path).label_names == ("0", "1")


def test_bad_text_values(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok", "label": 0}, {"text": 5, "label": 1}] * 3)
    with pytest.raises(ValueError, match=r"row 2 has a int \(5\), not a string in text column 'text'"):
        load_dataset(path)
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [("ok", 0), ("  ", 1)] * 3)
    with pytest.raises(ValueError, match="row 2 has an empty string in text column 'text'"):
        load_dataset(path)


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ngood,1\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv is not valid UTF-8: .* byte offset 21 \(line 3\)"):
        load_dataset(path)


def test_malformed_files(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": 0}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_dataset(tmp_path / "b.jsonl")
    (tmp_path / "b.json").write_text('{"text": "a"', encoding="utf-8")
    with pytest.raises(ValueError, match="b.json is not valid JSON"):
        load_dataset(tmp_path / "b.json")
    (tmp_path / "s.json").write_text('"just a string"', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list of objects"):
        load_dataset(tmp_path / "s.json")
    write_csv(tmp_path / "wide.csv", ["text", "label"], [("a", 0, "extra")])
    with pytest.raises(ValueError, match="row 1 has 3 fields but the header has 2"):
        load_dataset(tmp_path / "wide.csv")


def test_class_too_small_to_stratify(tmp_path):
    labels = ["a"] * 10 + ["b"] * 10 + ["rare"] * 2
    path = write_csv(tmp_path / "small.csv", ["text", "label"], [(f"t{i}", v) for i, v in enumerate(labels)])
    with pytest.raises(ValueError, match=r"too few examples to stratify.*at least 3.*'rare' \(2\)"):
        load_dataset(path)
    data = load_dataset(path, test_fraction=0)  # two splits need only 2 per class
    assert sum(e.label == 2 for e in data.validation) == 1


def test_unknown_name_without_datasets(monkeypatch):
    monkeypatch.setattr(hub, "datasets_available", lambda: False)
    with pytest.raises(ValueError, match=r"'sst2' is neither an embedded dataset \(mr, trec, sms, digits, mnist\) "
                                         r"nor an existing local file.*'datasets' package is not installed"):
        load_dataset("sst2")


def test_unknown_name_hub_failure(monkeypatch):
    def fail(name, label_column):
        raise ConnectionError("offline")

    monkeypatch.setattr(hub, "datasets_available", lambda: True)
    monkeypatch.setattr(hub, "hub_records", fail)
    with pytest.raises(ValueError, match=r"datasets.load_dataset\('user/set'\) failed.*ConnectionError: offline"):
        load_dataset("user/set")


def test_hub_records_go_through_the_same_checks(monkeypatch):
    records = [{"sentence": f"s{i}", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    monkeypatch.setattr(hub, "datasets_available", lambda: True)
    monkeypatch.setattr(hub, "hub_records", lambda name, label_column: (records, ["sentence", "label"]))
    data = load_dataset("user/set", text_column="sentence")
    assert data.name == "user/set" and data.label_names == ("neg", "pos") and len(data.test) == 2
    with pytest.raises(ValueError, match="column 'text'"):
        load_dataset("user/set")
