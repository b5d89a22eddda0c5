"""Extractive question answering: exact match and F1 on a SQuAD-format JSONL.

Each line of the file is one question::

    {"question": "...", "context": "...", "answers": {"text": ["..."], "answer_start": [17]}}

(``answers`` may also be a list of ``{"text", "answer_start"}`` objects, SQuAD's own layout; an
``id`` field is kept when present). The metrics are those of the SQuAD v1.1 evaluation script
(Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text"): both
the prediction and every gold answer are normalized (lowercased; punctuation, the articles
a/an/the and extra whitespace removed), exact match is 1 when the prediction equals one gold
answer, and F1 is the best harmonic mean, over the gold answers, of the precision and recall of
the shared words (a bag of words). Both are averaged over questions and given in [0, 1].

Prediction follows the usual recipe for BERT-style readers (Devlin et al., 2019, section 4.2):
question and context are tokenized as a pair; a context longer than the window is split into
overlapping windows of ``seq_len`` tokens (``seq_len // 3`` tokens shared by neighbours); in
every window the answer is the span of context tokens ``i ≤ j < i + max_answer_tokens`` with
the largest ``start_logits[i] + end_logits[j]``, and the question's answer is the best span of
all its windows, cut out of the context by the tokenizer's character offsets. No "no answer"
option (SQuAD v1.1).
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statprune.errors import DataError, ModelError
from statprune.evaluate import DEFAULT_WORST, TaskResult, worst_lines

MAX_ANSWER_TOKENS = 30  # the longest span predicted, in tokens (the usual SQuAD setting)


# ------------------------------------------------------------------------------------- metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lowercase, drop punctuation, drop the articles a/an/the, and
    collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    """The best word-overlap F1 of the prediction against any gold answer (SQuAD v1.1)."""

    def one(pred_words: list[str], gold_words: list[str]) -> float:
        common = sum((Counter(pred_words) & Counter(gold_words)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred_words), common / len(gold_words)
        return 2 * precision * recall / (precision + recall)

    words = normalize_answer(prediction).split()
    return max(one(words, normalize_answer(a).split()) for a in answers)


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class QAExample:
    """One question: its context and the gold answer texts (at least one)."""

    question: str
    context: str
    answers: tuple[str, ...]
    id: str | None = None


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, dict):
        texts = value.get("text")
        texts = [texts] if isinstance(texts, str) else texts
    elif isinstance(value, list):
        texts = [a.get("text") if isinstance(a, dict) else a for a in value]
    else:
        texts = None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(
            f'{where}: "answers" must be {{"text": [...], "answer_start": [...]}} (or a list of '
            f'{{"text", "answer_start"}} objects) with at least one answer text'
        )
    return tuple(texts)


def read_squad_jsonl(path: str | Path) -> list[QAExample]:
    """The questions of a SQuAD-format JSONL file (see the module docstring).

    Raises ``DataError`` for a missing, empty or non-UTF-8 file, a line that is not a JSON object,
    or a missing/ill-typed ``question``, ``context`` or ``answers`` field (naming the line)."""
    from statprune.calibration import json_objects

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; question answering reads a SQuAD-format .jsonl file")
    examples = []
    for number, record in json_objects(path, "with question, context and answers"):
        where = f"{path}:{number}"
        for name in ("question", "context", "answers"):
            if name not in record:
                raise DataError(
                    f'{where}: no "{name}" field; question answering reads SQuAD-format lines '
                    '{"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}'
                )
        for name in ("question", "context"):
            if not isinstance(record[name], str) or not record[name].strip():
                raise DataError(f'{where}: "{name}" must be a non-empty string')
        ident = record.get("id")
        examples.append(
            QAExample(
                record["question"],
                record["context"],
                _answers(record["answers"], where),
                None if ident is None else str(ident),
            )
        )
    return examples


# ---------------------------------------------------------------------------------- prediction


@dataclass
class _Window:
    example: int  # index of its question
    offsets: list[tuple[int, int]]  # character span of every token in the context
    context: list[bool]  # which tokens are context tokens (candidates for the answer)


def tokenize_windows(tokenizer: Any, examples: list[QAExample], seq_len: int) -> tuple[dict, list[_Window]]:
    """Question/context pairs as windows of at most ``seq_len`` tokens (``seq_len // 3`` shared
    by neighbouring windows of one context). Returns the tokenizer's encodings (lists, not
    padded) and each window's question index, character offsets and context mask.

    Raises ``ModelError`` for a tokenizer without character offsets (a slow tokenizer) and
    ``DataError`` when a question leaves no room for context at ``seq_len``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            "question answering needs a fast tokenizer (character offsets of tokens); "
            "the model folder needs a tokenizer.json"
        )
    try:
        enc = tokenizer(
            [e.question for e in examples],
            [e.context for e in examples],
            truncation="only_second",
            max_length=seq_len,
            stride=seq_len // 3,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
    except Exception as exc:  # tokenizers raises a plain Exception when the question fills the window
        if "truncat" in str(exc).lower() or "stride" in str(exc).lower():
            raise DataError(
                f"a question leaves no room for its context in {seq_len} tokens; pass a larger --seq-len "
                f"or shorter questions ({exc})"
            ) from None
        raise
    windows = []
    for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
        sequence_ids = enc.sequence_ids(i)
        windows.append(
            _Window(
                int(example_index),
                [tuple(o) for o in enc["offset_mapping"][i]],
                [s == 1 for s in sequence_ids],
            )
        )
    return enc, windows


def best_span(
    start, end, context, max_answer_tokens: int = MAX_ANSWER_TOKENS
) -> tuple[float, int, int] | None:
    """The span ``(score, i, j)`` of context tokens ``i ≤ j < i + max_answer_tokens`` that
    maximizes ``start[i] + end[j]`` (1-D tensors of one window's logits, ``context`` a bool
    tensor of the same length); None if the window has no context token."""
    import torch

    n = start.shape[0]
    idx = torch.arange(n)
    valid = context[:, None] & context[None, :]
    valid &= (idx[None, :] >= idx[:, None]) & (idx[None, :] - idx[:, None] < max_answer_tokens)
    if not bool(valid.any()):
        return None
    scores = (start.double()[:, None] + end.double()[None, :]).masked_fill(~valid, float("-inf"))
    flat = int(torch.argmax(scores))
    i, j = divmod(flat, n)
    return float(scores[i, j]), i, j


@dataclass
class QAPredictions:
    """Per question: the answer text, its character span (None: no context token was seen) and
    score; per window: the start and end logits of its context tokens (float64, CPU)."""

    texts: list[str]
    spans: list[tuple[int, int] | None]
    context_logits: list[tuple[Any, Any]] = field(repr=False)
    n_tokens: int = 0


def predict_answers(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    seq_len: int = 384,
    batch_size: int = 32,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
    encoded: tuple[dict, list[_Window]] | None = None,
) -> QAPredictions:
    """Answer every question with ``model`` (a …ForQuestionAnswering model in eval mode).

    Raises ``ModelError`` if the model returns no ``start_logits``/``end_logits`` or non-finite
    ones."""
    import torch

    from statprune.evaluate import _model_inputs

    enc, windows = encoded or tokenize_windows(tokenizer, examples, seq_len)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    best: list[tuple[float, int, int] | None] = [None] * len(examples)
    best_window: list[int | None] = [None] * len(examples)
    context_logits = []
    n_tokens = 0
    for first in range(0, len(windows), batch_size):
        rows = range(first, min(first + batch_size, len(windows)))
        batch = tokenizer.pad({k: [enc[k][r] for r in rows] for k in keys}, return_tensors="pt")
        n_tokens += int(batch["attention_mask"].sum())
        with torch.no_grad():
            out = model(**_model_inputs(model, dict(batch)), return_dict=True)
        start, end = getattr(out, "start_logits", None), getattr(out, "end_logits", None)
        if start is None or end is None:
            raise ModelError(f"{type(model).__name__} returns no start/end logits; it is not a QA model")
        start, end = start.detach().double().cpu(), end.detach().double().cpu()
        if not (torch.isfinite(start).all() and torch.isfinite(end).all()):
            raise ModelError("the model produced NaN or Inf start/end logits; evaluate with --dtype float32")
        left = getattr(tokenizer, "padding_side", "right") == "left"
        for b, r in enumerate(rows):
            window = windows[r]
            n = len(window.offsets)
            real = slice(start.shape[1] - n, None) if left else slice(0, n)  # the unpadded tokens
            context = torch.tensor(window.context)
            first, last = start[b, real], end[b, real]
            context_logits.append((first[context], last[context]))
            span = best_span(first, last, context, max_answer_tokens)
            current = best[window.example]
            if span is not None and (current is None or span[0] > current[0]):
                best[window.example], best_window[window.example] = span, r
    texts, spans = [], []
    for e, (example, span) in enumerate(zip(examples, best, strict=True)):
        if span is None:
            texts.append("")
            spans.append(None)
            continue
        offsets = windows[best_window[e]].offsets
        char_start, char_end = offsets[span[1]][0], offsets[span[2]][1]
        texts.append(example.context[char_start:char_end])
        spans.append((char_start, char_end))
    return QAPredictions(texts, spans, context_logits, n_tokens)


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class QAResult(TaskResult):
    """Question-answering metrics (fractions in [0, 1]; None where not measured).

    ``exact_match``/``f1``: SQuAD v1.1 metrics against the gold answers. With a reference model:
    its own ``reference_exact_match``/``reference_f1``, ``agreement`` (the fraction of questions
    whose predicted character span equals the reference's) and ``logit_relative_error``
    (‖Δ‖ / ‖reference‖ of the start and end logits over all context tokens of all windows).
    ``eval --json`` and ``--fail-below`` treat it like :class:`statprune.evaluate.EvalResult`."""

    n_windows: int
    exact_match: float
    f1: float
    seq_len: int
    doc_stride: int
    max_answer_tokens: int
    reference_exact_match: float | None = None
    reference_f1: float | None = None
    agreement: float | None = None
    logit_relative_error: float | None = None
    seconds: float = 0.0
    worst_examples: list[dict[str, Any]] | None = None
    worst_rule: str | None = None

    def summary(self) -> str:
        lines = [
            f"task: qa   questions: {self.n_examples:,}   windows: {self.n_windows:,}   "
            f"tokens: {self.n_tokens:,}   ({self.seconds:.1f} s)",
            f"seq_len: {self.seq_len}   doc stride: {self.doc_stride}   longest answer: "
            f"{self.max_answer_tokens} tokens",
        ]
        ref = ""
        if self.reference_exact_match is not None:
            ref = f"   reference {self.reference_exact_match:.4f} / {self.reference_f1:.4f}"
        lines.append(
            f"exact match / F1 (SQuAD v1.1 normalization): {self.exact_match:.4f} / {self.f1:.4f}{ref}"
        )
        if self.agreement is not None:
            lines.append(f"same answer span as the reference: {self.agreement:.4f}")
            lines.append(f"start/end logits, relative error vs reference: {self.logit_relative_error:.6f}")
        if self.worst_examples:
            lines += worst_lines(self.worst_rule, self.worst_examples)
        return "\n".join(lines)


def _scores(texts: list[str], examples: list[QAExample]) -> tuple[float, float]:
    em = [exact_match(t, list(e.answers)) for t, e in zip(texts, examples, strict=True)]
    f1 = [f1_score(t, list(e.answers)) for t, e in zip(texts, examples, strict=True)]
    return sum(em) / len(em), sum(f1) / len(f1)


def evaluate_qa(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    *,
    reference: Any | None = None,
    seq_len: int = 384,
    batch_size: int = 32,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
    worst: int = DEFAULT_WORST,
) -> QAResult:
    """Exact match and F1 of ``model`` (a …ForQuestionAnswering model) on ``examples``, and with
    ``reference`` (the uncompressed original, same tokenizer) the comparison metrics; ``worst``
    bounds the questions whose answer differs from the reference's listed in ``worst_examples``.

    Raises ``ModelError`` for a model (or reference) without a question-answering head, and
    ``DataError`` for no examples or bad sizes."""
    from statprune.evaluate import _check_positive, _check_task, _check_worst, _truncation_length, eval_mode
    from statprune.guards import check_seq_len

    _check_task(model, "qa", "the model")
    if reference is not None:
        _check_task(reference, "qa", "the reference model")
    if not examples:
        raise DataError("there are no questions to evaluate; provide some data")
    for name, value in (("batch_size", batch_size), ("max_answer_tokens", max_answer_tokens)):
        _check_positive(name, value)
    _check_worst(worst)
    check_seq_len(model, seq_len)
    seq_len = _truncation_length(tokenizer, seq_len)
    start = time.perf_counter()
    with eval_mode(model, reference):
        encoded = tokenize_windows(tokenizer, examples, seq_len)
        got = predict_answers(model, tokenizer, examples, seq_len, batch_size, max_answer_tokens, encoded)
        ref = None
        if reference is not None:
            ref = predict_answers(
                reference, tokenizer, examples, seq_len, batch_size, max_answer_tokens, encoded
            )
    em, f1 = _scores(got.texts, examples)
    result = QAResult(
        task="qa",
        n_examples=len(examples),
        n_tokens=got.n_tokens,
        n_windows=len(encoded[1]),
        exact_match=em,
        f1=f1,
        seq_len=seq_len,
        doc_stride=seq_len // 3,
        max_answer_tokens=max_answer_tokens,
    )
    if ref is not None:
        result.reference_exact_match, result.reference_f1 = _scores(ref.texts, examples)
        same = [a == b for a, b in zip(got.spans, ref.spans, strict=True)]
        result.agreement = sum(same) / len(same)
        diff = sum(
            float((a - c).square().sum() + (b - d).square().sum())
            for (a, b), (c, d) in zip(got.context_logits, ref.context_logits, strict=True)
        )
        norm = sum(float(c.square().sum() + d.square().sum()) for c, d in ref.context_logits)
        result.logit_relative_error = (diff / norm) ** 0.5 if norm > 0 else 0.0
        changed = [i for i, s in enumerate(same) if not s]
        result.worst_rule = "questions whose answer differs from the reference's"
        result.worst_examples = [
            {
                "index": i,
                "id": examples[i].id,
                "question": examples[i].question,
                "answer": got.texts[i],
                "reference": ref.texts[i],
                "gold": list(examples[i].answers),
            }
            for i in changed[:worst]
        ]
    result.seconds = time.perf_counter() - start
    return result
