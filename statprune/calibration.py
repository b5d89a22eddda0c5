"""Calibration data: read example texts, sample them, and turn them into model-ready batches.

Every problem with the user's data raises :class:`~statprune.errors.DataError` with a one-line
message naming the file (and line or field) and saying how to fix it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from statprune.errors import DataError
from statprune.guards import option

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CalibrationBatch",
    "CalibrationWarning",
    "Example",
    "batches_from_tensors",
    "count_tokens",
    "read_examples",
    "sample_examples",
    "tokenize_examples",
]

Example = str | tuple[str, str]
"""One calibration example: a text, or a (text, pair) tuple for sentence-pair models."""

T = TypeVar("T")

_SUPPORTED = ".txt (one example per line), .jsonl, .csv, or a directory of .txt files"


class CalibrationWarning(UserWarning):
    """Calibration data is usable but smaller than requested."""


# --------------------------------------------------------------------------------------- reading


def read_examples(
    path: str | Path, text_field: str | None = None, pair_field: str | None = None
) -> list[str] | list[tuple[str, str]]:
    """Read calibration examples from a .txt, .jsonl or .csv file or a directory of .txt files.

    ``.txt`` files give one example per non-empty line (stripped). ``.jsonl`` and ``.csv`` records
    give the ``text`` field (or ``text_field``); with ``pair_field`` the result is a list of
    ``(text, pair)`` tuples. Records whose text is blank are skipped; numbers are converted to
    strings. Files are decoded as UTF-8 (a leading byte-order mark is ignored).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data not found: {path}; pass an existing {_SUPPORTED}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".txt":
        if text_field is not None or pair_field is not None:
            raise DataError(
                f"{path}: {option('text_field')}/{option('pair_field')} only apply to .jsonl and .csv files; "
                "drop them or convert the data to .jsonl/.csv"
            )
        examples: list[Any] = _read_txt_dir(path) if path.is_dir() else _read_txt(path)
    elif suffix == ".jsonl":
        examples = _read_jsonl(path, text_field or "text", pair_field)
    elif suffix == ".csv":
        examples = _read_csv(path, text_field or "text", pair_field)
    else:
        raise DataError(f"unsupported data file {path}; use {_SUPPORTED}")
    if not examples:
        raise DataError(f"{path} contains no examples; add at least one non-empty text")
    return examples


def _read_text(path: Path, allow_empty: bool = False) -> str:
    """Decode a file as UTF-8 (dropping a BOM), or raise a DataError giving the bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path and permissions") from e
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[offset]:02x} at byte offset {offset}, "
            f"line {line}); convert it to UTF-8, e.g. with iconv -f OLD-ENCODING -t UTF-8"
        ) from e
    if not allow_empty and not text.strip():
        raise DataError(f"{path} is empty; add examples to it")
    return text


def _lines(text: str) -> list[str]:
    # Split on newlines only: str.splitlines would also split on U+2028 etc., which JSON allows
    # inside strings.
    return [line.rstrip("\r") for line in text.split("\n")]


def _read_txt(path: Path, allow_empty: bool = False) -> list[str]:
    return [s for line in _lines(_read_text(path, allow_empty)) if (s := line.strip())]


def _read_txt_dir(path: Path) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
    if not files:
        raise DataError(f"directory {path} contains no .txt files; add some or pass a file")
    examples: list[str] = []
    for file in files:  # an empty file is fine as long as the directory has examples
        examples.extend(_read_txt(file, allow_empty=True))
    return examples


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return names.get(type(value), "object")


def _field_value(value: Any, where: str, field: str, flag: str) -> str:
    """A record's field as a string: numbers are converted, other non-strings are errors."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = _json_type(value)
    raise DataError(f"{where}: field {field!r} is {kind}, not text; fix it or choose another {flag}")


def _missing_field(where: str, field: str, present: Iterable[str], flag: str) -> DataError:
    names = ", ".join(repr(f) for f in present) or "none"
    return DataError(f"{where} has no field {field!r} (fields: {names}); pass {flag} FIELD")


def _pair(
    record: dict[str, Any], where: str, text_field: str, pair_field: str | None
) -> str | tuple[str, str] | None:
    """The example from one record, or None when its text is blank."""
    fields = [(text_field, option("text_field"))]
    if pair_field is not None:
        fields.append((pair_field, option("pair_field")))
    values = []
    for field, flag in fields:
        if field not in record:
            raise _missing_field(where, field, record, flag)
        values.append(_field_value(record[field], where, field, flag))
    if not values[0].strip():
        return None
    return values[0] if pair_field is None else (values[0], values[1])


def json_objects(path: Path, hint: str = 'e.g. {"text": "..."}') -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file (UTF-8, a BOM dropped,
    split on newlines only: JSON strings may hold U+2028). Raises ``DataError`` naming the line
    for a line that is not a JSON object; ``hint`` ends that message."""
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} is not valid JSON ({e.msg} at column {e.colno}); write one object per line, {hint}"
            ) from e
        if not isinstance(record, dict):
            raise DataError(
                f"{where} is a JSON {_json_type(record)}, not an object; write one object per line, {hint}"
            )
        yield number, record


def _read_jsonl(path: Path, text_field: str, pair_field: str | None) -> list[Any]:
    examples = []
    for number, record in json_objects(path):
        if (example := _pair(record, f"{path} line {number}", text_field, pair_field)) is not None:
            examples.append(example)
    return examples


def _read_csv(path: Path, text_field: str, pair_field: str | None) -> list[Any]:
    # Decoded up front (instead of open(encoding="utf-8-sig")) to report the offset of a bad byte;
    # newline="" lets quoted fields span lines.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    old_limit = csv.field_size_limit(sys.maxsize)  # long documents exceed the 128 KiB default
    try:
        header = reader.fieldnames or []
        for field, flag in ((text_field, option("text_field")), (pair_field, option("pair_field"))):
            if field is not None and field not in header:
                raise _missing_field(f"{path} header", field, header, flag)
        examples = []
        for record in reader:
            where = f"{path} line {reader.line_num}"
            for field in (text_field, pair_field):
                if field is not None and record.get(field) is None:
                    raise DataError(
                        f"{where} has no value for column {field!r} (too few cells); "
                        "fix the row so it has as many cells as the header"
                    )
            if (example := _pair(record, where, text_field, pair_field)) is not None:
                examples.append(example)
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num} is not valid CSV ({e}); check its quoting") from e
    finally:
        csv.field_size_limit(old_limit)
    return examples


# -------------------------------------------------------------------------------------- sampling


def sample_examples(examples: Sequence[T], n: int, seed: int) -> list[T]:
    """Draw ``n`` examples at random (``random.Random(seed)``), in shuffled order.

    With fewer than ``n`` examples, warns with :class:`CalibrationWarning` and returns all of them,
    shuffled the same deterministic way. The result depends only on the examples, ``n`` and
    ``seed``.
    """
    if n < 1:
        raise DataError(f"the number of calibration examples must be at least 1, got {n}")
    if not examples:
        raise DataError("there are no calibration examples to sample from; provide some data")
    if len(examples) < n:
        warnings.warn(
            f"only {len(examples)} calibration examples available, fewer than the {n} requested; "
            "using all of them",
            CalibrationWarning,
            stacklevel=2,
        )
    return random.Random(seed).sample(list(examples), min(n, len(examples)))


# ------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class CalibrationBatch:
    """One padded batch: ``inputs`` are the keyword arguments of the model's forward.

    ``inputs`` holds 2-D ``input_ids`` and ``attention_mask`` (batch, seq) and, when the tokenizer
    produces them, ``token_type_ids``. Padding is on the right.
    """

    inputs: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        ids, mask = self.inputs.get("input_ids"), self.inputs.get("attention_mask")
        if ids is None or mask is None:
            raise DataError("a calibration batch needs input_ids and attention_mask tensors")
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise DataError(
                f"input_ids must be 2-D (batch, seq) with an attention_mask of the same shape, "
                f"got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )

    @property
    def token_mask(self) -> torch.Tensor:
        """Bool (batch, seq): True on real tokens, False on padding."""
        return self.inputs["attention_mask"].bool()

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.token_mask.sum())

    def to(self, device: torch.device | str) -> CalibrationBatch:
        """A copy with every input tensor on ``device``."""
        return CalibrationBatch({k: v.to(device) for k, v in self.inputs.items()})


def _check_sizes(seq_len: int | None, batch_size: int) -> None:
    if seq_len is not None and seq_len < 1:
        raise DataError(f"the sequence length must be at least 1, got {seq_len}")
    if batch_size < 1:
        raise DataError(f"the batch size must be at least 1, got {batch_size}")


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad token id, falling back to eos then unk; the tokenizer is not modified."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, list):  # some tokenizers list several eos ids
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            return int(token_id)
    raise DataError(
        "the tokenizer has no pad, eos or unk token to pad batches with; "
        f"set tokenizer.pad_token (e.g. to an existing special token) or use {option('batch_size', 1)}"
    )


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    seq_len: int = 128,
    batch_size: int = 16,
) -> list[CalibrationBatch]:
    """Tokenize examples (truncated to ``seq_len``) into right-padded batches.

    Examples are sorted by token length, longest first (stable, so deterministic), before being
    cut into batches, which keeps padding small; each batch is padded to its longest row. Pairs are
    tokenized as ``(text, pair)``. Examples with zero tokens are dropped. Padding uses the pad
    token, else eos, else unk (the tokenizer itself is left unchanged); it is masked out anyway.
    """
    _check_sizes(seq_len, batch_size)
    if not examples:
        raise DataError("there are no calibration examples to tokenize; provide some data")
    is_pair = [isinstance(e, tuple) for e in examples]
    if any(is_pair) and not all(is_pair):
        raise DataError("calibration examples mix texts and (text, pair) tuples; use one kind")
    pad_id = _pad_id(tokenizer) if batch_size > 1 and len(examples) > 1 else 0
    pad_type_id = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)

    texts = [e[0] if isinstance(e, tuple) else e for e in examples]
    pairs = [e[1] for e in examples if isinstance(e, tuple)] if all(is_pair) else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=seq_len, padding=False, verbose=False)
    keys = ["input_ids"] + (["token_type_ids"] if "token_type_ids" in encoded else [])
    rows = [
        {k: list(encoded[k][i][:seq_len]) for k in keys}  # [:seq_len] in case truncation could not
        for i in range(len(texts))
    ]
    rows = [r for r in rows if r["input_ids"]]
    if not rows:
        raise DataError("no calibration example produced any tokens; check the data")
    rows.sort(key=lambda r: len(r["input_ids"]), reverse=True)

    batches = []
    pad_values = {"input_ids": pad_id, "token_type_ids": pad_type_id}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = len(chunk[0]["input_ids"])
        inputs = {
            k: torch.tensor([r[k] + [pad_values[k]] * (width - len(r[k])) for r in chunk], dtype=torch.long)
            for k in keys
        }
        inputs["attention_mask"] = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk],
            dtype=torch.long,
        )
        batches.append(CalibrationBatch(inputs))
    return batches


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The beginning-of-sequence token id the tokenizer puts before every text on its own (Gemma,
    Llama 3), else None (SmolLM2, BERT-style [CLS] templates without a ``bos_token``).

    A model trained that way reads a window that does not start with it out of distribution (its
    first token becomes the attention sink; Gemma-3-270M's held-out perplexity is several times
    worse without it). So packed calibration windows and ``eval --task lm`` windows start with
    it, as llama.cpp's ``perplexity`` and ``imatrix`` tools do (the window's first token, never a
    prediction target, is replaced)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return None
    ids = tokenizer("a", verbose=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    n: int,
    seed: int,
    seq_len: int = 128,
    batch_size: int = 16,
) -> list[CalibrationBatch]:
    """Concatenate the texts (eos between them) and cut ``seq_len``-token windows; draw ``n``.

    The usual calibration for causal LMs (SparseGPT, Wanda): every example is a full window of
    running text, however short the lines of the source are. Windows do not overlap; the draw
    uses :func:`sample_examples` (same seed, same windows). For a tokenizer that starts every
    text with a BOS token, each window's first token is that BOS (see :func:`leading_bos`).
    """
    _check_sizes(seq_len, batch_size)
    if not examples:
        raise DataError("there are no calibration examples to pack; provide some data")
    if any(isinstance(e, tuple) for e in examples):
        raise DataError(f"{option('pack')} joins plain texts into windows; sentence pairs cannot be packed")
    encoded = tokenizer(list(examples), add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    stream: list[int] = []
    for ids in encoded:
        if ids:
            stream.extend(ids)
            if eos is not None:
                stream.append(int(eos))
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not windows:
        raise DataError(
            f"the calibration text has only {len(stream)} tokens, less than one window of "
            f"{option('seq_len', seq_len)}; give more text or a shorter {option('seq_len')}"
        )
    chosen = sample_examples(windows, n, seed)
    bos = leading_bos(tokenizer)
    if bos is not None:  # the model's usual first token (see leading_bos)
        chosen = [[bos, *w[1:]] for w in chosen]
    return [
        CalibrationBatch(
            {
                "input_ids": torch.tensor(chosen[i : i + batch_size], dtype=torch.long),
                "attention_mask": torch.ones(len(chosen[i : i + batch_size]), seq_len, dtype=torch.long),
            }
        )
        for i in range(0, len(chosen), batch_size)
    ]


def batches_from_tensors(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    **extra: torch.Tensor,
) -> list[CalibrationBatch]:
    """Split pre-tokenized (num_examples, seq) tensors into batches, keeping their order.

    ``attention_mask`` defaults to all ones; ``extra`` tensors (e.g. ``token_type_ids``) must have
    the same shape as ``input_ids`` and are passed through. A 1-D ``input_ids`` is one example.
    Rows without any real token are dropped.
    """
    _check_sizes(None, batch_size)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        extra = {k: v.reshape(1, -1) for k, v in extra.items()}
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise DataError(
            f"input_ids must be a non-empty (num_examples, seq) tensor, got shape {tuple(input_ids.shape)}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise DataError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.long()
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    for name, tensor in {"attention_mask": attention_mask, **extra}.items():
        if tensor.shape != input_ids.shape:
            raise DataError(
                f"{name} has shape {tuple(tensor.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass tensors of the same shape"
            )
    keep = attention_mask.bool().any(dim=1)
    if not keep.any():
        raise DataError("every row of attention_mask is zero; there are no tokens to calibrate on")
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    tensors = {k: v[keep] for k, v in tensors.items()}
    return [
        CalibrationBatch({k: v[start : start + batch_size] for k, v in tensors.items()})
        for start in range(0, int(keep.sum()), batch_size)
    ]


def count_tokens(batches: Iterable[CalibrationBatch]) -> int:
    """Total number of real (non-padding) tokens in ``batches``."""
    return sum(batch.num_tokens for batch in batches)
