"""benchmarks/path_rates.py: the fit of the cost model's rates, the decisions it reports, its input checks, and a
quick measurement on this CPU (its timings are never asserted, only the files and the report's shape)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from surm import STRUCTURES  # noqa: E402
from surm.execution import DeviceRates  # noqa: E402

from .scripts import load_script  # noqa: E402


@pytest.fixture(scope="module")
def rates_script():
    return load_script("benchmarks/path_rates.py")


def synthetic_cells(script, rates: DeviceRates) -> list[dict]:
    """Cells whose added times are exactly what ``rates`` predict for the script's cost of each path."""
    cells = []
    for out_features, in_features in ((48, 48), (96, 32), (32, 96)):
        for tokens in (1, 16, 512):
            for mode in script.MODES:
                for family in ("circulant", "monarch", "ldr"):
                    for path in ("structured", "dense"):
                        cell = {"out_features": out_features, "in_features": in_features, "tokens": tokens,
                                "mode": mode, "family": family, "path": path, "bare_s": 1e-4}
                        cell["added_s"] = rates.seconds(script.cell_cost(cell))
                        cells.append(cell)
    return cells


def test_the_fit_recovers_the_rates_that_made_the_times(rates_script):
    truth = DeviceRates(gemm=5e10, small_gemm=2e10, fft=4e9, elementwise=2e9, calls=5e4)
    fitted = rates_script.fit(synthetic_cells(rates_script, truth))
    for kind in rates_script.KINDS:
        assert getattr(fitted, kind) == pytest.approx(getattr(truth, kind), rel=1e-6), kind


def test_decisions_with_the_true_rates_are_all_right_and_wrong_rates_lose_time(rates_script):
    truth = DeviceRates(gemm=5e10, small_gemm=2e10, fft=4e9, elementwise=2e9, calls=5e4)
    cells = synthetic_cells(rates_script, truth)
    made = rates_script.decisions(cells, truth)
    assert made["right"] == made["total"] == len(cells) // 2 and made["lost_ms"] == 0 and not made["misses"]
    # Rates that make calls free misjudge the paths with many calls: fewer right, time lost, the misses listed.
    wrong = rates_script.decisions(cells, DeviceRates(gemm=5e10, small_gemm=2e10, fft=4e9, elementwise=2e9,
                                                      calls=1e18))
    assert wrong["right"] < made["right"] and wrong["lost_ms"] > 0 and len(wrong["misses"]) == made["total"] - \
        wrong["right"]
    left_out = rates_script.held_out_decisions(cells)
    assert left_out["right"] == left_out["total"] == made["total"]


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "3x"], "shapes must be OUTxIN,... with positive integers, got '3x'"),
    (["--shapes", "0x4"], "got '0x4'"),
    (["--tokens", "1,0"], "tokens must be N,... with positive integers, got '1,0'"),
    (["--modes", "train,generate"], "modes must be distinct names among train,inference,eval, got 'train,generate'"),
    (["--modes", "eval,eval"], "got 'eval,eval'"),
    (["--fit", "no/such.json"], "--fit no/such.json: cannot read it as JSON"),
])
def test_bad_input_is_a_one_line_error(rates_script, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        rates_script.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in error


def test_a_file_of_something_else_is_refused(rates_script, tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"device": "cpu", "cells": [{"tokens": 1}]}))
    with pytest.raises(SystemExit):
        rates_script.main(["--fit", str(path)])
    assert "not measurements written by this script" in capsys.readouterr().err


@pytest.mark.slow
def test_a_quick_measurement_writes_the_report_and_refits_from_it(rates_script, tmp_path, capsys):
    output = tmp_path / "rates.json"
    assert rates_script.main(["--quick", "--repeats", "2", "--warmup", "1", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    families = {cell["family"] for cell in saved["cells"]}
    assert saved["device"] == "cpu" and families == set(STRUCTURES)
    # families x paths x modes x tokens
    assert len(saved["cells"]) == len(families) * 2 * 3 * len(rates_script.QUICK_TOKENS)
    assert {cell["mode"] for cell in saved["cells"]} == {"train", "inference", "eval"}
    assert set(saved["fitted"]) == set(rates_script.KINDS)
    assert "| fitted |" in output.with_suffix(".md").read_text()
    capsys.readouterr()
    assert rates_script.main(["--fit", str(output)]) == 0  # the same report from the saved measurements
    assert "| fitted, each shape left out of its own fit |" in capsys.readouterr().out


def test_families_limits_the_measurement_and_bad_names_are_refused(rates_script, tmp_path, capsys):
    output = tmp_path / "kronecker.json"
    assert rates_script.main(["--quick", "--repeats", "2", "--warmup", "1", "--families", "kronecker",
                              "--modes", "train", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert {cell["family"] for cell in saved["cells"]} == {"kronecker"}
    assert len(saved["cells"]) == 2 * len(rates_script.QUICK_TOKENS)  # paths x tokens, one mode
    capsys.readouterr()
    with pytest.raises(SystemExit):
        rates_script.main(["--quick", "--families", "kronecker,butterfly"])
    assert "families must be distinct names among lowrank," in capsys.readouterr().err
