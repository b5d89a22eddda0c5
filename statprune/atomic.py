"""Atomic writes: an output appears complete or not at all.

Every output of statprune (a model folder, a sweep folder, an ONNX file, a JSON report, a
checkpoint file) is written through one of the two context managers here:

    with atomic_file(path) as tmp:       # tmp: a path in a fresh folder beside ``path``
        tmp.write_text(...)
    with atomic_folder(out) as tmp:      # tmp: a fresh folder beside ``out``
        model.save_pretrained(tmp)

The temporary path lies in the target's own directory (so the final ``os.replace`` is a rename
on one filesystem), is named ``.NAME.tmp-XXXX``, gets the permissions of an ordinary file or
folder (``mkstemp``/``mkdtemp`` make them private), is ``fsync``-ed before the rename and its
directory after it. On any exception, ``KeyboardInterrupt`` included, the temporary path and the
parent folders made for the output are removed, an existing output is left as it was, and I/O
errors (a full disk, a missing permission) become a one-line :class:`OutputError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
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


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out``.

    Folders cannot be swapped in one rename: the old one is first renamed aside (into a
    ``.NAME.old-XXXX`` folder) and put back if the second rename fails or is interrupted.
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
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
