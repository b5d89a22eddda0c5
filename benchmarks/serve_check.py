"""Serve dense and compressed SmolLM2 in llama.cpp (``statprune export-gguf``); compare with transformers.

    python benchmarks/serve_check.py                    # -> benchmarks/serve_check.{json,md}
    python benchmarks/serve_check.py --prompts 8 --prompt-tokens 32 --new-tokens 32

vLLM has its own script, ``benchmarks/serve_vllm.py`` (statprune's vLLM plugin serves the same
uneven folder); both take the compressed folder, prompts, transformers reference and agreement
measure from ``benchmarks/common.py``.

1. llama.cpp: the venv ``~/.cache/statprune/serve-venvs/llama.cpp`` with ``llama-cpp-python``
   (its sdist builds llama.cpp from source: more than 20 minutes on two cores), created if missing.
2. SmolLM2-135M dense, and compressed to 80 % of the attention + FFN parameters with the default
   (uneven, per-layer) allocation and bias compensation: the folder ``serve_vllm.py`` serves.
   Each is exported with ``statprune export-gguf`` as f32 and f16 (llama.cpp's ``deci``
   architecture: per-layer head counts and FFN lengths).
3. For every GGUF file, in the venv, one process per file (``llama_cpp.Llama(model_path=…)``):
   the prompt texts tokenized by llama.cpp from the file's tokenizer metadata against
   transformers' tokenizer; teacher-forced logits over the first prompt against transformers'
   (max absolute difference, share of positions with the same arg-max); greedy continuations of
   every prompt from the same token ids (``generate(temp=0)``), their agreement with
   transformers' greedy tokens, and tokens/s (both engines: one prompt at a time after one
   warm-up, prompt processing included, ``--threads`` threads).
4. Cases SmolLM2 at 80 % does not reach: tiny random-weight Llama and Qwen2 decoders (SmolLM2's
   tokenizer, hidden 64, 4 layers) compressed to 50 % FLOPs, then with layer 0's attention, layer
   2's FFN and both blocks of layer 3 emptied, each leaving a bias (the exporter writes one
   all-zero unit there), and Qwen2's query/key/value biases; teacher-forced logits in llama.cpp
   against transformers'.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    SERVE_CACHE,
    run_child,
    serve_arguments,
    serve_compress,
    serve_folder,
    serve_prompts,
    token_agreement,
    transformers_generate,
)

HERE = Path(__file__).resolve().parent
VENV = SERVE_CACHE / "serve-venvs" / "llama.cpp"
PACKAGE = "llama-cpp-python==0.3.36"
WORK = SERVE_CACHE / "serve-check"

# run in the llama.cpp venv, one GGUF file per process
CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

job = json.loads(sys.argv[1])
args = {"model_path": job["gguf"], "n_ctx": job["n_ctx"], "n_threads": job["threads"], "verbose": False}
out = {"llama_cpp_python": llama_cpp.__version__}
# teacher-forced logits with the default (f16) KV cache, then with a float32 one
for i, kv in enumerate(({}, {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32})):
    llm = Llama(**args, **kv, logits_all=True)
    out["metadata_arch"] = llm.metadata.get("general.architecture")
    out["tokenized"] = [llm.tokenize(t.encode(), add_bos=True) for t in job["texts"]]
    llm.eval(job["logits_ids"])
    np.save(job["logits_file"] + str(i), np.array(llm.scores[: len(job["logits_ids"])], dtype=np.float32))
    del llm
if job["prompts"]:
    llm = Llama(**args)

    def greedy(ids):
        llm.reset()  # no reuse of the previous prompt's cache
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(token))
            if len(tokens) == job["new_tokens"]:
                return tokens

    greedy(job["prompts"][0])  # warm-up
    start = time.perf_counter()
    out["tokens"] = [greedy(ids) for ids in job["prompts"]]
    out["seconds"] = time.perf_counter() - start
print("RESULT " + json.dumps(out), flush=True)
"""


def ensure_venv() -> tuple[Path, float | None]:
    """The llama.cpp venv's python (built once; a ``DONE`` file marks it) and the build seconds."""
    python = VENV / "bin" / "python"
    if (VENV / "DONE").exists():
        return python, None
    print(f"building {PACKAGE} into {VENV} (llama.cpp from source: 20+ minutes)", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python", PACKAGE], check=True
    )
    (VENV / "DONE").write_text("ok\n")
    return python, time.perf_counter() - start


def export(folder: Path, out: Path, outtype: str) -> dict:
    """``statprune export-gguf`` (the library call the CLI makes), once; returns its summary."""
    from statprune.gguf_export import export_gguf

    summary_file = out.with_suffix(".json")
    if out.is_file() and summary_file.is_file():
        return json.loads(summary_file.read_text())
    start = time.perf_counter()
    summary = export_gguf(folder, out, outtype=outtype, overwrite=True)
    summary["export_seconds"] = round(time.perf_counter() - start, 1)
    summary_file.write_text(json.dumps(summary) + "\n")
    return summary


def llama_cpp_run(python: Path, gguf: Path, job: dict) -> tuple[dict, list[np.ndarray]]:
    """Runs ``CHILD`` on ``gguf``; returns its result and the teacher-forced logits (default f16
    KV cache, float32 KV cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        logits_file = Path(tmp) / "logits"
        spec = {"gguf": str(gguf), "n_ctx": 512, "logits_file": str(logits_file), **job}
        result, error = run_child(python, CHILD, spec, {"OMP_NUM_THREADS": str(job["threads"])}, tail=20)
        if result is None:
            raise RuntimeError(f"llama.cpp failed on {gguf.name}:\n{error}")
        return result, [np.load(f"{logits_file}{i}.npy") for i in (0, 1)]


def logits_match(reference, got) -> dict:
    """Max absolute logit difference (and relative to the largest reference logit), arg-max agreement."""
    diff = float(np.abs(reference - got).max())
    return {
        "max_abs_logit_diff": diff,
        "relative": diff / float(np.abs(reference).max()),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
        "positions": int(reference.shape[0]),
    }


def reference_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def tiny_case(family: str, tokenizer, texts: list[str]):
    """A tiny random-weight ``family`` decoder with SmolLM2's vocabulary, compressed to half its
    attention + FFN FLOPs, then emptied where the allocation rarely goes (layer 0's attention, layer
    2's FFN, both blocks of layer 3, each leaving a compensation bias) and saved; returns
    (model, folder)."""
    import torch
    import transformers

    import statprune
    from statprune.adapters import adapter_for
    from statprune.modeling_statprune import EmptyAttention
    from statprune.surgery import prune_heads, prune_neurons

    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=family == "llama",  # Qwen2 with its own output matrix
        initializer_range=0.1,  # logits far from uniform, so arg-max agreement means something
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    pruned, _ = statprune.compress(
        model, tokenizer, texts, keep_flops=0.5, samples=32, seq_len=64, pack=True, progress=False
    )
    adapter, base, hidden = adapter_for(pruned.config), pruned.model, config.hidden_size
    none, no_weight = torch.tensor([], dtype=torch.long), torch.zeros(hidden, 0)
    ops = pruned.config.statprune_ops
    with torch.no_grad():
        for layer in (0, 3):
            if isinstance(base.layers[layer].self_attn, EmptyAttention):
                continue
            ops += prune_heads(adapter, base, layer, [], no_weight, 0.1 * torch.randn(hidden))
        for layer in (2, 3):
            ops += prune_neurons(adapter, base, layer, none, no_weight, 0.1 * torch.randn(hidden))
    folder = statprune.save(pruned, WORK / f"tiny-{family}", tokenizer=tokenizer, overwrite=True)
    return pruned.eval(), Path(folder)


def _diffs(row: dict) -> str:
    return (
        f"{row['logits']['max_abs_logit_diff']:.2g} ({row['logits_f32_kv_cache']['max_abs_logit_diff']:.2g})"
    )


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "# llama.cpp serving of a compressed decoder",
        "",
        f"`python benchmarks/serve_check.py --prompts {s['prompts']} --prompt-tokens {s['prompt_tokens']} "
        f"--new-tokens {s['new_tokens']} --keep-params {s['keep_params']} --samples {s['samples']} "
        f"--threads {s['threads']}` on {res['machine']}. llama.cpp through `{PACKAGE}` (built from its "
        "sdist), loading the file `statprune export-gguf` wrote (architecture `deci`, per-layer head "
        "counts and FFN lengths); transformers (float32) as reference. Same prompt token ids for both "
        "engines (the first WSJ held-out lines); greedy; tokens/s: one prompt at a time after a warm-up, "
        "prompt processing included. Agreement: share of generated positions where llama.cpp's token "
        "equals transformers'. Logits: teacher-forced over the first prompt, with llama.cpp's default "
        "f16 KV cache and, in parentheses, a float32 one (`type_k`/`type_v`). vLLM: "
        "[serve_vllm.md](serve_vllm.md).",
        "",
        "| model | GGUF | size MiB | tokenization = transformers | max abs logit diff (f32 KV cache) "
        "| arg-max agreement | tokens = transformers | common prefix per prompt | llama.cpp tok/s "
        "| transformers tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in res["models"].items():
        for outtype, g in row["gguf"].items():
            lg, a = g["logits"], g["agreement"]
            lines.append(
                f"| {name} | {outtype} | {g['size_mib']:.0f} | {g['tokenization_equal']}/{s['prompts']} "
                f"| {_diffs(g)} | {lg['argmax_agreement']:.0%} | {a['token_agreement']:.1%} "
                f"| {a['common_prefix']} | {g['tok_s']:.1f} | {row['transformers']['tok_s']:.1f} |"
            )
    c = res["compressed"]
    lines += [
        "",
        f"Compressed model: {c['params_kept']:.1%} of attention+FFN parameters kept, bias compensation "
        f"{'on' if c['bias_compensation'] else 'off'}; query heads per layer {c['head_count']}; key/value "
        f"heads {c['head_count_kv']}; FFN neurons per layer {c['feed_forward_length']}.",
        "",
        "Edge cases (tiny random-weight decoders with SmolLM2's vocabulary, compressed to 50 % FLOPs, "
        "then layer 0's attention, layer 2's FFN and both blocks of layer 3 emptied, each leaving a "
        "compensation bias; f32 GGUF, teacher-forced logits over the first prompt):",
        "",
        "| model | heads per layer (0 = emptied) | FFN per layer | layers padded with one zero unit "
        "| max abs logit diff (f32 KV cache) | largest logit | arg-max agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in res["edge_cases"].items():
        lg = e["logits"]
        lines.append(
            f"| {name} | {e['heads']} | {e['ffn']} | {e['padded_layers']} | {_diffs(e)} "
            f"| {lg['max_abs_logit_diff'] / lg['relative']:.1f} | {lg['argmax_agreement']:.0%} |"
        )
    lines += [
        "",
        "Times (s): " + ", ".join(f"{k} {v}" for k, v in res["timings_s"].items()) + ". Tokens/s come "
        "from a machine shared with other jobs: they show that the engines run, not how fast.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = serve_arguments(__doc__.splitlines()[0], 8, 32, HERE / "serve_check.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--outtypes", default="f32,f16")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    python, build_s = ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    compressed_dir = serve_folder(args.model, args.keep_params, args.samples)
    compress_s = serve_compress(args.model, compressed_dir, args.keep_params, args.samples)

    import torch
    import transformers

    import statprune

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    texts, ids = serve_prompts(tokenizer, args.prompts, args.prompt_tokens)
    full_ids = [tokenizer(t)["input_ids"] for t in texts]
    report = statprune.load_report(compressed_dir)
    res: dict = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)",
        "prompt_token_ids": ids,
        "models": {},
        "compressed": {
            "folder": str(compressed_dir),
            "params_kept": report.params_kept,
            "bias_compensation": report.options.get("bias_compensation"),
        },
        "edge_cases": {},
    }
    timings: dict = {"llama.cpp build": round(build_s) if build_s else "cached"}
    timings["compress"] = round(compress_s) if compress_s else "cached"
    n_new = args.new_tokens * len(ids)
    job = {"texts": texts, "prompts": ids, "new_tokens": args.new_tokens, "threads": args.threads}
    for name, folder, compressed in (("dense", args.model, False), ("compressed", compressed_dir, True)):
        start = time.perf_counter()
        hf = transformers_generate(folder, compressed, ids, args.new_tokens)
        model = statprune.load(folder, dtype=torch.float32)
        ref = reference_logits(model, ids[0])
        del model
        row: dict = {"transformers": hf, "gguf": {}}
        for outtype in args.outtypes.split(","):
            summary = export(folder, WORK / f"{name}-{outtype}.gguf", outtype)
            got, logits = llama_cpp_run(python, Path(summary["path"]), {**job, "logits_ids": ids[0]})
            row["gguf"][outtype] = {
                "size_mib": summary["size_bytes"] / 2**20,
                "export_seconds": summary.get("export_seconds"),
                "metadata_arch": got["metadata_arch"],
                "tokenization_equal": sum(a == b for a, b in zip(got["tokenized"], full_ids, strict=True)),
                "logits": logits_match(ref, logits[0]),
                "logits_f32_kv_cache": logits_match(ref, logits[1]),
                "agreement": token_agreement(got["tokens"], hf["tokens"]),
                "tokens": got["tokens"],
                "seconds": got["seconds"],
                "tok_s": n_new / got["seconds"],
            }
            res["llama_cpp_python"] = got["llama_cpp_python"]
            if compressed:
                for key in ("head_count", "head_count_kv", "feed_forward_length", "padded_layers"):
                    res["compressed"][key] = summary[key]
            print(
                name,
                outtype,
                {k: row["gguf"][outtype][k] for k in ("logits", "agreement", "tok_s")},
                flush=True,
            )
        res["models"][name] = row
        timings[name] = round(time.perf_counter() - start)

    start = time.perf_counter()
    calib = (SERVE_CACHE / "corpora" / "wsj-calib.txt").read_text().splitlines()[:200]
    for family in ("llama", "qwen2"):
        model, folder = tiny_case(family, tokenizer, calib)
        summary = export(folder, WORK / f"tiny-{family}.gguf", "f32")
        got, logits = llama_cpp_run(
            python, Path(summary["path"]), {**job, "prompts": [], "texts": [], "logits_ids": ids[0]}
        )
        ref = reference_logits(model, ids[0])
        res["edge_cases"][f"tiny {family}"] = {
            "heads": [
                0 if i in summary["empty_attention"] else h for i, h in enumerate(summary["head_count"])
            ],
            "ffn": [
                0 if i in summary["empty_ffn"] else n for i, n in enumerate(summary["feed_forward_length"])
            ],
            "padded_layers": summary["padded_layers"],
            "logits": logits_match(ref, logits[0]),
            "logits_f32_kv_cache": logits_match(ref, logits[1]),
        }
        print(family, res["edge_cases"][f"tiny {family}"], flush=True)
    timings["edge cases"] = round(time.perf_counter() - start)
    timings["total"] = round(time.perf_counter() - t0)
    res["timings_s"] = timings
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
