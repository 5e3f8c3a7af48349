"""Writing files so that readers never see them half-written: write beside the target, then rename.

Temporary names are ``.NAME.<8 random characters>.surm-tmp`` (and ``.NAME.old.<8>.surm-tmp`` for a folder being
replaced): :func:`remove_leftovers` deletes exactly those, never a user's file that merely starts like them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: The suffix of every temporary file and folder surm creates; nothing else is ever deleted as a leftover.
TEMP_SUFFIX = ".surm-tmp"
#: ``tempfile``'s random part: 8 characters of this alphabet.
_RANDOM_PART = r"[a-z0-9_]{8}"


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
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_mode(directory=False))
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        _raise_as_os_error(error, path)
    _fsync(path.parent)


def _raise_as_os_error(error: BaseException, path: Path) -> None:
    """Re-raise ``error``, naming ``path`` if it is an OSError that names no file (a failed ``write`` does not); as
    an OSError naming ``path`` when a writer library reported a full disk or a file-size limit in its own words
    (safetensors: "No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        raise OSError(error.errno, error.strerror, str(path)) from error
    if isinstance(error, Exception) and not isinstance(error, OSError):
        text = str(error)
        for code, words in ((errno.ENOSPC, ("No space left on device", "os error 28")),
                            (errno.EFBIG, ("File too large", "os error 27"))):
            if any(w in text for w in words):
                raise OSError(code, os.strerror(code), str(path)) from error
    raise error


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"  # fails before anything is written
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    """Write ``text``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically.

    The object is serialised in memory first and written by Python, so a full disk raises an ``OSError`` naming the
    file (torch's own writer reports it as "unexpected pos").
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` (an existing folder there is removed).

    The finished folder and everything in it get the permissions of a plain ``mkdir``/``open`` under the current
    umask: some writers create private files (safetensors >= 0.8 writes 0600 through a temporary file,
    safetensors/safetensors#782), which would leave an adapter folder that other users cannot load.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
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
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=TEMP_SUFFIX, dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_as_os_error(error, path)
    _fsync(path.parent)


def is_leftover(name: str, output_names: Iterable[str]) -> bool:
    """Whether ``name`` is a temporary file or folder that an atomic write of one of ``output_names`` creates."""
    alternatives = "|".join(re.escape(n) for n in output_names)
    return re.fullmatch(rf"\.(?:{alternatives})\.(?:old\.)?{_RANDOM_PART}{re.escape(TEMP_SUFFIX)}", name) is not None


def remove_leftovers(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files and staging folders that an interrupted write of ``names`` left in ``folder``.

    A process killed (e.g. SIGKILL) in the middle of :func:`atomic_write` or :func:`atomic_directory` cannot clean
    up after itself; its ``.NAME.<random>.surm-tmp`` entries are never valid outputs. Only names of exactly that
    form are removed (a user's ``.NAME.notes`` stays), and a symbolic link is removed as a link, never followed.
    Returns what was removed.
    """
    folder = Path(folder)
    names = tuple(names)
    removed: list[Path] = []
    if not folder.is_dir() or not names:
        return removed
    for item in sorted(folder.iterdir()):
        if not is_leftover(item.name, names):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def check_writable(folder: Path) -> None:
    """Check that files can be created in ``folder`` (or, if it does not exist yet, in its nearest existing parent)
    by creating and removing a probe file, before any model is loaded.

    Raises:
        ValueError: naming the folder and the operating system's reason.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {folder}: {existing} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"--output {folder} is not writable: cannot create files in {existing} "
                         f"({error.strerror})") from None
