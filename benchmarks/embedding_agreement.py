"""Do compressed sentence-embedding models keep what embeddings are used for? Neighbours and ranks.

    python benchmarks/embedding_agreement.py                       # MiniLM, every method, 0.9/0.7/0.5
    python benchmarks/embedding_agreement.py --model mpnet --methods stat,flap --budgets 0.7,0.5
    python benchmarks/embedding_agreement.py --methods stat-similarity   # the label-free remedy

Mean cosine to the original embedding says little about retrieval: a model can keep cosine 0.93 and
still reorder the neighbours. For each model, method and FLOPs budget this compresses the bare
encoder (mean pooling, no head) on 512 Rotten-Tomatoes calibration sentences (``rt-calib.txt``, seed
0, 128 tokens) and compares its embeddings of the 800 held-out sentences (``rt-test.jsonl``, the
test split no step tunes on; labels unused) with the original's: mean and minimum cosine, top-1 and
top-10 nearest-neighbour overlap within those 800 sentences (cosine, self excluded) and Spearman's
rank correlation of all 319,600 pairwise cosine similarities (``statprune.evaluate``). ``fisher``
is not run: it scores with a task head's loss, which a bare embedding model does not have.
``stat-similarity`` is STAT driven by a label-free head at the embedding (see
:class:`SimilarityToAnchorsForSequenceClassification`) instead of the residual-stream weighting.

Rows accumulate in ``benchmarks/embedding_agreement.json`` (a rerun replaces the rows of the
configurations it runs and keeps the others; each row is written as soon as it is measured), and
``benchmarks/embedding_agreement.md`` is rendered from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from statprune.calibration import read_examples, sample_examples, tokenize_examples
from statprune.driver import AnalysisCache, compress
from statprune.evaluate import evaluate
from statprune.persist import load, load_tokenizer

HERE = Path(__file__).resolve().parent
MODELS = {  # asset folder -> (display name, description)
    "minilm": ("MiniLM", "all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters)"),
    "mpnet": ("MPNet", "all-mpnet-base-v2 (12 layers, hidden 768, 109.5 M parameters)"),
}
METHODS = ("stat", "magnitude", "wanda-sp", "flap")
# STAT driven by a label-free loss at the embedding instead of the residual-stream weighting
SIMILARITY = "stat-similarity"
ANCHORS, TEMPERATURE = 32, 0.05
CALIB, TEST = "rt-calib.txt", "rt-test.jsonl"
SAMPLES, SEQ_LEN, SEED = 512, 128, 0
METRICS = (
    "cosine_mean",
    "cosine_min",
    "neighbor_overlap_at_1",
    "neighbor_overlap_at_10",
    "similarity_spearman",
)


def cache_dir() -> Path:
    return Path(os.environ.get("STATPRUNE_CACHE", Path.home() / ".cache" / "statprune"))


def asset(name: str) -> Path:
    """A cached asset folder, complete only once its DONE.json exists (``make assets-all``)."""
    path = cache_dir() / name
    if not (path / "DONE.json").exists():
        sys.exit(f"error: {path} is not ready (no DONE.json); run `make assets-all` first")
    return path


class SimilarityToAnchorsForSequenceClassification(torch.nn.Module):
    """A label-free task head over a bare encoder: an example's logits are the cosine similarities of
    its mean-pooled embedding to K fixed anchor embeddings (the dense model's, of K calibration
    sentences), divided by a temperature. The expected Fisher of this softmax (what STAT's gradient
    layer weighting and fisher error metric use for classifiers) measures how much a change at each
    block moves the example's similarity profile against the anchors: the similarity structure
    that retrieval relies on. The class name makes statprune treat it as a classifier head."""

    def __init__(self, encoder, anchors: torch.Tensor, temperature: float = TEMPERATURE):
        super().__init__()
        self.base_model, self.config = encoder, encoder.config
        self.register_buffer("anchors", torch.nn.functional.normalize(anchors.float(), dim=-1))
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        extra = {k: v for k, v in kwargs.items() if k == "token_type_ids"}
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        unit = torch.nn.functional.normalize(pooled, dim=-1)
        return SequenceClassifierOutput(logits=unit @ self.anchors.T / self.temperature)


def anchor_embeddings(encoder, batches, count: int) -> torch.Tensor:
    """The dense encoder's mean-pooled embeddings of the first ``count`` calibration examples."""
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = batch.inputs
            hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
            mask = inputs["attention_mask"].to(hidden.dtype).unsqueeze(-1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            if sum(len(o) for o in out) >= count:
                break
    return torch.cat(out)[:count]


def measure(
    model_key: str, methods: list[str], budgets: list[float], samples: int, eval_samples: int | None, record
) -> None:
    """Compress ``model_key`` with every method at every budget; ``record(row)`` after each run."""
    model_dir, corpora = asset(model_key), asset("corpora")
    tokenizer = load_tokenizer(model_dir)
    # the bare encoder: all-mpnet-base-v2's config names MPNetForMaskedLM, whose LM head is not in
    # the checkpoint (randomly initialised on load) and would otherwise drive STAT's gradient weighting
    dense = load(model_dir).base_model
    texts = read_examples(corpora / CALIB)
    chosen = sample_examples(texts, samples, SEED)
    batches = tokenize_examples(tokenizer, chosen, seq_len=SEQ_LEN, batch_size=16)
    tests = read_examples(corpora / TEST)
    if eval_samples is not None:
        tests = tests[:eval_samples]
    for method in methods:
        cache = AnalysisCache()  # the budgets of one method share its analysis pass
        source, options = dense, {"method": method}
        if method == SIMILARITY:
            anchors = anchor_embeddings(dense, batches, ANCHORS)
            source = SimilarityToAnchorsForSequenceClassification(dense, anchors)
            options = {"method": "stat"}
        for budget in budgets:
            tic = time.perf_counter()
            model, report = compress(
                source,
                tokenizer,
                batches,
                keep_flops=budget,
                seq_len=SEQ_LEN,
                cache=cache,
                progress=False,
                **options,
            )
            seconds = time.perf_counter() - tic
            model = model.base_model
            result = evaluate(model, tokenizer, tests, task="embed", reference=dense, seq_len=SEQ_LEN)
            row = {
                "model": MODELS[model_key][0],
                "method": method,
                "budget": budget,
                "flops_kept": report.flops_kept,
                "params_kept": report.params_kept,
                **{m: getattr(result, m) for m in METRICS},
                "similarity_spearman_examples": result.similarity_spearman_examples,
                "n_examples": result.n_examples,
                "calibration_samples": len(chosen),
                "compress_seconds": round(seconds, 1),
            }
            record(row)
            print(
                f"{row['model']:<7} {method:<9} {budget:.2f}: cosine {row['cosine_mean']:.4f}  "
                f"top-1 {row['neighbor_overlap_at_1']:.4f}  top-10 {row['neighbor_overlap_at_10']:.4f}  "
                f"spearman {row['similarity_spearman']:.4f}  ({seconds:.0f} s)",
                flush=True,
            )
            del model


def markdown(data: dict) -> str:
    """The section for RESULTS.md: protocol, one table per model, and what the numbers say."""
    rows = data["rows"]
    samples = sorted({r.get("calibration_samples", SAMPLES) for r in rows})
    lines = [
        "## Embedding models: neighbours and similarity ranks",
        "",
        f"Regenerated by `python benchmarks/embedding_agreement.py` (see its docstring for the exact "
        f"commands; machine: {data['machine']}). Protocol: bare sentence encoders (mean pooling, no "
        f"head), compressed without retraining on {' / '.join(map(str, samples))} unlabeled "
        "calibration sentences drawn with "
        f"seed {SEED} from `{CALIB}`, {SEQ_LEN} tokens; budgets are fractions of attention+FFN FLOPs at "
        f"sequence length {SEQ_LEN}. Each compressed model's embeddings of the held-out sentences of "
        f"`{TEST}` are compared with the original's: mean / min cosine to the original embedding of the "
        "same sentence; top-1 / top-10 nearest-neighbour overlap (the fraction of each sentence's k "
        "nearest neighbours among the evaluated sentences, by cosine, itself excluded, that the "
        "original also puts among its k nearest, averaged); Spearman's rank correlation of all "
        "pairwise cosine similarities. `fisher` is absent: it needs a task head's loss, which bare "
        "embedding models lack.",
        "",
    ]
    for name, description in MODELS.values():
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        methods = [m for m in (*METHODS, SIMILARITY) if any(r["method"] == m for r in mine)]
        mine.sort(key=lambda r: (-r["budget"], methods.index(r["method"])))
        lines += [
            f"### {name}",
            "",
            f"{description}; {mine[0]['n_examples']} held-out sentences."
            + (
                ""
                if set(METHODS) <= set(methods)
                else " Not run on this model (CPU time): "
                + ", ".join(m for m in METHODS if m not in methods)
                + "."
            ),
            "",
            "| keep FLOPs | method | achieved | mean cosine | min cosine | top-1 overlap | top-10 overlap "
            "| Spearman | compress s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            lines.append(
                f"| {r['budget']:.0%} | {r['method']} | {r['flops_kept']:.1%} | {r['cosine_mean']:.4f} | "
                f"{r['cosine_min']:.4f} | {r['neighbor_overlap_at_1']:.3f} | "
                f"{r['neighbor_overlap_at_10']:.3f} "
                f"| {r['similarity_spearman']:.4f} | {r['compress_seconds']:.0f} |"
            )
        lines += [""]
        best = {}
        for r in mine:
            if (
                r["budget"] not in best
                or r["neighbor_overlap_at_10"] > best[r["budget"]]["neighbor_overlap_at_10"]
            ):
                best[r["budget"]] = r
        wins = ", ".join(
            f"{b:.0%}: {r['method']} ({r['neighbor_overlap_at_1']:.1%} top-1, "
            f"{r['neighbor_overlap_at_10']:.1%} top-10)"
            for b, r in best.items()
        )
        lines += [f"Best top-10 overlap per budget — {wins}.", ""]
        stat = {r["budget"]: r for r in mine if r["method"] == "stat"}
        if stat:
            lowest = stat[min(stat)]
            lines += [
                f"Neighbours move long before the mean cosine does: at {lowest['budget']:.0%} FLOPs STAT "
                f"keeps a mean cosine of {lowest['cosine_mean']:.3f} to the original embeddings, yet only "
                f"{lowest['neighbor_overlap_at_1']:.1%} of the sentences keep their nearest neighbour and "
                f"{lowest['neighbor_overlap_at_10']:.1%} of the 10 nearest stay among the 10 nearest.",
                "",
            ]
        similarity = {r["budget"]: r for r in mine if r["method"] == SIMILARITY}
        shared = sorted(set(similarity) & set(stat), reverse=True)
        if shared:

            def delta(b: float, key: str, similarity=similarity, stat=stat) -> float:
                return similarity[b][key] - stat[b][key]

            deltas = "; ".join(
                f"{b:.0%}: top-1 {delta(b, 'neighbor_overlap_at_1'):+.3f}, "
                f"top-10 {delta(b, 'neighbor_overlap_at_10'):+.3f}, "
                f"Spearman {delta(b, 'similarity_spearman'):+.4f}, cosine {delta(b, 'cosine_mean'):+.4f}"
                for b in shared
            )
            lines += [
                f"`{SIMILARITY}` (the issue's suggested remedy, tried here): STAT's gradient layer weighting "
                f"and fisher error metric driven by a label-free loss at the embedding — the softmax over "
                f"cosine similarities to {ANCHORS} dense anchor embeddings of calibration sentences, "
                f"temperature {TEMPERATURE} (its expected Fisher) — instead of the residual-stream weighting "
                f"a bare encoder gets. Change against plain `stat`: {deltas}.",
                "",
            ]
    lines += [
        "Compression seconds: the budgets of one method share one analysis pass, counted in the first "
        "(largest) budget's time; measured on a shared machine, indicative only. One calibration seed: "
        "with 800 sentences, differences of a point or two in overlap are within sampling noise.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=list(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="0.9,0.7,0.5")
    parser.add_argument("--samples", type=int, default=SAMPLES, help=argparse.SUPPRESS)
    parser.add_argument("--eval-samples", type=int, help="first N test sentences (default: all 800)")
    parser.add_argument("--json", type=Path, default=HERE / "embedding_agreement.json")
    parser.add_argument("--md", type=Path, default=HERE / "embedding_agreement.md")
    parser.add_argument(
        "--merge",
        type=Path,
        metavar="OTHER.json",
        help="only add the rows of another run's --json (e.g. one run concurrently) and re-render",
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {*METHODS, SIMILARITY})
    if unknown:
        parser.error(
            f"unknown or inapplicable methods {unknown}; choose from {', '.join((*METHODS, SIMILARITY))} "
            "(fisher needs a task head)"
        )
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    data["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    )

    def record(row: dict) -> None:
        key = (row["model"], row["method"], row["budget"])
        data["rows"] = [r for r in data["rows"] if (r["model"], r["method"], r["budget"]) != key] + [row]
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        args.md.write_text(markdown(data))

    if args.merge is not None:
        for row in json.loads(args.merge.read_text())["rows"]:
            record(row)
        print(f"merged {args.merge} into {args.json} and {args.md}")
        return 0
    measure(args.model, methods, budgets, args.samples, args.eval_samples, record)
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
