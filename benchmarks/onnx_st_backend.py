"""sentence-transformers' own ONNX backend on statprune's ``export-onnx`` of MiniLM, dense and compressed.

    python benchmarks/onnx_st_backend.py            # -> benchmarks/onnx_st_backend.json

``SentenceTransformer(folder, backend="onnx")`` loads ``folder/onnx/model.onnx`` through
optimum-onnx, whose newest release (0.1.0) requires transformers < 4.58, while
sentence-transformers 6 and statprune require transformers >= 5: pip cannot install it beside
them. This script therefore puts the last stack that has the backend (sentence-transformers 5.1.2,
transformers 4.57.6, optimum 2.1.0 + optimum-onnx 0.1.0 and their pinned helpers) in a
``pip install --target`` folder ``~/.cache/statprune/st-onnx-site`` (``--no-deps``; torch,
onnxruntime and numpy come from this interpreter) and, in a child process with that folder first
on ``PYTHONPATH``, compares ``backend="onnx"`` with ``backend="torch"`` on 64 real sentences:

1. dense all-MiniLM-L6-v2 (a copy of ``~/.cache/statprune/minilm``);
2. the same compressed to 60 % FLOPs by the statprune CLI (its config needs
   ``trust_remote_code=True``: the folder's own ``configuration_statprune.py`` runs under
   transformers 4.57).

Both folders get ``statprune export-onnx DIR DIR`` (this interpreter) first, and the graph's
``sentence_embedding`` run by onnxruntime alone is compared with sentence-transformers 6 (torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path.home() / ".cache" / "statprune"
SITE = CACHE / "st-onnx-site"
PINS = [
    "sentence-transformers==5.1.2",
    "transformers==4.57.6",
    "optimum==2.1.0",
    "optimum-onnx==0.1.0",
    "huggingface_hub==0.36.0",
    "tokenizers==0.22.1",
    "datasets==4.0.0",
]

CHILD = r"""
import json, sys
import numpy as np
import optimum.onnxruntime, sentence_transformers, transformers
from sentence_transformers import SentenceTransformer

folder, data, trust = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
texts = open(data).read().splitlines()[-64:]
kw = {"trust_remote_code": True} if trust else {}
a = SentenceTransformer(folder, device="cpu", **kw).encode(texts)
model = SentenceTransformer(folder, device="cpu", backend="onnx", **kw)
b = model.encode(texts)
cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
print(json.dumps({
    "versions": {"sentence-transformers": sentence_transformers.__version__,
                 "transformers": transformers.__version__},
    "backend_model": type(model[0].auto_model).__name__,
    "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
    "min_cosine": float(cos.min()),
    "sentences": len(texts),
}))
"""


def _plain_check(folder: Path, data: Path, trust: bool) -> dict:
    """onnxruntime alone on the graph's ``sentence_embedding`` against sentence-transformers 6
    (torch) in this interpreter."""
    import numpy as np
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from statprune.export import onnx_session, relative_error

    texts = data.read_text().splitlines()[-64:]
    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=trust)
    expected = model.encode(texts)
    enc = model.tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=256)
    session = onnx_session(folder / "onnx" / "model.onnx")
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    pooled = session.run(["sentence_embedding"], feed)[0]
    cos = (pooled * expected).sum(-1) / np.linalg.norm(pooled, axis=-1) / np.linalg.norm(expected, axis=-1)
    return {
        "sentence-transformers": sentence_transformers.__version__,
        "relative_error": relative_error(pooled, expected),
        "min_cosine": float(cos.min()),
        "norms": [float(np.linalg.norm(pooled, axis=-1).min()), float(np.linalg.norm(pooled, axis=-1).max())],
    }


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main() -> int:
    start = time.perf_counter()
    if not (SITE / "optimum" / "onnxruntime").is_dir():
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE), *PINS])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cli = [sys.executable, "-m", "statprune.cli"]
    data = CACHE / "corpora" / "rt-calib.txt"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "minilm"
        shutil.copytree(CACHE / "minilm", dense, ignore=shutil.ignore_patterns("onnx"))
        compressed = Path(tmp) / "minilm-60"
        _run([*cli, "compress", str(dense), "--data", str(data), "--out", str(compressed),
              "--keep-flops", "0.6", "--samples", "128", "--quiet"], env=env)  # fmt: skip
        for name, folder, trust in (("dense", dense, "0"), ("compressed-60%-flops", compressed, "1")):
            _run([*cli, "export-onnx", str(folder), str(folder)], env=env)
            child_env = {**env, "PYTHONPATH": str(SITE), "HF_HUB_OFFLINE": "1"}
            out = _run([sys.executable, "-c", CHILD, str(folder), str(data), trust],
                       env=child_env, capture_output=True, text=True)  # fmt: skip
            results[name] = {
                "onnxruntime sentence_embedding vs SentenceTransformer.encode": _plain_check(
                    folder, data, trust == "1"
                ),
                "SentenceTransformer backend=onnx vs backend=torch": json.loads(
                    out.stdout.strip().splitlines()[-1]
                ),
            }
            print(name, results[name], flush=True)
    report = {
        "command": "python benchmarks/onnx_st_backend.py",
        "pins": PINS,
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (HERE / "onnx_st_backend.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
