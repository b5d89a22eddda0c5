"""The local multiple-choice task built from held-out text (scripts/statprune_assets/mc_task.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from statprune_assets import mc_task  # noqa: E402
from statprune_assets.cache import AssetError  # noqa: E402


def _corpora(folder: Path, n: int = 40) -> Path:
    folder.mkdir()
    for k, name in enumerate(mc_task.SOURCES):
        lines = [" ".join(f"w{k}x{i}y{j}" for j in range(12 + i % 7)) for i in range(n)]
        lines += ["too short to cut", ""]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_items_keep_the_true_ending(tmp_path):
    yaml_path = mc_task.build_continuation_task(_corpora(tmp_path / "corpora"), tmp_path / "tasks", n=30)
    items = [json.loads(line) for line in (yaml_path.parent / "items.jsonl").open()]
    assert len(items) == 30 and len({it["context"] for it in items}) == 30
    for it in items:
        assert len(it["endings"]) == mc_task.CHOICES == len(set(it["endings"]))
        whole = f"{it['context']} {it['endings'][it['label']]}"
        text = (tmp_path / "corpora" / it["source"]).read_text().splitlines()
        assert whole in text  # context + gold ending is the source sentence
        # words are w<file>x<sentence>y<position>: the distractors come from other sentences
        sentence = [e.split()[0].split("y")[0] for e in it["endings"]]
        own = it["context"].split()[0].split("y")[0]
        assert [i for i, s in enumerate(sentence) if s == own] == [it["label"]]
    assert {it["label"] for it in items} == set(range(mc_task.CHOICES))
    text = yaml_path.read_text()
    assert f"task: {mc_task.TASK_NAME}" in text and str(yaml_path.parent / "items.jsonl") in text


def test_deterministic_and_reused(tmp_path):
    corpora = _corpora(tmp_path / "corpora")
    a = mc_task.build_continuation_task(corpora, tmp_path / "a", n=20, seed=3)
    b = mc_task.build_continuation_task(corpora, tmp_path / "b", n=20, seed=3)
    c = mc_task.build_continuation_task(corpora, tmp_path / "c", n=20, seed=4)
    read = lambda p: (p.parent / "items.jsonl").read_text()  # noqa: E731
    assert read(a) == read(b) != read(c)
    stamp = (a.parent / "items.jsonl").stat().st_mtime_ns
    assert mc_task.build_continuation_task(corpora, tmp_path / "a", n=20, seed=3) == a
    assert (a.parent / "items.jsonl").stat().st_mtime_ns == stamp  # finished folder reused


def test_too_few_sentences(tmp_path):
    with pytest.raises(AssetError, match="only 80 usable sentences"):
        mc_task.build_continuation_task(_corpora(tmp_path / "corpora"), tmp_path / "tasks", n=500)
    assert not (tmp_path / "tasks" / "continuation-n500-s0").exists()


def test_lm_eval_reads_it(tmp_path):
    pytest.importorskip("lm_eval")
    from statprune.harness import _load_tasks, _quiet_lm_eval, task_files

    yaml_path = mc_task.build_continuation_task(_corpora(tmp_path / "corpora"), tmp_path / "tasks", n=10)
    with _quiet_lm_eval():
        _, loaded = _load_tasks(task_files(str(yaml_path)))
    task = loaded["tasks"][mc_task.TASK_NAME]
    docs = list(task.test_docs())
    assert len(docs) == 10
    doc = docs[0]
    assert task.doc_to_text(doc) == doc["context"]
    assert task.doc_to_choice(doc) == doc["endings"] and task.doc_to_target(doc) == doc["label"]
