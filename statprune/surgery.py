"""Generic model surgery: slice a layer's projections to the kept heads or neurons.

Each change is expressed as a JSON op (see ``modeling_statprune``) applied to the live model and
recorded, so the saved model can be rebuilt from a stock architecture plus the op list.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from statprune.adapters.base import ModelAdapter
from statprune.linalg.heads import head_columns
from statprune.modeling_statprune import apply_op


def _linear_op(base: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    op = {
        "op": "linear",
        "path": path,
        "in": weight.shape[1],
        "out": weight.shape[0],
        "bias": bias is not None,
    }
    module = apply_op(base, op)
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))
        if bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
    return op


def _slice_rows(base: nn.Module, path: str, rows: torch.Tensor) -> dict:
    old = base.get_submodule(path)
    rows = rows.to(old.weight.device)
    bias = None if old.bias is None else old.bias.detach()[rows]
    return _linear_op(base, path, old.weight.detach()[rows], bias)


def linearize(adapter: ModelAdapter, base: nn.Module) -> list[dict]:
    """Replace every transformers ``Conv1D`` inside the layers (GPT-2: a linear layer whose weight
    is stored transposed, (in, out)) by the equivalent ``nn.Linear`` (weight (out, in)), so that
    the rest of statprune reads one weight orientation. Returns the ``linear`` ops, to be recorded
    before any pruning op (the saved weights are then in the ``nn.Linear`` orientation)."""
    ops = []
    for index, layer in enumerate(adapter.layers(base)):
        prefix = adapter.layer_path(index) + "."
        for name, module in list(layer.named_modules()):
            if isinstance(module, Conv1D):
                bias = None if module.bias is None else module.bias.detach()
                ops.append(_linear_op(base, prefix + name, module.weight.detach().T, bias))
    return ops


def _slice_parameter(base: nn.Module, path: str, index: torch.Tensor) -> dict:
    """Keep entries ``index`` of a parameter's last dimension (a per-head norm weight)."""
    parent_path, _, name = path.rpartition(".")
    old = getattr(base.get_submodule(parent_path), name).detach()
    values = old.index_select(-1, index.to(old.device))
    op = {"op": "parameter", "path": path, "shape": list(values.shape)}
    with torch.no_grad():
        apply_op(base, op).copy_(values)
    return op


def prune_heads(
    adapter: ModelAdapter,
    base: nn.Module,
    layer_index: int,
    kept: list[int],
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
) -> list[dict]:
    """Keep the query heads ``kept`` of a layer; the output projection becomes ``out_weight``.

    Key/value heads go with their query heads in multi-head attention and stay in grouped-query
    attention (unless every head goes, which replaces the block by ``EmptyAttention``). Separate
    q/k/v modules are sliced each; a fused one once, keeping the rows of every kept head of each
    part in the order its forward splits them (``AttentionLayout.kept_rows``).
    """
    layer = adapter.layers(base)[layer_index]
    lay = adapter.attention(layer)
    prefix = adapter.layer_path(layer_index) + "."
    ops: list[dict] = []
    if not kept:
        op = {
            "op": "empty_attention",
            "path": prefix + lay.block,
            "out": adapter.hidden_size if lay.o_inside_block else 0,
            "bias": lay.o_inside_block and out_bias is not None,
            "head_dim": adapter.kv_cache_head_dim(lay),
            "layer_idx": layer_index,
        }
        if not lay.o_inside_block:
            ops.append(_linear_op(base, prefix + lay.o, out_weight, out_bias))
        module = apply_op(base, op)
        if op["bias"]:
            with torch.no_grad():
                module.bias.copy_(out_bias.to(module.bias.dtype))
        return [op, *ops]
    cols = head_columns(kept, lay.head_dim)
    kv_kept = list(range(lay.n_kv_heads)) if lay.grouped else kept
    for path, rows in lay.kept_rows(kept, kv_kept).items():
        ops.append(_slice_rows(base, prefix + path, rows))
    n_kv = len(kv_kept)
    for path in adapter.head_projections(layer):
        ops.append(_slice_rows(base, prefix + path, cols))
    ops.append(_linear_op(base, prefix + lay.o, out_weight, out_bias))
    for path, which in adapter.head_parameters(layer):
        if which == "q" or not lay.grouped:
            ops.append(_slice_parameter(base, prefix + path, cols))
    for path, values in adapter.head_attributes(len(kept), n_kv, lay.head_dim).items():
        op = {"op": "attrs", "path": prefix + path, "values": values}
        apply_op(base, op)
        ops.append(op)
    for path, values in adapter.head_config(len(kept), n_kv, lay.head_dim).items():
        op = {"op": "config", "path": prefix + path, "values": values}
        apply_op(base, op)
        ops.append(op)
    for selector in adapter.head_argument_selectors(kept):
        op = {"op": "select_argument", **selector, "path": prefix + selector["path"]}
        apply_op(base, op)
        ops.append(op)
    return ops


def prune_neurons(
    adapter: ModelAdapter,
    base: nn.Module,
    layer_index: int,
    kept: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
) -> list[dict]:
    """Keep the FFN neurons ``kept``; the down projection becomes ``out_weight``/``out_bias``.
    A fused gate/up module keeps both halves' rows of the kept neurons (``FFNLayout.rows``)."""
    layer = adapter.layers(base)[layer_index]
    lay = adapter.ffn(layer)
    prefix = adapter.layer_path(layer_index) + "."
    attributes = adapter.neuron_attributes(layer, kept)  # from the widths before slicing
    had_bias = getattr(layer.get_submodule(lay.output), "bias", None) is not None
    if lay.experts is not None and out_bias is not None and not had_bias and not out_bias.any():
        out_bias = None  # routed experts get no bias compensation (statprune.moe): no zero bias
    ops = [_slice_rows(base, prefix + path, rows) for path, rows in lay.rows(kept).items()]
    ops.append(_linear_op(base, prefix + lay.output, out_weight, out_bias))
    for path, values in attributes.items():
        op = {"op": "attrs", "path": prefix + path, "values": values}
        apply_op(base, op)
        ops.append(op)
    return ops
