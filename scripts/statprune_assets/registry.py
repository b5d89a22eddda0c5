"""Every asset: its builder, what it needs first, the groups; ``ensure`` builds one into the cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .cache import (
    AssetError,
    asset_lock,
    cache_dir,
    dir_size,
    human,
    is_done,
    log,
    marker_problem,
    write_marker,
)
from .checks import worker_verify_encoder
from .classifiers import DEPENDS, build_minilm_mr, build_mpnet_mr, worker_finetune
from .corpora import build_corpora
from .fetch import missing_modules
from .gemma3 import REQUIRES as GEMMA3_REQUIRES
from .gemma3 import build_gemma3
from .minilm import build_minilm
from .mpnet import build_mpnet
from .smollm2 import REQUIRES as SMOLLM2_REQUIRES
from .smollm2 import build_smollm2, worker_convert_smollm2

GROUPS: dict[str, list[str]] = {
    "all": ["minilm", "corpora"],
    "all-models": ["minilm", "corpora", "mpnet", "smollm2", "minilm-mr", "mpnet-mr", "gemma3"],
}


BUILDERS: dict[str, Callable[[Path, Path], dict]] = {
    "minilm": build_minilm,
    "corpora": build_corpora,
    "mpnet": build_mpnet,
    "smollm2": build_smollm2,
    "gemma3": build_gemma3,
    "minilm-mr": build_minilm_mr,
    "mpnet-mr": build_mpnet_mr,
}
# Python modules a builder needs beyond statprune's dependencies (the "assets" extra); ensure()
# stops before fetching anything when one is missing, and never installs it.
REQUIRES: dict[str, tuple[str, ...]] = {"smollm2": SMOLLM2_REQUIRES, "gemma3": GEMMA3_REQUIRES}
# What runs in a child process (``assets.py _worker NAME ARGS``), offline.
WORKERS: dict[str, Callable[..., dict]] = {
    "verify-encoder": worker_verify_encoder,
    "convert-smollm2": worker_convert_smollm2,
    "finetune": worker_finetune,
}


def expand_names(names: Sequence[str]) -> list[str]:
    """Asset and group names -> asset names, deduplicated, in order ("all" when empty)."""
    out: list[str] = []
    for n in names or ["all"]:
        if n in GROUPS:
            members = GROUPS[n]
        elif n in BUILDERS:
            members = [n]
        else:
            choices = ", ".join([*BUILDERS, *GROUPS])
            raise AssetError(f"unknown asset {n!r} (choose from {choices})")
        out += [m for m in members if m not in out]
    return out


def ensure(name: str, cache: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return ``CACHE/<name>``, fetching and preparing it first unless it is already finished."""
    if name not in BUILDERS:
        raise AssetError(f"unknown asset {name!r} (choose from {', '.join(BUILDERS)})")
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    final = root / name
    if not force and is_done(final, name):
        return final
    check_requirements(name)
    for dep in DEPENDS.get(name, []):
        ensure(dep, root)
    root.mkdir(parents=True, exist_ok=True)
    with asset_lock(root, name):
        if not force and is_done(final, name):  # somebody else finished while we waited
            return final
        for stale in root.glob(f".tmp-{name}-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log(name, f"rebuilding ({'forced' if force else marker_problem(final, name)})")
        t0 = time.time()
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            out, work = staging / "out", staging / "work"
            out.mkdir()
            work.mkdir()
            info = BUILDERS[name](out, work)
            for p in out.rglob("*"):  # save_pretrained leaves some files 0600
                if p.is_file():
                    p.chmod(0o644)
            info["seconds"] = round(time.time() - t0, 1)
            write_marker(out, name, info)
            if final.exists():
                final.rename(staging / "old")
            out.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(name, f"done in {time.time() - t0:.1f}s -> {final} ({human(dir_size(final))})")
    return final


def check_requirements(name: str) -> None:
    """Raise ``AssetError`` (one line naming the install command) when ``name`` needs Python
    modules this interpreter lacks."""
    missing = missing_modules(REQUIRES.get(name, ()))
    if missing:
        raise AssetError(
            f"{name} needs the Python packages {', '.join(missing)}, which are not installed: "
            "install them with pip install 'statprune[assets]'"
        )
