"""Rebuild a statprune-compressed model on top of the stock transformers classes.

A compressed model differs from its stock architecture only in module shapes: narrower linear
layers, fewer heads, skipped sub-blocks. ``config.statprune_ops`` lists those changes as plain
JSON; ``apply_ops`` replays them on a freshly built stock model, after which the saved weights
load as usual. statprune itself uses this module, and copies it into every output directory so
that ``AutoModel…from_pretrained(DIR, trust_remote_code=True)`` works where statprune is not
installed: it must import nothing but torch and transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_KEEP_LENGTH_CLASSES: dict[type, type] = {}


def _keys_length(self) -> int:
    """Cached length = the keys' sequence axis, whatever their head count (0 before any update)."""
    keys = getattr(self, "keys", None)
    if not getattr(self, "is_initialized", False) or keys is None or keys.dim() != 4:
        return 0
    return keys.shape[-2]


def keep_length_layer(layer: Any) -> Any:
    """Make a transformers cache layer count tokens even when its keys hold no heads.

    transformers' ``DynamicLayer.get_seq_length`` returns 0 when ``keys.numel() == 0``, so a layer
    whose keys are [batch, 0 heads, seq, head_dim] (``EmptyAttention``) would report an empty
    cache; ``cache.get_seq_length()`` asks layer 0, and generation sizes its attention mask and
    positions from it. A layer using that method is switched (in place, same object, same
    tensors) to a subclass whose length is the keys' sequence axis; layers that count tokens
    another way (sliding-window and static layers: ``cumulative_length``) are left as they are.
    Returns ``layer``.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # a transformers without per-layer caches
        return layer
    cls = type(layer)
    if not isinstance(layer, DynamicLayer) or cls.get_seq_length is not DynamicLayer.get_seq_length:
        return layer
    if cls not in _KEEP_LENGTH_CLASSES:
        # ``_layer_type = None``: not registered in transformers' layer-type mappings
        name = f"KeepLength{cls.__name__}"
        namespace = {
            "get_seq_length": _keys_length,
            "_layer_type": None,
            "__module__": __name__,
            "__qualname__": name,
        }
        _KEEP_LENGTH_CLASSES[cls] = globals()[name] = type(name, (cls,), namespace)  # global: caches pickle
    layer.__class__ = _KEEP_LENGTH_CLASSES[cls]
    return layer


class EmptyAttention(nn.Module):
    """Stands in for an attention block whose heads were all removed.

    Returns a constant (its ``bias``, or zeros) of width ``out_features`` for every token, and
    ``None`` attention weights, like the stock blocks' ``(output, weights)`` tuples. For decoders it
    still records zero-head keys/values [batch, 0, seq, head_dim] in the cache, and makes that
    layer count them (``keep_length_layer``) so that cache lengths stay right.
    """

    def __init__(self, out_features: int, bias: bool, head_dim: int = 0, layer_idx: int = 0):
        super().__init__()
        self.out_features = out_features
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        shape = (*hidden_states.shape[:-1], self.out_features)
        out = hidden_states.new_zeros(shape)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        # the cache argument's name differs by family (GPT-NeoX: ``layer_past``)
        cache = next(
            (kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None
        )
        if cache is not None and hasattr(cache, "update") and self.head_dim:
            batch, seq = hidden_states.shape[0], hidden_states.shape[1]
            empty = hidden_states.new_zeros(batch, 0, seq, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
            layers = getattr(cache, "layers", None)
            if layers is not None and self.layer_idx < len(layers):
                keep_length_layer(layers[self.layer_idx])
        return out, None


class StatprunedExperts(nn.Module):
    """The routed experts of a mixture-of-experts block, each with its own FFN width.

    Stands in for the stock fused expert tensors (``gate_up_proj`` (E, 2I, H), ``down_proj``
    (E, H, I): one width for every expert). The experts' neurons are stored concatenated: expert
    ``e`` owns the ``widths[e]`` rows from ``offset_e = sum(widths[:e])`` of ``gate_linear`` and
    ``up_linear`` and those columns of ``down_linear``. Called like the stock experts module,
    ``(hidden_states (N, H), top_k_index (N, k), top_k_weights (N, k)) -> (N, H)``, it returns
    ``sum over routed e of w_e(x) * down_e(act(gate_e x) * up_e x)``, plus ``down_linear.bias``
    once per token when the pruning gave it one (the stock experts have no bias).

    ``shared``: how many of the last ``widths`` are shared experts (Qwen2-MoE's
    ``shared_expert``), run on every token with the weights of a fourth argument
    ``shared_weights`` (N, shared) (``StatprunedSharedMoeBlock`` passes its sigmoid gate);
    ``num_experts`` counts the routed ones.
    """

    def __init__(self, hidden: int, widths: list[int], act: str, shared: int = 0):
        super().__init__()
        from transformers.activations import ACT2FN

        self.widths, self.act, self.shared = [int(w) for w in widths], act, int(shared)
        self.num_experts = len(self.widths) - self.shared
        total = sum(self.widths)
        self.gate_linear = nn.Linear(hidden, total, bias=False)
        self.up_linear = nn.Linear(hidden, total, bias=False)
        self.down_linear = nn.Linear(total, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def _slices(self) -> list[slice]:
        bounds, start = [], 0
        for width in self.widths:
            bounds.append(slice(start, start + width))
            start += width
        return bounds

    def _neurons(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        gate = nn.functional.linear(x, self.gate_linear.weight[rows])
        return self.act_fn(gate) * nn.functional.linear(x, self.up_linear.weight[rows])

    def routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n: int) -> torch.Tensor:
        """(N, E) routing weight of every token for every expert (0 where not routed)."""
        dense = top_k_weights.new_zeros(n, self.num_experts + 1)
        dense.scatter_add_(1, top_k_index.clamp(0, self.num_experts), top_k_weights)
        return dense[:, : self.num_experts]

    def _weights(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        shared_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E + shared) weight of every token for every expert (0 where not routed) and
        (N, E + shared) bool: which tokens each expert got (a shared expert: all)."""
        n = hidden_states.shape[0]
        weights = self.routing(top_k_index, top_k_weights, n)
        known = (top_k_index >= 0) & (top_k_index < self.num_experts)
        routed = torch.zeros(n, self.num_experts + 1, dtype=torch.bool, device=top_k_index.device)
        routed = routed.scatter_(1, torch.where(known, top_k_index, self.num_experts), True)[:, :-1]
        if self.shared:
            weights = torch.cat([weights, shared_weights.reshape(n, self.shared).to(weights.dtype)], 1)
            routed = torch.cat([routed, routed.new_ones(n, self.shared)], 1)
        return weights, routed

    def routed_activations(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        shared_weights: torch.Tensor | None = None,
        *args: Any,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Each expert's neuron activations on its own tokens times its routing weight, one
        expert at a time (called like :meth:`forward`).

        Yields ``(e, tokens, rows)`` for every expert in order (the routed ones, then the
        shared): ``tokens`` (n_e,) the indices (ascending) of the tokens routed to ``e`` (a
        shared expert: all N), ``rows`` (n_e, widths[e]) their ``w_e(x) z_e(x)``. Nothing of
        N × sum(widths) is built: the statistics of the routed experts (``statprune.moe``) stream
        from these records, and hold one expert's rows at a time.
        """
        weights, routed = self._weights(hidden_states, top_k_index, top_k_weights, shared_weights)
        for e, rows in enumerate(self._slices()):
            tokens = torch.nonzero(routed[:, e]).flatten()
            z = self._neurons(hidden_states[tokens], rows)
            yield e, tokens, z * weights[tokens, e, None].to(z.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        shared_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        slices = self._slices()
        if torch.compiler.is_exporting():  # no data-dependent shapes: every expert on every token
            weights = self.routing(top_k_index, top_k_weights, hidden_states.shape[0])
            for e, rows in enumerate(slices[: self.num_experts]):
                if rows.stop > rows.start:
                    z = self._neurons(hidden_states, rows)
                    y = nn.functional.linear(z, self.down_linear.weight[:, rows])
                    out = out + y * weights[:, e, None].to(y.dtype)
        else:
            for e, rows in enumerate(slices[: self.num_experts]):
                if rows.stop == rows.start:
                    continue
                tokens, slot = torch.where(top_k_index == e)
                if tokens.numel() == 0:
                    continue
                z = self._neurons(hidden_states[tokens], rows)
                y = nn.functional.linear(z, self.down_linear.weight[:, rows])
                y = y * top_k_weights[tokens, slot, None].to(y.dtype)
                out.index_add_(0, tokens, y.to(out.dtype))
        for rows, w in zip(slices[self.num_experts :], range(self.shared), strict=True):  # every token
            if rows.stop > rows.start:
                z = self._neurons(hidden_states, rows)
                y = nn.functional.linear(z, self.down_linear.weight[:, rows])
                out = out + shared_weights[:, w, None].to(y.dtype) * y
        if self.down_linear.bias is not None:
            out = out + self.down_linear.bias.to(out.dtype)
        return out


class StatprunedSharedMoeBlock(nn.Module):
    """A sparse MoE block with a gated shared expert (Qwen2-MoE), its neurons beside the routed
    experts' in one ``StatprunedExperts`` (``shared=1``, the last width).

    Holds the stock block's router ``gate`` and ``shared_expert_gate`` as they are and computes
    what the stock block does, ``experts(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)``,
    on (batch, seq, hidden) inputs.
    """

    def __init__(self, gate: nn.Module, shared_expert_gate: nn.Module, experts: StatprunedExperts):
        super().__init__()
        self.gate, self.shared_expert_gate, self.experts = gate, shared_expert_gate, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.gate(x)
        shared = torch.sigmoid(self.shared_expert_gate(x))
        return self.experts(x, index, weights, shared).reshape(shape)


class ArgumentSelector:
    """Selects entries of one forward argument of a module, e.g. the per-head position bias
    that an encoder computes once for all layers (MPNet) when this layer keeps fewer heads."""

    def __init__(self, position: int, name: str, dim: int, index: list[int]):
        self.position, self.name, self.dim, self.index = position, name, dim, list(index)

    def _select(self, value: torch.Tensor) -> torch.Tensor:
        return value.index_select(self.dim, torch.tensor(self.index, device=value.device))

    def hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if kwargs.get(self.name) is not None:
            kwargs = {**kwargs, self.name: self._select(kwargs[self.name])}
        elif len(args) > self.position and args[self.position] is not None:
            args = (*args[: self.position], self._select(args[self.position]), *args[self.position + 1 :])
        return args, kwargs


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def _like(root: nn.Module) -> dict:
    """Device and dtype for a new module: those of the module it replaces (or of the model)."""
    ref = next(iter(root.parameters()), None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


def apply_op(root: nn.Module, op: dict) -> nn.Module | None:
    """Apply one structural change to ``root`` (the base model); returns the new module, if any."""
    kind, path = op["op"], op["path"]
    if kind == "linear":
        parent, name = _parent(root, path)
        module = nn.Linear(op["in"], op["out"], bias=op["bias"], **_like(getattr(parent, name, root)))
        setattr(parent, name, module)
        return module
    if kind == "empty_attention":
        parent, name = _parent(root, path)
        module = EmptyAttention(op["out"], op["bias"], op.get("head_dim", 0), op.get("layer_idx", 0))
        module.to(**_like(getattr(parent, name, root)))
        setattr(parent, name, module)
        return module
    if kind == "parameter":  # a parameter replaced by a new one of another shape (values loaded later)
        parent, name = _parent(root, path)
        old = getattr(parent, name)
        setattr(parent, name, nn.Parameter(old.new_empty(op["shape"]), requires_grad=old.requires_grad))
        return getattr(parent, name)
    if kind == "experts":  # fused expert tensors -> per-expert widths (weights loaded later)
        parent, name = _parent(root, path)
        module = StatprunedExperts(op["hidden"], op["widths"], op["act"])
        module.to(**_like(getattr(parent, name, root)))
        setattr(parent, name, module)
        return module
    if kind == "shared_experts":  # a MoE block with a gated shared expert: its router and gate kept
        parent, name = _parent(root, path)
        old = getattr(parent, name)
        experts = StatprunedExperts(op["hidden"], op["widths"], op["act"], shared=op["shared"])
        experts.to(**_like(old))
        module = StatprunedSharedMoeBlock(old.gate, old.shared_expert_gate, experts)
        setattr(parent, name, module)
        return module
    if kind == "attrs":
        target = root.get_submodule(path)
        for key, value in op["values"].items():
            setattr(target, key, value)
        return None
    if kind == "config":  # the module reads these fields from its config: give it its own copy
        target = root.get_submodule(path)
        target.config = copy.copy(target.config)
        for key, value in op["values"].items():
            setattr(target.config, key, value)
        return None
    if kind == "select_argument":
        target = root.get_submodule(path)
        selector = ArgumentSelector(op["position"], op["name"], op["dim"], op["index"])
        target.register_forward_pre_hook(selector.hook, with_kwargs=True)
        return None
    raise ValueError(f"unknown statprune op {kind!r}: this model needs a newer statprune")


def apply_ops(root: nn.Module, ops: list[dict]) -> None:
    """Replay every structural change, in order."""
    for op in ops:
        apply_op(root, op)


class StatprunedMixin:
    """Mixed into a stock transformers class: builds it, then applies ``config.statprune_ops``."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        apply_ops(self.base_model, list(getattr(config, "statprune_ops", None) or []))


def statpruned_class(base: type) -> type:
    """The subclass of a stock transformers class that rebuilds compressed models."""
    return type(base.__name__, (StatprunedMixin, base), {"__module__": __name__})
