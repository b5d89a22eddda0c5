"""Resumable runs: a run killed with SIGKILL continues with --resume to identical outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    _build_tiny_tokenizer,
    assert_same_weights,
    build_tiny_model,
    interrupted_after,
    tiny_texts,
)
from safetensors.torch import load_file

import statprune
from statprune.errors import OutputError

TOKENIZER = _build_tiny_tokenizer()


def _model_dir(tmp_path, family="bert"):
    layers = {"num_hidden_layers": 6}
    model = build_tiny_model(family, hidden_size=64, intermediate_size=256, **layers)
    path = tmp_path / "model"
    model.save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    (tmp_path / "calib.txt").write_text("\n".join(tiny_texts(600)) + "\n")
    return path


def _cli(*args):
    return [sys.executable, "-m", "statprune.cli", *map(str, args)]


# the CLI, with a pause after each saved layer so that the kill always lands mid-run
_SLOW_DRIVER = """
import sys
import time
from statprune.checkpoint import Checkpoint
from statprune.cli import main

save = Checkpoint.save

def save_then_pause(self, *args, **kwargs):
    save(self, *args, **kwargs)
    time.sleep(0.5)

Checkpoint.save = save_then_pause
sys.exit(main(sys.argv[1:]))
"""


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("stage", ["analyse", "prune"])
def test_killed_run_resumes_to_identical_outputs(tmp_path, stage):
    model_dir = _model_dir(tmp_path)
    common = [
        model_dir,
        "--data",
        tmp_path / "calib.txt",
        "--keep-flops",
        "0.5",
        "--samples",
        "600",
        "--quiet",
    ]
    # the uninterrupted reference
    subprocess.run(_cli("compress", *common, "--out", tmp_path / "ref"), check=True, capture_output=True)
    ckpt = tmp_path / "ckpt"
    slow = [sys.executable, "-c", _SLOW_DRIVER, "compress", *map(str, common)]
    proc = subprocess.Popen(
        [*slow, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = ckpt / f"{stage}.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if marker.is_file() and json.loads(marker.read_text())["done"] >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    done = json.loads(marker.read_text())["done"]
    assert 1 <= done < 5
    # the same command without --resume refuses to clobber the checkpoint
    refused = subprocess.run(
        _cli("compress", *common, "--out", tmp_path / "out", "--checkpoint-dir", ckpt),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "--resume" in refused.stderr
    resumed = subprocess.run(
        _cli("compress", *common, "--out", tmp_path / "out", "--checkpoint-dir", ckpt, "--resume"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    ref, out = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert ref.keys() == out.keys()
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    ref_report = json.loads((tmp_path / "ref" / "statprune.json").read_text())
    out_report = json.loads((tmp_path / "out" / "statprune.json").read_text())
    assert ref_report["layers"] == out_report["layers"]
    assert not ckpt.exists(), "a finished run removes its checkpoint"


def test_checkpoint_of_another_job_is_refused(tmp_path):
    model = build_tiny_model("bert")
    texts = tiny_texts(300)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"job": "something else"}))
    with pytest.raises(OutputError, match="different model"):
        statprune.compress(
            model, TOKENIZER, texts, keep_flops=0.5, progress=False, checkpoint_dir=ckpt, resume=True
        )


def test_a_checkpoint_of_other_weights_is_refused(tmp_path):
    """Same config, options and data, weights fine-tuned again: not the same job."""
    import torch

    texts, ckpt = tiny_texts(300), tmp_path / "ckpt"
    model = build_tiny_model("llama")
    with interrupted_after(ckpt, "analyse", 0):
        statprune.compress(model, TOKENIZER, texts, keep_flops=0.5, progress=False, checkpoint_dir=ckpt)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(OutputError, match="different model"):
        statprune.compress(
            model, TOKENIZER, texts, keep_flops=0.5, progress=False, checkpoint_dir=ckpt, resume=True
        )


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model = build_tiny_model("llama")
    texts = tiny_texts(300)
    plain, _ = statprune.compress(model, TOKENIZER, texts, keep_flops=0.5, progress=False)
    ckpt, _ = statprune.compress(
        model,
        TOKENIZER,
        texts,
        keep_flops=0.5,
        progress=False,
        checkpoint_dir=tmp_path / "ckpt",
        resume=True,
    )
    assert_same_weights(plain, ckpt)


def test_interrupted_original_target_run_resumes_with_both_hidden_streams(tmp_path):
    """A correction toward the original model carries the original hidden states beside the
    pruned ones; the checkpoint saves both, so the resumed run matches an uninterrupted one."""
    model = build_tiny_model("llama", num_hidden_layers=4)
    texts = tiny_texts(300)
    options = {"keep_params": 0.5, "progress": False, "correction_target": "original"}
    reference, _ = statprune.compress(model, TOKENIZER, texts, **options)
    with interrupted_after(tmp_path / "ckpt", "prune", 1):
        statprune.compress(model, TOKENIZER, texts, checkpoint_dir=tmp_path / "ckpt", **options)
    resumed, _ = statprune.compress(
        model, TOKENIZER, texts, checkpoint_dir=tmp_path / "ckpt", resume=True, **options
    )
    assert_same_weights(reference, resumed)
