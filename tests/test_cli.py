"""The command line: happy paths, and every bad input failing cleanly.

Contract: a user error prints one ``error: …`` line on stderr, exits non-zero without a traceback,
and leaves nothing behind — no output folder, no ``.NAME.tmp-*`` / ``.NAME.old-*`` folders next to
it, and the input model folder byte-identical. Ctrl-C exits 130 the same way.

Most tests call ``statprune.cli.main`` in-process (fast); a few run the console script in a
subprocess for the real exit code, stderr and signal handling.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILIES, build_tiny_model

from statprune.cli import main

SAVED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "statprune.json",
    "modeling_statprune.py",
)


@pytest.fixture(autouse=True)
def _hf_state(monkeypatch):
    """``main`` sets env vars and transformers' verbosity / progress bars: restore them."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    yield
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


# ------------------------------------------------------------------------------------- helpers


def run(capsys, *args) -> tuple[int, str, str]:
    """``statprune ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what building the fixtures printed
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (and the set of paths, folders included)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        result[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return result


def leftovers(out: Path) -> list[str]:
    """Temporary folders ``save`` may have left next to ``out``."""
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    return [p.name for p in out.parent.iterdir() if p.name.startswith(prefixes)]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_clean_failure(code, err, out: Path, model: Path | None, before, *fragments, status=1):
    """One ``error:`` line holding every fragment, no traceback, nothing written, input intact."""
    assert code == status, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == []
    if model is not None:
        assert digest(model) == before, "the input model folder changed"


@pytest.fixture
def bert(tiny_model_dir):
    """A tiny BERT folder and the digest of its files."""
    path = tiny_model_dir("bert")
    return path, digest(path)


@pytest.fixture
def calib(calib_file):
    return calib_file(200)


def compress_args(model, data, out, *extra, budget=("--keep-flops", "0.6")):
    return ("compress", model, "--data", data, *budget, "--out", out, "--quiet", "--samples", "100", *extra)


# ---------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compress_then_info(family, tiny_model_dir, calib, tmp_path, capsys):
    model = tiny_model_dir(family)
    before = digest(model)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "compress",
        model,
        "--data",
        calib,
        "--keep-flops",
        "0.6",
        "--out",
        out,
        "--quiet",
        "--samples",
        "150",
    )
    assert code == 0, err
    assert err.strip() == "", "--quiet with enough data prints nothing on stderr"
    for name in SAVED_FILES:
        assert (out / name).is_file(), name
    assert leftovers(out) == []
    assert digest(model) == before

    report = json.loads((out / "statprune.json").read_text())
    assert report["budget_kind"] == "flops" and report["budget"] == 0.6
    assert 0 < report["flops_kept"] <= 0.6 + 1e-9
    assert report["calibration_examples"] == 150
    assert report["source_model"] == str(model.resolve())
    assert len(report["layers"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["statprune_ops"] and "AutoModel" in config["auto_map"]

    assert "FLOPs" in stdout and f"{report['flops_kept']:.1%} kept" in stdout
    assert "layer  heads kept" in stdout
    assert stdout.rstrip().endswith(f"saved to {out.resolve()}")

    code, info, err = run(capsys, "info", out)
    assert code == 0, err
    assert "layer  heads kept  neurons kept" in info
    for layer in report["layers"]:
        row = re.compile(
            rf"^\s*{layer['layer']}\s+{len(layer['heads_kept'])} / {layer['heads_total']}\s+"
            rf"{len(layer['neurons_kept'])} / {layer['neurons_total']}\s",
            re.M,
        )
        assert row.search(info), info

    import statprune
    from statprune.serving.widths import stock_architecture

    pruned = statprune.load(out)
    assert type(pruned).__name__ == stock_architecture(config["architectures"][0])


def test_keep_params(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, stdout, err = run(capsys, *compress_args(model, calib, out, budget=("--keep-params", "0.7")))
    assert code == 0, err
    report = json.loads((out / "statprune.json").read_text())
    assert report["budget_kind"] == "params"
    assert 0 < report["params_kept"] <= 0.7 + 1e-9
    assert "keep 70% of params" in stdout
    assert digest(model) == before


def test_fewer_examples_than_samples_warns(bert, calib_file, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "compress",
        model,
        "--data",
        calib_file(120),
        "--keep-flops",
        "0.6",
        "--out",
        out,
        "--quiet",
        "--samples",
        "500",
    )
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "only 120 calibration examples" in warning[0]
    assert "500" in warning[0]
    assert error_lines(err) == []
    assert json.loads((out / "statprune.json").read_text())["calibration_examples"] == 120
    assert digest(model) == before


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_too_few_tokens_names_the_options_that_give_more(family, tiny_model_dir, calib, tmp_path, capsys):
    model = tiny_model_dir(family)
    before = digest(model)
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out), "--samples", "3")
    assert_clean_failure(code, err, out, model, before, "tokens", "the widest layer", "--samples")
    # joining lines into windows suits a decoder's running text, not an encoder's separate examples
    assert ("--pack" in err) == (family == "llama")


def test_overwrite_replaces_existing_output(bert, calib, tmp_path, capsys):
    model, _ = bert
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    code, _, err = run(capsys, *compress_args(model, calib, out, "--overwrite"))
    assert code == 0, err
    assert not (out / "old.txt").exists()
    assert all((out / name).is_file() for name in SAVED_FILES)
    assert leftovers(out) == []


def test_empty_existing_output_is_used(bert, calib, tmp_path, capsys):
    model, _ = bert
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_info_and_card_show_each_experts_width(family, tmp_path, capsys):
    """A MoE layer's "neurons kept" lumps its experts together; ``info`` and the model card also
    give each routed expert's width and the shared expert's (Qwen2-MoE) on its own."""
    from conftest import _build_tiny_tokenizer, tiny_texts
    from families import build

    import statprune

    tokenizer = _build_tiny_tokenizer()
    model = build(family, "ForCausalLM")
    pruned, report = statprune.compress(
        model, tokenizer, tiny_texts(100), keep_flops=0.6, seq_len=16, progress=False
    )
    out = statprune.save(pruned, tmp_path / "out", tokenizer=tokenizer, report=report)
    code, info, err = run(capsys, "info", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    for i, layer in enumerate(pruned.model.layers):
        experts = layer.mlp.experts
        routed, shared = experts.widths[: experts.num_experts], experts.widths[experts.num_experts :]
        assert sum(routed) + sum(shared) == len(report.layers[i].neurons_kept)
        text = f"routed {', '.join(map(str, routed))} of 32 each"
        if family == "qwen2_moe":
            assert len(shared) == 1
            text += f"; shared {shared[0]} of 16"
            assert f"| {i} | {', '.join(map(str, routed))} of 32 each | {shared[0]} of 16 |" in card
        else:
            assert not shared and f"| {i} | {', '.join(map(str, routed))} of 32 each |\n" in card
        assert re.search(rf"^\s*{i}\s+{re.escape(text)}$", info, re.M), info
    assert ("shared" in info) == (family == "qwen2_moe")


def test_info_explains_round_to_next_to_a_latency_budgets_aligned_widths(bert, calib, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(bert[0], calib, out))
    assert code == 0, err
    code, info, _ = run(capsys, "info", out)
    assert code == 0 and "round_to=1" in info and "multiple of 8" not in info  # FLOPs budget: no note
    report = json.loads((out / "statprune.json").read_text())
    (out / "statprune.json").write_text(json.dumps({**report, "budget_kind": "latency"}))
    code, info, _ = run(capsys, "info", out)
    assert code == 0 and "latency table prices FFN widths off a multiple of 8 higher" in info


def test_info_errors(bert, tmp_path, capsys):
    model, _ = bert
    code, out, err = run(capsys, "info", tmp_path / "nope")
    assert code == 1 and error_lines(err) == [f"error: model folder {tmp_path / 'nope'} does not exist"]
    assert out == "" and "Traceback" not in err

    code, _, err = run(capsys, "info", model)  # an uncompressed model
    assert code == 1 and len(error_lines(err)) == 1, err
    assert "has no statprune.json" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content",
    ['{"budget": 0.5', '{"budget": 0.5}', "[1, 2]", ""],
    ids=["truncated", "missing-fields", "not-an-object", "empty"],
)
def test_info_corrupt_report(content, tmp_path, capsys):
    folder = tmp_path / "pruned"
    folder.mkdir()
    (folder / "statprune.json").write_text(content)
    code, out, err = run(capsys, "info", folder)
    assert code == 1 and len(error_lines(err)) == 1, err
    assert "statprune.json is not a valid statprune report" in err and "Traceback" not in err
    assert out == ""


# ------------------------------------------------------------------------------- bad model input


def test_missing_model_dir(calib, tmp_path, capsys):
    missing, out = tmp_path / "nope", tmp_path / "out"
    code, _, err = run(capsys, *compress_args(missing, calib, out))
    assert_clean_failure(code, err, out, None, None, "does not exist", str(missing))
    assert not missing.exists()


def test_not_a_model_dir(calib, tmp_path, capsys):
    folder, out = tmp_path / "notes", tmp_path / "out"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    before = digest(folder)
    code, _, err = run(capsys, *compress_args(folder, calib, out))
    assert_clean_failure(code, err, out, folder, before, "not a Hugging Face model folder", "config.json")


def test_unsupported_architecture(calib, tmp_path, capsys):
    import transformers
    from conftest import _build_tiny_tokenizer

    model = tmp_path / "gptj"
    config = transformers.GPTJConfig(vocab_size=19, n_positions=64, n_embd=32, n_layer=1, n_head=4)
    transformers.GPTJForCausalLM(config).save_pretrained(model)
    _build_tiny_tokenizer().save_pretrained(model)
    before = digest(model)
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, "unsupported architecture", "gptj")
    for family in TINY_FAMILIES:  # every family statprune supports
        assert family in error_lines(err)[0]


def test_nan_weight(tiny_model_dir, calib, tmp_path, capsys):
    from conftest import _build_tiny_tokenizer

    net = build_tiny_model("bert")
    with torch.no_grad():
        net.bert.encoder.layer[1].intermediate.dense.weight[3, 5] = float("nan")
    model = tmp_path / "nan-model"
    net.save_pretrained(model)
    _build_tiny_tokenizer().save_pretrained(model)
    before = digest(model)
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(
        code, err, out, model, before, "NaN or Inf", "encoder.layer.1.intermediate.dense.weight"
    )


# -------------------------------------------------------------------------------- bad data input


def test_missing_data_file(bert, tmp_path, capsys):
    model, before = bert
    out, data = tmp_path / "out", tmp_path / "missing.txt"
    code, _, err = run(capsys, *compress_args(model, data, out))
    assert_clean_failure(code, err, out, model, before, "calibration data not found", str(data))


def test_empty_data_file(bert, tmp_path, capsys):
    model, before = bert
    out, data = tmp_path / "out", tmp_path / "empty.txt"
    data.write_text("\n  \n")
    code, _, err = run(capsys, *compress_args(model, data, out))
    assert_clean_failure(code, err, out, model, before, str(data), "is empty")


def test_data_not_utf8(bert, tmp_path, capsys):
    model, before = bert
    out, data = tmp_path / "out", tmp_path / "latin1.txt"
    data.write_bytes("the cat sat\nthe caf\u00e9 dog ran\n".encode("latin-1"))
    code, _, err = run(capsys, *compress_args(model, data, out))
    assert_clean_failure(code, err, out, model, before, "is not UTF-8", "0xe9", "line 2", "iconv")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("data.csv", "label,sentence\n1,the cat sat\n0,the dog ran\n"),
        ("data.jsonl", '{"sentence": "the cat sat"}\n{"sentence": "the dog ran"}\n'),
    ],
)
def test_structured_data_without_text_field(name, content, bert, tmp_path, capsys):
    model, before = bert
    out, data = tmp_path / "out", tmp_path / name
    data.write_text(content)
    code, _, err = run(capsys, *compress_args(model, data, out))
    assert_clean_failure(code, err, out, model, before, "no field 'text'", "'sentence'", "--text-field")


def test_too_few_tokens(bert, tmp_path, capsys):
    model, before = bert
    out, data = tmp_path / "out", tmp_path / "short.txt"
    data.write_text("the cat sat\na dog ran\nthe fox\n")  # 3 + 3 + 2 words, + [CLS]/[SEP] each
    code, _, err = run(capsys, *compress_args(model, data, out))
    assert_clean_failure(code, err, out, model, before, "only 14 tokens", "at least 64")


# ----------------------------------------------------------------------------------- bad budgets


@pytest.mark.parametrize("flag", ["--keep-flops", "--keep-params"])
@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_budget_outside_unit_interval(flag, value, bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, budget=(flag, value)))
    assert_clean_failure(code, err, out, model, before, "outside (0, 1]")


def test_budget_not_a_number(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, budget=("--keep-flops", "abc")))
    assert code == 2
    assert "error: argument --keep-flops: 'abc' is not a number" in err
    assert "Traceback" not in err and not out.exists() and digest(model) == before


@pytest.mark.parametrize(
    "budget", [(), ("--keep-flops", "0.6", "--keep-params", "0.6")], ids=["neither", "both"]
)
def test_exactly_one_budget(budget, bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, budget=budget))
    assert_clean_failure(code, err, out, model, before, "exactly one budget", "--keep-flops", "--keep-params")


def test_budget_removing_everything(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, budget=("--keep-flops", "0.0001")))
    assert_clean_failure(code, err, out, model, before, "every head and neuron", "raise the budget")


def test_heads_only_cannot_meet_budget(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(
        capsys, *compress_args(model, calib, out, "--prune", "heads", budget=("--keep-flops", "0.1"))
    )
    assert_clean_failure(
        code, err, out, model, before, "--keep-flops 0.1 is below what can", "--prune heads,neurons"
    )


def test_correction_target_original_needs_sequential_activations(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    # a BERT classifier calibrates on original activations unless told otherwise
    code, _, err = run(capsys, *compress_args(model, calib, out, "--correction-target", "original"))
    assert_clean_failure(code, err, out, model, before, "needs --activations sequential")
    extra = ("--correction-target", "original", "--activations", "sequential")
    code, _, err = run(capsys, *compress_args(model, calib, out, *extra))
    assert code == 0, err
    assert json.loads((out / "statprune.json").read_text())["options"]["correction_target"] == "original"


# ---------------------------------------------------------------------------------- bad outputs


def test_out_is_input(bert, calib, tmp_path, capsys):
    model, before = bert
    code, _, err = run(capsys, *compress_args(model, calib, model))
    assert code == 1 and len(error_lines(err)) == 1, err
    assert "is the input model folder" in err and "Traceback" not in err
    assert digest(model) == before
    assert leftovers(model) == []


def test_out_inside_input(bert, calib, tmp_path, capsys):
    model, before = bert
    out = model / "pruned"
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, "inside the input model folder")


def test_existing_nonempty_out_refused(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    out_before = digest(out)
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert code == 1 and len(error_lines(err)) == 1, err
    assert "exists and is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert digest(out) == out_before
    assert leftovers(out) == [] and digest(model) == before


def test_out_below_a_file(bert, calib, tmp_path, capsys):
    model, before = bert
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, str(blocker), "not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, "--device", "cuda"))
    assert_clean_failure(code, err, out, model, before, "no CUDA GPU", "--device cpu")


def test_unknown_device(bert, calib, tmp_path, capsys):
    model, before = bert
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(model, calib, out, "--device", "tpu"))
    assert_clean_failure(code, err, out, model, before, "unknown device 'tpu'")


# ------------------------------------------------------------------------ failures while saving


def _in_tmp(path) -> bool:
    return ".tmp-" in str(path)


def _fail_writes_in_tmp(monkeypatch, error) -> None:
    """``Path.write_text`` raises ``error(path)`` for files in ``save``'s temporary folder."""
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if _in_tmp(self):
            raise error(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _previous_output(tmp_path) -> tuple[Path, dict[str, str]]:
    """An output folder an earlier run left, and its digest."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    return out, digest(out)


def assert_clean_interrupt(code, err) -> None:
    """Ctrl-C: exit status 130, an ``interrupted`` message, no traceback and no ``error:`` line."""
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err and error_lines(err) == []


def _enospc_write_text(monkeypatch):
    _fail_writes_in_tmp(monkeypatch, lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)))


def _enospc_safetensors(monkeypatch):
    """safetensors (Rust) reports a full disk as SafetensorError, not OSError."""
    import safetensors.torch

    def serialize_file(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)


def _enospc_tokenizer(monkeypatch):
    """tokenizers (Rust) reports a full disk as a plain Exception."""
    import tokenizers

    def save(self, path, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # as tokenizers does

    monkeypatch.setattr(tokenizers.Tokenizer, "save", save)


@pytest.mark.parametrize(
    "inject",
    [_enospc_write_text, _enospc_safetensors, _enospc_tokenizer],
    ids=["write_text", "safetensors", "tokenizer"],
)
def test_disk_full(inject, bert, calib, tmp_path, capsys, monkeypatch):
    model, before = bert
    out = tmp_path / "new" / "nested" / "out"  # parents created by save are removed again
    inject(monkeypatch)
    code, stdout, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, "disk full while writing", str(out))
    assert not (tmp_path / "new").exists()
    assert "saved to" not in stdout


def test_disk_full_with_overwrite_keeps_previous_output(bert, calib, tmp_path, capsys, monkeypatch):
    model, before = bert
    out, out_before = _previous_output(tmp_path)
    _enospc_write_text(monkeypatch)
    code, _, err = run(capsys, *compress_args(model, calib, out, "--overwrite"))
    assert code == 1 and error_lines(err) and "disk full" in error_lines(err)[0], err
    assert digest(out) == out_before and leftovers(out) == [] and digest(model) == before


def test_other_write_error(bert, calib, tmp_path, capsys, monkeypatch):
    model, before = bert
    out = tmp_path / "out"
    _fail_writes_in_tmp(
        monkeypatch, lambda path: PermissionError(errno.EACCES, "Permission denied", str(path))
    )
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, "cannot write", "Permission denied")


def test_device_out_of_memory_is_one_line(bert, calib, tmp_path, capsys, monkeypatch):
    """A device running out of memory mid-compression (here: during the backward pass of the
    gradient weighting) says what to lower, writes nothing and leaves the model as it was."""
    import statprune.pipeline.stages

    model, before = bert
    out = tmp_path / "out"

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(statprune.pipeline.stages, "output_sensitivity", exhausted)
    code, _, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_failure(code, err, out, model, before, "ran out of memory", "--batch-size")


# ----------------------------------------------------------------------------------- interrupts


def test_interrupt_while_saving(bert, calib, tmp_path, capsys, monkeypatch):
    model, before = bert
    out = tmp_path / "out"
    _fail_writes_in_tmp(monkeypatch, lambda path: KeyboardInterrupt())
    code, stdout, err = run(capsys, *compress_args(model, calib, out))
    assert_clean_interrupt(code, err)
    assert not out.exists() and leftovers(out) == [] and digest(model) == before
    assert "saved to" not in stdout


def test_interrupt_between_renames_restores_previous_output(bert, calib, tmp_path, capsys, monkeypatch):
    """--overwrite moves the old output aside, then the new one in: Ctrl-C in between."""
    model, before = bert
    out, out_before = _previous_output(tmp_path)
    original = os.rename

    def rename(src, dst, *args, **kwargs):
        if _in_tmp(src) and Path(dst) == out.resolve():
            raise KeyboardInterrupt
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    code, _, err = run(capsys, *compress_args(model, calib, out, "--overwrite"))
    assert_clean_interrupt(code, err)
    assert digest(out) == out_before and leftovers(out) == [] and digest(model) == before


# ---------------------------------------------------------------------- real process, real exit


def _command() -> list[str]:
    script = Path(sys.executable).with_name("statprune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "statprune.cli"]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_subprocess_user_error_exit_code(tmp_path):
    """A failure deep in the run (after loading the model) still gives one line and exit 1."""
    from conftest import _build_tiny_tokenizer

    net = build_tiny_model("llama")
    with torch.no_grad():
        net.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model = tmp_path / "inf-model"
    net.save_pretrained(model)
    _build_tiny_tokenizer().save_pretrained(model)
    before = digest(model)
    data = tmp_path / "calib.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *_command(),
            "compress",
            str(model),
            "--data",
            str(data),
            "--keep-flops",
            "0.5",
            "--out",
            str(out),
            "--quiet",
            "--samples",
            "50",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: model weight model.layers.0.mlp.down_proj.weight contains NaN or Inf; "
        "fix or re-export the checkpoint"
    ]
    assert proc.stdout == ""
    assert not out.exists() and leftovers(out) == [] and digest(model) == before


_DRIVER = """
import signal
import sys
import time
import statprune.pipeline.stages as stages
from statprune.cli import main

# a shell that runs the test suite in the background (nohup … &) starts its children with SIGINT
# ignored; Ctrl-C at a terminal meets Python's default handler, so restore that
signal.signal(signal.SIGINT, signal.default_int_handler)

analyse_layer = stages.analyse_layer

def analyse_then_wait(*args, **kwargs):
    result = analyse_layer(*args, **kwargs)
    if args[1] == 1:  # the second layer is analysed: we are mid-compression, so wait for Ctrl-C
        print("TEST-MARKER: layer 1 analysed", file=sys.stderr, flush=True)
        time.sleep(120)
    return result

stages.analyse_layer = analyse_then_wait
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_during_compression(tmp_path, stop):
    """Ctrl-C, and SIGTERM (a scheduler's stop) handled the same way: a clean interrupt."""
    from conftest import _build_tiny_tokenizer, tiny_texts

    net = build_tiny_model(
        "bert", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    model = tmp_path / "model"
    net.save_pretrained(model)
    _build_tiny_tokenizer().save_pretrained(model)
    before = digest(model)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(tiny_texts(64)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _DRIVER,
            "compress",
            str(model),
            "--data",
            str(data),
            "--keep-flops",
            "0.5",
            "--samples",
            "64",
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    lines: list[str] = []
    started = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("TEST-MARKER"):
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "compression never started: " + "".join(lines)
        assert proc.poll() is None
        proc.send_signal(stop)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    err = "".join(lines)
    assert_clean_interrupt(code, err)
    assert proc.stdout.read() == ""
    assert not out.exists() and leftovers(out) == []
    assert digest(model) == before


def test_a_warning_met_at_every_budget_of_a_sweep_is_printed_once(bert, calib_file, tmp_path, capsys):
    model, before = bert
    thin = calib_file(12, name="thin.txt")  # more tokens than the widest layer, not 4x as many
    code, _, err = run(
        capsys, "sweep", model, "--data", thin, "--eval", calib_file(20, name="eval.txt"),
        "--budgets", "0.8,0.6", "--methods", "stat", "--out", tmp_path / "sweep",
    )  # fmt: skip
    assert code == 0, err
    overfit = [line for line in err.splitlines() if line.startswith("warning:") and "may overfit" in line]
    assert len(overfit) == 1 and "--correction-ridge" in overfit[0]
    assert digest(model) == before
