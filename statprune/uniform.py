"""``--uniform``: a compressed decoder written as a stock transformers model (no remote code).

When every layer keeps the same number of query heads, key/value heads and FFN neurons, the
standard config fields state the whole geometry: ``num_attention_heads``, ``num_key_value_heads``,
``head_dim`` (kept at the original head size) and ``intermediate_size``. Llama, Mistral and Qwen2
read ``head_dim`` from the config; BERT-style encoders derive the head size as
``hidden_size / num_attention_heads``, so fewer heads cannot be expressed there.

Bias compensation puts biases on ``o_proj`` and ``down_proj``. Llama's config can express them
(``attention_bias`` / ``mlp_bias``: the query/key/value and gate/up biases this switches on are
written as zeros, so the outputs are unchanged); Mistral's and Qwen2's cannot, so they need
``--no-bias-compensation``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from statprune.errors import StatpruneError

FAMILIES = ("llama", "mistral", "qwen2")
_BIAS_FIELDS = {"llama": ("attention_bias", "mlp_bias")}


class UniformError(StatpruneError):
    """The model cannot be written in its stock architecture's standard config fields."""


def check_family(config, bias_compensation: bool = True) -> None:
    """Refuse, before any work, a model ``--uniform`` cannot write as a stock config."""
    family = config.model_type
    if family not in FAMILIES:
        raise UniformError(
            f"--uniform writes Llama, Mistral and Qwen2 models, whose config states the head size "
            f"(head_dim); {family} derives it as hidden_size / num_attention_heads, so fewer heads "
            "cannot be written in its standard fields. Drop --uniform: the output then loads with "
            "trust_remote_code=True"
        )
    if bias_compensation and family not in _BIAS_FIELDS:
        raise UniformError(
            f"the stock {family} config has no o_proj/down_proj biases for bias compensation; "
            "pass --no-bias-compensation with --uniform"
        )


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _widths(model: nn.Module) -> set[tuple[int, int, int]]:
    from statprune.modeling_statprune import EmptyAttention

    head_dim = _head_dim(model.config)
    widths = set()
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn, EmptyAttention):
            widths.add((0, 0, layer.mlp.gate_proj.out_features))
            continue
        widths.add(
            (
                attn.q_proj.out_features // head_dim,
                attn.k_proj.out_features // head_dim,
                layer.mlp.gate_proj.out_features,
            )
        )
    return widths


def stock_model(model: nn.Module) -> nn.Module:
    """The stock transformers model (same class, standard config, no ``statprune_ops``) holding
    ``model``'s weights; shares their storage. Raises ``UniformError`` when the layers' widths
    differ or biases cannot be expressed."""
    config = model.config
    family = config.model_type
    check_family(config, bias_compensation=False)
    widths = _widths(model)
    if len(widths) != 1:
        raise UniformError(
            f"the layers keep different widths {sorted(widths)}; --uniform needs --allocation uniform"
        )
    ((heads, kv_heads, ffn),) = widths
    if heads == 0 or ffn == 0:
        raise UniformError("every head or every neuron of the layers went; --uniform needs a milder budget")
    state = dict(model.state_dict())
    has_o_bias = any(k.endswith("self_attn.o_proj.bias") for k in state)
    has_down_bias = any(k.endswith("mlp.down_proj.bias") for k in state)
    fields: dict[str, Any] = {
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _head_dim(config),
        "intermediate_size": ffn,
    }
    if has_o_bias or has_down_bias:
        if family not in _BIAS_FIELDS:
            raise UniformError(
                f"the stock {family} config has no o_proj/down_proj biases; compress with "
                "--no-bias-compensation"
            )
        attention_field, mlp_field = _BIAS_FIELDS[family]
        fields[attention_field] = has_o_bias or bool(getattr(config, attention_field, False))
        fields[mlp_field] = has_down_bias or bool(getattr(config, mlp_field, False))
    data = {k: v for k, v in config.to_dict().items() if k not in ("statprune_ops", "auto_map")}
    stock_config = type(config).from_dict({**data, **fields})
    stock_name = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.")).__name__
    cls = getattr(transformers, stock_name)
    with torch.device("meta"):
        stock = cls(stock_config)
    expected = stock.state_dict()
    for key, value in expected.items():  # biases the stock layout has and the model lacks: zeros
        if key not in state:
            if not key.endswith(".bias"):
                raise UniformError(f"the stock {cls.__name__} expects {key}, which the model lacks")
            state[key] = torch.zeros(value.shape, dtype=model.dtype, device=model.device)
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise UniformError(
                f"{key} is {tuple(value.shape)}, the stock layout {tuple(expected[key].shape)}"
            )
    stock.load_state_dict(state, strict=True, assign=True)
    stock.tie_weights()
    stock.generation_config = model.generation_config
    return stock.eval()
