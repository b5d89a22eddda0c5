"""Per-layer widths of a compressed decoder, read from its ``config.json``.

A compressed folder keeps the stock config fields (the widths of the original model) and lists
every change as ``statprune_ops`` (see ``statprune.modeling_statprune``). ``layer_widths``
replays those ops on the stock widths and returns, per layer, what an inference engine must build:
query and key/value head counts, head size, FFN width and which projections carry a bias (bias
compensation adds one to ``o_proj`` and ``down_proj``). Pure Python: no torch, no vLLM.

This is the one place that interprets a folder's config for serving; the vLLM model
(``statprune.serving.vllm_model``) calls it for every layer it builds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from statprune.errors import ModelError

# the stock transformers class of a compressed causal LM -> the architecture the vLLM plugin serves
VLLM_ARCHITECTURES = {
    "LlamaForCausalLM": "StatpruneLlamaForCausalLM",
    "MistralForCausalLM": "StatpruneMistralForCausalLM",
    "Qwen2ForCausalLM": "StatpruneQwen2ForCausalLM",
}
_STOCK_ARCHITECTURES = {v: k for k, v in VLLM_ARCHITECTURES.items()}
# a compressed folder's config.json says ``model_type: statprune_<stock type>`` (statprune.persist),
# so that transformers asks for trust_remote_code instead of building the stock, wider model
CUSTOM_TYPE_PREFIX = "statprune_"

# model_type -> biases of the stock layers: (q/k/v, o_proj, gate/up, down_proj)
_STOCK_BIASES = {
    "llama": lambda get: (get("attention_bias", False),) * 2 + (get("mlp_bias", False),) * 2,
    "mistral": lambda get: (False, False, False, False),
    "qwen2": lambda get: (True, False, False, False),
}
_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerWidths:
    """What one decoder layer keeps. ``heads == 0``: the attention block is gone (its output is
    the constant ``o_bias`` vector or zeros); ``intermediate == 0``: likewise for the FFN."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool
    o_bias: bool
    gate_up_bias: bool
    down_bias: bool


def _getter(config: Any):
    if isinstance(config, Mapping):
        return lambda key, default=None: config.get(key, default) if config.get(key) is not None else default
    return lambda key, default=None: (
        getattr(config, key, default) if getattr(config, key, None) is not None else default
    )


def stock_architecture(name: str) -> str:
    """The transformers class name behind an architecture name (``StatpruneLlamaForCausalLM`` ->
    ``LlamaForCausalLM``); other names are returned unchanged."""
    return _STOCK_ARCHITECTURES.get(name, name)


def serving_architectures(architectures: list[str], ops: list | None) -> list[str]:
    """The ``architectures`` a saved folder declares: the vLLM plugin's name for a compressed
    causal LM of a family it serves (so ``vllm.LLM(DIR)`` picks the plugin's model, or fails with
    "architecture not supported" when the plugin is missing, instead of misloading weights),
    the given names otherwise."""
    if not ops or not architectures:
        return list(architectures)
    return [VLLM_ARCHITECTURES.get(architectures[0], architectures[0]), *architectures[1:]]


def layer_widths(config: Any) -> list[LayerWidths]:
    """Per-layer widths of a (possibly compressed) Llama-family decoder.

    ``config``: a transformers config object or the dict of a ``config.json``. Returns one
    ``LayerWidths`` per layer, in order. Raises ``ModelError`` for a family other than Llama,
    Mistral or Qwen2, or for ops the serving code cannot express (with what to do instead).
    """
    get = _getter(config)
    model_type = str(get("model_type")).removeprefix(CUSTOM_TYPE_PREFIX)
    if model_type not in _STOCK_BIASES:
        raise ModelError(
            f"serving with vLLM supports compressed llama, mistral and qwen2 decoders, not {model_type!r}; "
            "load this model with transformers (trust_remote_code=True) instead"
        )
    heads = int(get("num_attention_heads"))
    head_dim = int(get("head_dim") or get("hidden_size") // heads)
    qkv, o, gate_up, down = (bool(b) for b in _STOCK_BIASES[model_type](get))
    stock = LayerWidths(
        heads=heads,
        kv_heads=int(get("num_key_value_heads", heads)),
        head_dim=head_dim,
        intermediate=int(get("intermediate_size")),
        qkv_bias=qkv,
        o_bias=o,
        gate_up_bias=gate_up,
        down_bias=down,
    )
    layers = [stock] * int(get("num_hidden_layers"))
    for op in get("statprune_ops", []) or []:
        match = _LAYER_PATH.search(op.get("path", ""))
        if match is None or int(match.group(1)) >= len(layers):
            raise ModelError(
                f"statprune op {op.get('op')!r} on {op.get('path')!r} is outside the decoder layers"
            )
        index, sub = int(match.group(1)), match.group(2)
        layers[index] = _apply(layers[index], op, sub)
    for i, layer in enumerate(layers):
        if layer.heads and (not layer.kv_heads or layer.heads % layer.kv_heads):
            raise ModelError(
                f"layer {i} keeps {layer.heads} query heads for {layer.kv_heads} key/value heads "
                "(not a multiple); compress again with this statprune version"
            )
    return layers


def _apply(layer: LayerWidths, op: Mapping[str, Any], sub: str) -> LayerWidths:
    kind = op.get("op")
    if kind == "attrs":  # module attributes (num_key_value_groups) follow from the widths
        return layer
    if kind == "empty_attention" and sub == "self_attn":
        return replace(layer, heads=0, kv_heads=0, o_bias=bool(op.get("bias")))
    if kind == "linear":
        bias = bool(op.get("bias"))
        if sub == "self_attn.q_proj":
            return replace(layer, heads=op["out"] // layer.head_dim, qkv_bias=bias)
        if sub in ("self_attn.k_proj", "self_attn.v_proj"):
            return replace(layer, kv_heads=op["out"] // layer.head_dim, qkv_bias=layer.qkv_bias or bias)
        if sub == "self_attn.o_proj":
            return replace(layer, heads=op["in"] // layer.head_dim, o_bias=bias)
        if sub in ("mlp.gate_proj", "mlp.up_proj"):
            return replace(layer, intermediate=op["out"], gate_up_bias=bias)
        if sub == "mlp.down_proj":
            return replace(layer, intermediate=op["in"], down_bias=bias)
    raise ModelError(
        f"statprune op {kind!r} on {sub!r} cannot be served by the vLLM plugin; "
        "load this model with transformers (trust_remote_code=True) instead"
    )
