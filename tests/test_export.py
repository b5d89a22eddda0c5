"""ONNX export of compressed folders: dynamo export, dynamic axes, onnxruntime check, atomic writes;
decoders with a KV cache driven by a greedy loop in onnxruntime against transformers' generation;
sentence-transformers folders with their pooling in the graph against ``SentenceTransformer.encode``.

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
from statprune.errors import ModelError, OptionsError, OutputError
from statprune.export import (
    add_export_parser,
    export_onnx,
    greedy_generate,
    onnx_session,
    relative_error,
    run_export,
    synthetic_inputs,
)
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
                # decoders: the full-sequence graph here; the KV-cache graph has its own tests below
                result = export_onnx(folder, root / f"{family}.onnx", past=False)
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
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        export_onnx(tmp_path / "model", tmp_path / "dir.onnx")
    (tmp_path / "out" / "onnx").mkdir(parents=True)
    (tmp_path / "out" / "onnx" / "model.onnx").write_bytes(b"keep")
    with pytest.raises(OutputError, match=r"onnx/model\.onnx exists"):  # a folder gets onnx/model.onnx
        export_onnx(tmp_path / "model", tmp_path / "out")
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


# --- decoders with a KV cache ------------------------------------------------------------------

PROMPTS = [[2, 6, 7, 8, 9, 10], [2, 11, 12, 13]]  # batched left-padded, as for generation


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _uneven_decoder(empty_layer: int):
    """A multi-head Llama (3 layers): layer ``empty_layer`` lost every head (EmptyAttention with a
    bias), another keeps 2 of 4 heads (so 2 KV heads), layer 2 lost its FFN; random weights large
    enough that greedy decoding does not repeat one token."""
    from statprune.surgery import prune_heads, prune_neurons

    model = build_tiny_model("llama", num_hidden_layers=3, num_key_value_heads=4, initializer_range=0.3)
    adapter = adapter_for(model.config)
    hidden, gen = model.config.hidden_size, torch.Generator().manual_seed(1)
    bias = 0.1 * torch.randn(hidden, generator=gen)
    half = 1 - empty_layer
    o = model.model.layers[half].self_attn.o_proj.weight.detach()
    ops = prune_heads(adapter, model.model, empty_layer, [], torch.zeros(hidden, 0), bias)
    ops += prune_heads(adapter, model.model, half, [0, 2], torch.cat([o[:, 0:8], o[:, 16:24]], 1), bias)
    none = torch.tensor([], dtype=torch.long)
    ops += prune_neurons(adapter, model.model, 2, none, torch.zeros(hidden, 0), bias)
    model.config.statprune_ops = ops
    return model


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """name -> (folder, export result), exported on first use with the defaults (KV cache on)."""
    root = tmp_path_factory.mktemp("decoders")
    cache = {}

    def get(name):
        if name not in cache:
            if name == "qwen2":  # compressed by STAT: grouped-query attention, uneven query heads
                model, _ = _compress(build_tiny_model("qwen2", initializer_range=0.3), keep_flops=0.5)
            else:
                model = _uneven_decoder(empty_layer={"llama-empty-1": 1, "llama-empty-0": 0}[name])
            folder = statprune.save(model, root / name, tokenizer=TOKENIZER)
            cache[name] = (folder, export_onnx(folder, folder))  # into folder/onnx/model.onnx
        return cache[name]

    return get


def _generate(model, ids, mask, steps, use_cache=True):
    model.generation_config.eos_token_id = None  # run all steps, as greedy_generate does
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, ids.shape[1] :].numpy(), torch.stack(out.logits, 1).numpy()


@pytest.mark.parametrize("name", ["llama-empty-1", "qwen2"])
def test_cached_greedy_decoding_in_onnxruntime_equals_transformers(name, decoders):
    folder, result = decoders(name)
    assert result.path == folder / "onnx" / "model.onnx"
    assert result.verified and result.relative_error < 1e-4
    n_layers = 3 if name.startswith("llama") else 2
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    assert result.inputs == ("input_ids", "attention_mask", "position_ids", *past)
    assert result.outputs == ("logits", *(n.replace("past_key_values", "present") for n in past))
    model = statprune.load(folder)
    ids, mask = _left_padded(PROMPTS)
    steps = 10
    expected_tokens, expected_logits = _generate(model, ids, mask, steps)
    tokens, logits = greedy_generate(onnx_session(result.path), ids.numpy(), mask.numpy(), steps)
    np.testing.assert_array_equal(tokens, expected_tokens)
    assert len(set(tokens.ravel().tolist())) > 2  # a real sequence, not one token repeated
    assert relative_error(logits, expected_logits) < 1e-4


def test_cache_tensors_have_each_layers_heads(decoders):
    """Layer 0 keeps 2 of 4 KV heads, layer 1 none (its past/present are empty but keep the length)."""
    folder, result = decoders("llama-empty-1")
    graph = onnx.load(str(result.path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 8]
    assert dims["past_key_values.1.value"] == ["batch_size", 0, "past_sequence_length", 8]
    assert dims["past_key_values.2.key"] == ["batch_size", 4, "past_sequence_length", 8]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    layers = statprune.load(folder).model.layers
    assert isinstance(layers[1].self_attn, EmptyAttention) and layers[1].self_attn.bias is not None
    session = onnx_session(result.path)
    ids, mask = _left_padded(PROMPTS)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    feed["position_ids"] = np.where(mask.numpy() == 0, 1, mask.numpy().cumsum(-1) - 1)
    for i, heads in enumerate([2, 0, 4]):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, heads, 0, 8), np.float32)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    assert out["present.1.key"].shape == (2, 0, 6, 8) and out["present.0.value"].shape == (2, 2, 6, 8)


def test_first_layer_without_heads_decodes_like_cached_transformers(decoders):
    """With layer 0 empty its keys hold no heads; transformers would count them as length 0, but
    ``EmptyAttention`` makes the layer count the sequence axis (``keep_length_layer``), as the ONNX
    graph does. On a left-padded batch the graph equals transformers with a cache and without."""
    folder, result = decoders("llama-empty-0")
    model = statprune.load(folder)
    assert isinstance(model.model.layers[0].self_attn, EmptyAttention)
    session = onnx_session(result.path)
    ids, mask = _left_padded(PROMPTS)
    tokens, logits = greedy_generate(session, ids.numpy(), mask.numpy(), 8)
    for use_cache in (True, False):
        expected_tokens, expected_logits = _generate(model, ids, mask, 8, use_cache=use_cache)
        np.testing.assert_array_equal(tokens, expected_tokens)
        assert relative_error(logits, expected_logits) < 1e-4


def test_past_on_an_encoder_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(OptionsError, match="not a causal LM"):
        export_onnx(tiny_model_dir("bert"), tmp_path / "a.onnx", past=True)
    with pytest.raises(OptionsError, match="not a sentence-transformers folder"):
        export_onnx(tiny_model_dir("bert", name="other"), tmp_path / "a.onnx", pooling=True)
    assert not list(tmp_path.glob("*.onnx"))


# --- sentence-transformers folders: pooling and normalization in the graph ---------------------


def _st_folder(root, pooling="mean", normalize=True):
    """A tiny sentence-transformers model saved with sentence-transformers' own API."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = root / "hf"
    build_tiny_model("bert", task="base", initializer_range=0.3).save_pretrained(base)
    TOKENIZER.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=24)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling)]
    folder = root / "st"
    SentenceTransformer(modules=modules + ([Normalize()] if normalize else [])).save(str(folder))
    return folder


def test_embedding_model_exports_sentence_embedding_like_encode(tmp_path, calib_file):
    """A compressed sentence-transformers folder (mean pooling, Normalize) exported into itself:
    onnx/model.onnx has last_hidden_state and sentence_embedding, and the latter equals
    SentenceTransformer(folder).encode on padded batches."""
    from sentence_transformers import SentenceTransformer

    from statprune.cli import main

    source = _st_folder(tmp_path)
    out = tmp_path / "out"
    argv = [str(source), "--data", str(calib_file()), "--out", str(out), "--keep-flops", "0.5", "--quiet"]
    assert main(["compress", *argv]) == 0
    assert main(["export-onnx", str(out), str(out)]) == 0
    path = out / "onnx" / "model.onnx"
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    texts = [*tiny_texts(6, seed=7), " ".join(["the cat"] * 30)]  # the last one is cut at 24 tokens
    enc = TOKENIZER(texts, return_tensors="np", padding=True, truncation=True, max_length=24)
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    hidden, pooled = session.run(None, feed)
    expected = SentenceTransformer(str(out), device="cpu", trust_remote_code=True).encode(texts)
    assert relative_error(pooled, expected) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)
    with torch.no_grad():
        token_embeddings = statprune.load(out)(**{k: torch.from_numpy(v) for k, v in feed.items()})
    assert relative_error(hidden, token_embeddings.last_hidden_state.numpy(), feed["attention_mask"]) < 1e-5


def test_cls_and_max_pooling_without_normalize(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = _st_folder(tmp_path, pooling=("cls", "max"), normalize=False)
    result = export_onnx(folder, tmp_path / "pooled.onnx")
    assert result.outputs == ("last_hidden_state", "sentence_embedding")
    texts = tiny_texts(5, seed=3)
    enc = TOKENIZER(texts, return_tensors="np", padding=True)
    session = onnx_session(result.path)
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    _, pooled = session.run(None, feed)
    expected = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert pooled.shape == (5, 64) and relative_error(pooled, expected) < 1e-5
    plain = export_onnx(folder, tmp_path / "plain.onnx", pooling=False)
    assert plain.outputs == ("last_hidden_state",)


def test_modules_the_graph_cannot_hold_are_refused(tmp_path):
    import json

    folder = _st_folder(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match=r"Dense module.*--no-pooling"):
        export_onnx(folder, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.slow
def test_real_minilm_onnx_embeddings_equal_sentence_transformers(tmp_path):
    """all-MiniLM-L6-v2 compressed to 60 % FLOPs, exported into its folder: the graph's
    sentence_embedding equals SentenceTransformer(folder).encode (torch) on real sentences."""
    import os
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    from statprune.cli import main

    cache = Path.home() / ".cache" / "statprune"
    if not (cache / "minilm" / "DONE.json").is_file() or not (cache / "corpora" / "DONE.json").is_file():
        if os.environ.get("STATPRUNE_REQUIRE_ASSETS") == "1":
            pytest.fail("assets minilm/corpora missing: run `make assets`")
        pytest.skip("assets minilm/corpora not fetched (make assets)")
    out = tmp_path / "mini60"
    data = cache / "corpora" / "rt-calib.txt"
    assert main(["compress", str(cache / "minilm"), "--data", str(data), "--out", str(out),
                 "--keep-flops", "0.6", "--samples", "128", "--quiet"]) == 0  # fmt: skip
    result = export_onnx(out, out)
    assert result.path == out / "onnx" / "model.onnx" and result.verified
    texts = data.read_text().splitlines()[-64:]
    model = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    expected = model.encode(texts, batch_size=16)
    enc = model.tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=256)
    session = onnx_session(result.path)
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    _, pooled = session.run(None, feed)
    assert relative_error(pooled, expected) < 1e-5
    cosine = (pooled * expected).sum(-1) / np.linalg.norm(pooled, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() > 0.99999
    try:  # sentence-transformers' own ONNX backend needs optimum-onnx, which pins transformers < 4.58
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        return
    onnx_model = SentenceTransformer(str(out), device="cpu", backend="onnx", trust_remote_code=True)
    assert relative_error(onnx_model.encode(texts), expected) < 1e-5


def test_cli_flags_reach_the_api_and_cache_names_are_folded():
    from statprune.export import _listing

    parser = argparse.ArgumentParser(prog="statprune")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-onnx", "m", "m"])
    assert (args.past, args.pooling) == (None, None)  # the API decides from the model
    args = parser.parse_args(["export-onnx", "m", "m.onnx", "--no-past", "--pooling"])
    assert (args.past, args.pooling) == (False, True)
    names = ["input_ids", "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key"]
    assert _listing(names) == "input_ids, past_key_values.{0..1}.key/value"
