"""Which loss the fisher baseline ranks by, measured on the training portion (test split untouched).

    python benchmarks/fisher_labels.py --model mpnet-mr --budgets 0.6,0.5 --labels predicted,expected,given

Kwon et al. 2022 compute the mask gradients from labelled training data; statprune's benchmark
gives every method the same unlabelled calibration sentences, so `fisher` scores a classifier
against its own argmax predictions (`predicted`) or by the expected Fisher under its predictive
distribution (`expected`). `given` attaches the training labels to the same calibration sentences
(they are the fine-tuning sentences of the MR assets), i.e. Kwon's own setting. Evaluation: 800
training sentences drawn with seed 1 (accuracy and agreement with the dense model).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from common import assets

import statprune.fisher_grads as fisher_grads
from statprune.persist import load_tokenizer
from statprune.sweep import sweep


def _attach_training_labels(model_dir: Path, train: list[dict]) -> None:
    """Make the fisher pass see each calibration sentence's training label (matched by token ids)."""
    tokenizer = load_tokenizer(model_dir)
    label_of = {
        tuple(tokenizer(r["text"], truncation=True, max_length=128)["input_ids"]): r["label"] for r in train
    }
    collect = fisher_grads.collect_mask_gradients

    def with_labels(model, adapter, batches, *args, **kwargs):
        for b in batches:
            rows = zip(b.inputs["input_ids"], b.inputs["attention_mask"], strict=True)
            b.inputs["labels"] = torch.tensor([label_of[tuple(ids[m.bool()].tolist())] for ids, m in rows])
        try:
            return collect(model, adapter, batches, *args, **kwargs)
        finally:
            for b in batches:
                b.inputs.pop("labels")

    fisher_grads.collect_mask_gradients = with_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpnet-mr", help="minilm-mr or mpnet-mr")
    parser.add_argument("--budgets", default="0.6,0.5")
    parser.add_argument("--labels", default="predicted,expected,given")
    args = parser.parse_args()
    corpora, model_dir = assets.ensure("corpora"), assets.ensure(args.model)
    train = [json.loads(line) for line in (corpora / "rt-train.jsonl").read_text().splitlines()]
    held = list(train)
    random.Random(1).shuffle(held)
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = Path(tmp) / "train-800.jsonl"
        evaluation.write_text("".join(json.dumps(r) + "\n" for r in held[:800]))
        for labels in args.labels.split(","):
            options = {} if labels == "given" else {"fisher_labels": labels}
            plain = fisher_grads.collect_mask_gradients
            if labels == "given":
                _attach_training_labels(model_dir, train)
            try:
                result = sweep(
                    model_dir,
                    corpora / "rt-calib.txt",
                    evaluation,
                    budgets=args.budgets,
                    methods=["fisher"],
                    samples=512,
                    seq_len=128,
                    out=Path(tmp) / labels,
                    device="cpu",
                    log=None,
                    **options,
                )
            finally:
                fisher_grads.collect_mask_gradients = plain
            for r in result.rows:
                print(
                    f"{args.model} labels={labels} keep={r.budget:g}: accuracy {r.value:.4f} "
                    f"(dense {r.dense_value:.4f}), agreement {r.agreement:.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
