"""The cache: where assets live, the ``DONE.json`` marker that says one is finished, the lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

MARKER = "DONE.json"
MARKER_FORMAT = 1

# Bump an asset's recipe version whenever what it produces changes: old caches then rebuild.
RECIPES: dict[str, int] = {
    "minilm": 1,
    "corpora": 1,
    "mpnet": 1,
    "smollm2": 1,
    "minilm-mr": 1,
    "mpnet-mr": 1,
    "gemma3": 1,
}


class AssetError(RuntimeError):
    """A fetch or preparation step failed; the message is one line meant for the user."""


def log(name: str, msg: str) -> None:
    print(f"[assets] {name}: {msg}", flush=True)


def cache_dir() -> Path:
    """The cache root: ``$STATPRUNE_CACHE`` if set, else ``~/.cache/statprune`` (not created)."""
    env = os.environ.get("STATPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "statprune"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``root`` except the marker, sorted."""
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def write_marker(root: Path, asset: str, info: dict | None = None) -> dict:
    """Hash every file under ``root``; write ``root/DONE.json`` atomically, as the last step."""
    files = {
        rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        for rel in list_files(root)
    }
    if not files:
        raise AssetError(f"{asset}: refusing to mark an empty folder as done")
    marker = {
        "format": MARKER_FORMAT,
        "asset": asset,
        "recipe": RECIPES.get(asset, 0),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "info": info or {},
    }
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / MARKER)
    return marker


def read_marker(root: Path) -> dict | None:
    """The parsed marker, or None when it is missing or unreadable."""
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_problem(root: Path, asset: str, deep: bool = False) -> str | None:
    """Why ``root`` is not a finished ``asset`` (None when it is).

    The cheap check compares names and sizes; ``deep`` re-hashes every file.
    """
    marker = read_marker(root)
    if marker is None:
        return f"no valid {MARKER}"
    if marker.get("format") != MARKER_FORMAT or marker.get("asset") != asset:
        return f"{MARKER} is for another format or asset"
    if marker.get("recipe") != RECIPES.get(asset, 0):
        return f"recipe version {marker.get('recipe')} != {RECIPES.get(asset, 0)}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    for rel, meta in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta.get("bytes"):
            return f"size mismatch for {rel}"
        if deep and sha256_file(p) != meta.get("sha256"):
            return f"sha256 mismatch for {rel}"
    return None


def is_done(root: Path, asset: str, deep: bool = False) -> bool:
    return marker_problem(root, asset, deep=deep) is None


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@contextlib.contextmanager
def asset_lock(cache: Path, name: str) -> Iterator[None]:
    """An exclusive per-asset lock (fcntl where available), so parallel callers build once."""
    lock_dir = cache / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no locking
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(name, "another process is preparing this asset; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
