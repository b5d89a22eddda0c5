"""A local lm-evaluation-harness multiple-choice task built from the held-out corpora.

Each item is one held-out sentence (WSJ and OANC, never the calibration portions) cut in the middle:
the first half is the context, the true second half is one choice, and three second halves of other
sentences, drawn with a seeded generator, are the others (HellaSwag's format, Zellers et al. 2019,
with real text instead of generated endings). Scored zero-shot by lm-eval's ``acc`` (the choice with
the highest log-likelihood) and ``acc_norm`` (log-likelihood per character). Chance is 1/4.

The files live in the cache (``CACHE/lm-eval-tasks/<name>-n<N>-s<seed>/``: ``items.jsonl``, the task
YAML with the absolute ``data_files`` path, ``DONE.json``), never in the repository (the corpora's
terms). ``python benchmarks/lm_eval_check.py`` builds it; from Python::

    yaml_path = build_continuation_task(cache_dir() / "corpora", cache_dir() / "lm-eval-tasks")
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cache import AssetError, is_done, write_marker

TASK_NAME = "statprune_continuation"
SOURCES = ("wsj-heldout.txt", "oanc-heldout.txt")  # held-out: not in *-calib.txt
MIN_WORDS, MAX_WORDS = 12, 50  # sentences long enough to cut, short enough to be one sentence
CHOICES = 4
ASSET = "lm-eval-task"


def usable_sentences(lines: Sequence[str]) -> list[str]:
    """Distinct stripped lines of ``MIN_WORDS``..``MAX_WORDS`` words, in their order."""
    out = [" ".join(line.split()) for line in lines]
    return list(dict.fromkeys(s for s in out if MIN_WORDS <= len(s.split()) <= MAX_WORDS))


def split_sentence(sentence: str) -> tuple[str, str]:
    """Cut at the middle word: ``(first half, second half)``, both non-empty."""
    words = sentence.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def continuation_items(
    sentences: Sequence[tuple[str, str]], n: int, seed: int = 0, choices: int = CHOICES
) -> list[dict]:
    """``n`` items from ``(source, sentence)`` pairs: ``{"id", "source", "context", "endings",
    "label"}`` with ``endings[label]`` the sentence's own second half and the others second halves
    of other sentences (all distinct). Deterministic for a given input and seed."""
    if n > len(sentences):
        raise AssetError(f"{ASSET}: asked for {n} items but only {len(sentences)} usable sentences")
    if len(sentences) < choices:
        raise AssetError(f"{ASSET}: need at least {choices} sentences")
    rng = random.Random(seed)
    halves = [split_sentence(s) for _, s in sentences]
    items = []
    for idx in rng.sample(range(len(sentences)), n):
        context, ending = halves[idx]
        endings = [ending]
        while len(endings) < choices:
            other = halves[rng.randrange(len(halves))][1]
            if other not in endings:
                endings.append(other)
        rng.shuffle(endings)
        items.append(
            {
                "id": len(items),
                "source": sentences[idx][0],
                "context": context,
                "endings": endings,
                "label": endings.index(ending),
            }
        )
    return items


def task_yaml(name: str, data_file: Path) -> str:
    """lm-eval task YAML reading ``data_file`` (absolute: lm-eval resolves paths from the cwd)."""
    return (
        f"# built by scripts/statprune_assets/mc_task.py from held-out corpora; not for redistribution\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: endings\n"
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def build_continuation_task(corpora: Path, root: Path, n: int = 500, seed: int = 0) -> Path:
    """Write the task into ``root/continuation-n<n>-s<seed>/`` (atomically, once; a finished folder
    is reused) and return its YAML path. Reads ``SOURCES`` from ``corpora``."""
    final = Path(root) / f"continuation-n{n}-s{seed}"
    yaml_path = final / f"{TASK_NAME}.yaml"
    if is_done(final, ASSET):
        return yaml_path
    sentences = []
    for name in SOURCES:
        path = Path(corpora) / name
        if not path.is_file():
            raise AssetError(f"{ASSET}: {path} is missing; run python scripts/assets.py corpora")
        sentences += [(name, s) for s in usable_sentences(path.read_text(encoding="utf-8").splitlines())]
    items = continuation_items(sentences, n, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        (tmp / yaml_path.name).write_text(task_yaml(TASK_NAME, final / "items.jsonl"), encoding="utf-8")
        info = {
            "sources": list(SOURCES),
            "items": n,
            "seed": seed,
            "choices": CHOICES,
            "pool": len(sentences),
        }
        write_marker(tmp, ASSET, info)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return yaml_path
