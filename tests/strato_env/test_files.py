"""Atomic writes: complete or absent, with the permissions an ordinary write would give."""

from __future__ import annotations

import os
import stat

import pytest

from strato_env.files import replace_folder, write_atomic


def test_write_atomic_leaves_the_whole_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "report.md"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["report.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_atomic_leaves_no_trace_when_the_data_cannot_be_written(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "kept")
    with pytest.raises(TypeError):
        write_atomic(path, 3)  # type: ignore[arg-type]
    assert path.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_replace_folder_swaps_a_complete_folder_in(tmp_path):
    old, staging = tmp_path / "adapter", tmp_path / ".staging"
    old.mkdir()
    (old / "stale.bin").write_text("old")
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    replace_folder(staging, old)
    assert [p.name for p in old.iterdir()] == ["adapter_config.json"] and not staging.exists()
