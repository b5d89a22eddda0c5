"""Evaluate a (compressed) model, alone or against the original it was compressed from.

Three kinds of evaluation, picked from the model's class unless ``task`` says otherwise:

* ``classify`` (``…ForSequenceClassification``): accuracy when labels are given; against a
  reference, top-1 agreement (fraction of identical argmax) and mean KL(reference || model).
* ``lm`` (``…ForCausalLM``): perplexity of the concatenated texts with a sliding window; against a
  reference, the perplexity ratio model / reference, top-1 next-token agreement and mean per-token
  KL(reference || model).
* ``embed`` (bare base models such as ``BertModel``; any model with ``task="embed"``):
  attention-mask-weighted mean-pooled last hidden states; against a reference, the mean and minimum
  per-example cosine similarity, and what retrieval and clustering rely on: the top-1 / top-10
  nearest-neighbour overlap with the reference within the evaluated set and the Spearman rank
  correlation of the pairwise cosine similarities (see :func:`embedding_agreement`).

Against a reference, the result also lists what a validation team looks at first: for ``classify``
a per-class breakdown (support, each model's accuracy on the class, agreement; the classes that
lost most first) and the examples whose prediction flipped (highest KL first); for ``embed`` the
examples with the lowest cosine to the reference; for ``lm`` the windows with the highest mean KL.
``statprune eval --fail-below [METRIC=]Q`` exits with status 3 when a metric falls below Q.

Everything runs in eval mode under ``torch.no_grad()`` without network access. Only the standard
library is imported at module level so that the command line stays quick to start.

    result = evaluate(model, tokenizer, texts, reference=original)
    print(result.summary())
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statprune.argtypes import positive_int, resolve_device, resolve_dtype
from statprune.errors import DataError, ModelError, OutputError
from statprune.guards import check_count, check_seq_len

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASKS",
    "EvalResult",
    "TaskResult",
    "add_eval_parser",
    "detect_task",
    "embedding_agreement",
    "evaluate",
    "evaluate_paths",
    "fail_below_checks",
    "read_labels",
    "run_eval",
]

TASKS = ("classify", "lm", "embed", "qa")  # qa: statprune.qa_eval (SQuAD-format JSONL)
DEFAULT_WINDOW = 256
DEFAULT_LABEL_FIELD = "label"
# Largest number of logits (rows x window x vocab) computed at once for ``lm``; rows are capped so
# that each float32 copy of the logits stays around 128 MiB whatever ``batch_size`` says.
_LM_LOGIT_BUDGET = 2**25
_SANE_MAX_LENGTH = 1_000_000  # tokenizers without a limit report model_max_length = 1e30
NEIGHBOR_KS = (1, 10)
DEFAULT_WORST = 50  # examples listed in ``worst_examples``
EXIT_BELOW = 3  # exit status of ``eval --fail-below`` when a metric falls below its bar
# metrics --fail-below may watch (higher is better); the default is the task's agreement measure
FAIL_METRICS = (
    "agreement",
    "accuracy",
    "cosine_mean",
    "cosine_min",
    "neighbor_overlap_at_1",
    "neighbor_overlap_at_10",
    "similarity_spearman",
    "exact_match",
    "f1",
)
DEFAULT_FAIL_METRIC = {
    "classify": "agreement",
    "lm": "agreement",
    "embed": "neighbor_overlap_at_10",
    "qa": "agreement",
}
GOLD_METRICS = ("accuracy", "exact_match", "f1")  # measured without --against
# the rank correlation of pairwise similarities uses at most this many examples (n(n-1)/2 pairs)
SPEARMAN_MAX_EXAMPLES = 2000
# nearest neighbours are searched among at most this many examples (O(n²) similarities)
NEIGHBOR_MAX_EXAMPLES = 20000


@dataclass
class TaskResult:
    """What every evaluation reports first: the task, the examples evaluated and the tokens fed to
    the model. :class:`EvalResult` (classify, lm, embed) and :class:`statprune.qa_eval.QAResult`
    add their metrics; ``eval --json`` writes :meth:`to_dict` and ``--fail-below`` reads the
    metrics by name (:func:`fail_below_checks`)."""

    task: str
    n_examples: int
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult(TaskResult):
    """Metrics of one evaluation; ``None`` where a metric does not apply.

    ``n_tokens`` counts the real (non-padding, after truncation) tokens fed to the model for
    ``classify`` / ``embed``, and the scored (predicted) tokens for ``lm``. ``agreement`` is top-1
    agreement with the reference (per example for ``classify``, per scored token for ``lm``) and
    ``kl`` the mean KL(reference || model) over the same units. ``seq_len`` is the truncation length
    actually used (``classify`` / ``embed``); ``window`` / ``stride`` those of ``lm``.
    """

    accuracy: float | None = None
    perplexity: float | None = None
    window: int | None = None
    stride: int | None = None
    agreement: float | None = None
    kl: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    # embed: mean fraction of each example's k nearest neighbours (cosine, within the evaluated
    # set, itself excluded) that the reference's embeddings also put among its k nearest
    neighbor_overlap_at_1: float | None = None
    neighbor_overlap_at_10: float | None = None
    neighbor_examples: int | None = None  # the examples searched (evenly spaced ones beyond a cap)
    # embed: Spearman's rho between the model's and the reference's pairwise cosine similarities
    similarity_spearman: float | None = None
    similarity_spearman_examples: int | None = None  # examples whose pairs entered it
    perplexity_ratio: float | None = None
    reference_perplexity: float | None = None
    reference_accuracy: float | None = None
    # 95 % intervals: Wilson's for the accuracy; for accuracy − reference accuracy, the normal
    # interval of the paired per-example differences (both models scored on the same examples)
    accuracy_interval: tuple[float, float] | None = None
    accuracy_change_interval: tuple[float, float] | None = None
    seconds: float = 0.0
    seq_len: int | None = None
    # classify with a reference: one dict per class (see :func:`per_class_breakdown`), the classes
    # that lost most first, and the number of examples whose top-1 prediction differs
    per_class: list[dict[str, Any]] | None = None
    flipped: int | None = None
    # with a reference: the examples (classify, embed) or windows (lm) that moved most, worst
    # first, at most ``worst`` of them; ``worst_rule`` says what was ranked
    worst_examples: list[dict[str, Any]] | None = None
    worst_rule: str | None = None

    def summary(self) -> str:
        """A compact human-readable report."""
        lines = [
            f"task: {self.task}   examples: {self.n_examples:,}   tokens: {self.n_tokens:,}   "
            f"({self.seconds:.1f} s)"
        ]
        if self.task == "lm":
            lines.append(f"window: {self.window}   stride: {self.stride}")
        if self.accuracy is not None:
            ref = ""
            if self.accuracy_interval is not None:
                ref = f"   (95% CI {self.accuracy_interval[0]:.4f}–{self.accuracy_interval[1]:.4f})"
            if self.reference_accuracy is not None:
                ref += f"   reference {self.reference_accuracy:.4f}"
            if self.accuracy_change_interval is not None:
                low, high = self.accuracy_change_interval
                change = self.accuracy - self.reference_accuracy
                ref += f", change {change:+.4f} (95% CI {low:+.4f} to {high:+.4f})"
            lines.append(f"accuracy: {self.accuracy:.4f}{ref}")
        if self.perplexity is not None:
            ref = ""
            if self.reference_perplexity is not None:
                ref = f"   (reference {self.reference_perplexity:.4f}, ratio {self.perplexity_ratio:.4f})"
            lines.append(f"perplexity: {self.perplexity:.4f}{ref}")
        if self.agreement is not None:
            unit = "next-token" if self.task == "lm" else "prediction"
            lines.append(f"top-1 {unit} agreement with reference: {self.agreement:.4f}")
        if self.kl is not None:
            lines.append(f"mean KL(reference || model): {self.kl:.6f}")
        if self.cosine_mean is not None:
            lines.append(
                f"cosine similarity to reference: mean {self.cosine_mean:.6f}   min {self.cosine_min:.6f}"
            )
        if self.neighbor_overlap_at_1 is not None:
            top10 = self.neighbor_overlap_at_10
            top10_text = "n/a (needs 11 examples)" if top10 is None else f"{top10:.4f}"
            lines.append(
                f"nearest-neighbour overlap with reference: top-1 {self.neighbor_overlap_at_1:.4f}   "
                f"top-10 {top10_text}   (cosine, within {self.neighbor_examples:,} examples)"
            )
        if self.similarity_spearman is not None:
            lines.append(
                f"rank correlation of pairwise similarities with reference (Spearman): "
                f"{self.similarity_spearman:.4f}"
            )
        if self.per_class:
            lines += ["", _per_class_table(self.per_class)]
        if self.flipped is not None:
            lines += [
                "",
                f"flipped predictions: {self.flipped:,} of {self.n_examples:,}"
                + (" (highest KL first):" if self.flipped else ""),
            ]
            lines += [_describe_worst(e) for e in (self.worst_examples or [])[:5]]
            listed = len(self.worst_examples or [])
            if self.flipped > 5:
                lines.append(
                    "  … all listed in the --json output"
                    if self.flipped <= listed
                    else f"  … the first {listed} in the --json output"
                )
        elif self.worst_examples:
            lines += worst_lines(self.worst_rule, self.worst_examples)
        return "\n".join(lines)


def _per_class_table(rows: list[dict[str, Any]], limit: int = 10) -> str:
    labelled = "accuracy" in rows[0]
    head = "per class, lost most first"
    if labelled:
        lines = [f"{head}:".ljust(34) + "support  accuracy  reference    change  agreement"]
    else:  # grouped by the reference's prediction
        lines = [f"{head} (by the reference's prediction):".ljust(50) + "support  agreement"]
    for row in rows[:limit]:
        name = str(row["label"])[:30]
        if labelled:
            lines.append(
                f"  {name:<30}{row['support']:>9,}{row['accuracy']:>10.4f}"
                f"{row['reference_accuracy']:>11.4f}{row['change']:>+10.4f}{row['agreement']:>11.4f}"
            )
        else:
            lines.append(f"  {name:<46}{row['support']:>9,}{row['agreement']:>11.4f}")
    if len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more classes in the --json output")
    return "\n".join(lines)


def worst_lines(rule: str | None, examples: list[dict[str, Any]]) -> list[str]:
    """The summary's list of what moved most: a blank line, ``rule:``, the first five entries."""
    return ["", f"{rule}:"] + [_describe_worst(e) for e in examples[:5]]


def _describe_worst(example: dict[str, Any]) -> str:
    if "question" in example:  # qa (statprune.qa_eval)
        question, answer, reference = example["question"][:60], example["answer"], example["reference"]
        return f"  #{example['index']}: {question!r} -> {answer!r} (reference {reference!r})"
    text = str(example.get("text", ""))
    text = text if len(text) <= 70 else text[:69] + "…"
    if "prediction" in example:
        label = "" if example.get("label") is None else f", label {example['label']}"
        return (
            f"  #{example['index']}: {example['reference_prediction']} -> {example['prediction']}"
            f"{label}, KL {example['kl']:.4f}: {text!r}"
        )
    if "cosine" in example:
        return f"  #{example['index']}: cosine {example['cosine']:.4f}: {text!r}"
    return f"  tokens {example['begin']}–{example['end']}: mean KL {example['kl']:.4f}: {text!r}"


# ---------------------------------------------------------------------------------- task choice


def _class_name(model: Any) -> str:
    return type(model).__name__


def _is_classifier(model: Any) -> bool:
    from statprune.adapters import task_head

    head = task_head(model)
    return head is not None and head.kind == "sequence-classification"


def _task_head(model: Any):
    from statprune.adapters import task_head

    return task_head(model)


def _is_causal_lm(model: Any) -> bool:
    from statprune.adapters import is_causal_lm

    return is_causal_lm(model)


def _is_base_model(model: Any) -> bool:
    return getattr(model, "base_model", None) is model


def detect_task(model: Any) -> str:
    """``classify`` for …ForSequenceClassification, ``lm`` for …ForCausalLM, ``embed`` for a bare
    base model (BertModel, MPNetModel, …); otherwise a ModelError asking for an explicit task."""
    if _is_classifier(model):
        return "classify"
    if getattr(_task_head(model), "kind", None) == "question-answering":
        return "qa"
    if _is_causal_lm(model):
        return "lm"
    if _is_base_model(model):
        return "embed"
    raise ModelError(
        f"cannot tell how to evaluate a {_class_name(model)}; pass --task embed "
        "(or --task classify / lm for models with those heads)"
    )


def _resolve_task(model: Any, task: str) -> str:
    if task == "auto":
        return detect_task(model)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use auto, {', '.join(TASKS)}")
    _check_task(model, task, "the model")
    return task


def _check_task(model: Any, task: str, which: str) -> None:
    name = _class_name(model)
    if task == "classify" and not _is_classifier(model):
        raise ModelError(
            f"--task classify needs a …ForSequenceClassification model but {which} is a {name}; "
            "pass --task embed or lm"
        )
    if task == "lm" and not _is_causal_lm(model):
        raise ModelError(
            f"--task lm needs a …ForCausalLM model but {which} is a {name}; pass --task embed or classify"
        )
    if task == "qa" and getattr(_task_head(model), "kind", None) != "question-answering":
        raise ModelError(f"--task qa needs a …ForQuestionAnswering model but {which} is a {name}")
    if task == "embed" and not hasattr(model, "base_model"):
        raise ModelError(f"--task embed needs a transformers model but {which} is a {name}")


def _check_reference(model: Any, reference: Any, task: str) -> None:
    _check_task(reference, task, "the reference model")
    config, ref_config = model.config, reference.config
    if task == "classify" and config.num_labels != ref_config.num_labels:
        raise ModelError(
            f"the model has {config.num_labels} labels but the reference has {ref_config.num_labels}; "
            "compare a model against the one it was compressed from"
        )
    vocab, ref_vocab = getattr(config, "vocab_size", None), getattr(ref_config, "vocab_size", None)
    if task in ("lm", "embed") and vocab != ref_vocab:
        raise ModelError(
            f"the model's vocabulary ({vocab} tokens) differs from the reference's ({ref_vocab}); "
            "compare a model against the one it was compressed from"
        )
    if task == "embed":
        size, ref_size = _hidden_size(model), _hidden_size(reference)
        if size != ref_size:
            raise ModelError(
                f"the model's embeddings have {size} dimensions but the reference's have {ref_size}; "
                "compare a model against the one it was compressed from"
            )


def _hidden_size(model: Any) -> int | None:
    config = model.config
    for name in ("hidden_size", "dim", "d_model", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


# ------------------------------------------------------------------------------------- helpers


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_worst(worst: int) -> None:
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise DataError(f"worst must be a non-negative integer, got {worst!r}")


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Every model given (``None`` skipped, each one once) in eval mode for the block; each gets
    its own training flag back after it, whatever happens."""
    distinct = list({id(m): m for m in models if m is not None}.values())
    training = [m.training for m in distinct]
    try:
        for m in distinct:
            m.eval()
        yield
    finally:
        for m, was_training in zip(distinct, training, strict=True):
            m.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    import torch

    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _accepts(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_inputs(module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as ``module`` wants it: on its device, ``token_type_ids`` only where the forward
    names them, and padded positions holding the model's own pad id (RoBERTa derives positions,
    decoder classifiers the last token, from it)."""
    out = {k: v for k, v in inputs.items() if k != "token_type_ids" or _accepts(module, k)}
    pad = getattr(module.config, "pad_token_id", None)
    if isinstance(pad, int):
        out["input_ids"] = out["input_ids"].masked_fill(~out["attention_mask"].bool(), pad)
    device = _device_of(module)
    return {k: v.to(device) for k, v in out.items()}


def _check_finite(values: torch.Tensor, which: str) -> None:
    import torch

    if not torch.isfinite(values).all():
        raise ModelError(
            f"{which} produced NaN or Inf outputs; check its weights, or evaluate with --dtype float32"
        )


def _truncation_length(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _SANE_MAX_LENGTH:
        return min(seq_len, limit)
    return seq_len


def _label_ids(labels: Sequence[Any], config: Any) -> list[int]:
    """Label values (ints, or strings naming ``config.label2id`` entries or ids) as class ids."""
    num_labels = int(config.num_labels)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    folded = {k.casefold(): v for k, v in label2id.items()}
    known = ", ".join(repr(k) for k in label2id) or "none"
    ids = []
    for number, label in enumerate(labels, start=1):
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(
                f"label of example {number} is {label!r}; labels must be integers 0..{num_labels - 1} "
                f"or label names ({known})"
            )
        if isinstance(label, str):
            text = label.strip()
            if text in label2id:
                value = label2id[text]
            elif text.casefold() in folded:
                value = folded[text.casefold()]
            else:
                try:
                    value = int(text)
                except ValueError:
                    raise DataError(
                        f"label {label!r} of example {number} is not one of the model's labels ({known}); "
                        f"use those names or ids 0..{num_labels - 1}"
                    ) from None
        else:
            value = label
        if not 0 <= value < num_labels:
            raise DataError(
                f"label {label!r} of example {number} is outside 0..{num_labels - 1}: the model has "
                f"{num_labels} labels; fix the data or --label-field"
            )
        ids.append(value)
    return ids


# ------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    *,
    task: str = "auto",
    reference: nn.Module | None = None,
    labels: Sequence[int | str] | None = None,
    seq_len: int = 128,
    batch_size: int = 32,
    window: int | None = None,
    stride: int | None = None,
    worst: int = DEFAULT_WORST,
) -> TaskResult:
    """Evaluate ``model`` on ``examples`` (texts, or (text, pair) tuples for classify / embed).

    ``task`` is ``auto`` (from the model's class, see :func:`detect_task`), ``classify``, ``lm``,
    ``embed`` or ``qa`` (``examples`` are then :class:`statprune.qa_eval.QAExample` records, the
    result a :class:`statprune.qa_eval.QAResult`; see :func:`statprune.qa_eval.evaluate_qa`).
    ``reference`` (typically the uncompressed original, sharing the tokenizer) adds the comparison
    metrics. ``labels`` (``classify`` only; one per example: ids, or names from
    ``config.label2id``) add accuracy. ``seq_len`` truncates each example (``classify`` /
    ``embed``); ``lm`` scores the texts joined by blank lines with windows of ``window`` tokens
    (default min(256, max positions)) moved by ``stride`` (default ``window``): every token is
    scored once, from the window whose scored part holds it. With a reference, ``worst`` bounds
    the examples (or windows) listed in ``worst_examples`` (0: none).
    """
    import torch

    task = _resolve_task(model, task)
    if task == "qa":  # examples: statprune.qa_eval.QAExample records
        from statprune.qa_eval import QAExample, evaluate_qa

        if not all(isinstance(e, QAExample) for e in examples):
            raise DataError("question answering needs QAExample records (statprune.qa_eval.read_squad_jsonl)")
        return evaluate_qa(
            model,
            tokenizer,
            list(examples),
            reference=reference,
            seq_len=seq_len,
            batch_size=batch_size,
            worst=worst,
        )
    _check_worst(worst)
    for name, value in (
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("window", window),
        ("stride", stride),
    ):
        _check_positive(name, value)
    check_seq_len(model, seq_len)  # one rule for every command (statprune.guards)
    examples = list(examples)
    if not examples:
        raise DataError("there are no examples to evaluate; provide some data")
    if labels is not None:
        if task != "classify":
            raise DataError(f"labels only apply to --task classify, not {task}; drop them")
        if len(labels) != len(examples):
            raise DataError(
                f"got {len(labels)} labels for {len(examples)} examples; give one label per example"
            )
    if reference is not None:
        _check_reference(model, reference, task)

    start = time.perf_counter()
    with eval_mode(model, reference), torch.no_grad():
        if task == "lm":
            result = _evaluate_lm(model, reference, tokenizer, examples, batch_size, window, stride, worst)
        else:
            seq_len = _truncation_length(tokenizer, seq_len)
            evaluate_batches = _evaluate_classify if task == "classify" else _evaluate_embed
            result = evaluate_batches(
                model, reference, tokenizer, examples, labels, seq_len, batch_size, worst
            )
            result.seq_len = seq_len
    result.seconds = time.perf_counter() - start
    return result


def _ordered_batches(tokenizer, examples, labels, seq_len, batch_size):
    """Batches via ``tokenize_examples`` with the labels kept in step.

    ``tokenize_examples`` sorts examples by token length (longest first, stable) and drops those
    without tokens; sorting them the same way beforehand makes its batches follow our order.
    """
    from statprune.calibration import tokenize_examples

    is_pair = [isinstance(e, tuple) for e in examples]
    if any(is_pair) and not all(is_pair):
        raise DataError("examples mix texts and (text, pair) tuples; use one kind")
    texts = [e[0] if isinstance(e, tuple) else e for e in examples]
    pairs = [e[1] for e in examples] if all(is_pair) else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=seq_len, padding=False, verbose=False)
    lengths = [min(len(ids), seq_len) for ids in encoded["input_ids"]]
    order = sorted((i for i in range(len(examples)) if lengths[i] > 0), key=lambda i: -lengths[i])
    if not order:
        raise DataError("no example produced any tokens; check the data")
    batches = tokenize_examples(tokenizer, [examples[i] for i in order], seq_len, batch_size)
    got = [int(n) for b in batches for n in b.inputs["attention_mask"].sum(dim=1)]
    if got != [lengths[i] for i in order]:  # tokenize_examples changed how it orders batches
        raise RuntimeError("statprune.evaluate: tokenize_examples no longer keeps the length order")
    ordered_labels = None if labels is None else [labels[i] for i in order]
    return batches, ordered_labels, order


def _class_logits(model, inputs: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    """Float32 logits on the CPU. Decoder classifiers without ``config.pad_token_id`` refuse padded
    batches (they cannot find each row's last token): those run one unpadded row at a time."""
    import torch

    try:
        out = model(**_model_inputs(model, inputs)).logits
    except ValueError as exc:
        if "padding token" not in str(exc):
            raise
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        rows = [{k: v[i : i + 1, :n] for k, v in inputs.items()} for i, n in enumerate(lengths)]
        out = torch.cat([model(**_model_inputs(model, row)).logits for row in rows])
    out = out.float()
    _check_finite(out, which)
    return out.cpu()


def _evaluate_classify(
    model, reference, tokenizer, examples, labels, seq_len, batch_size, worst
) -> EvalResult:
    import torch

    label_ids = None if labels is None else _label_ids(labels, model.config)
    batches, label_ids, order = _ordered_batches(tokenizer, examples, label_ids, seq_len, batch_size)
    count = len(order)
    logits, ref_logits = [], []
    for batch in batches:
        logits.append(_class_logits(model, batch.inputs, "the model"))
        if reference is not None:
            ref_logits.append(_class_logits(reference, batch.inputs, "the reference model"))
    result = EvalResult("classify", count, sum(b.num_tokens for b in batches))
    logit = torch.cat(logits)
    target = None if label_ids is None else torch.tensor(label_ids)
    if target is not None:
        correct = logit.argmax(-1) == target
        result.accuracy = float(correct.double().mean())
        result.accuracy_interval = wilson_interval(int(correct.sum()), len(correct))
    if reference is not None:
        ref_logit = torch.cat(ref_logits)
        pred, ref_pred = logit.argmax(-1), ref_logit.argmax(-1)
        result.agreement = float((pred == ref_pred).double().mean())
        logp, ref_logp = logit.double().log_softmax(-1), ref_logit.double().log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        result.kl = float(kl.mean())
        if target is not None:
            ref_correct = ref_pred == target
            result.reference_accuracy = float(ref_correct.double().mean())
            result.accuracy_change_interval = paired_change_interval(correct, ref_correct)
        result.per_class = per_class_breakdown(pred, ref_pred, target, model.config)
        flips = (pred != ref_pred).nonzero().flatten()
        result.flipped = len(flips)
        flips = flips[kl[flips].argsort(descending=True, stable=True)][:worst].tolist()
        names = _label_names(model.config)
        result.worst_rule = "flipped predictions, highest KL(reference || model) first"
        result.worst_examples = [
            {
                **_example_fields(examples[order[i]]),
                "index": order[i],
                "reference_prediction": names(int(ref_pred[i])),
                "prediction": names(int(pred[i])),
                "label": None if target is None else names(int(target[i])),
                "kl": float(kl[i]),
            }
            for i in flips
        ]
    return result


def _label_names(config):
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return lambda i: id2label.get(i, str(i))


def _example_fields(example) -> dict[str, Any]:
    if isinstance(example, tuple):
        return {"text": example[0], "pair": example[1]}
    return {"text": example}


def per_class_breakdown(
    pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor | None, config: Any
) -> list[dict[str, Any]]:
    """Per class, the classes that lost most first.

    With labels (``target``, shape (n,)), each class's examples are those labelled with it:
    ``support``, ``accuracy`` and ``reference_accuracy`` (the recall of each model on the class),
    ``change`` (accuracy − reference_accuracy; sorted by it, ascending) and ``agreement`` (the
    fraction of the class's examples on which the two top-1 predictions agree). Without labels the
    examples are grouped by the reference's prediction (``support``), sorted by ``agreement``.
    ``predicted`` / ``reference_predicted`` count how often each model predicts the class over
    all examples (a shift between them is drift toward or away from the class). Classes with no
    example are left out. ``pred`` / ``ref_pred``: (n,) class ids.
    """
    names = _label_names(config)
    rows = []
    for c in range(int(config.num_labels)):
        members = (target if target is not None else ref_pred) == c
        support = int(members.sum())
        if support == 0:
            continue
        row: dict[str, Any] = {"class": c, "label": names(c), "support": support}
        if target is not None:
            row["accuracy"] = float((pred[members] == c).double().mean())
            row["reference_accuracy"] = float((ref_pred[members] == c).double().mean())
            row["change"] = row["accuracy"] - row["reference_accuracy"]
        row["agreement"] = float((pred[members] == ref_pred[members]).double().mean())
        row["predicted"], row["reference_predicted"] = int((pred == c).sum()), int((ref_pred == c).sum())
        rows.append(row)
    key = "change" if target is not None else "agreement"
    return sorted(rows, key=lambda r: (r[key], r["agreement"], r["class"]))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (95 % for ``z = 1.96``); None without examples."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_change_interval(
    correct: torch.Tensor, ref_correct: torch.Tensor, z: float = 1.96
) -> tuple[float, float] | None:
    """Normal interval of mean(correct − ref_correct) over the same examples: the accuracy change
    and its uncertainty, which only the examples where the two models differ carry."""
    n = len(correct)
    if n < 2:
        return None
    diff = correct.double() - ref_correct.double()
    mean, sd = float(diff.mean()), float(diff.std())
    half = z * sd / math.sqrt(n)
    return mean - half, mean + half


def _mean_pooled(model, inputs, which: str) -> torch.Tensor:
    base = model.base_model
    inputs = _model_inputs(base, inputs)
    out = base(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden.float()
    _check_finite(hidden, which)
    mask = inputs["attention_mask"].to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _evaluate_embed(model, reference, tokenizer, examples, labels, seq_len, batch_size, worst) -> EvalResult:
    import torch

    batches, _, order = _ordered_batches(tokenizer, examples, None, seq_len, batch_size)
    count = len(order)
    result = EvalResult("embed", count, sum(b.num_tokens for b in batches))
    if reference is None:
        for batch in batches:
            _mean_pooled(model, batch.inputs, "the model")
        return result
    embs, refs = [], []
    for batch in batches:
        embs.append(_mean_pooled(model, batch.inputs, "the model").double().cpu())
        refs.append(_mean_pooled(reference, batch.inputs, "the reference model").double().cpu())
    emb, ref = torch.cat(embs), torch.cat(refs)
    cosine = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    result.cosine_mean, result.cosine_min = float(cosine.mean()), float(cosine.min())
    agreement = embedding_agreement(emb, ref)
    result.neighbor_overlap_at_1 = agreement["neighbor_overlap_at_1"]
    result.neighbor_overlap_at_10 = agreement["neighbor_overlap_at_10"]
    result.neighbor_examples = agreement["neighbor_examples"]
    result.similarity_spearman = agreement["similarity_spearman"]
    result.similarity_spearman_examples = agreement["similarity_spearman_examples"]
    result.worst_rule = "lowest cosine similarity to the reference first"
    result.worst_examples = [
        {**_example_fields(examples[order[i]]), "index": order[i], "cosine": float(cosine[i])}
        for i in cosine.argsort(stable=True)[:worst].tolist()
    ]
    return result


def _neighbors(unit: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Indices (n, k) of each row's k largest cosine similarities to the other rows of ``unit``
    (rows of unit norm), itself excluded; computed ``block`` rows at a time (O(block·n) memory)."""
    import torch

    out = []
    for start in range(0, unit.shape[0], block):
        sim = unit[start : start + block] @ unit.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -math.inf
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def embedding_agreement(
    emb: torch.Tensor,
    ref: torch.Tensor,
    ks: Sequence[int] = NEIGHBOR_KS,
    spearman_max_examples: int = SPEARMAN_MAX_EXAMPLES,
    neighbor_max_examples: int = NEIGHBOR_MAX_EXAMPLES,
) -> dict[str, float | int | None]:
    """How well embeddings ``emb`` (n, d) keep the similarity structure of ``ref`` (n, d'), row i
    of both embedding the same example.

    * ``neighbor_overlap_at_k`` for each k in ``ks``: the mean over examples of
      |N_k(emb, i) ∩ N_k(ref, i)| / k, where N_k(x, i) are the k examples with the largest cosine
      similarity to example i, i itself excluded (k = 1: the fraction of examples whose nearest
      neighbour is unchanged). None when n ≤ k. Beyond ``neighbor_max_examples`` examples, the
      neighbours are searched among that many evenly spaced ones (``neighbor_examples``).
    * ``similarity_spearman``: Spearman's rank correlation (scipy.stats.spearmanr) between the
      two models' cosine similarities over all pairs i < j of the examples, or of
      ``spearman_max_examples`` evenly spaced ones when there are more (n(n-1)/2 pairs;
      ``similarity_spearman_examples`` says how many); None for fewer than 3 examples or
      constant similarities.

    1.0 for identical embeddings (or any rotation or positive rescaling of them). Ties among
    neighbours are broken by ``torch.topk``. Raises ValueError when the row counts differ.
    """
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    if emb.shape[0] != ref.shape[0]:
        raise ValueError(f"embedding_agreement: {emb.shape[0]} rows against {ref.shape[0]}")
    n = emb.shape[0]
    unit = torch.nn.functional.normalize(emb.double(), dim=-1)
    ref_unit = torch.nn.functional.normalize(ref.double(), dim=-1)
    searched = min(n, neighbor_max_examples)
    among = torch.linspace(0, n - 1, searched).round().long()
    out: dict[str, float | int | None] = {"neighbor_examples": searched}
    for k in ks:
        if searched <= k:
            out[f"neighbor_overlap_at_{k}"] = None
            continue
        mine, theirs = _neighbors(unit[among], k), _neighbors(ref_unit[among], k)
        if k == 1:
            shared = (mine == theirs).double().squeeze(1)
        else:  # members of each row's set also in the reference's: compare every pair of slots
            shared = (mine.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).double().sum(dim=1) / k
        out[f"neighbor_overlap_at_{k}"] = float(shared.mean())
    m = min(n, spearman_max_examples)
    rho = None
    if m >= 3:
        pick = torch.linspace(0, n - 1, m).round().long()
        rows, cols = np.triu_indices(m, k=1)
        sim = (unit[pick] @ unit[pick].T).numpy()[rows, cols]
        ref_sim = (ref_unit[pick] @ ref_unit[pick].T).numpy()[rows, cols]
        if np.ptp(sim) > 0 and np.ptp(ref_sim) > 0:
            rho = float(spearmanr(sim, ref_sim).statistic)
    out["similarity_spearman"] = rho
    out["similarity_spearman_examples"] = m if rho is not None else None
    return out


def lm_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The ``(begin, end, first_scored)`` windows over ``n_tokens`` tokens (the Hugging Face strided
    perplexity recipe): each window ``[begin, end)`` scores the tokens ``[first_scored, end)``
    that earlier windows did not, each predicted from its context inside the window. A token at a
    window's first position has no context there and is not scored, so with ``stride < window``
    every token but the first is scored once, and with ``stride == window`` all but the first of
    each window."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _max_positions(model) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _evaluate_lm(model, reference, tokenizer, examples, batch_size, window, stride, worst) -> EvalResult:
    import torch

    from statprune.calibration import leading_bos

    if any(isinstance(e, tuple) for e in examples):
        raise DataError("--task lm evaluates plain texts, not (text, pair) tuples; drop the pair field")
    limit = _max_positions(model)
    if window is None:
        window = min(DEFAULT_WINDOW, limit) if limit else DEFAULT_WINDOW
        if stride is not None:
            window = max(window, stride) if limit is None else min(max(window, stride), limit)
    elif limit is not None and window > limit:
        raise DataError(
            f"--window {window} exceeds the model's {limit} positions; pass --window {limit} or less"
        )
    stride = window if stride is None else stride
    if stride > window:
        raise DataError(
            f"--stride {stride} is larger than --window {window}; pass a stride of at most {window}"
        )

    ids = tokenizer("\n\n".join(examples), verbose=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"the data holds {len(ids)} token(s); perplexity needs at least 2, provide more text")
    ids = torch.tensor(ids, dtype=torch.long)
    windows = lm_windows(len(ids), window, stride)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else int(getattr(model.config, "vocab_size", 1) or 1)
    rows = max(1, min(batch_size, _LM_LOGIT_BUDGET // (window * max(vocab, 1))))

    nll = ref_nll = kl = 0.0
    agree = scored = 0
    window_kl: list[tuple[float, int, int]] = []  # (mean KL over its scored tokens, begin, end)
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:  # consecutive windows of one length, at most ``rows`` per forward
        if groups and len(groups[-1]) < rows and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    bos = leading_bos(tokenizer)
    for group in groups:
        x = torch.stack([ids[b:e] for b, e, _ in group])
        if bos is not None:  # every window starts as the model's texts do; x[:, 0] is never a target
            x[:, 0] = bos
        length = x.shape[1]
        # position j predicts token begin + j + 1; keep the predictions of scored tokens
        absolute = torch.tensor([b for b, _, _ in group]).unsqueeze(1) + torch.arange(1, length)
        mask = absolute >= torch.tensor([f for _, _, f in group]).unsqueeze(1)
        target = x[:, 1:]
        logp = _next_token_logp(model, x, "the model")
        token_nll = -logp.gather(-1, target.to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()
        nll += float(token_nll[mask].double().sum())
        scored += int(mask.sum())
        if reference is not None:
            ref_logp = _next_token_logp(reference, x, "the reference model").to(logp.device)
            ref_token_nll = -ref_logp.gather(-1, target.to(ref_logp.device).unsqueeze(-1)).squeeze(-1).cpu()
            ref_nll += float(ref_token_nll[mask].double().sum())
            dev_mask = mask.to(logp.device)
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1))[dev_mask].sum())
            token_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            kl += float(token_kl[dev_mask].double().sum())
            row_kl = (token_kl.double() * dev_mask).sum(-1).cpu()
            for (b, e, _), total, n in zip(group, row_kl.tolist(), mask.sum(-1).tolist(), strict=True):
                if n:
                    window_kl.append((total / n, b, e))
            del ref_logp
        del logp

    result = EvalResult("lm", len(examples), scored, window=window, stride=stride)
    result.perplexity = math.exp(nll / scored)
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / scored)
        result.perplexity_ratio = result.perplexity / result.reference_perplexity
        result.agreement = agree / scored
        result.kl = kl / scored
        result.worst_rule = (
            "windows with the highest mean KL(reference || model) over their scored tokens first"
        )
        window_kl.sort(key=lambda w: (-w[0], w[1]))
        result.worst_examples = [
            {"begin": b, "end": e, "kl": value, "text": tokenizer.decode(ids[b:e].tolist())}
            for value, b, e in window_kl[:worst]
        ]
    return result


def _next_token_logp(model, x: torch.Tensor, which: str) -> torch.Tensor:
    """log-softmax (float32) of the next-token logits at every position but the last."""
    import torch

    device = _device_of(model)
    x = x.to(device)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    logits = out.logits[:, :-1].float()
    _check_finite(logits, which)
    return logits.log_softmax(-1)


# --------------------------------------------------------------------------------------- labels


def read_labels(
    path: str | Path,
    label_field: str | None = None,
    text_field: str | None = None,
    required: bool | None = None,
) -> list[int | str] | None:
    """The labels of a .jsonl / .csv file, aligned with ``read_examples(path, text_field)``.

    Records whose text is blank are skipped, as ``read_examples`` does. ``label_field`` defaults to
    ``label``; when it was not given explicitly (``required`` defaults to whether it was) and no
    record has it, the data is unlabelled and the result is None. .txt data (or a folder) has no
    labels: None, or a DataError when a label field was asked for. JSON numbers stay ints, CSV
    cells are strings (mapped later through ``config.label2id``, or read as ids).
    """
    from statprune.calibration import _lines, _missing_field, _read_text

    path = Path(path)
    required = label_field is not None if required is None else required
    field = label_field or DEFAULT_LABEL_FIELD
    text_field = text_field or "text"
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in (".jsonl", ".csv"):
        if required:
            raise DataError(f"{path} has no labels: --label-field needs .jsonl or .csv data")
        return None
    records: list[tuple[str, dict[str, Any]]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(_lines(_read_text(path)), start=1):
            if line.strip():
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(record, dict):
                    raise DataError(f"{where} is not a JSON object; write one object per line")
                records.append((where, record))
    else:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        old_limit = csv.field_size_limit(sys.maxsize)  # long documents exceed the 128 KiB default
        try:
            header = reader.fieldnames or []
            if field not in header:
                if required:
                    raise _missing_field(f"{path} header", field, header, "--label-field")
                return None
            records = [(f"{path} line {reader.line_num}", row) for row in reader]
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num} is not valid CSV ({e}); check its quoting") from e
        finally:
            csv.field_size_limit(old_limit)

    def blank(record: dict[str, Any]) -> bool:
        value = record.get(text_field)
        return isinstance(value, str) and not value.strip()

    records = [(where, r) for where, r in records if not blank(r)]
    if not required and records and not any(field in r for _, r in records):
        return None
    labels: list[int | str] = []
    for where, record in records:
        if field not in record:
            raise _missing_field(where, field, record, "--label-field")
        value = record[field]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, str))
            or (isinstance(value, str) and not value.strip())
        ):
            raise DataError(
                f"{where}: label {field!r} is {value!r}; labels must be integer ids or label names"
            )
        labels.append(value)
    return labels


# ---------------------------------------------------------------------------------------- paths


def evaluate_paths(
    model_dir: str | Path,
    data_path: str | Path,
    against: str | Path | None = None,
    task: str = "auto",
    text_field: str | None = None,
    label_field: str | None = None,
    pair_field: str | None = None,
    seq_len: int = 128,
    batch_size: int = 32,
    window: int | None = None,
    stride: int | None = None,
    samples: int | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
    worst: int = DEFAULT_WORST,
) -> TaskResult:
    """:func:`evaluate` on folders and a data file.

    The model (and ``against``, the reference) load with :func:`statprune.persist.load`, the
    tokenizer from ``model_dir``. Texts come from :func:`~statprune.calibration.read_examples`;
    for ``classify``, labels from ``label_field`` (default ``label``, used when present; an
    explicit field must exist). ``samples`` keeps the first N examples. ``dtype`` is a torch dtype
    name such as ``bfloat16``.
    """

    from statprune.calibration import read_examples
    from statprune.persist import check_model_dir, load, load_tokenizer

    _check_positive("samples", samples)
    if task not in ("auto", *TASKS):
        raise DataError(f"unknown task {task!r}; use auto, {', '.join(TASKS)}")
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if against is not None:
        check_model_dir(Path(against))
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    model = load(model_dir, device=str(target), dtype=torch_dtype)
    task = _resolve_task(model, task)
    if task == "qa":  # a SQuAD-format JSONL (statprune.qa_eval), not texts
        from statprune.qa_eval import read_squad_jsonl

        examples = read_squad_jsonl(data_path)
    else:
        examples = read_examples(data_path, text_field=text_field, pair_field=pair_field)
    reference = None if against is None else load(against, device=str(target), dtype=torch_dtype)
    labels = None
    if task == "classify":
        labels = read_labels(data_path, label_field, text_field)
        if labels is not None and len(labels) != len(examples):
            raise RuntimeError(f"statprune.evaluate: read {len(labels)} labels for {len(examples)} examples")
    if samples is not None:
        samples = check_count(samples, len(examples), "samples")
        examples = examples[:samples]
        labels = None if labels is None else labels[:samples]
    return evaluate(
        model,
        tokenizer,
        examples,
        task=task,
        reference=reference,
        labels=labels,
        seq_len=seq_len,
        batch_size=batch_size,
        window=window,
        stride=stride,
        worst=worst,
    )


# ------------------------------------------------------------------------------------------ CLI


def _fail_below(text: str) -> tuple[str | None, float]:
    """``Q`` or ``METRIC=Q`` (argparse type of ``--fail-below``)."""
    metric, sep, number = text.partition("=")
    if not sep:
        metric, number = None, text
    else:
        metric = metric.strip()
        if metric not in FAIL_METRICS:
            raise argparse.ArgumentTypeError(
                f"unknown metric {metric!r}; use one of {', '.join(FAIL_METRICS)} (higher is better)"
            )
    number = number.strip()
    percent = number.endswith("%")
    try:
        value = float(number[:-1] if percent else number) / (100.0 if percent else 1.0)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give Q or METRIC=Q with Q a number, e.g. 0.95 or 95%")
    if not -1.0 <= value <= 1.0:  # agreements, accuracy and overlaps lie in [0, 1], correlations in [-1, 1]
        raise argparse.ArgumentTypeError(f"{text!r}: every metric --fail-below watches lies in [-1, 1]")
    return metric, value


def fail_below_checks(
    result: TaskResult, rules: Sequence[tuple[str | None, float]]
) -> list[tuple[str, float, float, bool]]:
    """``(metric, value, bar, passed)`` for each ``(metric or None, bar)``; None names the task's
    agreement measure (:data:`DEFAULT_FAIL_METRIC`). A metric the run did not measure raises a
    DataError saying what it needs."""
    checks = []
    for metric, bar in rules:
        metric = metric or DEFAULT_FAIL_METRIC[result.task]
        value = getattr(result, metric, None)
        if value is None:
            need = "labelled data" if metric == "accuracy" else "--against ORIGINAL"
            if metric.startswith(("cosine", "neighbor", "similarity")) and result.task != "embed":
                need = "an embedding model (--task embed)"
            if metric in ("exact_match", "f1") and result.task != "qa":
                need = "a question-answering model (--task qa)"
            raise DataError(f"--fail-below: {metric} was not measured in this run; it needs {need}")
        checks.append((metric, float(value), bar, float(value) >= bar))
    return checks


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command to an ``add_subparsers()`` object; returns its parser."""
    e = subparsers.add_parser(
        "eval", help="measure a model (accuracy / perplexity) and its agreement with the original"
    )
    e.add_argument("model", type=Path, help="Hugging Face model folder (compressed or not)")
    e.add_argument("--data", type=Path, help="evaluation data: .txt, .jsonl, .csv or folder")
    e.add_argument("--against", type=Path, help="the original model folder to compare with")
    e.add_argument(
        "--task",
        default="auto",
        choices=["auto", *TASKS],
        help="auto: classify for …ForSequenceClassification, lm for …ForCausalLM, "
        "qa for …ForQuestionAnswering (SQuAD-format JSONL: question, context, answers), "
        "embed for bare encoders",
    )
    e.add_argument("--text-field", help="JSONL/CSV field holding the text (default: text)")
    e.add_argument("--pair-field", help="JSONL/CSV field holding the second text of a pair")
    e.add_argument("--label-field", help="JSONL/CSV field holding the label (default: label, if present)")
    e.add_argument("--seq-len", type=positive_int, default=128, help="max tokens per example")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument(
        "--window",
        type=positive_int,
        help=f"lm: tokens per perplexity window (default: min({DEFAULT_WINDOW}, max positions))",
    )
    e.add_argument("--stride", type=positive_int, help="lm: tokens the window moves by (default: --window)")
    e.add_argument("--samples", type=positive_int, help="evaluate the first N examples only")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--json", type=Path, metavar="OUT.json", help="also write the results as JSON")
    e.add_argument(
        "--worst",
        type=int,
        default=DEFAULT_WORST,
        metavar="N",
        help="with --against: list the N flipped / most changed examples in the JSON (default: %(default)s)",
    )
    e.add_argument(
        "--fail-below",
        type=_fail_below,
        action="append",
        metavar="[METRIC=]Q",
        help=f"exit with status {EXIT_BELOW} when METRIC < Q (repeatable; default metric: "
        "agreement, or neighbor_overlap_at_10 for embeddings; also "
        + ", ".join(m for m in FAIL_METRICS if m != "agreement")
        + ")",
    )
    from statprune.harness import add_harness_arguments

    add_harness_arguments(e)  # --lm-eval-tasks: lm-evaluation-harness tasks instead of --data
    return e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    if path.is_dir():
        raise OutputError(f"--json {path} is a folder; give a file name such as {path / 'eval.json'}")
    from statprune.atomic import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def write_eval_json(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """``eval --json``: ``record`` followed by the resolved paths of the model, the data (when
    given) and the reference, written atomically; says where. Nothing without ``--json``."""
    if args.json is None:
        return
    record = {**record, "model": str(Path(args.model).resolve())}
    if getattr(args, "data", None) is not None:
        record["data"] = str(Path(args.data).resolve())
    record["against"] = None if args.against is None else str(Path(args.against).resolve())
    _write_json(args.json, record)
    print(f"\nwrote {args.json}")


def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` command: print the results and, with ``--json``, write them."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "lm_eval_tasks", None):
        from statprune.harness import run_harness_eval

        return run_harness_eval(args)
    if args.data is None:
        raise DataError("eval needs --data FILE (or --lm-eval-tasks TASK.yaml: lm-evaluation-harness tasks)")
    worst = getattr(args, "worst", DEFAULT_WORST)
    if worst < 0:
        raise DataError(f"--worst must be 0 or more, got {worst}")
    rules = getattr(args, "fail_below", None) or []
    if args.against is None and any(m not in GOLD_METRICS for m, _ in rules):
        raise DataError(
            "--fail-below compares with the original: add --against ORIGINAL "
            "(or watch accuracy alone: --fail-below accuracy=Q)"
        )
    result = evaluate_paths(
        args.model,
        args.data,
        against=args.against,
        task=args.task,
        text_field=args.text_field,
        label_field=args.label_field,
        pair_field=args.pair_field,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        window=args.window,
        stride=args.stride,
        samples=args.samples,
        device=args.device,
        dtype=args.dtype,
        worst=worst,
    )
    print(result.summary())
    write_eval_json(args, result.to_dict())
    status = 0
    for metric, value, bar, passed in fail_below_checks(result, rules):
        if passed:
            print(f"ok: {metric} {value:.4f} >= {bar:g}")
        else:
            print(f"FAIL: {metric} {value:.4f} is below {bar:g} (--fail-below); exit status {EXIT_BELOW}")
            status = EXIT_BELOW
    return status
