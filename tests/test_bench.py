"""Side-by-side benchmark: row structure, ratios, both backends, causal-LM extras, CLI."""

import argparse
import json
import shutil
import sys

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.bench import (
    BenchRow,
    add_bench_parser,
    benchmark,
    format_table,
    memory_caveat,
    run_bench,
    to_dict,
)
from statprune.errors import DeviceError, ModelError

TOKENIZER = _build_tiny_tokenizer()
FAST = {"seq_len": 8, "warmup": 1, "trials": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT, its compressed copy, and a tiny Llama."""
    root = tmp_path_factory.mktemp("bench")
    bert = build_tiny_model("bert")
    bert.save_pretrained(root / "bert")
    pruned, report = statprune.compress(bert, TOKENIZER, tiny_texts(300), keep_flops=0.4, progress=False)
    statprune.save(pruned, root / "pruned", tokenizer=TOKENIZER, report=report)
    build_tiny_model("llama").save_pretrained(root / "llama")
    return {name: root / name for name in ("bert", "pruned", "llama")}


def _by(rows, **match):
    return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]


def test_torch_rows_compare_models_side_by_side(folders):
    rows = benchmark([folders["bert"], folders["pruned"]], batches=(1, 3), memory=False, **FAST)
    assert [(r.label, r.kind, r.batch) for r in rows] == [
        ("bert", "forward", 1),
        ("pruned", "forward", 1),
        ("bert", "forward", 3),
        ("pruned", "forward", 3),
    ]
    for row in rows:
        assert isinstance(row, BenchRow)
        assert row.backend == "torch" and row.device == "cpu" and row.seq_len == 8 and row.trials == 3
        assert 0 < row.latency_ms <= row.latency_p90_ms
        assert row.throughput == pytest.approx(row.batch / (row.latency_ms / 1e3))
        assert row.unit == "seq/s"
        assert row.peak_memory_mb is None and row.memory_method == "not measured"
    for batch in (1, 3):
        first, second = _by(rows, batch=batch)
        assert first.speedup == 1.0 and first.params_ratio == 1.0
        assert second.speedup == pytest.approx(first.latency_ms / second.latency_ms)
        assert second.params < first.params and second.params_ratio < 1.0
    table = format_table(rows)
    assert "bert" in table and "pruned" in table and "speedup" in table
    data = json.loads(json.dumps(to_dict(rows)))
    assert data["environment"]["torch"] == torch.__version__
    assert data["rows"][1]["label"] == "pruned" and data["rows"][1]["params"] == rows[1].params


def test_cpu_memory_is_measured_in_a_child_process(folders):
    rows = benchmark([folders["pruned"]], batches=(1, 3), **FAST)
    assert all(r.peak_memory_mb is not None and r.peak_memory_mb >= 0 for r in rows)
    assert all(r.memory_method.startswith("child process") for r in rows)
    assert "peak MiB: child process" in format_table(rows)


def _dying_python(tmp_path, pattern: str) -> str:
    """A stand-in for ``sys.executable`` whose child process is killed (SIGKILL, as the OOM killer
    does) when its arguments match ``pattern``; any other command runs the real interpreter."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\ncase "$*" in *{pattern}*) kill -9 $$;; esac\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_dying_memory_child_is_recorded_and_the_others_are_kept(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", _dying_python(tmp_path, "pruned"))
    with pytest.raises(ModelError, match="killed by signal 9"):  # without failures: as before
        benchmark([folders["bert"], folders["pruned"]], batches=(2,), **FAST)
    failures: dict[str, str] = {}
    rows = benchmark([folders["bert"], folders["pruned"]], batches=(2,), failures=failures, **FAST)
    assert list(failures) == [str(folders["pruned"])]
    assert "peak memory could not be measured" in failures[str(folders["pruned"])]
    assert "killed by signal 9" in failures[str(folders["pruned"])]
    bert, pruned = rows  # latency is still measured for both
    assert bert.peak_memory_mb > 0 and pruned.peak_memory_mb is None and pruned.latency_ms > 0


def test_a_model_that_cannot_run_is_recorded_and_the_others_are_kept(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["pruned"], broken)
    (broken / "config.json").write_text("{not json")
    failures: dict[str, str] = {}
    rows = benchmark([folders["bert"], broken], batches=(2,), memory=False, failures=failures, **FAST)
    assert [r.label for r in rows] == ["bert"] and rows[0].latency_ms > 0
    assert list(failures) == [str(broken)] and "could not be loaded" in failures[str(broken)]


def test_weights_are_reported_next_to_the_peak_and_noise_is_measured(folders):
    rows = benchmark([folders["bert"], folders["pruned"]], batches=(2,), **FAST)
    bert, pruned = rows
    for row, folder in zip(rows, ("bert", "pruned"), strict=True):
        model = statprune.load(folders[folder])
        exact = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert row.weight_mb == pytest.approx(exact / 2**20)
        assert row.memory_noise_mb is not None and row.memory_noise_mb >= 0
    assert pruned.weight_mb < bert.weight_mb
    table = format_table(rows)
    assert "weights MiB" in table and f"{pruned.weight_mb:,.1f}" in table and "peak MiB noise" in table


def test_a_pruned_peak_above_the_dense_one_is_flagged_not_silent():
    def row(label, peak, weights, noise):
        return BenchRow(
            label,
            label,
            "torch",
            "cpu",
            "forward",
            2,
            8,
            0,
            100,
            1.0,
            1.1,
            2000.0,
            "seq/s",
            peak,
            "child process",
            1.0,
            1.0,
            3,
            1,
            weight_mb=weights,
            memory_noise_mb=noise,
        )

    dense, above = row("dense", 40.0, 4.0, 0.5), row("pruned", 41.0, 2.0, 0.5)
    assert memory_caveat(41.0, 40.0, 0.5) == "above" and memory_caveat(39.8, 40.0, 0.5) == "noise"
    assert memory_caveat(30.0, 40.0, 0.5) is None and memory_caveat(None, 40.0, 0.5) is None
    assert memory_caveat(39.7, 40.0, 0.1) == "noise"  # a measured gap below 1 % of the peak: 1 % counts
    table = format_table([dense, above])
    assert "41.0 †" in table and "40.0 †" not in table
    assert "†: peak memory not below the dense (first) model's" in table
    assert "†" not in format_table([dense, row("pruned", 30.0, 2.0, 0.5)])
    assert "1 thread," in table and "first model: the weights are 10.0% of the peak memory" in table


def test_memory_child_ignores_a_statprune_in_the_working_directory(folders, tmp_path, monkeypatch):
    """Run from a folder holding another ``statprune/`` (an old checkout), with a relative model
    path: the child still imports this statprune and finds the model."""
    shadow = tmp_path / "statprune"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the statprune in the working directory')\n")
    (tmp_path / "pruned").symlink_to(folders["pruned"], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    rows = benchmark(["pruned"], batches=(1,), **FAST)
    assert rows[0].peak_memory_mb is not None and rows[0].memory_method.startswith("child process")


def test_a_model_against_itself(folders):
    rows = benchmark([folders["bert"], folders["bert"]], batches=(2,), memory=False, **FAST)
    assert [r.label for r in rows] == ["bert", "bert#2"]
    assert rows[0].speedup == 1.0
    assert rows[1].params_ratio == 1.0
    assert rows[0].peak_memory_mb is None and rows[0].memory_method == "not measured"
    assert rows[1].speedup > 0


def test_onnxruntime_backend(folders):
    rows = benchmark([folders["pruned"]], batches=(1, 4), backend="onnxruntime", threads=1, **FAST)
    assert [(r.backend, r.kind, r.batch) for r in rows] == [
        ("onnxruntime", "forward", 1),
        ("onnxruntime", "forward", 4),
    ]
    assert all(r.speedup == 1.0 and r.latency_ms > 0 and r.threads == 1 for r in rows)
    assert all(r.peak_memory_mb is not None and r.peak_memory_mb >= 0 for r in rows)
    torch_rows = benchmark([folders["pruned"]], batches=(1,), memory=False, **FAST)
    assert rows[0].params == torch_rows[0].params
    assert "onnxruntime" in format_table(rows)


def test_causal_lm_gets_prefill_and_generation(folders):
    rows = benchmark([folders["llama"]], batches=(2,), lm_batches=(1, 2), new_tokens=3, memory=False, **FAST)
    assert [(r.kind, r.batch) for r in rows] == [
        ("forward", 2),
        ("prefill", 1),
        ("generate", 1),
        ("prefill", 2),
        ("generate", 2),
    ]
    for row in _by(rows, kind="generate"):
        assert row.new_tokens == 3 and row.unit == "tok/s"
        assert row.throughput == pytest.approx(row.batch * 3 / (row.latency_ms / 1e3))
    prefill = _by(rows, kind="prefill")
    assert all(r.unit == "seq/s" and r.new_tokens == 0 and r.latency_ms > 0 for r in prefill)
    assert "generate 3" in format_table(rows)


def _parser():
    parser = argparse.ArgumentParser(prog="statprune")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_table_and_json(folders, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(folders["bert"]), str(folders["pruned"]), "--batch", "1,2", "--seq-len", "6"]
    args = _parser().parse_args([*argv, "--trials", "2", "--warmup", "0", "--no-memory", "--json", str(out)])
    assert args.func is run_bench
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    assert "pruned" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert [(r["label"], r["batch"]) for r in data["rows"]] == [
        ("bert", 1),
        ("pruned", 1),
        ("bert", 2),
        ("pruned", 2),
    ]
    assert data["rows"][0]["speedup"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    for bad in (["--batch", "0"], ["--batch", "1,x"], ["--trials", "0"], ["--backend", "tvm"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["bench", str(folders["bert"]), *bad])


def test_cuda_without_gpu_is_a_device_error(folders, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA"):
        benchmark([folders["bert"]], device="cuda")
    args = _parser().parse_args(["bench", str(folders["bert"]), "--device", "cuda"])
    with pytest.raises(DeviceError):
        run_bench(args)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="onnxruntime has no CUDA"):
        benchmark([folders["bert"]], device="cuda", backend="onnxruntime")


def test_bad_models_and_lengths_are_refused(folders, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        benchmark([tmp_path / "missing"])
    with pytest.raises(ModelError, match="positions"):
        benchmark([folders["bert"]], seq_len=4096)  # the tiny BERT has 130 positions


# --- thread counts: recorded for every backend, and the same for both ------------------------


def test_onnxruntime_runs_and_records_torchs_thread_count_by_default(folders, monkeypatch):
    """Without ``threads`` onnxruntime would pick its own default (one per physical core, unlike
    torch's OMP_NUM_THREADS); its sessions get torch's count and the rows record it."""
    import statprune.export

    sessions, make = [], statprune.export.onnx_session
    monkeypatch.setattr(
        statprune.export, "onnx_session", lambda *a, **k: sessions.append(make(*a, **k)) or sessions[-1]
    )
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rows = benchmark([folders["pruned"]], batches=(1,), backend="onnxruntime", memory=False, **FAST)
    finally:
        torch.set_num_threads(previous)
    assert [r.threads for r in rows] == [2]
    # the last session is the timed one (the export checks its graph in one of its own first)
    assert sessions[-1].get_session_options().intra_op_num_threads == 2
    assert "onnxruntime on cpu, 2 threads" in format_table(rows)


def _sweep_assets(root):
    model_dir, calib, data = root / "tinybert", root / "calib.txt", root / "eval.jsonl"
    build_tiny_model("bert").save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    calib.write_text("\n".join(tiny_texts(40)) + "\n")
    data.write_text("\n".join(json.dumps({"text": t, "label": 0}) for t in tiny_texts(8, seed=1)) + "\n")
    return model_dir, calib, data


def test_sweep_threads_option_reaches_the_measurement_and_is_shown(tmp_path):
    from statprune.sweep import add_sweep_parser, run_sweep

    model_dir, calib, data = _sweep_assets(tmp_path)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser(prog="statprune")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    argv = [
        "sweep",
        model_dir,
        "--data",
        calib,
        "--eval",
        data,
        "--out",
        out,
        "--budgets",
        "0.7",
        "--methods",
        "magnitude",
        "--samples",
        "20",
        "--seq-len",
        "8",
        "--bench",
        "--bench-trials",
        "2",
        "--bench-batch",
        "2",
        "--bench-no-memory",
        "--threads",
        "2",
        "--quiet",
    ]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_sweep(parser.parse_args([str(a) for a in argv])) == 0
    finally:
        torch.set_num_threads(previous)
    data = json.loads((out / "sweep.json").read_text())
    assert data["bench"]["threads"] == 2
    assert data["bench_setting"].endswith("torch on cpu, 2 threads")
    assert "torch on cpu, 2 threads" in (out / "results.md").read_text()
    assert torch.get_num_threads() == previous
