"""The one atomic-write helper: outputs appear complete or not at all."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from statprune.atomic import atomic_file, atomic_folder, write_text
from statprune.errors import OutputError


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_file_is_written_with_ordinary_permissions_and_nothing_else(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a" / "b.json", "{}\n")
    finally:
        os.umask(old)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert _names(tmp_path / "a") == ["b.json"]


def test_companion_files_move_with_the_file(tmp_path):
    with atomic_file(tmp_path / "m.onnx") as tmp:
        tmp.write_bytes(b"graph")
        (tmp.parent / "m.onnx.data").write_bytes(b"weights")
    assert _names(tmp_path) == ["m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), ValueError("bug")])
def test_any_exception_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(type(error)), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise error
    assert path.read_text() == "old" and _names(tmp_path) == ["out.json"]


def test_disk_full_and_permission_errors_are_one_line_output_errors(tmp_path):
    out = tmp_path / "new" / "nested" / "out"
    full = r"disk full while writing .*nothing was written"
    with pytest.raises(OutputError, match=full), atomic_folder(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "new").exists()  # the parents made for the output went too
    denied = r"cannot write .*: Permission denied; nothing was written"
    with pytest.raises(OutputError, match=denied), atomic_file(tmp_path / "x.json"):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(OutputError, match="disk full"), atomic_file(tmp_path / "y.safetensors"):
        raise Exception("I/O error: No space left on device (os error 28)")  # as Rust libraries say
    assert _names(tmp_path) == []


def test_folder_replaces_an_existing_one_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert _names(out) == ["old.txt"] and _names(tmp_path) == ["out"]
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("done")
    assert _names(out) == ["new.txt"] and _names(tmp_path) == ["out"]


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporary_paths_are_removed_by_the_next_write(tmp_path):
    """``kill -9`` mid-write leaves ``.NAME.tmp-*`` (and, between the two renames of a folder
    replacement, the previous output only inside ``.NAME.old-*``): the next write of that output
    puts the previous output back first, then removes them; others' paths stay."""
    from statprune.atomic import _owner

    host, dead = _owner().split("-")[0], _dead_pid()
    out = tmp_path / "out"
    stale_tmp = tmp_path / f".out.tmp-{host}-{dead}-abcd"
    (stale_tmp / "sub").mkdir(parents=True)
    stale_old = tmp_path / f".out.old-{host}-{dead}-efgh"
    (stale_old / "old").mkdir(parents=True)
    (stale_old / "old" / "model.safetensors").write_text("previous output")
    live = tmp_path / f".out.tmp-{_owner()}-ijkl"  # this (live) process's
    other_host = tmp_path / f".out.tmp-000000-{dead}-mnop"  # another machine on a shared disk
    unrelated = tmp_path / f".other.tmp-{host}-{dead}-qrst"
    for path in (live, other_host, unrelated):
        path.mkdir()

    from statprune.atomic import clean_stale

    assert sorted(clean_stale(out)) == sorted([stale_tmp, stale_old])
    assert (out / "model.safetensors").read_text() == "previous output"  # put back
    assert live.exists() and other_host.exists() and unrelated.exists()

    stale_tmp.mkdir()  # and a real write does it too
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not stale_tmp.exists() and (out / "new.txt").read_text() == "new"
