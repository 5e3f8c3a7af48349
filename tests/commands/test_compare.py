"""surm compare: the --methods syntax, and a real comparison (2 methods x 2 seeds, each a ``surm finetune`` child)
with its table, JSON and plot, reuse of finished runs, and failed runs; the plot's labels and Pareto front; the
learning-rate tuning protocol (``--tune-lr``, ``--reference``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess

import pytest

from surm.commands.compare import LABEL_WIDTH, THREAD_VARIABLES, MethodSpec, Protocol, child_environment, \
    frontier_plot, pareto_front, parse_methods, plot_label, recall_table, summarise, text_box
from surm.commands.compare import compare as compare_runs
from surm.commands.finetune import FORWARDED_CTRL_C
from surm.settings import RunSettings

from ..runs import call_main, environment, interrupted_stderr, surm_command, wait_for

#: One step of 16 examples per run, 8 validation and 8 test examples.
COMPARE_ARGS = ("--train-size", "16", "--eval-size", "8", "--batch-size", "16", "--max-length", "16", "--epochs", "1")
METHODS = ("lora", "circulant")
SEEDS = (0, 1)


# -- --methods ----------------------------------------------------------------------------------------------------


def test_parse_methods_names_modes_and_options():
    specs = parse_methods(" lora, monarch:adapter ,circulant+parameterization=product,monarch+nblocks=8+block_rank=2,"
                          "lora+lr=3e-4,kronecker:delta+factors=4,8,full")
    assert specs == [
        MethodSpec("lora"),
        MethodSpec("monarch", "adapter"),
        MethodSpec("circulant", "delta", [("parameterization", "product")], {"parameterization": "product"}),
        MethodSpec("monarch", "delta", [("nblocks", "8"), ("block-rank", "2")], {"nblocks": 8, "block_rank": 2}),
        MethodSpec("lora", "delta", [("lr", "3e-4")], overrides={"lr": 3e-4}),  # a run setting, typed
        MethodSpec("kronecker", "delta", [("factors", "4,8")], {"factors": (4, 8)}),  # the comma belongs to the value
        MethodSpec("full"),
    ]
    assert specs[3].option_flags() == ["--nblocks", "8", "--block-rank", "2"]
    assert [s.key for s in specs] == ["lora", "monarch_adapter", "circulant_parameterization_product",
                                      "monarch_nblocks_8_block-rank_2", "lora_lr_3e-4", "kronecker_factors_4-8",
                                      "full"]


@pytest.mark.parametrize("text, message", [
    ("lora,hexagonal", "unknown method 'hexagonal' in --methods; valid methods: lowrank, circulant"),
    ("8,lora", "unknown method '8'"),
    ("monarch:sideways", "unknown mode 'sideways' in --methods item 'monarch:sideways'"),
    ("monarch+nblocks", "malformed option 'nblocks' in --methods item 'monarch+nblocks'; use +flag=value"),
    ("monarch+=4", "malformed option '=4'"),
    (" , ", "--methods is empty"),
    ("lora,circulant,lora", "--methods lists 'lora' twice"),
    ("monarch:adapter,monarch:adapter", "--methods lists 'monarch:adapter' twice"),
    ("monarch+nblock=4", "unknown option 'nblock' in --methods item 'monarch+nblock=4'; method options: "),
    ("monarch+nblocks=four", "cannot read nblocks='four' in --methods item 'monarch+nblocks=four'"),
    ("lora+seed=3", "unknown option 'seed'"),  # the seed is each run's own
])
def test_parse_methods_errors(text, message):
    with pytest.raises(ValueError) as error:
        parse_methods(text)
    assert message in str(error.value)


def test_parse_methods_targets_keep_their_commas():
    specs = parse_methods("lora,circulant+targets=query,value,attention.output.dense,"
                          "monarch+targets=query,key+nblocks=2,kronecker")
    assert [s.name for s in specs] == ["lora", "circulant", "monarch", "kronecker"]
    assert specs[1].targets == ["query", "value", "attention.output.dense"] and specs[1].options == {}
    assert specs[1].option_flags() == ["--targets", "query,value,attention.output.dense"]
    assert specs[1].method().targets == ["query", "value", "attention.output.dense"]
    assert specs[1].method().label == "circulant on query,value,attention.output.dense"  # the table's label
    assert specs[2].method().label == "monarch nblocks=2 on query,key" and specs[0].method().label == "lora"
    assert specs[2].targets == ["query", "key"] and specs[2].options == {"nblocks": 2}
    assert specs[2].option_flags() == ["--targets", "query,key", "--nblocks", "2"]
    assert specs[0].targets is None and specs[0].method().targets is None
    assert specs[1].key == "circulant_targets_query-value-attention.output.dense"


@pytest.mark.parametrize("protocol, settings, methods, message", [
    (Protocol(tune_lr=1), {}, "lora", "--tune-lr takes the number of grid points per method, at least 2, got 1"),
    (Protocol(tune_lr=3), {"lr": 1e-3}, "lora", "--lr 0.001 fixes every method's rate, which --tune-lr would choose"),
    (Protocol(tune_lr=3), {}, "lora+lr=1e-3,circulant", "--methods fixes the rate of lora_lr_1e-3 (+lr=...)"),
    (Protocol(tune_lr=3, tune_seeds=0), {}, "lora", "--tune-seeds must be at least 1, got 0"),
    (Protocol(tune_seeds=2), {}, "lora", "--tune-seeds applies only with --tune-lr"),
    (Protocol(reference="loar"), {}, "lora,circulant", "--reference 'loar' is not one of the compared methods: "
                                                       "lora, circulant"),
])
def test_a_protocol_that_does_not_apply_is_refused_before_any_run(tmp_path, protocol, settings, methods, message):
    with pytest.raises(ValueError) as error:
        compare_runs(parse_methods(methods), [0], tmp_path / "out", RunSettings(**settings), protocol=protocol)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


# -- the plot -------------------------------------------------------------------------------------------------------


def test_parallel_runs_divide_the_cpus_unless_the_user_set_the_threads(monkeypatch):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not set(THREAD_VARIABLES) & set(child_environment(1, cpus=8))  # one job: PyTorch's own default
    assert {name: child_environment(2, cpus=8)[name] for name in THREAD_VARIABLES} == dict.fromkeys(
        THREAD_VARIABLES, "4")
    assert child_environment(3, cpus=2)["OMP_NUM_THREADS"] == "1"  # never below one
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    kept = child_environment(2, cpus=8)
    assert kept["OMP_NUM_THREADS"] == "2" and "MKL_NUM_THREADS" not in kept
    assert all(child_environment(jobs)[FORWARDED_CTRL_C] == "1" for jobs in (1, 2))  # each Ctrl-C reaches it twice


def test_pareto_front():
    points = [(10, 80.0), (5, 81.0), (20, 79.0), (40, 85.0), (40, 84.0), (5, 70.0), (80, 85.0)]
    assert pareto_front(points) == [1, 3]


#: A method with its targets, as a comparison names it: too long for one line beside its point.
LONG_LABEL = "monarch block_rank=1 nblocks=16 on query,key,value,attention.output.dense,intermediate.dense,output.dense"


def test_plot_labels_are_wrapped_at_spaces_and_after_commas_keeping_every_character():
    assert plot_label("lora") == "lora"
    wrapped = plot_label(LONG_LABEL)
    assert all(len(line) <= LABEL_WIDTH for line in wrapped.split("\n")) and wrapped.count("\n") >= 2
    assert wrapped.replace(",\n", ",").replace("\n", " ") == LONG_LABEL


def plotted_rows():
    """The main job's situation: several methods with the same parameter count and nearly the same accuracy."""
    rows = []
    for index, (label, params, accuracy) in enumerate([
            ("circulant", 5_378, 0.8095), ("symmetric_toeplitz", 5_378, 0.8096), ("ldr", 9_986, 0.8083),
            ("lokr", 8_450, 0.8149), ("toeplitz", 9_974, 0.8247), ("kronecker", 10_754, 0.8253),
            ("circulant adapter", 9_986, 0.8155), ("lora", 74_498, 0.8420), ("lowrank", 74_498, 0.8420),
            ("full", 22_713_986, 0.8644), (LONG_LABEL, 42_242, 0.8325)]):
        rows.append({"label": label, "trainable_params": params, "accuracy_mean": accuracy,
                     "accuracy_std": 0.01 * (index % 3)})
    return rows


def test_labels_never_overlap_and_the_front_is_drawn(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from surm.commands import compare as module

    drawn = {}
    original = module.place_labels

    def spy(axes, renderer, anchors, labels):
        drawn["labels"] = original(axes, renderer, anchors, labels)
        drawn["boxes"] = [text_box(text, renderer) for text in drawn["labels"]]  # the text, without leader lines
        drawn["lines"] = {line.get_label(): line.get_xydata().tolist() for line in axes.get_lines()}
        drawn["transform"] = axes.transData.transform
        drawn["area"] = axes.get_window_extent(renderer)
        return drawn["labels"]

    monkeypatch.setattr(module, "place_labels", spy)
    monkeypatch.setattr(plt, "close", lambda figure: None)
    rows = plotted_rows()
    frontier_plot(rows, tmp_path / "frontier.png", "a title")
    assert (tmp_path / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert [text.get_text() for text in drawn["labels"]] == [plot_label(row["label"]) for row in rows]
    boxes = drawn["boxes"]
    overlapping = [(rows[i]["label"], rows[j]["label"]) for i in range(len(boxes)) for j in range(i)
                   if boxes[i].overlaps(boxes[j])]
    assert overlapping == []
    anchors = [(row["trainable_params"], 100 * row["accuracy_mean"]) for row in rows]
    area = drawn["area"]
    for box, anchor in zip(boxes, anchors):  # each label inside the plot, near its own point
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
        x, y = drawn["transform"](anchor)
        assert box.x0 - 100 < x < box.x1 + 100 and box.y0 - 100 < y < box.y1 + 100
    expected = ["symmetric_toeplitz", "lokr", "toeplitz", "kronecker", LONG_LABEL, "lora", "full"]  # beat all cheaper
    front = [[row["trainable_params"], 100 * row["accuracy_mean"]] for label in expected for row in rows
             if row["label"] == label]
    line = drawn["lines"]["Pareto front (best accuracy for at most so many parameters)"]
    assert [x for x, _ in line] == [x for x, _ in front]
    assert [y for _, y in line] == pytest.approx([y for _, y in front])


# -- a real comparison --------------------------------------------------------------------------------------------


def compare(output, methods=",".join(METHODS), seeds=len(SEEDS), *extra):
    return call_main("compare", "--methods", methods, "--seeds", str(seeds), *COMPARE_ARGS, *extra,
                     "--output", str(output))


def results_files(output, methods=METHODS, seeds=SEEDS):
    return {(m, s): output / "runs" / m / f"seed{s}" / "results.json" for m in methods for s in seeds}


def stamps(files):
    return {key: (path.stat().st_mtime_ns, path.read_bytes()) for key, path in files.items()}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first comparison, as it was written (later tests rerun in the same folder)."""
    output = tmp_path_factory.mktemp("compare") / "cmp"
    outcome = compare(output, ",".join(METHODS), len(SEEDS), "--jobs", "2")
    files = results_files(output)
    return {
        "outcome": outcome, "output": output, "markdown": (output / "comparison.md").read_text(),
        "json": json.loads((output / "comparison.json").read_text()),
        "plot": (output / "frontier.png").read_bytes(), "stamps": stamps(files),
        "results": {key: json.loads(path.read_text()) for key, path in files.items()},
    }


@pytest.mark.slow
def test_compare_writes_table_json_and_plot(first):
    assert first["outcome"].code == 0, first["outcome"].stderr
    markdown, summary = first["markdown"], first["json"]
    assert first["outcome"].stdout.startswith(markdown)
    assert markdown.startswith("surm compare: model minilm, dataset mr, 2 seed(s), finetune ")
    assert "| method | adapter params | trainable params | lr | accuracy % (mean ± std) |" in markdown
    assert "2 runs shared the machine at a time" in markdown  # --jobs 2
    assert summary["seeds"] == list(SEEDS) and summary["failed"] == []
    common = summary["common_args"]
    assert dict(zip(common[::2], common[1::2])) == dict(zip(COMPARE_ARGS[::2], COMPARE_ARGS[1::2]))
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        runs = [first["results"][method, seed] for seed in SEEDS]
        accuracies = [r["test_accuracy"] for r in runs]
        assert row["seeds"] == [r["seed"] for r in runs] == list(SEEDS)
        assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert row["macro_f1_std"] == pytest.approx(statistics.stdev(r["test_macro_f1"] for r in runs))
        assert row["trainable_params"] == runs[0]["trainable_params"] == runs[1]["trainable_params"]
        assert row["adapter_params"] == row["trainable_params"] - 770
        cells = f"| {100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} |"
        assert any(line.startswith(f"| {method} |") and cells in line for line in markdown.splitlines())
        recalls = [[c[i][i] / sum(c[i]) if sum(c[i]) else None for i in range(2)]
                   for c in (r["test_confusion"] for r in runs)]
        expected = [statistics.fmean(pair) if None not in pair else None for pair in zip(*recalls)]
        assert list(row["recall_per_class"]) == runs[0]["label_names"]
        assert list(row["recall_per_class"].values()) == pytest.approx(expected)
    assert "Test recall per class" not in markdown  # mr is balanced: accuracy says it all
    assert rows["lora"]["adapter_params"] == 12 * 8 * 768 and rows["circulant"]["adapter_params"] == 12 * 384
    assert first["plot"].startswith(b"\x89PNG\r\n\x1a\n") and len(first["plot"]) > 10_000


def _result(seed: int, confusion: list[list[int]] | None, label: str) -> dict:
    correct = sum(confusion[i][i] for i in range(3)) if confusion else 9
    return {"seed": seed, "label": label, "trainable_params": 10, "head_params": 4, "test_accuracy": correct / 12,
            "test_macro_f1": 0.5, "validation_history": [{"accuracy": 0.5}], "train_seconds": 1.0,
            "peak_memory_mb": 1.0, "config": {"lr": 1e-3}, "imbalanced": True, "label_names": ["a", "b", "rare"],
            "test_confusion": confusion}


def test_recall_per_class_is_averaged_over_seeds_and_tabled_for_an_imbalanced_set():
    runs = {"lora": [_result(0, [[6, 0, 0], [0, 4, 0], [1, 0, 1]], "lora"),
                     _result(1, [[5, 1, 0], [0, 4, 0], [2, 0, 0]], "lora")],
            "circulant": [_result(0, [[6, 0, 0], [1, 3, 0], [2, 0, 0]], "circulant"),
                          _result(1, [[6, 0, 0], [0, 4, 0], [2, 0, 0]], "circulant")]}
    rows = {row["method"]: row for row in summarise(runs, "lora")}
    assert rows["lora"]["recall_per_class"] == pytest.approx({"a": 11 / 12, "b": 1.0, "rare": 0.25})
    assert rows["circulant"]["recall_per_class"] == pytest.approx({"a": 1.0, "b": 7 / 8, "rare": 0.0})
    lines = recall_table(list(rows.values())).splitlines()
    assert lines[2:] == ["| method | a | b | rare |", "|---|---:|---:|---:|",
                         "| lora | 91.7 | 100.0 | 25.0 |", "| circulant | 100.0 | 87.5 | 0.0 |"]
    # a class with no test examples has no recall; a reused result from before confusion matrices has no table
    runs["lora"][0]["test_confusion"] = [[6, 0, 0], [0, 4, 0], [0, 0, 0]]
    assert summarise(runs)[0]["recall_per_class"]["rare"] is None
    runs["lora"][1]["test_confusion"] = None
    rows = summarise(runs)
    assert rows[0]["recall_per_class"] is None and recall_table(rows) == ""


@pytest.mark.slow
def test_every_run_has_the_same_data_steps_and_seeds(first):
    shared = {"dataset", "train_size", "eval_size", "epochs", "batch_size", "max_length", "warmup_ratio", "head_lr"}
    configs = {key: r["config"] for key, r in first["results"].items()}
    assert len({json.dumps({k: c[k] for k in shared}, sort_keys=True) for c in configs.values()}) == 1
    assert {key: c["seed"] for key, c in configs.items()} == {(m, s): s for m in METHODS for s in SEEDS}
    assert {r["validation_history"][-1]["step"] for r in first["results"].values()} == {1}
    for seed in SEEDS:  # identical data: the same seed gives the same labels to every method
        assert first["results"]["lora", seed]["label_names"] == first["results"]["circulant", seed]["label_names"]


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_lists_a_failed_one(first):
    output = first["output"]
    outcome = compare(output, "lora,circulant,monarch+nblocks=0", 1)
    assert outcome.code == 2
    assert "surm compare: error: 1 run(s) failed: monarch_nblocks_0 seed 0" in outcome.stderr
    assert "[compare] monarch_nblocks_0 seed 0: finetune --structure monarch" in outcome.stderr
    assert "[compare] FAILED: monarch_nblocks_0 seed 0 (exit 2)" in outcome.stderr
    assert "[compare] lora" not in outcome.stderr and "[compare] circulant" not in outcome.stderr  # nothing rerun
    assert stamps(results_files(output)) == first["stamps"]
    markdown = (output / "comparison.md").read_text()
    assert "Failed runs (diverged or errored; see their train.log): monarch_nblocks_0 seed 0" in markdown
    summary = json.loads((output / "comparison.json").read_text())
    assert summary["failed"] == ["monarch_nblocks_0 seed 0"]
    assert [(row["method"], row["seeds"]) for row in summary["rows"]] == [("lora", [0]), ("circulant", [0])]


@pytest.mark.slow
def test_finished_runs_are_reused_from_a_moved_folder_but_not_under_other_settings(first, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(first["output"], moved)
    files = results_files(moved)
    before = stamps(files)
    same = compare(moved)
    assert same.code == 0 and "[compare]" not in same.stderr
    assert json.loads((moved / "comparison.json").read_text())["rows"] == first["json"]["rows"]

    other = compare(moved, ",".join(METHODS), len(SEEDS), "--max-length", "12")
    assert other.code == 2 and "4 run(s) failed" in other.stderr
    assert f"{moved / 'runs' / 'lora' / 'seed0' / 'results.json'} was made with other settings (max_length)" \
        in other.stderr
    assert stamps(files) == before  # neither retrained nor mixed into the table
    assert json.loads((moved / "comparison.json").read_text())["rows"] == []
    assert not (moved / "frontier.png").exists()  # the old plot would contradict the empty table


@pytest.mark.slow
def test_ctrl_c_stops_the_comparison_and_a_rerun_finishes_it(tmp_path):
    """Ctrl-C in a terminal reaches compare and its running child: exit 130 with how to continue, no new run starts,
    and the same command then finishes, resuming the interrupted run from its checkpoint."""
    output = tmp_path / "cmp"
    args = ["compare", "--methods", "circulant,monarch", "--seeds", "1", *COMPARE_ARGS, "--epochs", "3",
            "--output", str(output)]
    process = subprocess.Popen(surm_command(*args), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for(output / "runs" / "circulant" / "seed0" / "checkpoint.pt", process)
    os.killpg(process.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    stderr = interrupted_stderr(process)
    assert stderr.strip().splitlines()[-1] == (
        "surm compare: interrupted; run the same command again: finished runs are reused and an interrupted one "
        "resumes from its checkpoint")
    assert not (output / "runs" / "monarch").exists()  # nothing new started after Ctrl-C
    outcome = call_main(*args)
    assert outcome.code == 0, outcome.stderr[-3000:]
    log = (output / "runs" / "circulant" / "seed0" / "train.log").read_text()
    assert "resumed from" in log


# -- the tuning protocol ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """``--tune-lr 2 --reference lora`` over lora and circulant with 2 seeds: 4 tuning runs, then 4 final runs."""
    output = tmp_path_factory.mktemp("tuned") / "cmp"
    outcome = compare(output, "lora,circulant", 2, "--tune-lr", "2", "--reference", "lora", "--jobs", "2")
    return outcome, output


@pytest.mark.slow
def test_tuning_runs_never_read_the_test_split_and_the_final_runs_use_the_best_validation_rate(tuned):
    outcome, output = tuned
    assert outcome.code == 0, outcome.stderr
    summary = json.loads((output / "comparison.json").read_text())
    assert summary["reference"] == "lora" and summary["failed"] == []
    for method, grid in (("lora", [1e-3, 3e-3]), ("circulant", [3e-3, 1e-2])):
        record = summary["tuning"][method]
        assert record["grid"] == pytest.approx(grid)
        validation = {}
        for rate in grid:
            folder = output / "runs" / method / "tune" / f"lr-{rate:g}" / "seed0"
            results = json.loads((folder / "results.json").read_text())
            assert results["config"]["lr"] == pytest.approx(rate) and results["config"]["evaluate_test"] is False
            assert results["test_accuracy"] is None and results["test_macro_f1"] is None
            assert " / 0 test examples;" in (folder / "train.log").read_text()  # the test split was never loaded
            validation[rate] = results["validation_history"][-1]["accuracy"]
            assert record["validation"][f"{rate:g}"] == [validation[rate]]
        best = max(validation.values())
        chosen = record["chosen"]
        assert validation[chosen] == best and (chosen == grid[0] or validation[grid[0]] < best)  # ties: the default
        finals = [json.loads((output / "runs" / method / f"lr-{chosen:g}" / f"seed{seed}" / "results.json")
                             .read_text()) for seed in SEEDS]
        assert [r["config"]["lr"] for r in finals] == [chosen] * len(SEEDS)
        assert all(r["config"]["evaluate_test"] and r["test_accuracy"] is not None for r in finals)
        row = next(row for row in summary["rows"] if row["method"] == method)
        assert row["lr"] == chosen and row["accuracy_mean"] == pytest.approx(
            statistics.fmean(r["test_accuracy"] for r in finals))
    rows = {row["method"]: row for row in summary["rows"]}
    assert rows["lora"]["difference"] is None
    lora = {s: json.loads(next((output / "runs" / "lora").glob(f"lr-*/seed{s}/results.json")).read_text())
            for s in SEEDS}
    circulant = {s: json.loads(next((output / "runs" / "circulant").glob(f"lr-*/seed{s}/results.json")).read_text())
                 for s in SEEDS}
    differences = [circulant[s]["test_accuracy"] - lora[s]["test_accuracy"] for s in SEEDS]
    half = 12.706 * statistics.stdev(differences) / 2 ** 0.5
    difference = rows["circulant"]["difference"]
    assert difference["mean"] == pytest.approx(statistics.fmean(differences))
    assert (difference["low"], difference["high"]) == pytest.approx((statistics.fmean(differences) - half,
                                                                     statistics.fmean(differences) + half))
    markdown = (output / "comparison.md").read_text()
    assert "learning rate tuned on validation (2 rates per method, 1 tuning seed(s))" in markdown
    assert "| Δ vs lora (95 % CI) |" in markdown
    assert "Learning rates chosen on the validation split" in markdown
    assert f"**{record['chosen']:g}: " in markdown


@pytest.mark.slow
def test_a_tuned_comparison_reruns_nothing(tuned):
    _, output = tuned
    again = compare(output, "lora,circulant", 2, "--tune-lr", "2", "--reference", "lora")
    assert again.code == 0 and "[compare]" not in again.stderr
