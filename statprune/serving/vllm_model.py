"""vLLM model of statprune-compressed Llama, Mistral and Qwen2 decoders (uneven per-layer widths).

vLLM's own Llama implementation with one change: each decoder layer is built with its own query
and key/value head counts, FFN width and biases, read by ``statprune.serving.widths.layer_widths``
from the folder's ``config.json``. Tensor-parallel layers, paged KV cache and the attention
kernels are vLLM's. A layer whose heads were all removed has no attention (no KV cache); its
output is its bias (bias compensation) or zeros, as in ``statprune.modeling_statprune.EmptyAttention``;
likewise for a layer without FFN neurons. Imported by vLLM only (through ``vllm_plugin``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from statprune.errors import ModelError
from statprune.serving.widths import LayerWidths, layer_widths


class ConstantBlock(nn.Module):
    """A removed block: its output is ``bias`` (or zeros) of width ``hidden_size`` for every token.

    Parameter named ``bias`` as in the saved folder (``…self_attn.bias``) for attention; for an
    FFN the bias lives in a ``down_proj`` child so the saved ``…mlp.down_proj.bias`` loads."""

    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward(self, *args, hidden_states: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        x = hidden_states if hidden_states is not None else args[-1]
        out = x.new_zeros((*x.shape[:-1], self.hidden_size))
        return out if self.bias is None else out + self.bias.to(out.dtype)


class EmptyMLP(nn.Module):
    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.down_proj = ConstantBlock(hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(hidden_states=x)


def _check_parallel(index: int, widths: LayerWidths) -> None:
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return
    sizes = {
        "query heads": widths.heads,
        "key/value heads": widths.kv_heads,
        "FFN neurons": widths.intermediate,
    }
    for what, n in sizes.items():
        if n and n % tp and not (what == "key/value heads" and tp % n == 0):
            fix = f"--round-to {tp}" if what == "FFN neurons" else "--prune neurons"
            raise ModelError(
                f"layer {index} keeps {n} {what}, not divisible by tensor_parallel_size={tp}; serve with "
                f"a tensor_parallel_size dividing every layer's widths, or compress with {fix}"
            )


class StatpruneLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's ``LlamaDecoderLayer`` built with this layer's widths (``layer_widths``)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **kwargs) -> None:
        config = config or vllm_config.model_config.hf_config
        index = extract_layer_index(prefix)
        widths = layer_widths(config)[index]
        _check_parallel(index, widths)
        layer_config = copy.copy(config)
        layer_config.num_attention_heads = max(widths.heads, 1)
        layer_config.num_key_value_heads = max(widths.kv_heads, 1)
        layer_config.head_dim = widths.head_dim
        layer_config.intermediate_size = max(widths.intermediate, 1)
        # LlamaDecoderLayer: o_proj bias <- attention_bias (or bias), q/k/v bias <- qkv_bias
        layer_config.attention_bias = widths.o_bias
        layer_config.bias = False
        layer_config.qkv_bias = widths.qkv_bias
        layer_config.mlp_bias = widths.gate_up_bias
        if getattr(config, "sliding_window", None) and not getattr(config, "layer_types", None):
            # Mistral: one window for every layer (vLLM's Llama layers read it from layer_types)
            layer_config.layer_types = ["sliding_attention"] * config.num_hidden_layers

        def attention(**attn_kwargs) -> nn.Module:
            if widths.heads == 0:  # no Attention module: vLLM allocates no KV cache for this layer
                return ConstantBlock(config.hidden_size, widths.o_bias)
            return LlamaAttention(**attn_kwargs)

        super().__init__(vllm_config, prefix=prefix, config=layer_config, attn_layer_type=attention)
        if widths.intermediate == 0:
            self.mlp = EmptyMLP(config.hidden_size, widths.down_bias)
        elif widths.down_bias != widths.gate_up_bias:
            self.mlp.down_proj = RowParallelLinear(
                input_size=widths.intermediate,
                output_size=config.hidden_size,
                bias=widths.down_bias,
                quant_config=self.get_quant_config(vllm_config),
                prefix=f"{prefix}.mlp.down_proj",
            )


class StatpruneLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers follow the compressed folder's per-layer widths."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layer_widths(vllm_config.model_config.hf_config)  # one clear error before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=StatpruneLlamaDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the saved zero-width projections of removed FFNs ([0, hidden] tensors) have no module here
        return super().load_weights((name, w) for name, w in weights if w.numel() > 0)
