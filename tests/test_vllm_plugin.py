"""The vLLM plugin's config reading (no vLLM needed) and its lazy import.

The engine itself runs in ``benchmarks/serve_vllm.py`` (its own venv with vLLM's CPU build);
``test_vllm_generates_like_transformers`` runs it when vLLM is importable here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.adapters import adapter_for
from statprune.errors import ModelError
from statprune.serving.widths import layer_widths, serving_architectures, stock_architecture
from statprune.surgery import prune_heads, prune_neurons

TOKENIZER = _build_tiny_tokenizer()
TEXTS = tiny_texts(120)


def _module_widths(model) -> list[tuple]:
    """(heads, kv heads, FFN width, q/k/v bias, o bias, gate/up bias, down bias) of the live modules."""
    adapter = adapter_for(model.config)
    hd = adapter.head_dim
    rows = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_proj"):
            heads = (attn.q_proj.out_features // hd, attn.k_proj.out_features // hd)
            biases = (attn.q_proj.bias is not None, attn.o_proj.bias is not None)
        else:  # EmptyAttention
            heads, biases = (0, 0), (False, attn.bias is not None)
        rows.append(
            (
                *heads,
                mlp.up_proj.out_features,
                *biases,
                mlp.up_proj.bias is not None,
                mlp.down_proj.bias is not None,
            )
        )
    return rows


def _config_widths(folder) -> list[tuple]:
    config = json.loads((folder / "config.json").read_text())
    return [
        (w.heads, w.kv_heads, w.intermediate, w.qkv_bias, w.o_bias, w.gate_up_bias, w.down_bias)
        for w in layer_widths(config)
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_widths_from_a_saved_folder_equal_the_module_shapes(family, tmp_path):
    model = build_tiny_model(family, num_hidden_layers=3)
    pruned, _ = statprune.compress(
        model, TOKENIZER, TEXTS, keep_params=0.5, samples=32, seq_len=16, progress=False
    )
    statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER)
    reloaded = statprune.load(tmp_path / "out")
    widths = _config_widths(tmp_path / "out")
    assert widths == _module_widths(reloaded) == _module_widths(pruned)
    assert widths != _module_widths(build_tiny_model(family, num_hidden_layers=3))  # something was removed
    assert any(w[4] or w[6] for w in widths)  # bias compensation put a bias on o_proj or down_proj
    arch = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"]
    assert arch == [f"Statprune{type(model).__name__}"]
    assert type(reloaded).__name__ == stock_architecture(arch[0])


def test_zero_head_and_zero_neuron_layers(tmp_path):
    model = build_tiny_model("llama")
    adapter = adapter_for(model.config)
    hidden = model.config.hidden_size
    bias = torch.randn(hidden)
    ops = prune_heads(adapter, model.model, 0, [], torch.zeros(hidden, 0), bias)
    ops += prune_neurons(
        adapter, model.model, 1, torch.tensor([], dtype=torch.long), torch.zeros(hidden, 0), bias
    )
    model.config.statprune_ops = ops
    statprune.save(model, tmp_path / "out", tokenizer=TOKENIZER)
    widths = layer_widths(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert (widths[0].heads, widths[0].kv_heads, widths[0].o_bias) == (0, 0, True)
    assert (widths[1].intermediate, widths[1].down_bias, widths[1].heads) == (0, True, 4)
    assert _config_widths(tmp_path / "out") == _module_widths(statprune.load(tmp_path / "out"))


def test_dense_folders_keep_their_architecture_and_unknown_families_are_refused():
    assert serving_architectures(["LlamaForCausalLM"], []) == ["LlamaForCausalLM"]
    assert serving_architectures(["BertModel"], [{"op": "linear"}]) == ["BertModel"]
    dense = build_tiny_model("mistral").config
    assert {(w.heads, w.kv_heads, w.intermediate) for w in layer_widths(dense)} == {(4, 2, 64)}
    with pytest.raises(ModelError, match="not 'bert'"):
        layer_widths(build_tiny_model("bert").config)
    bad = {**dense.to_dict(), "statprune_ops": [{"op": "select_argument", "path": "layers.0.self_attn"}]}
    with pytest.raises(ModelError, match="cannot be served"):
        layer_widths(bad)


def test_importing_statprune_and_the_plugin_does_not_import_vllm():
    code = (
        "import sys, statprune, statprune.persist, statprune.serving.vllm_plugin as p\n"
        "assert callable(p.register)\n"
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], 'vllm imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_plugin_is_declared_as_a_vllm_entry_point():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    plugins = pyproject["project"]["entry-points"]["vllm.general_plugins"]
    module, _, func = plugins["statprune"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_vllm_generates_like_transformers(family, tmp_path):
    """vLLM with the plugin (found through its entry point) on a compressed tiny decoder with uneven
    widths, a zero-head layer and a zero-neuron layer, both with bias compensation: the same
    greedy tokens as transformers, and the same log-probabilities of the prompt tokens. Needs vLLM
    (e.g. run inside the venv that ``benchmarks/serve_vllm.py`` creates); head size 64, as vLLM's
    CPU attention kernels take no smaller."""
    vllm = pytest.importorskip("vllm")
    model = build_tiny_model(family, num_hidden_layers=4, hidden_size=256, intermediate_size=128)
    pruned, _ = statprune.compress(
        model, TOKENIZER, TEXTS, keep_params=0.5, samples=32, seq_len=16, progress=False
    )
    adapter = adapter_for(pruned.config)
    hidden = pruned.config.hidden_size
    bias = 0.1 * torch.randn(hidden)
    none = torch.tensor([], dtype=torch.long)
    pruned.config.statprune_ops += prune_heads(adapter, pruned.model, 2, [], torch.zeros(hidden, 0), bias)
    pruned.config.statprune_ops += prune_neurons(adapter, pruned.model, 3, none, torch.zeros(hidden, 0), bias)
    statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER)
    prompts = [[2, 6, 7, 8], [2, 9, 10, 11, 12]]
    with torch.no_grad():
        expected = [
            pruned.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :]
            for p in prompts
        ]
        logprobs = [torch.log_softmax(pruned(torch.tensor([p])).logits[0].double(), -1) for p in prompts]
    llm = vllm.LLM(
        model=str(tmp_path / "out"),
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        gpu_memory_utilization=0.3,  # on the CPU backend: the share of RAM reserved for the KV cache
    )
    assert llm.llm_engine.model_config.architectures == [f"Statprune{type(model).__name__}"]
    params = vllm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == [e.tolist() for e in expected]
    for p, out, lp in zip(prompts, outs, logprobs, strict=True):
        got = [out.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        want = [lp[i - 1, p[i]].item() for i in range(1, len(p))]
        assert got == pytest.approx(want, abs=5e-4)  # float32 through different kernels
