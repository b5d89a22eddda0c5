"""Fused projections (issue 16): Phi-3's stacked ``qkv_proj`` and ``gate_up_proj``, GPT-2's
``Conv1D`` layers and stacked ``c_attn``, GPT-NeoX's head-by-head ``query_key_value``, ModernBERT's
stacked ``Wqkv`` and fused ``Wi`` ([input; gate]).

``tests/test_conformance.py`` runs the shared checks on these families; this file checks what is
particular to them: the row layouts against hand-written indices, the ``Conv1D`` conversion, the
FLOPs and parameter accounting against torch's own FLOP counter and the modules' parameters, the
variants the tiny configs of the conformance test do not cover (Phi-3 with multi-head attention,
GPT-NeoX without the parallel residual), and every baseline method on the fused layouts.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import _build_tiny_tokenizer, assert_same_weights, interrupted_after, tiny_texts
from families import FAMILIES, build, main_head
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

import statprune
from statprune.adapters import adapter_for
from statprune.adapters.base import QKV_INTERLEAVED, QKV_STACKED, AttentionLayout, FFNLayout
from statprune.flops import dense_counts, model_shapes, total_cost
from statprune.modeling_statprune import EmptyAttention, apply_ops
from statprune.surgery import linearize

TOKENIZER = _build_tiny_tokenizer()
TEXTS = tiny_texts(200)
FUSED = ["phi3", "gpt2", "gpt_neox"]
SEQ_LEN = 16
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _compress(model, **kwargs):
    options = {"samples": 64, "seq_len": SEQ_LEN, "progress": False, "keep_params": 0.5, **kwargs}
    return statprune.compress(model, TOKENIZER, TEXTS, **options)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ------------------------------------------------------------------------------- row layouts


def _layout(qkv: str, heads: int, kv_heads: int) -> AttentionLayout:
    return AttentionLayout("a", "a.qkv", "a.qkv", "a.qkv", "a.o", heads, kv_heads, 2, qkv=qkv)


def test_stacked_rows_are_query_then_key_then_value_blocks():
    lay = _layout(QKV_STACKED, 4, 2)  # rows 0-7 queries, 8-11 keys, 12-15 values (heads of 2)
    assert lay.rows("q", [1, 3])[1].tolist() == [2, 3, 6, 7]
    assert lay.rows("k", [1])[1].tolist() == [10, 11]
    assert lay.rows("v")[1].tolist() == [12, 13, 14, 15]
    # grouped queries: the key/value heads stay, so the module keeps all their rows
    kept = lay.kept_rows([0, 2], [0, 1])["a.qkv"].tolist()
    assert kept == [0, 1, 4, 5, *range(8, 16)]
    assert lay.kept_rows([0, 1, 2, 3], [0, 1]) == {}  # nothing removed: no slicing


def test_interleaved_rows_go_head_by_head():
    lay = _layout(QKV_INTERLEAVED, 3, 3)  # head h: rows 6h (q), 6h + 2 (k), 6h + 4 (v)
    assert lay.rows("q", [2])[1].tolist() == [12, 13]
    assert lay.rows("k", [0, 1])[1].tolist() == [2, 3, 8, 9]
    assert lay.rows("v", [1])[1].tolist() == [10, 11]
    assert lay.kept_rows([0, 2], [0, 2])["a.qkv"].tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]


def test_fused_gate_up_rows_take_both_halves():
    ffn = FFNLayout(("m.gate_up",), "m.down", 4, fused=True)
    assert ffn.gated and ffn.rows(torch.tensor([1, 3]))["m.gate_up"].tolist() == [1, 3, 5, 7]
    layer = nn.Module()
    layer.m = nn.Module()
    layer.m.gate_up = nn.Linear(3, 8)
    gate, up = ffn.input_weights(layer)
    assert torch.equal(gate, layer.m.gate_up.weight[:4]) and torch.equal(up, layer.m.gate_up.weight[4:])


def test_a_layout_whose_paths_contradict_its_qkv_mode_is_refused():
    with pytest.raises(ValueError, match="mismatches the paths"):
        AttentionLayout("a", "a.qkv", "a.qkv", "a.qkv", "a.o", 4, 4, 2)  # fused paths, "separate"
    with pytest.raises(ValueError, match="mismatches the paths"):
        AttentionLayout("a", "a.q", "a.k", "a.v", "a.o", 4, 4, 2, qkv=QKV_STACKED)


def _module_input(model, layer, path: str) -> torch.Tensor:
    """The input of ``layer``'s module at ``path`` on ``IDS``, (tokens, features)."""
    seen = {}
    module = layer.get_submodule(path)
    handle = module.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(IDS, **({"use_cache": False} if adapter_for(model.config).is_decoder else {}))
    handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1])


def _head_outputs(model, layer, attn) -> torch.Tensor:
    """The attention's per-head outputs (input of the output projection), (tokens, heads, d_h)."""
    return _module_input(model, layer, attn.o).reshape(-1, attn.n_heads, attn.head_dim)


@pytest.mark.parametrize("family", [*FUSED, "modernbert"])
def test_layouts_name_the_rows_each_stock_forward_reads(family):
    """Zeroing the rows the layout gives for one query head changes that head's output alone;
    zeroing the value rows of key/value head 0 makes the outputs of exactly its query heads zero
    (the stock forward splits the fused output where the layout says); zeroing the input rows
    of one FFN neuron (both halves of a fused module) zeroes that neuron alone."""
    model = build(family, main_head(family))
    adapter = adapter_for(model.config)
    adapter.prepare(model.base_model)
    layer = adapter.layers(model.base_model)[0]
    attn = adapter.attention(layer)
    per_kv = attn.n_heads // attn.n_kv_heads
    before = _head_outputs(model, layer, attn)

    def zero(part: str, head: int) -> torch.Tensor:
        path, rows = attn.rows(part, [head])
        module = layer.get_submodule(path)
        with torch.no_grad():
            module.weight[rows] = 0
            if module.bias is not None:
                module.bias[rows] = 0
        return _head_outputs(model, layer, attn)

    changed = (zero("q", 1) - before).abs().amax(dim=(0, 2))
    assert changed[1] > 0 and torch.all(changed[[0, 2, 3]] == 0), changed
    after = zero("v", 0).abs().amax(dim=(0, 2))
    assert torch.all(after[:per_kv] == 0) and torch.all(after[per_kv:] > 0), after
    ffn = adapter.ffn(layer)
    with torch.no_grad():
        for path, rows in ffn.rows(torch.tensor([3])).items():
            module = layer.get_submodule(path)
            module.weight[rows] = 0
            if module.bias is not None:
                module.bias[rows] = 0
    neurons = _module_input(model, layer, ffn.output).abs().amax(dim=0)
    assert neurons[3] == 0 and torch.all(neurons[torch.arange(ffn.width) != 3] > 0), neurons


# ---------------------------------------------------------------------------- GPT-2's Conv1D


def test_linearize_replaces_conv1d_exactly_and_its_ops_rebuild_the_model():
    model = build("gpt2", "ForCausalLM")
    expected = _logits(model)
    adapter = adapter_for(model.config)
    ops = linearize(adapter, model.base_model)
    assert len(ops) == 4 * model.config.n_layer and not any(isinstance(m, Conv1D) for m in model.modules())
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    apply_ops(fresh.base_model, ops)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=1e-6)
    assert linearize(adapter, model.base_model) == []  # nothing left to convert


def test_compressing_gpt2_leaves_the_input_model_as_it_was():
    model = build("gpt2", "ForCausalLM")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compress(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------- FLOPs and parameters


def _counted_flops(model) -> int:
    """FLOPs of one forward pass at SEQ_LEN tokens by torch's FLOP counter (matrix products only,
    eager attention), less the LM head's."""
    model.config._attn_implementation = "eager"
    for module in model.modules():  # Phi-3's pruned attentions hold their own config copies
        if isinstance(getattr(module, "config", None), transformers.PretrainedConfig):
            module.config._attn_implementation = "eager"
    ids = torch.randint(3, 19, (1, SEQ_LEN))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, use_cache=False)
    head = model.get_output_embeddings()
    return counter.get_total_flops() - 2 * SEQ_LEN * head.in_features * head.out_features


def _projection_params(model) -> int:
    """Parameters of every linear (or Conv1D) module in the layers, plus emptied blocks' biases."""
    adapter = adapter_for(model.config)
    kinds = (nn.Linear, Conv1D, EmptyAttention)
    return sum(
        p.numel()
        for layer in adapter.layers(model.base_model)
        for m in layer.modules()
        if isinstance(m, kinds)
        for p in m.parameters(recurse=False)
    )


@pytest.mark.parametrize("family", FUSED)
def test_flops_and_params_match_the_models_own_count(family):
    """The Kwon et al. accounting of ``statprune.flops`` equals torch's FLOP counter (matrix
    products of the layers at SEQ_LEN tokens) and the projections' parameter count, dense and
    pruned (heads and neurons, a layer without heads included)."""
    model = build(family, "ForCausalLM")
    adapter = adapter_for(model.config)
    pruned, report = _compress(model)
    no_heads = [(0, s.ffn_width) for s in model_shapes(adapter, model.base_model)]
    dense_shapes = model_shapes(adapter, model.base_model)
    budget = total_cost(dense_shapes, no_heads, "flops", SEQ_LEN) / total_cost(
        dense_shapes, dense_counts(dense_shapes), "flops", SEQ_LEN
    )
    headless, _ = _compress(model, keep_params=None, keep_flops=budget, prune=("heads",))
    assert report.params_after == _projection_params(pruned)
    for m in (model, pruned, headless):
        shapes = model_shapes(adapter, m.base_model)
        assert total_cost(shapes, dense_counts(shapes), "flops", SEQ_LEN) == _counted_flops(m)
        assert total_cost(shapes, dense_counts(shapes), "params", SEQ_LEN) == _projection_params(m)


# --------------------------------------------------------------- variants and other methods


def _check_reload_and_generation(pruned, tmp_path):
    folder = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER)
    remote = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(remote).__module__.endswith("modeling_statprune")
    torch.testing.assert_close(_logits(remote), _logits(pruned), rtol=0, atol=1e-6)
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    for m in (pruned, remote):
        cached = m.generate(IDS, use_cache=True, **greedy)
        assert torch.equal(cached, m.generate(IDS, use_cache=False, **greedy))


def test_phi3_with_multi_head_attention(tmp_path):
    """Key/value heads go with their query heads: all three parts of the fused module shrink."""
    config = transformers.Phi3Config(**{**FAMILIES["phi3"].fields, "num_key_value_heads": 4})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    pruned, report = _compress(model, keep_params=0.6)
    kept = [len(lr.heads_kept) for lr in report.layers]
    assert min(kept) < 4 and report.params_kept <= 0.6
    attn = pruned.model.layers[kept.index(min(kept))].self_attn
    assert attn.qkv_proj.out_features == 3 * min(kept) * 8 and attn.num_key_value_heads == min(kept)
    assert attn.config is not pruned.config and attn.config.num_attention_heads == min(kept)
    _check_reload_and_generation(pruned, tmp_path)


def test_gpt_neox_with_the_sequential_residual(tmp_path):
    config = transformers.GPTNeoXConfig(**{**FAMILIES["gpt_neox"].fields, "use_parallel_residual": False})
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    pruned, report = _compress(model, keep_params=0.6)
    assert report.params_kept <= 0.6
    assert any(len(lr.heads_kept) < lr.heads_total for lr in report.layers)
    _check_reload_and_generation(pruned, tmp_path)


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "fisher"])
@pytest.mark.parametrize("family", FUSED)
def test_baselines_on_fused_layouts(family, method):
    """Every method reads the fused weights through the layouts (magnitude: query rows and both
    gated halves) and meets the budget."""
    model = build(family, "ForCausalLM")
    pruned, report = _compress(model, method=method, keep_params=0.6)
    assert 0.45 <= report.params_kept <= 0.6
    assert torch.isfinite(_logits(pruned)).all()


def test_a_stock_gpt_neox_folder_loads_with_its_legacy_head_name(tmp_path):
    """transformers writes GPT-NeoX's LM head as the legacy ``embed_out`` (as the Pythia
    checkpoints have it) and renames it on load for its own classes only: ``statprune.load`` of a
    stock folder must keep the head (not warn that it is missing and drop it), and a compressed
    folder, written under the in-memory names, must reload as it was."""
    import warnings

    from safetensors import safe_open

    from statprune.persist import HeadlessCheckpointWarning

    model = build("gpt_neox", "ForCausalLM")
    model.save_pretrained(tmp_path / "dense")
    with safe_open(tmp_path / "dense" / "model.safetensors", "pt") as f:
        assert "embed_out.weight" in f.keys()  # noqa: SIM118 (a safetensors file, not a dict)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadlessCheckpointWarning)
        loaded = statprune.load(tmp_path / "dense")
    assert type(loaded) is transformers.GPTNeoXForCausalLM
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    pruned, report = _compress(loaded)
    folder = statprune.save(pruned, tmp_path / "pruned", tokenizer=TOKENIZER, report=report)
    torch.testing.assert_close(_logits(statprune.load(folder)), _logits(pruned), rtol=0, atol=1e-6)


def test_an_interrupted_gpt2_run_resumes_to_the_same_model(tmp_path):
    """The Conv1D conversion is redone on the resumed run's fresh copy, before the saved pruning
    ops are replayed: the result and its op list equal an uninterrupted run's."""
    model = build("gpt2", "ForCausalLM")
    reference, _ = _compress(model)
    with interrupted_after(tmp_path / "ckpt", "prune", 0):
        _compress(model, checkpoint_dir=str(tmp_path / "ckpt"))
    resumed, _ = _compress(model, checkpoint_dir=str(tmp_path / "ckpt"), resume=True)
    assert resumed.config.statprune_ops == reference.config.statprune_ops
    assert_same_weights(reference, resumed)
