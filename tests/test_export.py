"""ONNX export of compressed folders: dynamo export, dynamic axes, onnxruntime check, atomic writes.

Each export takes ~10 s (torch.export tracing with symbolic shapes), so every folder is exported
once, in a module-scoped fixture, and the tests share the files.
"""

import argparse

import numpy as np
import onnx
import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts
from torch.onnx._internal.exporter import _onnx_program

import statprune
from statprune.adapters import adapter_for
from statprune.errors import ModelError, OutputError
from statprune.export import add_export_parser, export_onnx, relative_error, run_export, synthetic_inputs
from statprune.flops import model_shapes, total_cost
from statprune.modeling_statprune import EmptyAttention

ort = pytest.importorskip("onnxruntime")
TOKENIZER = _build_tiny_tokenizer()


def _compress(model, **kwargs):
    return statprune.compress(model, TOKENIZER, tiny_texts(300), progress=False, **kwargs)


def _budget(model, counts):
    """The FLOPs fraction of ``counts`` [(heads, neurons) per layer] relative to ``model``."""
    adapter = adapter_for(model.config)
    shapes = model_shapes(adapter, model.base_model)
    dense = [(s.n_heads, s.ffn_width) for s in shapes]
    return total_cost(shapes, counts, "flops", 128) / total_cost(shapes, dense, "flops", 128)


def _hollow_bert():
    """BERT whose layers lost every head, and whose layer 0 or 1 also lost every FFN neuron."""
    model = build_tiny_model("bert")
    no_heads, _ = _compress(model, keep_flops=_budget(model, [(0, 64), (0, 64)]), prune=("heads",))
    # round_to=64: a layer keeps all 64 neurons or none, so half the FFN budget empties one layer
    budget = _budget(no_heads, [(0, 0), (0, 64)])
    return _compress(no_heads, keep_flops=budget, prune=("neurons",), round_to=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model folder, export result); exported on first use."""
    root = tmp_path_factory.mktemp("export")
    cache = {}

    def get(family):
        if family not in cache:
            if family == "hollow-bert":
                model, report = _hollow_bert()
            else:
                model, report = _compress(build_tiny_model(family), keep_flops=0.4)
            folder = statprune.save(model, root / family, tokenizer=TOKENIZER, report=report)
            with pytest.MonkeyPatch.context() as patch:
                if family == "llama":  # as if it were over 1.5 GB: weights go to an external .data file
                    patch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
                result = export_onnx(folder, root / f"{family}.onnx")
            cache[family] = (folder, result, report)
        return cache[family]

    return get


def _check_against_torch(folder, onnx_path, shapes):
    """Run the file at several (batch, length) shapes, with padding; compare with PyTorch."""
    model = statprune.load(folder)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for batch, length in shapes:
        lengths = [length] + [max(1, length - 2 - i) for i in range(batch - 1)]
        inputs = synthetic_inputs(model, batch, length, lengths=lengths, seed=batch * 100 + length)
        feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
        assert set(feed) == set(inputs)
        got = session.run(names, feed)
        kwargs = dict(inputs)
        if type(model).__name__.endswith("ForCausalLM"):
            kwargs["use_cache"] = False
        with torch.no_grad():
            out = model(**kwargs)
        for name, value in zip(names, got, strict=True):
            expected = out[name].numpy()
            assert value.shape == expected.shape
            assert relative_error(value, expected, inputs["attention_mask"].numpy()) < 1e-4


@pytest.mark.parametrize("family", ["mpnet", "llama"])
def test_compressed_model_exports_and_matches_at_other_shapes(family, exported):
    folder, result, report = exported(family)
    assert result.verified and result.relative_error < 1e-4
    assert result.verify_shape != (2, 16)  # checked on a shape the export never saw
    assert result.path.is_file()
    if family == "llama":
        assert result.external_data == result.path.with_name("llama.onnx.data")
        assert result.size_bytes > result.path.stat().st_size
    else:
        assert result.external_data is None and result.size_bytes == result.path.stat().st_size
    assert not list(result.path.parent.glob(".*.tmp-*"))
    assert result.inputs == ("input_ids", "attention_mask")
    assert result.outputs == ("logits",)
    assert report.flops_kept <= 0.4
    # uneven layers: not every layer keeps the same widths
    widths = {(len(lr.heads_kept), len(lr.neurons_kept)) for lr in report.layers}
    assert len(widths) > 1 or any(len(lr.heads_kept) < lr.heads_total for lr in report.layers)
    # dynamic axes really work, including batch 1 and a length of 1
    _check_against_torch(folder, result.path, [(1, 1), (1, 11), (4, 23)])
    graph = onnx.load(str(result.path)).graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}


def test_mpnet_position_bias_selection_survives_export(exported):
    folder, result, report = exported("mpnet")
    ops = statprune.load(folder).config.statprune_ops
    assert any(op["op"] == "select_argument" for op in ops)  # the forward pre-hook was in the graph
    assert any(0 < len(lr.heads_kept) < lr.heads_total for lr in report.layers)
    assert result.relative_error < 1e-4


def test_layers_without_heads_or_neurons_export(exported):
    folder, result, report = exported("hollow-bert")
    assert all(not lr.heads_kept for lr in report.layers)
    assert sorted(len(lr.neurons_kept) for lr in report.layers) == [0, 64]
    model = statprune.load(folder)
    layers = model.bert.encoder.layer
    assert all(isinstance(layer.attention.self, EmptyAttention) for layer in layers)
    assert any(layer.attention.output.dense.in_features == 0 for layer in layers)
    assert any(layer.intermediate.dense.out_features == 0 for layer in layers)
    assert any(layer.output.dense.in_features == 0 for layer in layers)
    assert result.verified and result.relative_error < 1e-4
    assert result.inputs == ("input_ids", "attention_mask", "token_type_ids")
    _check_against_torch(folder, result.path, [(1, 5), (3, 30)])


def test_cli_exports_distilbert(tmp_path, capsys):
    model, report = _compress(build_tiny_model("distilbert"), keep_flops=0.4)
    folder = statprune.save(model, tmp_path / "model", tokenizer=TOKENIZER, report=report)
    parser = argparse.ArgumentParser(prog="statprune")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "onnx" / "model.onnx"  # the parent folder is created
    args = parser.parse_args(["export-onnx", str(folder), str(out), "--seq-len", "12"])
    assert args.func is run_export
    assert run_export(args) == 0
    printed = capsys.readouterr().out
    assert "verified with onnxruntime" in printed and str(out) in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    _check_against_torch(folder, out, [(2, 7)])
    with pytest.raises(SystemExit):
        parser.parse_args(["export-onnx", str(folder), str(out), "--seq-len", "1"])


def test_wrong_onnx_fails_verification_and_writes_nothing(exported, tmp_path, monkeypatch):
    """Verification compares against PyTorch: a file computing something else is refused."""
    from statprune import export as export_mod

    folder, _, _ = exported("mpnet")
    _, other, _ = exported("llama")

    class WrongProgram:
        def save(self, path):  # the llama file (and its external data) under mpnet's name
            path.write_bytes(other.path.read_bytes())
            data = other.external_data
            (path.parent / data.name).write_bytes(data.read_bytes())

    monkeypatch.setattr(export_mod, "_torch_export", lambda *a, **k: WrongProgram())
    out = tmp_path / "new" / "folder" / "wrong.onnx"
    with pytest.raises(ModelError, match="differ from PyTorch"):
        export_onnx(folder, out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folders made for it


def test_overwrite_replaces_the_file_and_its_external_data(exported, tmp_path, monkeypatch):
    from statprune import export as export_mod

    folder, mpnet, _ = exported("mpnet")
    _, llama, _ = exported("llama")

    class Copy:
        def __init__(self, source):
            self.source = source

        def save(self, path):  # as the exporter does: external data named after the file
            proto = onnx.load(str(self.source.path))
            external = self.source.external_data is not None
            onnx.save_model(proto, str(path), save_as_external_data=external, location=f"{path.name}.data")

    out = tmp_path / "m.onnx"
    monkeypatch.setattr(export_mod, "_torch_export", lambda *a, **k: Copy(llama))
    first = export_onnx(folder, out, verify=False)
    assert first.external_data == tmp_path / "m.onnx.data" and not first.verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    with pytest.raises(ModelError, match="differ from PyTorch"):  # a failed check keeps the old pair
        export_onnx(folder, out, overwrite=True)
    assert onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim[1].dim_param == "sequence"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    monkeypatch.setattr(export_mod, "_torch_export", lambda *a, **k: Copy(mpnet))
    second = export_onnx(folder, out, overwrite=True)
    assert second.verified and second.external_data is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the stale .data went too


def test_missing_or_corrupt_model_gives_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        export_onnx(tmp_path / "nope", tmp_path / "a.onnx")
    folder = tiny_model_dir("bert")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load the weights"):
        export_onnx(folder, tmp_path / "a.onnx")
    weights.unlink()
    with pytest.raises(ModelError, match="no weights"):
        export_onnx(folder, tmp_path / "a.onnx")
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"config\.json"):
        export_onnx(folder, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_bad_output_paths_are_refused(tmp_path):
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        export_onnx(tmp_path / "model", existing)
    assert existing.read_bytes() == b"keep"
    with pytest.raises(OutputError, match="is a folder"):
        export_onnx(tmp_path / "model", tmp_path)
    with pytest.raises(OutputError, match="is a file"):
        export_onnx(tmp_path / "model", existing / "x.onnx")
    with pytest.raises(ValueError, match="at least 2"):
        export_onnx(tmp_path / "model", tmp_path / "new.onnx", batch=1)


def test_relative_error_ignores_padding():
    expected = np.ones((2, 3, 4))
    got = expected.copy()
    got[1, 2] = 100.0  # a padded position
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    assert relative_error(got, expected, mask) == 0.0
    assert relative_error(got, expected) > 1.0
    assert relative_error(np.ones((2, 3)), expected) == float("inf")
