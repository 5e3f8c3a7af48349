"""Atomic writes (surm.atomic): a reader sees the old content or the new, never a half-written file or folder."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from surm import atomic


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that the expected modes are not what a default would give anyway."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


class Interrupted(Exception):
    pass


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "notes.txt"  # the folder is created
    atomic.atomic_write(target, lambda tmp: tmp.write_text("first"))
    atomic.atomic_write(target, lambda tmp: tmp.write_text("second"))
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["notes.txt"]


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_content_when_writing_fails(tmp_path, error):
    target = tmp_path / "results.json"
    target.write_text("old")

    def write(tmp):
        tmp.write_text("half of the new")
        raise error()

    with pytest.raises(error):
        atomic.atomic_write(target, write)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]  # the temporary file is gone


def test_write_json_that_cannot_be_serialised_leaves_no_trace(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": true}')
    with pytest.raises(ValueError, match="Circular reference"):
        data: dict = {}
        data["self"] = data
        atomic.write_json(target, data)
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_json_text_and_torch_save(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "é"]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5,\n    "\\u00e9"\n  ],\n  "b": 1\n}\n'
    atomic.write_text(tmp_path / "t.md", "| é |\n")
    assert (tmp_path / "t.md").read_bytes() == "| é |\n".encode()
    atomic.torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(3))


def test_files_get_the_umask_default_mode(tmp_path, umask_027):
    atomic.write_text(tmp_path / "t.txt", "x")  # mkstemp alone would give 0600
    assert mode(tmp_path / "t.txt") == 0o640


def test_atomic_directory_replaces_a_folder_whole(tmp_path, umask_027):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old_only.bin").write_bytes(b"old")
    (target / "shared.json").write_text("old")
    with atomic.atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".adapter.")
        assert (target / "old_only.bin").exists()  # the old folder stays whole until the new one is complete
        (staging / "shared.json").write_text("new")
        (staging / "nested").mkdir(mode=0o700)
        private = staging / "nested" / "weights.safetensors"
        private.write_bytes(b"new")
        private.chmod(0o600)  # as safetensors >= 0.8 writes its files
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging or old folder is left
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == \
        ["nested", "nested/weights.safetensors", "shared.json"]
    assert (target / "shared.json").read_text() == "new"
    assert mode(target) == mode(target / "nested") == 0o750
    assert mode(target / "shared.json") == mode(target / "nested" / "weights.safetensors") == 0o640


def test_atomic_directory_keeps_the_old_folder_on_error(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(Interrupted):
        with atomic.atomic_directory(target) as staging:
            (staging / "config.json").write_text("new")
            raise Interrupted()
    assert os.listdir(tmp_path) == ["model"]
    assert os.listdir(target) == ["config.json"] and (target / "config.json").read_text() == "old"


def test_atomic_directory_creates_a_new_folder(tmp_path):
    with atomic.atomic_directory(tmp_path / "out" / "adapter") as staging:
        (staging / "a.txt").write_text("a")
    assert os.listdir(tmp_path / "out") == ["adapter"]
    assert (tmp_path / "out" / "adapter" / "a.txt").read_text() == "a"


def test_remove_leftovers_removes_only_the_named_temporaries(tmp_path):
    """Only surm's own temporary names (``.NAME.<8 random>.surm-tmp``) go; a user's look-alikes stay, folders too."""
    kept = ["checkpoint.pt", "results.json", "adapter", ".keep", ".other.json.abc", "results.json.bak",
            ".results.jsonx", ".model.notes", ".results.json.bak", ".adapter.v1", ".checkpoint.pt.k2j4h1",
            ".results.json.a81x0q.surm-tmp", ".adapter.x7y2mz0c.surm-tmp.old", ".adapter.UPPERCAS.surm-tmp",
            ".other.json.abcdefgh.surm-tmp"]
    leftovers = [".checkpoint.pt.k2j4h1_a.surm-tmp", ".results.json.a81x0q2b.surm-tmp", ".adapter.x7y2mz0c.surm-tmp",
                 ".adapter.old.p0q1r2s3.surm-tmp"]
    for name in kept + leftovers:
        if "adapter" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
        else:
            (tmp_path / name).write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (tmp_path / ".adapter.linklink.surm-tmp").symlink_to(outside)  # a link is removed, not followed
    removed = atomic.remove_leftovers(tmp_path, ["checkpoint.pt", "results.json", "adapter"])
    assert sorted(p.name for p in removed) == sorted([*leftovers, ".adapter.linklink.surm-tmp"])
    assert (tmp_path / ".adapter.v1" / "adapter_model.safetensors").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "elsewhere"])
    assert (outside / "keep.txt").exists()
    assert atomic.remove_leftovers(tmp_path / "absent", ["adapter"]) == []


def test_leftovers_of_a_failed_write_are_recognised(tmp_path):
    """What atomic_write and atomic_directory name their temporaries is what remove_leftovers looks for."""
    seen = []
    with pytest.raises(Interrupted):
        def write(tmp):
            seen.append(tmp.name)
            raise Interrupted()
        atomic.atomic_write(tmp_path / "results.json", write)
    with pytest.raises(Interrupted):
        with atomic.atomic_directory(tmp_path / "adapter") as staging:
            seen.append(staging.name)
            raise Interrupted()
    assert seen[0].startswith(".results.json.") and seen[1].startswith(".adapter.")
    for name in seen:  # as a SIGKILL would leave them
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in atomic.remove_leftovers(tmp_path, ["results.json", "adapter"])) == sorted(seen)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_write_the_disk_refuses_becomes_an_os_error_naming_the_target(tmp_path):
    """torch and safetensors word a refused write their own way ("unexpected pos", "os error 27/28"); atomic writes
    turn it into an OSError naming the file or folder, and leave no temporary behind. Files are limited to 4 kB in
    a child process (the kernel answers EFBIG, as a full disk answers ENOSPC)."""
    code = textwrap.dedent("""
        import resource, signal, sys, torch
        from pathlib import Path
        from safetensors.torch import save_file
        from surm import atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        folder = Path(sys.argv[1])
        try:
            atomic.torch_save({"x": torch.zeros(10000)}, folder / "checkpoint.pt")
        except OSError as error:
            print(error.errno, error.filename)
        try:
            with atomic.atomic_directory(folder / "adapter") as staging:
                save_file({"x": torch.zeros(10000)}, staging / "adapter_model.safetensors")
        except OSError as error:
            print(error.errno, error.filename)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"{errno.EFBIG} {tmp_path / 'checkpoint.pt'}",
                                        f"{errno.EFBIG} {tmp_path / 'adapter'}"]
    assert os.listdir(tmp_path) == []
