"""Writing files so that readers never see them half-written: write beside the target, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _default_mode(directory: bool) -> int:
    """The permissions ``open``/``mkdir`` would give a new file or folder under the current umask.

    ``tempfile`` creates its files 0600 and folders 0700; the finished outputs should not be more private than
    any other file the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk, so that a rename after it never exposes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it onto ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_mode(directory=False))
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"  # fails before anything is written
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    """Write ``text``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` (an existing folder there is removed).

    The finished folder and everything in it get the permissions of a plain ``mkdir``/``open`` under the current
    umask: some writers create private files (safetensors >= 0.8 writes 0600 through a temporary file,
    safetensors/safetensors#782), which would leave an adapter folder that other users cannot load.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        folder_mode, file_mode = _default_mode(directory=True), _default_mode(directory=False)
        os.chmod(staging, folder_mode)
        for item in staging.rglob("*"):
            if item.is_symlink():
                continue
            if item.is_dir():
                os.chmod(item, folder_mode)
            elif item.is_file():
                os.chmod(item, file_mode)
                _fsync(item)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(path.parent)


def remove_leftovers(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files and staging folders that an interrupted write of ``names`` left in ``folder``.

    A process killed (e.g. SIGKILL) in the middle of :func:`atomic_write` or :func:`atomic_directory` cannot clean
    up after itself; its ``.NAME.*`` entries are never valid outputs. Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        for item in folder.glob(f".{name}.*"):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed
