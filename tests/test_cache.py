"""Cached generation of decoders with a layer that lost every attention head.

Such a layer's ``EmptyAttention`` records keys/values with 0 heads ([batch, 0, seq, head_dim]);
transformers' ``DynamicLayer`` counts an empty key tensor as length 0, and ``cache.get_seq_length()``
asks layer 0, so without the fix in ``modeling_statprune`` a left-padded batch got a mis-sized
attention mask in cached generation. Checked through ``statprune.load`` and through plain
transformers (``trust_remote_code=True``) in a process where statprune cannot be imported.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import statprune
from statprune.adapters import adapter_for
from statprune.modeling_statprune import EmptyAttention, keep_length_layer
from statprune.surgery import prune_heads

TOKENIZER = _build_tiny_tokenizer()
PROMPTS = [[2, 6, 7, 8, 9, 10], [2, 11, 12, 13]]  # left-padded: the second row has 2 pads
STEPS = 8
# (family, extra config, layer that loses every head)
CASES = {
    "llama-0": ("llama", {}, 0),
    "llama-1": ("llama", {}, 1),
    "qwen2-0": ("qwen2", {}, 0),
    "qwen2-1": ("qwen2", {}, 1),
    # a cache built from the config's layer types: layer 0 full (and empty), layer 1 sliding
    "qwen2-sliding-0": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": 4,
            "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        },
        0,
    ),
}


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _emptied(family, extra, layer):
    """A 3-layer decoder whose ``layer`` lost every head (EmptyAttention with a bias)."""
    model = build_tiny_model(family, num_hidden_layers=3, initializer_range=0.3, **extra)
    adapter = adapter_for(model.config)
    hidden = model.config.hidden_size
    bias = 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    ops = prune_heads(adapter, model.model, layer, [], torch.zeros(hidden, 0), bias)
    model.config.statprune_ops = ops
    assert isinstance(model.model.layers[layer].self_attn, EmptyAttention)
    return model


def _generate(model, use_cache=True, **kwargs):
    """Greedy tokens [batch, STEPS] and logits [batch, STEPS, vocab] on the left-padded PROMPTS."""
    ids, mask = _left_padded(PROMPTS)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def _assert_same(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)


_PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["statprune"] = None  # importing statprune must fail in here
    import torch, transformers
    ids, mask = (torch.tensor(x) for x in json.loads(sys.argv[2]))
    for folder in json.loads(sys.argv[1]):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        model.generation_config.eos_token_id = None
        result = {"module": type(model).__module__.rsplit(".", 1)[-1]}
        for name, extra in [("cached", {}), ("uncached", {"use_cache": False})]:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=int(sys.argv[3]),
                                     do_sample=False, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True, **extra)
            result[name] = (out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1))
        torch.save(result, folder + "/remote_generate.pt")
    """
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> saved folder, each also generated from by ONE plain-transformers process
    (results in ``folder/remote_generate.pt``)."""
    root = tmp_path_factory.mktemp("cache")
    result = {
        name: statprune.save(_emptied(*case), root / name, tokenizer=TOKENIZER)
        for name, case in CASES.items()
    }
    ids, mask = _left_padded(PROMPTS)
    args = [
        json.dumps([str(f) for f in result.values()]),
        json.dumps([ids.tolist(), mask.tolist()]),
        str(STEPS),
    ]
    run = subprocess.run(
        [sys.executable, "-c", _PLAIN_TRANSFORMERS, *args],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_cached_generation_equals_uncached(name, folders):
    model = statprune.load(folders[name])
    expected = _generate(model, use_cache=False)
    assert len(set(expected[0].ravel().tolist())) > 2  # a real sequence, not one token repeated
    _assert_same(_generate(model), expected)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("llama-0", {"cache_implementation": "static"}),
        ("qwen2-0", {"cache_implementation": "static"}),
        ("qwen2-1", {"cache_implementation": "static"}),
        ("llama-0", {"num_beams": 2}),  # beam search reorders the cache
    ],
)
def test_static_cache_and_beam_search_equal_uncached(name, options, folders):
    model = statprune.load(folders[name])
    _assert_same(_generate(model, **options), _generate(model, use_cache=False, **options))


@pytest.mark.parametrize("name", list(CASES))
def test_plain_transformers_generates_alike_with_and_without_cache(name, folders):
    remote = torch.load(folders[name] / "remote_generate.pt")
    assert remote["module"] == "modeling_statprune"  # the code shipped in the folder built it
    _assert_same(remote["cached"], remote["uncached"])
    _assert_same(remote["uncached"], _generate(statprune.load(folders[name]), use_cache=False))


@pytest.mark.parametrize("name", ["llama-0", "qwen2-sliding-0"])
def test_forward_with_a_cache_counts_the_empty_layer(name, folders):
    """A prefill then one step by hand, with a cache built from the config (its layer types)."""
    model = statprune.load(folders[name])
    ids, mask = _left_padded(PROMPTS)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        assert cache.get_seq_length() == ids.shape[1]
        assert cache.layers[0].keys.shape[1] == 0  # still no heads: ONNX/GGUF/vLLM see the same shapes
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(step)], 1)
        cached = model(input_ids=step, attention_mask=mask2, cache=cache, use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([ids, step], 1), attention_mask=mask2, use_cache=False).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1] + 1
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_keep_length_layer_upgrades_only_layers_that_count_elements():
    keys = torch.zeros(2, 0, 5, 8)
    dense = DynamicLayer()
    dense.update(keys, keys)
    assert dense.get_seq_length() == 0  # transformers' count, the bug
    upgraded = keep_length_layer(dense)
    assert upgraded is dense and isinstance(dense, DynamicLayer) and dense.get_seq_length() == 5
    dense.update(torch.zeros(2, 0, 1, 8), torch.zeros(2, 0, 1, 8))
    assert dense.get_seq_length() == 6
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    sliding.update(keys, keys)
    assert type(keep_length_layer(sliding)) is DynamicSlidingWindowLayer  # counts tokens already
    assert sliding.get_seq_length() == 5
    fresh = keep_length_layer(DynamicLayer())
    assert fresh.get_seq_length() == 0
