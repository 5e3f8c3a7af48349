"""Checkpoints (surm.checkpoint) are never trusted: a planted pickle runs no code in any command that reads one, and a
readable checkpoint that does not match the run (shape, dtype, names, values, optimizer, settings) is refused with a
message naming the file, before anything is written."""

from __future__ import annotations

import builtins
import pickletools
import shutil
import zipfile

import pytest
import torch

from surm.checkpoint import read_checkpoint
from surm.errors import CheckpointError

from .conftest import REFERENCE_ARGS
from .runs import TINY, call_main
from .commands.test_search import search_args


class Payload:
    """Unpickling this writes ``marker``: what an attacker's checkpoint.pt would do with a shell command instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant(path, marker):
    """A checkpoint.pt that runs code when unpickled; checked to be hostile by loading it the unsafe way once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "trainable": {}, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the planted file is expected to run code when unpickled"
    marker.unlink()
    return path


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- reading -------------------------------------------------------------------------------------------------------


def test_a_planted_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "marker"
    path = plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match=r"refusing checkpoint .*checkpoint.pt: it holds objects other than "
                                              r"tensors and plain data \(loading them could run code\)"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot read checkpoint"),
    ("empty", "cannot read checkpoint"),
    ("folder", "cannot read checkpoint"),
    ("list", "is a list, not a surm checkpoint"),
    ("missing", "lacks 'trainable'"),
    ("mistyped", "'epoch' is a str, expected int"),
    ("negative", "'global_step' is negative"),
    ("history", "a 'history' entry is not a dict of finite numbers"),
    ("confusion", "a 'history' entry is not a dict of finite numbers"),
    ("trainable", "'trainable' holds non-tensor entries"),
    ("rng", "'rng' is not a list of random states"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused(reference_run, tmp_path, damage, message):
    good = reference_run.output / "checkpoint.pt"
    path = tmp_path / "checkpoint.pt"
    data = read_checkpoint(good)
    if damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.mkdir()
    elif damage == "list":
        torch.save([1, 2], path)
    else:
        if damage == "missing":
            del data["trainable"]
        elif damage == "mistyped":
            data["epoch"] = "1"
        elif damage == "negative":
            data["global_step"] = -1
        elif damage == "history":
            data["history"] = [{"accuracy": float("nan")}]
        elif damage == "confusion":  # a count below zero (the reference run's own matrices read back above)
            assert all(len(entry["confusion"]) == 2 for entry in data["history"])
            data["history"] = [{"accuracy": 0.5, "confusion": [[1, -1], [0, 2]]}]
        elif damage == "trainable":
            data["trainable"] = {"x": [1.0]}
        elif damage == "rng":
            data["rng"] = [torch.zeros(3)]
        torch.save(data, path)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


@pytest.mark.slow
def test_the_reference_checkpoint_is_plain_data(reference_run):
    """What surm writes is readable with weights_only=True and holds no pickled objects of other types."""
    path = reference_run.output / "checkpoint.pt"
    data = read_checkpoint(path)
    assert data["epoch"] == 2 and data["trainable"] and data["loss_watch"]["start"] > 0
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    globals_ = {arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    # Tensors (their rebuild function and storage types) and ordered dicts; no class of surm or anyone else.
    assert globals_ <= {"torch._utils _rebuild_tensor_v2", "collections OrderedDict", "torch FloatStorage",
                        "torch ByteStorage", "torch LongStorage"}, globals_


# -- every command that reads a checkpoint ---------------------------------------------------------------------------


def test_finetune_resume_refuses_a_planted_checkpoint(tmp_path):
    output, marker = tmp_path / "run", tmp_path / "marker"
    plant(output / "checkpoint.pt", marker)
    before = snapshot(output)
    outcome = call_main("finetune", *REFERENCE_ARGS, "--resume", "--output", str(output))
    assert outcome.code == 2 and not marker.exists()
    assert outcome.stderr.strip().splitlines()[-1].startswith(
        f"surm finetune: error: refusing checkpoint {output / 'checkpoint.pt'}: it holds objects other than tensors")
    assert snapshot(output) == before


@pytest.mark.slow
def test_compare_refuses_a_planted_checkpoint_of_one_run(tmp_path):
    """compare resumes a run whose folder holds a checkpoint; that run fails, nothing runs code."""
    output, marker = tmp_path / "cmp", tmp_path / "marker"
    plant(output / "runs" / "circulant" / "seed0" / "checkpoint.pt", marker)
    outcome = call_main("compare", "--methods", "circulant", *TINY, "--epochs", "1", "--output", str(output))
    assert outcome.code == 2 and not marker.exists()
    assert "surm compare: error: 1 run(s) failed: circulant seed 0" in outcome.stderr


@pytest.mark.slow
def test_search_refuses_a_planted_checkpoint_in_a_trial_folder(tmp_path):
    """A fresh search reads a trial folder's checkpoint for its history: the planted one is refused."""
    output, marker = tmp_path / "search", tmp_path / "marker"
    plant(output / "trials" / "trial-0000" / "checkpoint.pt", marker)
    outcome = call_main(*search_args(output, 1))
    assert outcome.code == 2 and not marker.exists()
    assert f"refusing checkpoint {output / 'trials' / 'trial-0000' / 'checkpoint.pt'}" in outcome.stderr


# -- a readable checkpoint that does not fit the run -------------------------------------------------------------------


def tamper(data, case):
    """Change the reference run's checkpoint ``data`` the way ``case`` says."""
    trainable = data["trainable"]
    name = next(n for n in trainable if "surm_delta" in n)
    if case == "wrong shape":
        trainable[name] = torch.zeros(trainable[name].numel() + 1)
    elif case == "broadcastable shape":
        trainable[name] = torch.zeros(1)
    elif case == "wrong dtype":
        trainable[name] = trainable[name].double()
    elif case == "NaN":
        trainable[name] = torch.full_like(trainable[name], float("nan"))
    elif case == "missing tensor":
        del trainable[name]
    elif case == "extra tensor":
        trainable["base_model.model.extra.weight"] = torch.zeros(2)
    elif case == "optimizer state shape":
        state = next(iter(data["optimizer"]["state"].values()))
        state["exp_avg"] = torch.zeros(3)
    elif case == "optimizer state NaN":
        state = next(iter(data["optimizer"]["state"].values()))
        state["exp_avg_sq"] = torch.full_like(state["exp_avg_sq"], float("inf"))
    elif case == "optimizer groups":
        data["optimizer"]["param_groups"] = data["optimizer"]["param_groups"][:1]
    elif case == "scheduler layout":
        data["scheduler"]["base_lrs"] = "lots"
    elif case == "scheduler value":
        data["scheduler"]["last_epoch"] = 2.5
    elif case == "random state":
        data["rng"] = data["rng"] * 2
    elif case == "epoch beyond the run":
        data["epoch"] = 7
    elif case == "settings":
        data["settings"]["seed"] = 4
    return name


@pytest.mark.parametrize("case, message", [
    ("wrong shape", "has shape (385,) and dtype torch.float32 there, (384,) and torch.float32 in this run"),
    ("broadcastable shape", "has shape (1,)"),
    ("wrong dtype", "dtype torch.float64 there"),
    ("NaN", "holds non-finite values (NaN or inf)"),
    ("missing tensor", "its trainable parameters do not match this run's (missing "),
    ("extra tensor", "(unexpected base_model.model.extra.weight)"),
    ("optimizer state shape", "does not fit its shape"),
    ("optimizer state NaN", "holds non-finite values"),
    ("optimizer groups", "its optimizer param_groups state is not laid out as this run's"),
    ("scheduler layout", "its scheduler state is not laid out as this run's"),
    ("scheduler value", "its scheduler state holds 2.5 where this run holds a value of type int"),
    ("random state", "random states of the wrong layout"),
    ("epoch beyond the run", "beyond this run's 2 epochs"),
    ("settings", "settings changed since it was written (seed)"),
])
@pytest.mark.slow
def test_resume_refuses_a_checkpoint_that_does_not_fit_and_writes_nothing(reference_run, tmp_path, case, message):
    output = tmp_path / "run"
    shutil.copytree(reference_run.output, output)
    data = read_checkpoint(output / "checkpoint.pt")
    name = tamper(data, case)
    torch.save(data, output / "checkpoint.pt")
    before = snapshot(output)
    outcome = call_main("finetune", *REFERENCE_ARGS, "--resume", "--output", str(output))
    assert outcome.code == 2, outcome.stderr[-2000:]
    line = outcome.stderr.strip().splitlines()[-1]
    assert line.startswith(f"surm finetune: error: cannot resume {output / 'checkpoint.pt'}: "), line
    assert message in line
    if case in ("wrong shape", "wrong dtype", "NaN"):
        assert name in line
    assert snapshot(output) == before
