"""statprune eval --lm-eval-tasks: lm-evaluation-harness tasks on a model statprune loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

from statprune.cli import main

pytest.importorskip("lm_eval")

CHOICES = ["mat", "fence", "dog", "fox", "cat", "the", "lazy", "ran"]


def _write_task(folder: Path, name: str = "tiny_mc", n: int = 5) -> Path:
    """A 4-choice task over the tiny vocabulary, local JSONL data, absolute data_files."""
    import random

    rng = random.Random(0)
    rows = []
    for context in tiny_texts(n, seed=1):
        choices = rng.sample(CHOICES, 4)
        rows.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )
    return task


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """A tiny random Llama (dense) and its STAT-compressed copy saved by statprune."""
    import statprune

    root = tmp_path_factory.mktemp("harness")
    tokenizer = _build_tiny_tokenizer(eos_token="[SEP]", bos_token="[CLS]")
    dense = build_tiny_model("llama", seed=3)
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    model, report = statprune.compress(
        build_tiny_model("llama", seed=3),
        tokenizer,
        tiny_texts(100),
        keep_params=0.5,
        samples=64,
        progress=False,
    )
    statprune.save(model, root / "compressed", tokenizer=tokenizer, report=report)
    return root / "dense", root / "compressed"


def _error_line(err: str) -> str:
    """The one ``error:`` line of a failed command (progress bars aside), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _plain_lm_eval(folder: Path, task: Path) -> dict[str, float]:
    """lm-eval's own route: model name "hf", the folder's path, remote code trusted."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,device=cpu",
        tasks=[task.stem],
        task_manager=TaskManager(include_path=str(task.parent), include_defaults=False),
        batch_size=4,
    )
    return res["results"][task.stem]


def test_eval_lm_eval_tasks_matches_lm_eval(tmp_path, lm_dirs, capsys):
    dense, compressed = lm_dirs
    task = _write_task(tmp_path / "tasks")
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(compressed),
            "--lm-eval-tasks",
            str(task),
            "--against",
            str(dense),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc_norm" in printed and "change" in printed
    data = json.loads(out.read_text())
    rows = {(r["task"], r["metric"]): r for r in data["lm_eval"]["rows"]}
    assert set(rows) == {("tiny_mc", "acc"), ("tiny_mc", "acc_norm")}
    assert data["lm_eval"]["num_fewshot"] == {"tiny_mc": 0}
    mine, ref = _plain_lm_eval(compressed, task), _plain_lm_eval(dense, task)
    for metric in ("acc", "acc_norm"):
        row = rows["tiny_mc", metric]
        assert row["n"] == 5
        assert row["value"] == pytest.approx(mine[f"{metric},none"], abs=1e-12)
        assert row["stderr"] == pytest.approx(mine[f"{metric}_stderr,none"], abs=1e-12)
        assert row["reference"] == pytest.approx(ref[f"{metric},none"], abs=1e-12)
        assert row["change"] == pytest.approx(row["value"] - row["reference"])
        lo, hi = row["change_interval"]
        assert lo <= row["change"] <= hi


def test_folder_of_tasks_and_limit(tmp_path, lm_dirs):
    from statprune.harness import harness_paths, task_files

    _, compressed = lm_dirs
    folder = tmp_path / "tasks"
    _write_task(folder, "task_a", n=6)
    _write_task(folder, "task_b", n=6)
    (folder / "template.yaml").write_text("output_type: multiple_choice\n")  # no task: left out
    assert [p.name for p in task_files(str(folder))] == ["task_a.yaml", "task_b.yaml"]
    result = harness_paths(compressed, str(folder), limit=3, device="cpu", batch_size=4)
    assert {(r.task, r.n) for r in result.rows} == {("task_a", 3), ("task_b", 3)}
    assert all(r.reference is None for r in result.rows)
    assert "reference" not in result.summary()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("task: [unclosed\n", "cannot read"),
        ("output_type: multiple_choice\n", "defines neither 'task' nor 'group'"),
        (
            "task: broken\ndataset_path: json\n"
            "dataset_kwargs:\n  data_files:\n    test: /nonexistent/x.jsonl\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: x\ndoc_to_choice: [a, b]\n"
            "doc_to_target: 0\n",
            "cannot load broken.yaml",
        ),
    ],
)
def test_bad_task_file(tmp_path, lm_dirs, capsys, content, message):
    _, compressed = lm_dirs
    task = tmp_path / "broken.yaml"
    if content is not None:
        task.write_text(content)
    code = main(["eval", str(compressed), "--lm-eval-tasks", str(task), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert _error_line(err).startswith("error: --lm-eval-tasks") and message in err


def test_non_causal_lm_refused(tmp_path, tiny_model_dir, capsys):
    task = _write_task(tmp_path / "tasks")
    classifier = tiny_model_dir("bert")
    assert main(["eval", str(classifier), "--lm-eval-tasks", str(task), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "BertForSequenceClassification" in _error_line(err) and "ForCausalLM" in err


def test_lm_eval_missing_names_the_extra(tmp_path, lm_dirs, capsys, monkeypatch):
    _, compressed = lm_dirs
    task = _write_task(tmp_path / "tasks")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(compressed), "--lm-eval-tasks", str(task)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: --lm-eval-tasks needs lm-evaluation-harness: pip install 'statprune[harness]'"
    )


def test_data_or_tasks(tmp_path, lm_dirs, capsys):
    _, compressed = lm_dirs
    task = _write_task(tmp_path / "tasks")
    assert main(["eval", str(compressed)]) == 1
    assert "--data FILE (or --lm-eval-tasks" in capsys.readouterr().err
    data = tmp_path / "d.txt"
    data.write_text("the cat\n")
    assert main(["eval", str(compressed), "--data", str(data), "--lm-eval-tasks", str(task)]) == 1
    assert "not both" in capsys.readouterr().err
    for extra, message in (
        (["--fail-below", "0.9"], "does not apply to --lm-eval-tasks"),
        (["--task", "classify"], "drop --task classify"),
        (["--num-fewshot", "-1"], "0 or more"),
    ):
        assert main(["eval", str(compressed), "--lm-eval-tasks", str(task), *extra]) == 1
        assert message in _error_line(capsys.readouterr().err)


def test_committed_lm_eval_check_page_is_rendered_from_its_json():
    """benchmarks/lm_eval_check.md is what the script makes of lm_eval_check.json, and the plain
    lm-eval command line gave the numbers statprune eval gave on the compressed folder."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    from lm_eval_check import markdown

    res = json.loads((bench / "lm_eval_check.json").read_text())
    assert (bench / "lm_eval_check.md").read_text() == markdown(res)
    ours = {r["metric"]: r["value"] for r in res["statprune_eval"]["rows"]}
    cli = {m: v["value"] for m, v in res["lm_eval_cli"]["metrics"].items()}
    assert cli == ours and res["lm_eval_cli"]["matches_statprune"]
