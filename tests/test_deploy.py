"""The output folder serves like the input: sentence-transformers modules, dtype, generation and
tokenizer files, a model card, and a clear demand for ``trust_remote_code`` where it is needed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts
from safetensors import safe_open

import statprune
from statprune.cli import main

TOKENIZER = _build_tiny_tokenizer()


def _compress_cli(model_dir, data, out, *extra):
    argv = [str(model_dir), "--data", str(data), "--out", str(out), "--keep-flops", "0.5", "--quiet"]
    assert main(["compress", *argv, *extra]) == 0
    return out


def _st_folder(tmp_path, max_seq_length=24):
    """A tiny sentence-transformers model (Transformer → mean Pooling → Normalize), built and saved
    with sentence-transformers' own API."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = tmp_path / "hf"
    build_tiny_model("bert", task="base").save_pretrained(base)
    TOKENIZER.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    folder = tmp_path / "st"
    SentenceTransformer(modules=[transformer, pooling, Normalize()]).save(str(folder))
    return folder


def _mean_pooled_normalized(model, texts, max_len):
    enc = TOKENIZER(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_sentence_transformers_model_stays_one(tmp_path, calib_file):
    from sentence_transformers import SentenceTransformer

    source = _st_folder(tmp_path)
    out = _compress_cli(source, calib_file(), tmp_path / "out")
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (out / name).read_text() == (source / name).read_text(), name
    assert (out / "1_Pooling" / "config.json").read_text() == (
        source / "1_Pooling" / "config.json"
    ).read_text()

    dense = SentenceTransformer(str(source), device="cpu")
    pruned = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert [type(m).__name__ for m in pruned] == ["Transformer", "Pooling", "Normalize"]
    assert pruned.max_seq_length == dense.max_seq_length == 24
    texts = [*tiny_texts(10, seed=5), " ".join(["the cat"] * 30)]  # the last one is truncated at 24
    got = pruned.encode(texts, convert_to_tensor=True)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    expected = _mean_pooled_normalized(statprune.load(out), texts, 24)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and it is a different (compressed) model, not the dense one reloaded
    assert not torch.allclose(got, dense.encode(texts, convert_to_tensor=True), atol=1e-3)

    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card
    assert "Transformer → Pooling → Normalize" in card
    assert "SentenceTransformer(" in card and "trust_remote_code=True" in card


def test_sentence_transformers_without_trust_asks_for_it(tmp_path, calib_file, monkeypatch):
    from sentence_transformers import SentenceTransformer

    out = _compress_cli(_st_folder(tmp_path), calib_file(), tmp_path / "out")
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 0)  # no prompt
    with pytest.raises(ValueError, match="trust_remote_code=True") as caught:
        SentenceTransformer(str(out), device="cpu")
    assert "ignore_mismatched_sizes" not in str(caught.value)


@pytest.mark.parametrize(("family", "auto"), [("llama", "AutoModelForCausalLM"), ("bert", "AutoModel")])
def test_loading_without_trust_remote_code_says_to_pass_it(family, auto, tmp_path, monkeypatch):
    import transformers

    pruned, report = statprune.compress(
        build_tiny_model(family), TOKENIZER, tiny_texts(200), keep_flops=0.4, progress=False
    )
    out = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    assert (
        json.loads((out / "config.json").read_text())["model_type"] == f"statprune_{pruned.config.model_type}"
    )
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 0)
    for loader in (getattr(transformers, auto), transformers.AutoConfig):
        with pytest.raises(ValueError, match="trust_remote_code=True") as caught:
            loader.from_pretrained(out)
        assert "ignore_mismatched_sizes" not in str(caught.value)
        assert "size mismatch" not in str(caught.value)
    # with trust the shipped code builds it; statprune reads it without running that code
    remote = getattr(transformers, auto).from_pretrained(out, trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules")
    assert type(statprune.load(out)).__module__ == "statprune.modeling_statprune"
    assert statprune.load(out).config.model_type == pruned.config.model_type
    # the tokenizer loads without trust (statprune's loader asks no question either)
    assert statprune.persist.load_tokenizer(out)("the cat")["input_ids"]


def test_uncompressed_output_stays_a_stock_model(tmp_path):
    import transformers

    model = build_tiny_model("bert")
    out = statprune.save(model, tmp_path / "out", tokenizer=TOKENIZER)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and "AutoConfig" not in config["auto_map"]
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)  # no trust needed
    assert type(loaded).__module__.startswith("transformers.models.bert")


def _safetensors_dtypes(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


def test_bfloat16_input_gives_bfloat16_output(tmp_path, calib_file):
    source = tmp_path / "bf16"
    build_tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    TOKENIZER.save_pretrained(source)
    assert statprune.persist.checkpoint_dtype(source) == "bfloat16"
    data = calib_file()
    kept = _compress_cli(source, data, tmp_path / "kept", "--pack", "--seq-len", "16")
    wide = _compress_cli(source, data, tmp_path / "wide", "--pack", "--seq-len", "16", "--dtype", "float32")
    assert _safetensors_dtypes(kept) == {"BF16"}
    assert _safetensors_dtypes(wide) == {"F32"}
    assert json.loads((kept / "config.json").read_text())["dtype"] == "bfloat16"
    ratio = (kept / "model.safetensors").stat().st_size / (wide / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    # same selection (statistics in float32 either way), weights rounded once to bfloat16
    a, b = statprune.load(kept), statprune.load(wide)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert (
        json.loads((kept / "statprune.json").read_text())["layers"]
        == json.loads((wide / "statprune.json").read_text())["layers"]
    )
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.float(), q.to(torch.bfloat16).float(), msg=name)
    assert "Weights are stored in bfloat16" in (kept / "README.md").read_text()


def test_generation_config_chat_template_and_tokenizer_files_kept(tmp_path, calib_file):
    from transformers import GenerationConfig

    source = tmp_path / "lm"
    model = build_tiny_model("llama")
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=3)
    model.save_pretrained(source)
    tokenizer = _build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} [SEP] {% endfor %}"
    tokenizer.save_pretrained(source)
    (source / "vocab.txt").write_text("\n".join(tokenizer.get_vocab()) + "\n")  # a slow tokenizer's file
    out = _compress_cli(source, calib_file(), tmp_path / "out", "--pack", "--seq-len", "16")
    assert (out / "vocab.txt").read_text() == (source / "vocab.txt").read_text()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 7 and gen["eos_token_id"] == 3
    reloaded = statprune.persist.load_tokenizer(out)
    messages = [{"role": "user", "content": "the cat"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert (out / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()


def test_model_card_describes_the_compression_never_the_data(tmp_path):
    texts = tiny_texts(200)
    pruned, report = statprune.compress(
        build_tiny_model("llama"), TOKENIZER, texts, keep_flops=0.5, progress=False
    )
    out = statprune.save(
        pruned,
        tmp_path / "pruned-lm",
        tokenizer=TOKENIZER,
        report=report,
        calibration_data="my_calib.txt",
        quality={"perplexity": 12.5},
    )
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- statprune" in card
    assert "keep 50 % of the attention + FFN flops" in card
    assert f"{report.flops_kept * 100:.1f} % of the FLOPs" in card
    for lr in report.layers:
        heads, neurons = (
            f"{len(lr.heads_kept)} / {lr.heads_total}",
            f"{len(lr.neurons_kept)} / {lr.neurons_total}",
        )
        assert f"| {lr.layer} | {heads} | {neurons} |" in card
    assert (
        f"`my_calib.txt`: {report.calibration_examples} examples, {report.calibration_tokens} tokens" in card
    )
    assert "| perplexity | 12.5 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("pruned-lm", trust_remote_code=True)' in card
    assert 'statprune.load("pruned-lm")' in card and "export-gguf" in card
    assert not any(text in card for text in texts if len(text) > 25)  # no calibration text


def test_model_card_keeps_the_input_cards_metadata(tmp_path, calib_file):
    source = _st_folder(tmp_path)
    (source / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage: en\ntags:\n- embeddings\n---\n# card\n"
    )
    out = _compress_cli(source, calib_file(), tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "- embeddings" in card and "- statprune" in card
    assert "`calib.txt`" in card


# --- --uniform: the stock architecture, no remote code -----------------------------------------


@pytest.mark.parametrize(("family", "bias"), [("llama", True), ("qwen2", False), ("mistral", False)])
def test_uniform_output_loads_in_stock_transformers_without_remote_code(family, bias, tmp_path):
    import transformers

    pruned, report = statprune.compress(
        build_tiny_model(family),
        TOKENIZER,
        tiny_texts(200),
        keep_flops=0.8,
        allocation="uniform",
        bias_compensation=bias,
        progress=False,
    )
    out = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report, stock=True)
    config = json.loads((out / "config.json").read_text())
    layers = pruned.model.layers
    assert config["model_type"] == family and "auto_map" not in config and "statprune_ops" not in config
    assert not (out / "modeling_statprune.py").exists()
    assert config["num_attention_heads"] == layers[0].self_attn.q_proj.out_features // 8 < 4
    assert config["intermediate_size"] == layers[0].mlp.gate_proj.out_features < 64
    assert config["head_dim"] == 8
    if bias:
        assert config["attention_bias"] and config["mlp_bias"]
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(stock).__module__.startswith(f"transformers.models.{family}")
    enc = TOKENIZER(tiny_texts(6, seed=4), return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, pruned(**inputs).logits, rtol=0, atol=1e-5)
    assert (
        "trust_remote_code"
        not in (out / "README.md").read_text().split("## Load and serve")[1].split("ONNX")[0]
    )


def test_uniform_is_refused_where_the_stock_config_cannot_say_it(
    tmp_path, calib_file, tiny_model_dir, capsys
):
    data = calib_file()
    bert = tiny_model_dir("bert")
    assert (
        main(
            [
                "compress",
                str(bert),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "b"),
                "--keep-flops",
                "0.8",
                "--uniform",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "hidden_size / num_attention_heads" in err and "trust_remote_code=True" in err
    mistral = tiny_model_dir("mistral", name="mistral")
    argv = [
        "compress",
        str(mistral),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "m"),
        "--keep-flops",
        "0.8",
    ]
    assert main([*argv, "--uniform", "--pack", "--seq-len", "16"]) == 1
    assert "--no-bias-compensation" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "m").exists()
    assert main([*argv, "--uniform", "--pack", "--seq-len", "16", "--no-bias-compensation", "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mistral"


def test_uneven_widths_cannot_be_saved_as_stock(tmp_path):
    from statprune.uniform import UniformError

    pruned, report = statprune.compress(
        build_tiny_model("llama"), TOKENIZER, tiny_texts(200), keep_flops=0.4, progress=False
    )
    with pytest.raises(UniformError, match="--allocation uniform"):
        statprune.save(pruned, tmp_path / "out", report=report, stock=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_minilm_stays_a_sentence_transformers_model(tmp_path):
    """all-MiniLM-L6-v2 (modules.json, 1_Pooling, Normalize, max_seq_length 256) at 60 % FLOPs."""
    import os
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    cache = Path.home() / ".cache" / "statprune"
    if not (cache / "minilm" / "DONE.json").is_file() or not (cache / "corpora" / "DONE.json").is_file():
        if os.environ.get("STATPRUNE_REQUIRE_ASSETS") == "1":
            pytest.fail("assets minilm/corpora missing: run `make assets`")
        pytest.skip("assets minilm/corpora not fetched (make assets)")
    source = cache / "minilm"
    out = tmp_path / "mini60"
    data = cache / "corpora" / "rt-calib.txt"
    assert main(["compress", str(source), "--data", str(data), "--out", str(out), "--keep-flops", "0.6",
                 "--samples", "128", "--quiet"]) == 0  # fmt: skip
    model = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    texts = (cache / "corpora" / "rt-calib.txt").read_text().splitlines()[-40:]
    got = model.encode(texts, convert_to_tensor=True)
    tokenizer = statprune.persist.load_tokenizer(out)
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    with torch.no_grad():
        hidden = statprune.load(out)(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "`rt-calib.txt`: 128 examples" in card
