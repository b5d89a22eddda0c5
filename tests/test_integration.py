"""Integration tests on a real checkpoint and real text (all-MiniLM-L6-v2, Rotten Tomatoes).

The assets come from ``scripts/assets.py`` (``make assets``). Without them these tests skip,
unless ``STATPRUNE_REQUIRE_ASSETS=1`` (as ``make test`` and CI set) makes that a failure.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import statprune

pytestmark = pytest.mark.slow


def _asset(name: str) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import assets
    finally:
        sys.path.pop(0)
    folder = assets.cache_dir() / name
    if not (folder / "DONE.json").is_file():
        if os.environ.get("STATPRUNE_REQUIRE_ASSETS") == "1":
            pytest.fail(f"asset {name} missing in {folder}: run `make assets`")
        pytest.skip(f"asset {name} not fetched (make assets)")
    return folder


@pytest.fixture(scope="module")
def minilm():
    import transformers

    folder = _asset("minilm")
    return folder, statprune.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sentences():
    corpora = _asset("corpora")
    calib = (corpora / "rt-calib.txt").read_text().splitlines()
    test = [json.loads(line)["text"] for line in (corpora / "rt-test.jsonl").read_text().splitlines()]
    return calib, test[:200]


def _embed(model, tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_at_60_percent_flops_keeps_embeddings(minilm, sentences, tmp_path):
    _folder, model, tokenizer = minilm
    calib, test = sentences
    pruned, report = statprune.compress(model, tokenizer, calib, keep_flops=0.6, samples=256, progress=False)
    assert report.flops_kept <= 0.6
    assert report.calibration_examples == 256
    dense = _embed(model, tokenizer, test)
    small = _embed(pruned, tokenizer, test)
    cosine = torch.nn.functional.cosine_similarity(small, dense).mean().item()
    assert cosine > 0.9, f"mean cosine to the dense embeddings only {cosine:.3f}"
    # the correction matters: the same units removed without it agree far less
    plain, _ = statprune.compress(
        model, tokenizer, calib, keep_flops=0.6, samples=256, progress=False, correction=False
    )
    plain_cos = torch.nn.functional.cosine_similarity(_embed(plain, tokenizer, test), dense).mean().item()
    assert cosine > plain_cos + 0.02
    out = statprune.save(pruned, tmp_path / "out", tokenizer=tokenizer, report=report)
    reloaded = _embed(statprune.load(out), tokenizer, test)
    torch.testing.assert_close(reloaded, small, rtol=0, atol=1e-5)
    n_small = sum(p.numel() for p in statprune.load(out).parameters())
    assert n_small < sum(p.numel() for p in model.parameters())


def test_stat_beats_the_baselines_on_minilm(minilm, sentences):
    _folder, model, tokenizer = minilm
    calib, test = sentences
    dense = _embed(model, tokenizer, test)
    cosine = {}
    for method in ("stat", "magnitude", "wanda-sp", "flap"):
        pruned, report = statprune.compress(
            model, tokenizer, calib, keep_flops=0.6, samples=256, method=method, progress=False
        )
        assert report.flops_kept <= 0.6
        small = _embed(pruned, tokenizer, test)
        cosine[method] = torch.nn.functional.cosine_similarity(small, dense).mean().item()
    assert all(cosine["stat"] > cosine[m] for m in ("magnitude", "wanda-sp", "flap")), cosine


def test_benchmark_quick_subset_runs(tmp_path, minilm):
    """`benchmarks/run.py --quick`: the committed benchmark's code path on a small subset."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in rows} == {"stat", "magnitude"}
    for row in rows:
        assert set(row) >= {
            "model",
            "task",
            "method",
            "budget_kind",
            "budget",
            "achieved",
            "metric",
            "value",
            "dense_value",
            "seconds",
        }
        assert row["achieved"] <= row["budget"] and 0.0 < row["value"] <= 1.0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Protocol" in text and "## Targets" in text
    assert (tmp_path / "plots" / "minilm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --update reruns one method and keeps the other's rows as they were
    update = ["--quick", "--update", "--methods", "magnitude", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(script), *update],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    updated = json.loads((tmp_path / "results.json").read_text())
    assert [r for r in updated if r["method"] == "stat"] == [r for r in rows if r["method"] == "stat"]
    assert {r["method"] for r in updated} == {"stat", "magnitude"} and len(updated) == len(rows)
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| stat | magnitude |" in table and "rerun alone" in table
