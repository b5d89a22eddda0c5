"""The fine-tuning loop of the classifier assets (pure helpers tested without torch)."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimizer updates per epoch: the last, smaller batch counts as one."""
    if n_rows < 1 or batch_size < 1:
        raise ValueError("need at least one row and a positive batch size")
    return -(-n_rows // batch_size)


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """``ceil(total * frac)`` (as the transformers Trainer rounds ``warmup_ratio``)."""
    if not 0.0 <= warmup_frac <= 1.0:
        raise ValueError(f"warmup fraction {warmup_frac} is not in [0, 1]")
    return math.ceil(round(total_steps * warmup_frac, 9))


def linear_schedule(step: int, total_steps: int, warmup: int) -> float:
    """Learning-rate multiplier before update ``step`` (0-based): ``step / warmup`` while warming
    up, then a straight line down to 0 at ``total_steps`` (== get_linear_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def epoch_order(n_rows: int, epoch: int, seed: int) -> list[int]:
    """Row order for one epoch: a permutation that depends only on (seed, epoch, n_rows)."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_batches(n_rows: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """``epoch_order`` cut into consecutive batches of ``batch_size`` (the last may be short)."""
    order = epoch_order(n_rows, epoch, seed)
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    return sum(int(p) == int(y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices, none on biases and norm layers."""
    import torch

    no_decay: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname == "bias" or isinstance(module, torch.nn.LayerNorm):
                no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def predict_labels(model, tok, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """argmax labels and the stacked logits (eval mode, no grad, batches in the given order)."""
    import torch

    model.eval()
    logits = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits.append(model(**enc).logits.float())
    stacked = torch.cat(logits)
    return stacked.argmax(-1).tolist(), stacked


def finetune_classifier(
    model,
    tok,
    rows: Sequence[dict],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    max_length: int,
    warmup_frac: float,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    adam_betas: Sequence[float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    seed: int = 0,
    eval_rows: Sequence[dict] | None = None,
    eval_batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Fine-tune a ``*ForSequenceClassification`` in place on ``rows`` (``{"text", "label"}``).

    Deterministic given ``seed`` and the model's initial weights: the global torch RNG (dropout)
    is re-seeded here, the batch order comes from ``epoch_batches``.  When ``eval_rows`` are given
    their accuracy is measured after every epoch.  Returns the schedule and per-epoch history.
    """
    import torch

    torch.manual_seed(seed)
    per_epoch = steps_per_epoch(len(rows), batch_size)
    total = per_epoch * epochs
    warm = warmup_steps(total, warmup_frac)
    opt = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=tuple(adam_betas), eps=adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, total, warm))
    texts = [r["text"] for r in rows]
    labels = [int(r["label"]) for r in rows]
    history = []
    step = 0
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        loss_sum, seen, correct = 0.0, 0, 0
        for batch in epoch_batches(len(rows), batch_size, epoch, seed):
            enc = tok(
                [texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            y = torch.tensor([labels[i] for i in batch])
            out = model(**enc, labels=y)
            out.loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += float(out.loss.detach()) * len(batch)
            correct += int((out.logits.detach().argmax(-1) == y).sum())
            seen += len(batch)
            if progress and (step % 10 == 0 or step == total):
                progress(
                    f"epoch {epoch + 1}/{epochs} step {step}/{total} "
                    f"loss {loss_sum / seen:.4f} ({time.time() - t0:.0f}s this epoch)"
                )
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 5),
            "train_accuracy": round(correct / seen, 5),
            "seconds": round(time.time() - t0, 1),
        }
        if eval_rows:
            preds, _ = predict_labels(model, tok, [r["text"] for r in eval_rows], max_length, eval_batch_size)
            record["eval_accuracy"] = round(accuracy(preds, [r["label"] for r in eval_rows]), 5)
        history.append(record)
        if progress:
            progress(f"epoch {epoch + 1} done: {json.dumps(record)}")
    return {
        "steps": total,
        "steps_per_epoch": per_epoch,
        "warmup_steps": warm,
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "seconds_with_eval": round(time.time() - t_start, 1),
        "history": history,
    }
