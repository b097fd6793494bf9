"""Atomic file writes (`atomic_write_text` / `atomic_write_bytes`): the old file or the new one, never a torn one."""

import os

import pytest

import respec.engine.checkpoint as checkpoint
from respec.engine.checkpoint import atomic_write_bytes, atomic_write_text


def test_atomic_write_creates_the_parent_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    assert atomic_write_text(path, "first\n") == path
    assert path.read_text() == "first\n"
    atomic_write_text(str(path), "second, ünïcode\n")  # str paths too; UTF-8 whatever the locale
    assert path.read_bytes() == "second, ünïcode\n".encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


def test_atomic_write_keeps_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "x.png", b"\x89PNG")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as a plain write_text would leave it


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")

    class DiskFull:
        """A file that takes half the bytes, then fails, as a full disk does."""

        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: DiskFull(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new: 2\n" * 100)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_failed_rename_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("{}\n")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_text(path, '{"step": 1}\n')
    monkeypatch.undo()
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
