"""Outside check (issue #3): the real `torch-pruning` package on MiniLM-MR, next to statprune's numbers.

    python benchmarks/torch_pruning_check.py                 # writes benchmarks/outside_check.json
    python benchmarks/torch_pruning_check.py --out /tmp/x.json --budgets 0.6

torch-pruning's ``MetaPruner`` removes whole attention heads (``prune_num_heads=True``,
``prune_head_dims=False``, heads grouped through ``num_heads`` on each ``BertSelfAttention``'s
query/key/value) and FFN neurons (``intermediate.dense`` outputs) of the fine-tuned
BertForSequenceClassification. The hidden (residual) width, the embeddings, the pooler and the
classifier are left alone (``ignored_layers``), so the result has the same shape family as
statprune's. One ratio ``r`` is used for both heads and neurons, in two allocations: ``uniform``
(``global_pruning=False``: every layer loses ``ceil(12·r)`` heads and a fraction ``r`` of its
neurons) and ``global`` (``global_pruning=True``: one ranking over all layers). ``r`` is
bisected so that the attention+FFN FLOPs fraction kept, counted by ``statprune.flops`` at sequence
length 128 (the accounting of the committed benchmark), is as close as possible to each budget.

Importance: ``MagnitudeImportance(p=2)`` (group L2 norm) and ``TaylorImportance`` (|w·∂L/∂w|
per group), where L is the cross-entropy of the dense model against its own argmax predictions on
the 512 calibration sentences statprune draws (``sample_examples(texts, 512, 0)``, at most 128
tokens): no labels are used. No correction and no retraining follow the removal.

Every pruned model is checked against the dense one with the removed heads' and neurons' columns
of the next projection zeroed (which is what removing them means): the logits must agree.
Accuracy and agreement come from ``statprune.evaluate.evaluate`` on the 800 test sentences.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import HERE, assets

from statprune.adapters import adapter_for
from statprune.calibration import read_examples, sample_examples, tokenize_examples
from statprune.evaluate import evaluate, read_labels
from statprune.flops import model_shapes, total_cost

MODEL = "MiniLM-MR"
SEQ_LEN = 128
SAMPLES = 512
SEED = 0
ALLOCATIONS = ("uniform", "global")
IMPORTANCES = ("magnitude", "taylor")
IMPORTANCE_NAMES = {
    "magnitude": "MagnitudeImportance(p=2) (group L2 norm)",
    "taylor": "TaylorImportance (|w·grad|, CE vs own predictions)",
}


def tool_name() -> str:
    from importlib.metadata import version

    return f"torch-pruning {version('torch-pruning')}"


def load_dense(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model.eval(), tokenizer


def flops_fraction(dense, model) -> float:
    adapter = adapter_for(dense.config)
    before = model_shapes(adapter, dense.base_model)
    after = model_shapes(adapter, model.base_model)
    full = total_cost(before, [(s.n_heads, s.ffn_width) for s in before], "flops", SEQ_LEN)
    kept = total_cost(after, [(s.n_heads, s.ffn_width) for s in after], "flops", SEQ_LEN)
    return kept / full


def taylor_gradients(model, batches) -> dict[str, torch.Tensor]:
    """Gradients of the summed cross-entropy against the model's own argmax, over ``batches``."""
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout
    for batch in batches:
        out = model(**batch.inputs).logits
        target = out.detach().argmax(-1)
        torch.nn.functional.cross_entropy(out, target, reduction="sum").backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def prune(dense, example_inputs, importance: str, allocation: str, ratio: float, grads=None):
    """A pruned copy of ``dense`` (torch-pruning MetaPruner, heads + FFN neurons at ``ratio``)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(dense)
    if grads is not None:
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {lin: m.num_attention_heads for m in attentions for lin in (m.query, m.key, m.value)}
    if importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2)
    else:
        imp = tp.importance.TaylorImportance()
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=imp,
        global_pruning=allocation == "global",
        pruning_ratio=ratio,
        head_pruning_ratio=ratio,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        output_transform=lambda out: out.logits.sum(),
        ignored_layers=[model.bert.embeddings, model.bert.pooler, model.classifier],
        # fresh dicts: MetaPruner's defaults are shared mutable dicts it writes into
        in_channel_groups={},
        out_channel_groups={},
    )
    for group in pruner.step(interactive=True):
        group.prune()
    # as torch-pruning's examples/transformers/prune_hf_bert.py does after pruning
    for m in attentions:
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
        if m.num_attention_heads * m.attention_head_size != m.all_head_size:
            raise RuntimeError(
                f"head bookkeeping is off: {m.num_attention_heads} heads x {m.attention_head_size} "
                f"!= {m.all_head_size} query outputs"
            )
    model.zero_grad(set_to_none=True)
    return model.eval()


def _match_rows(rows: torch.Tensor, dense_rows: torch.Tensor) -> list[int]:
    """Index in ``dense_rows`` of each row of ``rows`` (rows are exact copies)."""
    dist = torch.cdist(rows.double(), dense_rows.double())
    best = dist.argmin(dim=1)
    if float(dist.gather(1, best[:, None]).max()) > 1e-6:
        raise RuntimeError("a kept row does not match any dense row: torch-pruning changed the weights")
    if len(set(best.tolist())) != len(best):
        raise RuntimeError("two kept rows match the same dense row")
    return best.tolist()


def masked_equivalent(dense, model):
    """The dense model with the columns of the next projection that read removed heads / neurons
    zeroed: exactly what removing them computes. Also returns (heads kept, neurons kept)."""
    masked = copy.deepcopy(dense)
    heads, neurons = [], []
    for lp, ld, lm in zip(
        model.bert.encoder.layer, dense.bert.encoder.layer, masked.bert.encoder.layer, strict=True
    ):
        sa, sd = lp.attention.self, ld.attention.self
        hd = sd.attention_head_size
        kept = _match_rows(
            sa.query.weight.detach().reshape(-1, hd * sd.query.in_features),
            sd.query.weight.detach().reshape(sd.num_attention_heads, -1),
        )
        # key/value/output must have kept the same heads, in the same order
        for name in ("key", "value"):
            got = _match_rows(
                getattr(sa, name).weight.detach().reshape(-1, hd * sd.query.in_features),
                getattr(sd, name).weight.detach().reshape(sd.num_attention_heads, -1),
            )
            if got != kept:
                raise RuntimeError(f"{name} kept heads {got} but query kept {kept}")
        drop = torch.ones(sd.num_attention_heads, hd, dtype=torch.bool)
        drop[kept] = False
        with torch.no_grad():
            lm.attention.output.dense.weight[:, drop.flatten()] = 0
        width = ld.intermediate.dense.out_features
        kept_n = _match_rows(lp.intermediate.dense.weight.detach(), ld.intermediate.dense.weight.detach())
        drop_n = torch.ones(width, dtype=torch.bool)
        drop_n[kept_n] = False
        with torch.no_grad():
            lm.output.dense.weight[:, drop_n] = 0
        heads.append(len(kept))
        neurons.append(len(kept_n))
    return masked.eval(), heads, neurons


def search_ratio(dense, example_inputs, importance, allocation, target, grads, steps=14):
    """Bisect r in [0.02, 0.98]: FLOPs kept falls as r grows. Returns the r closest to target."""
    lo, hi = 0.02, 0.98
    tried: dict[float, float] = {}

    def achieved(r: float) -> float:
        if r not in tried:
            tried[r] = flops_fraction(dense, prune(dense, example_inputs, importance, allocation, r, grads))
        return tried[r]

    for _ in range(steps):
        mid = (lo + hi) / 2
        if achieved(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda r: (abs(tried[r] - target), r))
    return best, tried[best], len(tried)


def ours(results: Path, budget: float) -> dict[str, float | None]:
    """statprune's committed MiniLM-MR values at ``budget`` (method -> accuracy)."""
    if not results.exists():
        return {}
    rows = json.loads(results.read_text())
    return {
        r["method"]: r["value"]
        for r in rows
        if r["model"] == MODEL and r.get("budget") is not None and abs(r["budget"] - budget) < 1e-9
    }


def markdown(rows: list[dict], results: Path) -> str:
    lines = [
        "| allocation | importance | budget | achieved | accuracy | agreement | dense | "
        "statprune stat | statprune magnitude | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mine = ours(results, r["budget"])

        def fmt(v):
            return "–" if v is None else f"{v:.4f}"

        lines.append(
            f"| {r['allocation']} | {r['importance']} | {r['budget']:.0%} | {r['achieved']:.1%} "
            f"| {fmt(r['value'])} | {fmt(r['agreement'])} | {r['dense_value']:.4f} "
            f"| {fmt(mine.get('stat'))} | {fmt(mine.get('magnitude'))} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "outside_check.json")
    parser.add_argument("--budgets", default="0.6,0.4", help="attention+FFN FLOPs fractions to keep")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]

    model_dir = assets.ensure("minilm-mr")
    corpora = assets.ensure("corpora")
    dense, tokenizer = load_dense(model_dir)
    test_path = corpora / "rt-test.jsonl"
    texts = read_examples(test_path)
    labels = read_labels(test_path)
    dense_eval = evaluate(dense, tokenizer, texts, labels=labels, seq_len=SEQ_LEN)
    dense_value = dense_eval.accuracy
    print(f"dense accuracy {dense_value:.4f} on {dense_eval.n_examples} test sentences", flush=True)

    calib = sample_examples(read_examples(corpora / "rt-calib.txt"), SAMPLES, SEED)
    example_inputs = dict(
        tokenizer(calib[:2], padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    )
    grads, grad_seconds = None, 0.0
    if "taylor" in args.importances.split(","):
        t0 = time.perf_counter()
        grads = taylor_gradients(dense, tokenize_examples(tokenizer, calib, seq_len=SEQ_LEN, batch_size=16))
        grad_seconds = time.perf_counter() - t0
        print(f"Taylor gradients on {len(calib)} calibration sentences: {grad_seconds:.1f} s", flush=True)

    probe = {
        k: v[:8]
        for k, v in dict(
            tokenizer(texts[:8], padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
        ).items()
    }
    rows = []
    for allocation in args.allocations.split(","):
        for importance in args.importances.split(","):
            g = grads if importance == "taylor" else None
            for budget in budgets:
                t0 = time.perf_counter()
                ratio, _, trials = search_ratio(dense, example_inputs, importance, allocation, budget, g)
                search_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                model = prune(dense, example_inputs, importance, allocation, ratio, g)
                seconds = time.perf_counter() - t0 + (grad_seconds if g is not None else 0.0)
                achieved = flops_fraction(dense, model)
                masked, heads, neurons = masked_equivalent(dense, model)
                with torch.no_grad():
                    diff = float((model(**probe).logits - masked(**probe).logits).abs().max())
                if diff > 1e-3:
                    raise RuntimeError(f"pruned model differs from the masked dense model by {diff:g}")
                result = evaluate(model, tokenizer, texts, labels=labels, reference=dense, seq_len=SEQ_LEN)
                row = {
                    "model": MODEL,
                    "tool": tool_name(),
                    "importance": importance,
                    "allocation": allocation,
                    "budget": budget,
                    "achieved": round(achieved, 4),
                    "metric": "accuracy",
                    "value": result.accuracy,
                    "dense_value": dense_value,
                    "agreement": result.agreement,
                    "seconds": round(seconds, 2),
                    "ratio": round(ratio, 4),
                    "search_trials": trials,
                    "search_seconds": round(search_seconds, 1),
                    "heads_kept": heads,
                    "neurons_kept": neurons,
                    "masked_logit_diff": diff,
                }
                rows.append(row)
                print(
                    f"{allocation:7s} {importance:9s} budget {budget:.0%}: r={ratio:.4f} achieved "
                    f"{achieved:.1%} heads {heads} neurons {neurons} accuracy {result.accuracy:.4f} "
                    f"agreement {result.agreement:.4f} (|logit - masked| {diff:.1e})",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(markdown(rows, HERE / "results.json"))
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
