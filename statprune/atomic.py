"""Atomic writes: an output appears complete or not at all.

Every output of statprune (a model folder, a sweep folder, an ONNX file, a JSON report, a
checkpoint file) is written through one of the two context managers here:

    with atomic_file(path) as tmp:       # tmp: a path in a fresh folder beside ``path``
        tmp.write_text(...)
    with atomic_folder(out) as tmp:      # tmp: a fresh folder beside ``out``
        model.save_pretrained(tmp)

The temporary path lies in the target's own directory (so the final ``os.replace`` is a rename
on one filesystem), is named ``.NAME.tmp-HOST-PID-XXXX``, gets the permissions of an ordinary
file or folder (``mkstemp``/``mkdtemp`` make them private), is ``fsync``-ed before the rename and
its directory after it. On any exception, ``KeyboardInterrupt`` included, the temporary path and
the parent folders made for the output are removed, an existing output is left as it was, and I/O
errors (a full disk, a missing permission) become a one-line :class:`OutputError`. A process
killed outright (``kill -9``, the out-of-memory killer) cannot clean up: the next write of the
same output removes what it left (:func:`clean_stale`, by the dead process id in the names).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from statprune.argtypes import current_umask
from statprune.errors import OutputError

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def io_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, or None if ``exc`` is not an I/O error (then it is a bug).

    safetensors and tokenizers (Rust) report I/O errors, e.g. a full disk, not as ``OSError`` but
    as ``SafetensorError`` / ``Exception`` whose message ends in "(os error N)".
    """
    if isinstance(exc, OSError):
        return exc.errno or 0
    if isinstance(exc, Exception) and (match := _RUST_OS_ERROR.search(str(exc))):
        return int(match.group(1))
    return None


def write_error(target: Path, exc: BaseException) -> OutputError | None:
    """The one-line ``OutputError`` for an I/O error while writing ``target`` (None otherwise)."""
    code = io_errno(exc)
    if code is None:
        return None
    if code == errno.ENOSPC:
        return OutputError(f"disk full while writing {target}; nothing was written — free space")
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else os.strerror(code)
    return OutputError(f"cannot write {target}: {reason}; nothing was written")


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_dir(Path(root))
    else:
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    """fsync one file or one folder's entry list (opened read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can sync a directory
        _fsync_path(path)


def _remove(tmp: Path | None, created: list[Path]) -> None:
    """Remove the temporary path and the parent folders made for the output (innermost first)."""
    if tmp is not None:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _owner() -> str:
    """``HOST-PID`` of this process (HOST: 6 hex digits of the host name's hash), in the names of
    its temporary paths, so that a later run can tell those a killed process left."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary paths beside ``target`` that a process of this host left when it was
    killed (``kill -9``, out of memory) while writing ``target``; returns them. A kill between
    the two renames of :func:`replace_folder` left the previous output only in its
    ``.NAME.old-*`` folder: it is put back first. Paths of live processes, of other hosts (a
    shared filesystem) or named otherwise are left alone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-([0-9a-f]{{6}})-(\d+)-")
    host = _owner().split("-")[0]
    removed = []
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match is None or match.group(2) != host or _alive(int(match.group(3))):
            continue
        kept = entry / "old"
        if match.group(1) == "old" and kept.exists() and not os.path.lexists(target):
            os.rename(kept, target)
        _remove(entry, [])
        removed.append(entry)
    return removed


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out``.

    Folders cannot be swapped in one rename: the old one is first renamed aside (into a
    ``.NAME.old-XXXX`` folder) and put back if the second rename fails or is interrupted.
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_owner()}-", dir=out.parent))
    moved = False
    try:
        os.rename(out, trash / "old")
        moved = True
        os.rename(tmp, out)
    except BaseException:
        if moved:
            os.rename(trash / "old", out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    created = [p for p in target.parents if not p.exists()]  # innermost first
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; outputs are ordinary
        yield tmp
    except BaseException as exc:
        _remove(tmp, created)
        error = write_error(target, exc)
        if error is not None:
            raise error from None
        raise


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write the folder ``out`` atomically; yields the temporary folder to fill.

    On a clean exit the folder is synced and renamed to ``out`` (replacing an existing one, which
    is kept on any failure). Raises ``OutputError`` (one line) for I/O errors; any other exception
    propagates after the clean-up.
    """
    target = Path(out).absolute()
    with _staged(target) as tmp:
        yield tmp
        _fsync(tmp)
        replace_folder(tmp, target)
        _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write the file ``path`` atomically; yields the temporary path to write.

    The temporary path is ``.NAME.tmp-XXXX/NAME`` beside ``path``: it keeps the final file name,
    so files written next to it that refer to it by name (an ONNX file's ``NAME.data`` external
    weights) move beside ``path`` too, before ``path`` itself, whose appearance commits the set.
    Raises ``OutputError`` (one line) for I/O errors.
    """
    target = Path(path).absolute()
    with _staged(target) as folder:
        tmp = folder / target.name
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(errno.ENOENT, "nothing was written to the temporary file", str(tmp))
        companions = sorted(p for p in folder.iterdir() if p.name != target.name and p.is_file())
        for file in [*companions, tmp]:
            _fsync_path(file)
        for file in companions:
            os.replace(file, target.parent / file.name)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(folder, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the absolute path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).absolute()
