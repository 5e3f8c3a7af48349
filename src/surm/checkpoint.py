"""Training checkpoints: tensors and plain data only, written atomically, read back with ``weights_only=True`` and
checked against the run that would resume from them before anything is trained or overwritten.

A checkpoint is one dict:

* progress: ``epoch``, ``step_in_epoch``, ``global_step`` (ints), ``history`` (validation metrics per epoch: finite
  numbers, and the ``confusion`` matrix as a square list of lists of counts),
  ``train_seconds``, ``samples``, ``loss_watch`` (the divergence watch of :mod:`surm.trainer`);
* ``trainable``: every trainable parameter by name; ``optimizer`` and ``scheduler``: their ``state_dict()``;
* ``rng``: the CPU random state of every process; ``settings``: the run's settings (``RunConfig.describe()``).

Nothing in it is trusted: a file that holds anything but tensors and plain data is refused unread (unpickling it
could run code), and a readable one must match the run in every name, shape, dtype and setting, with finite values.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import atomic
from .errors import CheckpointError
from .validation import is_finite_number, is_int, is_number

CHECKPOINT = "checkpoint.pt"

#: Top-level entries and their types (a float entry also takes an int).
LAYOUT: dict[str, type] = {
    "epoch": int, "step_in_epoch": int, "global_step": int, "history": list, "train_seconds": float, "samples": int,
    "loss_watch": dict, "trainable": dict, "optimizer": dict, "scheduler": dict, "rng": list, "settings": dict,
}
#: How many mismatches a message lists before "and N more".
_LISTED = 4


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` (see the module docstring) to ``path`` atomically."""
    atomic.torch_save(checkpoint, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load ``path`` without unpickling anything but tensors and plain data, and check its layout.

    Raises:
        CheckpointError: naming the file, if it cannot be read, holds other objects, or lacks or mistypes an entry.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing checkpoint {path}: it holds objects other than tensors and plain data (loading them could run "
            "code), so surm did not write it; delete it to start the run afresh"
        ) from None
    except Exception as error:  # truncated, not a zip, unreadable: torch and the OS word these many ways
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}; delete it to start the run afresh") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(data).__name__}, not a surm checkpoint (a dict)")
    missing = [k for k in LAYOUT if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {_listing(map(repr, missing))}; it is not a checkpoint of "
                              "this surm")
    for key, kind in LAYOUT.items():
        if not _is_a(data[key], kind):
            raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(data[key]).__name__}, "
                                  f"expected {kind.__name__}")
    for key in ("epoch", "step_in_epoch", "global_step", "samples"):
        if data[key] < 0:
            raise CheckpointError(f"checkpoint {path}: {key!r} is negative ({data[key]})")
    if not (math.isfinite(data["train_seconds"]) and data["train_seconds"] >= 0):
        raise CheckpointError(f"checkpoint {path}: 'train_seconds' is {data['train_seconds']!r}")
    for entry in data["history"]:
        if not (isinstance(entry, dict) and all(_is_counts(v) if k == "confusion" else is_finite_number(v)
                                                for k, v in entry.items())):
            raise CheckpointError(f"checkpoint {path}: a 'history' entry is not a dict of finite numbers (and a "
                                  f"confusion matrix of counts): {entry!r}")
    bad = [name for name, value in data["trainable"].items()
           if not (isinstance(name, str) and isinstance(value, Tensor))]
    if bad:
        raise CheckpointError(f"checkpoint {path}: 'trainable' holds non-tensor entries {_listing(map(repr, bad))}")
    if not all(isinstance(state, Tensor) and state.dtype == torch.uint8 for state in data["rng"]):
        raise CheckpointError(f"checkpoint {path}: 'rng' is not a list of random states (uint8 tensors)")
    return data


def _is_counts(value: Any) -> bool:
    """True for a square list of lists of non-negative ints (a confusion matrix)."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(row, list) and len(row) == len(value) and all(is_int(n, minimum=0) for n in row)
                    for row in value))


def check_resumable(path: Path, data: dict[str, Any], *, settings: dict[str, Any],
                    parameters: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                    world_size: int, epochs: int, steps_per_epoch: int) -> None:
    """Check that the checkpoint ``data`` read from ``path`` belongs to this run, before anything is loaded into it.

    ``settings`` must equal the saved ones (the output folder aside: a moved folder resumes); ``parameters`` (the
    run's trainable ones) must match ``trainable`` in names, shapes and dtypes, with finite values; the optimizer and
    scheduler states must have the layout of ``optimizer`` and ``scheduler``; ``rng`` one state per process.

    Raises:
        CheckpointError: naming the file and the first mismatches.
    """
    saved = data["settings"]
    changed = sorted(k for k in set(saved) | set(settings) if k != "output" and saved.get(k) != settings.get(k))
    if changed:
        raise CheckpointError(f"cannot resume {path}: settings changed since it was written ({', '.join(changed)})")
    _check_tensors(path, "trainable parameters", data["trainable"], parameters)
    _check_optimizer(path, data["optimizer"], optimizer)
    _check_like(path, "scheduler", data["scheduler"], scheduler.state_dict())
    template = torch.get_rng_state()
    if len(data["rng"]) != world_size or any(s.shape != template.shape for s in data["rng"]):
        raise CheckpointError(f"cannot resume {path}: it holds {len(data['rng'])} random states of the wrong layout "
                              f"for {world_size} process(es)")
    if data["epoch"] > epochs or data["step_in_epoch"] > steps_per_epoch:
        raise CheckpointError(f"cannot resume {path}: it is at epoch {data['epoch']}, step {data['step_in_epoch']}, "
                              f"beyond this run's {epochs} epochs of {steps_per_epoch} steps")


def _check_tensors(path: Path, what: str, saved: Mapping[str, Tensor], wanted: Mapping[str, Tensor]) -> None:
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    if missing or unexpected:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"unexpected {_listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"cannot resume {path}: its {what} do not match this run's ({'; '.join(parts)})")
    for name, value in saved.items():
        target = wanted[name]
        if value.shape != target.shape or value.dtype != target.dtype:
            raise CheckpointError(f"cannot resume {path}: {name} has shape {tuple(value.shape)} and dtype "
                                  f"{value.dtype} there, {tuple(target.shape)} and {target.dtype} in this run")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"cannot resume {path}: {name} holds non-finite values (NaN or inf)")


def _check_optimizer(path: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    template = optimizer.state_dict()
    _check_like(path, "optimizer param_groups", saved.get("param_groups"), template["param_groups"])
    state = saved.get("state")
    if not isinstance(state, dict) or set(saved) != set(template):
        raise CheckpointError(f"cannot resume {path}: its optimizer state is not laid out as "
                              f"{type(optimizer).__name__}'s")
    shapes = {index: p.shape for group, live in zip(template["param_groups"], optimizer.param_groups)
              for index, p in zip(group["params"], live["params"])}
    for index, entries in state.items():
        if index not in shapes or not isinstance(entries, dict):
            raise CheckpointError(f"cannot resume {path}: its optimizer state names parameter {index!r}, which this "
                                  "run does not have")
        for key, value in entries.items():
            if not isinstance(value, Tensor) or value.shape not in (shapes[index], torch.Size([])):
                raise CheckpointError(f"cannot resume {path}: optimizer state {key!r} of parameter {index} does not "
                                      f"fit its shape {tuple(shapes[index])}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"cannot resume {path}: optimizer state {key!r} of parameter {index} holds "
                                      "non-finite values")


def _check_like(path: Path, what: str, saved: Any, template: Any) -> None:
    """``saved`` must have the layout of ``template``: the same keys, list lengths and types (int for float allowed),
    finite numbers."""
    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            raise CheckpointError(f"cannot resume {path}: its {what} state is not laid out as this run's")
        for key in template:
            _check_like(path, what, saved[key], template[key])
    elif isinstance(template, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(template):
            raise CheckpointError(f"cannot resume {path}: its {what} state is not laid out as this run's")
        for item, reference in zip(saved, template):
            _check_like(path, what, item, reference)
    elif template is None or isinstance(template, (bool, str)):
        if type(saved) is not type(template):
            raise CheckpointError(f"cannot resume {path}: its {what} state holds {saved!r} where this run has "
                                  f"{template!r}")
    elif isinstance(template, (int, float)):
        if not is_finite_number(saved) or (isinstance(template, int) and not isinstance(saved, int)):
            raise CheckpointError(f"cannot resume {path}: its {what} state holds {saved!r} where this run holds a "
                                  f"value of type {type(template).__name__}")
    elif isinstance(template, Tensor):
        if not isinstance(saved, Tensor) or saved.shape != template.shape or saved.dtype != template.dtype:
            raise CheckpointError(f"cannot resume {path}: its {what} state holds a tensor of the wrong layout")


def _is_a(value: Any, kind: type) -> bool:
    if kind is float:
        return is_number(value)
    if kind is int:
        return is_int(value)
    return isinstance(value, kind)


def _listing(names: Any) -> str:
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
