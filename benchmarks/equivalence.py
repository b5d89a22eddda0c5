"""Behaviour fingerprint of ``statprune.compress``: hashes of the pruned weights and reports.

Compresses (a) the real MiniLM demo through the CLI (``--keep-flops 0.6`` on ``rt-calib.txt``) and
(b) a tiny random BERT classifier and a tiny random Llama causal LM (built here, fixed seeds) at two
budgets with every method and several non-default options, and writes, per run, the sha256 of every
tensor of the pruned state dict, of the recorded surgery ops and of the report without timings.
Used to show that a refactor leaves the outputs bit-identical:

    python benchmarks/equivalence.py --out before.json      # on the old code
    python benchmarks/equivalence.py --out after.json --compare before.json

About 2-4 minutes on one CPU core (``--skip-minilm``: under a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import statprune

MINILM = Path.home() / ".cache" / "statprune" / "minilm"
RT_CALIB = Path.home() / ".cache" / "statprune" / "corpora" / "rt-calib.txt"
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "over",
    "fence",
    "quick",
    "brown",
    "fox",
    "jumps",
    "lazy",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
TIMINGS = ("seconds", "stage_seconds", "peak_device_mb", "source_model", "versions")


def tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def texts(n: int = 160, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]


def tiny(family: str, task: str = "head"):
    import transformers as tf

    torch.manual_seed(1234)
    common = {
        "vocab_size": len(SPECIALS) + len(WORDS),
        "num_hidden_layers": 3,
        "hidden_size": 48,
        "num_attention_heads": 4,
        "intermediate_size": 96,
    }
    if family == "llama":
        config = tf.LlamaConfig(
            **common,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return tf.AutoModelForCausalLM.from_config(config).eval()
    config = tf.BertConfig(**common, max_position_embeddings=130, num_labels=3, pad_token_id=0)
    cls = tf.AutoModelForSequenceClassification if task == "head" else tf.AutoModel
    return cls.from_config(config).eval()


def digest(model, report) -> dict:
    tensors = {}
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        tensors[name] = h.hexdigest()[:16]
    ops = json.dumps(getattr(model.config, "statprune_ops", None), sort_keys=True)
    data = {k: v for k, v in report.to_dict().items() if k not in TIMINGS}
    return {
        "weights": hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest(),
        "tensors": tensors,
        "ops": hashlib.sha256(ops.encode()).hexdigest(),
        "report": data,
    }


def tiny_cases() -> list[tuple[str, str, dict]]:
    cases: list[tuple[str, str, dict]] = []
    methods = ("stat", "magnitude", "wanda-sp", "flap", "fisher")
    for family in ("bert", "llama"):
        for budget in ({"keep_flops": 0.7}, {"keep_params": 0.45}):
            for method in methods:
                cases.append((family, "head", {"method": method, **budget}))
        flops = {"keep_flops": 0.55}
        cases += [
            (family, "head", {**flops, "activations": "sequential"}),
            (family, "head", {**flops, "activations": "original"}),
            (family, "head", {**flops, "activations": "sequential", "correction_target": "original"}),
            (family, "head", {**flops, "error_metric": "euclidean"}),
            (family, "head", {**flops, "layer_weighting": "residual"}),
            (family, "head", {**flops, "layer_weighting": "gradient-only"}),
            (family, "head", {**flops, "correction_ridge": 0.1, "round_to": 8}),
            (family, "head", {"keep_flops": 0.8, "prune": ("neurons",), "bias_compensation": False}),
            (family, "head", {**flops, "gram_dtype": "float64", "method": "wanda-sp"}),
            (family, "head", {**flops, "method": "flap", "round_to": 16}),
            (family, "head", {**flops, "allocation": "uniform", "correction": False}),
            (family, "head", {**flops, "method": "fisher", "fisher_labels": "expected"}),
            (family, "head", {**flops, "method": "flap", "allocation": "uniform"}),
            (family, "head", {**flops, "offload": True, "device": "cpu"}),
            (family, "head", {**flops, "checkpoint_dir": "CKPT"}),
        ]
    cases.append(("bert", "base", {"keep_flops": 0.6}))
    cases.append(("bert", "base", {"keep_params": 0.5, "method": "wanda-sp"}))
    return cases


def run_tiny(results: dict) -> None:
    tok = tokenizer()
    data = texts()
    for family, task, options in tiny_cases():
        key = f"{family}-{task} " + ",".join(f"{k}={v}" for k, v in options.items())
        kwargs = dict(options)
        with tempfile.TemporaryDirectory() as tmp:
            if kwargs.get("checkpoint_dir") == "CKPT":
                kwargs["checkpoint_dir"] = str(Path(tmp) / "ckpt")
            model = tiny(family, task)
            try:
                pruned, report = statprune.compress(model, tok, data, progress=False, seed=3, **kwargs)
            except statprune.StatpruneError as exc:  # recorded: the same error must come again
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(key, results[key]["error"], flush=True)
                continue
        results[key] = digest(pruned, report)
        print(key, results[key]["weights"][:12], flush=True)
    # one analysis shared by two budgets (AnalysisCache), as sweep does
    cache = statprune.AnalysisCache()
    for family in ("bert", "llama"):
        model = tiny(family)
        for budget in (0.8, 0.5):
            pruned, report = statprune.compress(
                model, tok, data, progress=False, keep_flops=budget, cache=cache
            )
            key = f"{family}-head cache keep_flops={budget}"
            results[key] = digest(pruned, report)
            print(key, results[key]["weights"][:12], flush=True)


def run_minilm(results: dict) -> None:
    from safetensors.torch import load_file

    from statprune.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = [str(MINILM), "--data", str(RT_CALIB), "--keep-flops", "0.6", "--out", str(out), "--quiet"]
        if main(["compress", *args]) != 0:
            raise SystemExit("MiniLM compression failed")
        raw = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        tensors = load_file(out / "model.safetensors")
        report = json.loads((out / "statprune.json").read_text())
    hashes = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        hashes[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    results["minilm cli keep_flops=0.6"] = {
        "weights": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
        "safetensors_file": raw,
        "tensors": hashes,
        "report": {k: v for k, v in report.items() if k not in TIMINGS},
    }
    print("minilm", results["minilm cli keep_flops=0.6"]["weights"][:12], flush=True)


def compare(now: dict, before: dict) -> int:
    differ = 0
    for key in sorted(set(now) | set(before)):
        a, b = now.get(key), before.get(key)
        if a is None or b is None:
            print(f"MISSING {key}: {'before' if a is None else 'now'} lacks it")
            differ += 1
            continue
        parts = [p for p in ("weights", "ops", "report", "error") if a.get(p) != b.get(p)]
        if parts:
            differ += 1
            print(f"DIFFER {key}: {', '.join(parts)}")
    print(f"{len(now)} runs, {differ} differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="a previous output to compare with")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results: dict = {}
    run_tiny(results)
    if not args.skip_minilm:
        run_minilm(results)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is not None:
        return compare(results, json.loads(args.compare.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
