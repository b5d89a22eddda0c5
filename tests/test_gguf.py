"""export-gguf: per-layer widths, tensors and tokenizer metadata, read back with gguf's own reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, tiny_texts

import statprune
from statprune.cli import main
from statprune.gguf_export import GGUFExportError, export_gguf, to_rope_pairs

gguf = pytest.importorskip("gguf")

CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style) trained on the tiny sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tiny_texts(300), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT
    return wrapped


def _compressed_lm(tmp_path, budget=0.4, family="llama", empty=False, **model_kwargs):
    """A tiny decoder compressed to ``budget`` of its FLOPs; with ``empty``, then also layer 0's
    attention and layer 1's FFN removed entirely (each leaving a compensation bias), which the
    allocation does not reliably do on a tiny model."""
    from statprune.adapters import adapter_for
    from statprune.modeling_statprune import EmptyAttention
    from statprune.surgery import prune_heads, prune_neurons

    tokenizer = _bpe_tokenizer()
    model = build_tiny_model(family, vocab_size=len(tokenizer), **model_kwargs)
    pruned, report = statprune.compress(model, tokenizer, tiny_texts(200), keep_flops=budget, progress=False)
    if empty:
        adapter, hidden = adapter_for(pruned.config), pruned.config.hidden_size
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if not isinstance(pruned.model.layers[0].self_attn, EmptyAttention):
                pruned.config.statprune_ops += prune_heads(
                    adapter, pruned.model, 0, [], torch.zeros(hidden, 0), torch.randn(hidden, generator=gen)
                )
            pruned.config.statprune_ops += prune_neurons(
                adapter,
                pruned.model,
                1,
                torch.tensor([], dtype=torch.long),
                torch.zeros(hidden, 0),
                torch.randn(hidden, generator=gen),
            )
        report = None  # no longer describes the model
    out = statprune.save(pruned, tmp_path / "lm", tokenizer=tokenizer, report=report)
    return pruned, tokenizer, out


def _fields(reader):
    def value(field):
        if len(field.types) > 1 or field.types[0] == gguf.GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            if field.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(x).decode() for x in items]
            return [x.tolist()[0] for x in items]
        part = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(part).decode()
        return part.tolist()[0]

    return {name: value(field) for name, field in reader.fields.items()}


def _tensors(reader):
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_per_layer_widths_tensors_and_tokenizer_read_back(tmp_path):
    pruned, tokenizer, folder = _compressed_lm(tmp_path)
    summary = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields, tensors = _fields(reader), _tensors(reader)

    layers = pruned.model.layers
    heads = [layer.self_attn.q_proj.out_features // 8 for layer in layers]
    kv = [layer.self_attn.k_proj.out_features // 8 for layer in layers]
    ffn = [layer.mlp.gate_proj.out_features for layer in layers]
    assert len(set(ffn)) > 1 or len(set(heads)) > 1  # the widths really are uneven
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == heads == summary["head_count"]
    assert fields["deci.attention.head_count_kv"] == kv
    assert fields["deci.feed_forward_length"] == ffn
    assert fields["deci.block_count"] == 2 and fields["deci.embedding_length"] == 32
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8

    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert tensors[f"blk.{i}.attn_q.weight"].shape == (heads[i] * 8, 32)
        assert tensors[f"blk.{i}.attn_k.weight"].shape == (kv[i] * 8, 32)
        assert tensors[f"blk.{i}.attn_output.weight"].shape == (32, heads[i] * 8)
        assert tensors[f"blk.{i}.ffn_gate.weight"].shape == (ffn[i], 32)
        assert tensors[f"blk.{i}.ffn_down.weight"].shape == (32, ffn[i])
        # exact values: rotary rows reordered to llama.cpp's pairs, the rest as they are
        np.testing.assert_array_equal(
            tensors[f"blk.{i}.attn_q.weight"], to_rope_pairs(attn.q_proj.weight, heads[i]).detach().numpy()
        )
        np.testing.assert_array_equal(
            tensors[f"blk.{i}.ffn_down.weight"], mlp.down_proj.weight.detach().numpy()
        )
        # bias compensation survives: the biases statprune added are in the file
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_output.bias"], attn.o_proj.bias.detach().numpy())
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down.bias"], mlp.down_proj.bias.detach().numpy())
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd

    vocab = tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.token_type"][vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    )
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<|im_end|>"]
    assert fields["tokenizer.chat_template"] == CHAT


def test_rope_pair_reordering_matches_rotary_embedding():
    """Rotating pairs (2i, 2i+1) of the reordered projection gives the rotate-half result reordered."""
    torch.manual_seed(0)
    heads, d, hidden, pos = 2, 8, 5, 3.0
    w, x = torch.randn(heads * d, hidden), torch.randn(hidden)
    theta = pos / 10000 ** (torch.arange(0, d, 2) / d)
    cos, sin = torch.cos(theta), torch.sin(theta)
    q = (w @ x).view(heads, d)  # Hugging Face: dims i and i + d/2 rotate together
    a, b = q[:, : d // 2], q[:, d // 2 :]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    p = (to_rope_pairs(w, heads) @ x).view(heads, d // 2, 2)  # llama.cpp: dims 2i and 2i+1
    cpp = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], dim=-1)
    torch.testing.assert_close(cpp.reshape(heads, d), to_rope_pairs(hf.reshape(-1, 1), heads).view(heads, d))


def test_empty_layers_get_one_zero_unit_and_keep_their_bias(tmp_path):
    from statprune.modeling_statprune import EmptyAttention

    pruned, _, folder = _compressed_lm(tmp_path, empty=True)
    empty = [i for i, layer in enumerate(pruned.model.layers) if isinstance(layer.self_attn, EmptyAttention)]
    no_ffn = [i for i, layer in enumerate(pruned.model.layers) if layer.mlp.gate_proj.out_features == 0]
    assert 0 in empty and no_ffn == [1]  # llama.cpp takes the head size from layer 0's heads
    summary = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields, tensors = _fields(reader), _tensors(reader)
    assert sorted(set(empty) | set(no_ffn)) == summary["padded_layers"]
    assert summary["empty_attention"] == empty and summary["empty_ffn"] == no_ffn
    for i in empty:
        assert fields["deci.attention.head_count"][i] == fields["deci.attention.head_count_kv"][i] == 1
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert not tensors[f"blk.{i}.{name}.weight"].any()
        bias = pruned.model.layers[i].self_attn.bias
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_output.bias"], bias.detach().numpy())
    for i in no_ffn:
        assert fields["deci.feed_forward_length"][i] == 1
        assert not tensors[f"blk.{i}.ffn_gate.weight"].any() and not tensors[f"blk.{i}.ffn_down.weight"].any()
        down = pruned.model.layers[i].mlp.down_proj.bias
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down.bias"], down.detach().numpy())


@pytest.mark.parametrize(
    ("outtype", "dtype"), [("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)]
)
def test_half_precision_matrices_float32_vectors(tmp_path, outtype, dtype):
    _, _, folder = _compressed_lm(tmp_path)
    export_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype and kinds["token_embd.weight"] == dtype
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.ffn_down.bias"] == gguf.GGMLQuantizationType.F32


def test_cli_writes_atomically_and_refuses_what_llama_cpp_cannot_run(tmp_path, capsys, tiny_model_dir):
    _, _, folder = _compressed_lm(tmp_path)
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(folder), str(out)]) == 0
    assert "heads per layer" in capsys.readouterr().out
    assert main(["export-gguf", str(folder), str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export-gguf", str(folder), str(out), "--overwrite"]) == 0
    capsys.readouterr()
    # an encoder, and a word-level tokenizer: one-line errors, no file
    bert = tiny_model_dir("bert")
    assert main(["export-gguf", str(bert), str(tmp_path / "b.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the fixture's save bars
    assert err.startswith("error: ") and "Llama-family" in err and "export-onnx" in err
    word = tiny_model_dir("llama", name="word")
    assert main(["export-gguf", str(word), str(tmp_path / "w.gguf")]) == 1
    assert "byte-level BPE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["m.gguf"]
    assert not list(tmp_path.glob(".*tmp-*"))


def test_unrecognised_pre_tokenizer_asks_for_its_name(tmp_path):
    _, _, folder = _compressed_lm(tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Metaspace"}, data["pre_tokenizer"]],
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(GGUFExportError, match="--tokenizer-pre"):
        export_gguf(folder, tmp_path / "m.gguf")
    export_gguf(folder, tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    assert _fields(gguf.GGUFReader(tmp_path / "m.gguf"))["tokenizer.ggml.pre"] == "gpt-2"


def _deci_logits(path, input_ids):
    """Logits of a GGUF file computed the way llama.cpp's deci graph reads it: RMSNorm, rotary
    embedding on adjacent pairs (ggml's normal mode), grouped-query attention with query head h on
    key/value head h // (n_head / n_head_kv), SwiGLU, optional output/down biases, tied output."""
    reader = gguf.GGUFReader(path)
    fields, t = (
        _fields(reader),
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in _tensors(reader).items()},
    )
    eps, base = fields["deci.attention.layer_norm_rms_epsilon"], fields["deci.rope.freq_base"]
    d = fields["deci.attention.key_length"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def linear(x, name):
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    def rope(x):  # (T, heads, d): pairs (2i, 2i+1) rotated by pos * base^(-2i/d)
        pos = torch.arange(x.shape[0], dtype=torch.float32)[:, None]
        angle = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    h = t["token_embd.weight"][input_ids]
    steps = input_ids.shape[0]
    causal = torch.full((steps, steps), float("-inf")).triu(1)
    for i in range(fields["deci.block_count"]):
        n_head, n_kv = fields["deci.attention.head_count"][i], fields["deci.attention.head_count_kv"][i]
        x = rms(h, t[f"blk.{i}.attn_norm.weight"])
        q = rope(linear(x, f"blk.{i}.attn_q").view(steps, n_head, d))
        k = rope(linear(x, f"blk.{i}.attn_k").view(steps, n_kv, d))
        v = linear(x, f"blk.{i}.attn_v").view(steps, n_kv, d)
        group = n_head // n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5 + causal
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(steps, n_head * d)
        h = h + linear(attn, f"blk.{i}.attn_output")
        y = rms(h, t[f"blk.{i}.ffn_norm.weight"])
        gated = torch.nn.functional.silu(linear(y, f"blk.{i}.ffn_gate")) * linear(y, f"blk.{i}.ffn_up")
        h = h + linear(gated, f"blk.{i}.ffn_down")
    return rms(h, t["output_norm.weight"]) @ t["token_embd.weight"].T


@pytest.mark.parametrize(
    ("family", "empty"), [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)]
)
def test_gguf_computes_the_compressed_model(tmp_path, family, empty):
    """Read back and run as llama.cpp's deci graph reads it, the file gives transformers' logits
    (uneven widths, bias compensation, Qwen2's query/key/value biases, emptied blocks as all-zero
    units)."""
    pruned, tokenizer, folder = _compressed_lm(
        tmp_path,
        family=family,
        empty=empty,
        budget=0.8,
        num_hidden_layers=3,
        initializer_range=0.2,  # peaked attention, so rotary matters
    )
    export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    ids = torch.tensor(tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"])
    with torch.no_grad():
        expected = pruned(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(_deci_logits(tmp_path / "m.gguf", ids), expected, rtol=1e-4, atol=1e-4)


def test_pre_tokenizer_names_from_tokenizer_json():
    from statprune.gguf_export import tokenizer_pre

    def tok(pre):
        return {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, "pre_tokenizer": pre}

    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert tokenizer_pre(tok(byte_level)) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert tokenizer_pre(tok({"type": "Sequence", "pretokenizers": [digits, byte_level]})) == "smollm"
    head = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
    tail = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    for digit_rule, name in (("|\\p{N}{1,3}", "llama-bpe"), ("|\\p{N}", "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": head + digit_rule + tail}}
        pre = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
        assert tokenizer_pre(tok(pre)) == name
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        tokenizer_pre({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("mistral", {"sliding_window": 16, "max_position_embeddings": 64}, "sliding window of 16"),
        ("qwen2", {"use_sliding_window": True}, "sliding-window attention"),
        ("llama", {"hidden_act": "gelu"}, "SwiGLU"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'"),
    ],
)
def test_refuses_what_the_deci_graph_does_not_compute(family, change, message):
    from statprune.gguf_export import check_exportable

    model = build_tiny_model(family)
    config = model.config
    config.architectures = [type(model).__name__]  # as saved
    check_exportable(config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(GGUFExportError, match=message):
        check_exportable(config)


LLAMA_CPP_CHILD = """
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
f32 = llama_cpp.GGML_TYPE_F32
llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                      type_k=f32, type_v=f32)
llm.eval(job["ids"])
np.save(job["out"], np.array(llm.scores[: len(job["ids"])], dtype=np.float32))
"""


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # head size 8: frequencies scaled, smoothed and kept
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "extra"),
    [("llama", {}), ("llama", {"rope_parameters": LLAMA3_ROPE}), ("mistral", {}), ("qwen2", {})],
)
def test_llama_cpp_computes_the_compressed_model(tmp_path, family, extra):
    """Real llama.cpp (the python of a venv with llama-cpp-python: ``$STATPRUNE_LLAMA_CPP_PYTHON``, or
    the one ``benchmarks/serve_check.py`` builds) loads the file of a compressed tiny decoder with
    uneven widths, layer 0's attention and layer 1's FFN emptied and bias compensation (and Llama 3
    rotary scaling as ``rope_freqs``), and gives transformers' logits (float32 KV cache)."""
    import os
    import subprocess
    from pathlib import Path

    default = Path.home() / ".cache/statprune/serve-venvs/llama.cpp/bin/python"
    python = Path(os.environ.get("STATPRUNE_LLAMA_CPP_PYTHON", default))
    if not python.is_file():
        pytest.skip(f"no llama-cpp-python venv at {python}")
    pruned, tokenizer, folder = _compressed_lm(
        tmp_path,
        family=family,
        empty=True,
        budget=0.8,
        num_hidden_layers=3,
        initializer_range=0.2,  # peaked attention, so rotary matters
        **extra,
    )
    summary = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    assert summary["empty_attention"] == [0] and summary["empty_ffn"] == [1]  # layers 1, 2 keep heads
    ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    job = {"gguf": str(tmp_path / "m.gguf"), "ids": ids, "out": str(tmp_path / "logits.npy")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-c", LLAMA_CPP_CHILD, json.dumps(job)], check=True, env=env)
    with torch.no_grad():
        expected = pruned(input_ids=torch.tensor([ids])).logits[0]
    got = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
