"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (Llama-style attention).

Each decoder layer's ``mlp`` is a sparse block: a top-k router (``mlp.gate``, left untouched) and
the experts, which transformers 5 stores as fused 3-D tensors (``mlp.experts.gate_up_proj``
(E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)) that force one width on every expert. Before
anything is measured, :meth:`MoEAdapter.prepare` replaces them in every layer by
``StatprunedExperts`` (the same weights, the experts' neurons concatenated, one width per expert;
an ``experts`` op, replayed when a saved folder loads). From then on the layer's FFN is "all the
experts' neurons" (``FFNLayout.experts``: their widths) and the generic surgery slices it; the
statistics are gathered per expert over the tokens routed to it (``statprune.moe``).

Qwen2-MoE adds a shared expert (``mlp.shared_expert``, a SwiGLU FFN run on every token, scaled by
``sigmoid(mlp.shared_expert_gate(x))``): :class:`Qwen2MoeAdapter` replaces the block by
``StatprunedSharedMoeBlock`` (the same router and shared gate), whose experts module holds the
shared expert's neurons after the routed ones (the last width, ``shared=1``): one more block of the
concatenation, its weight the sigmoid gate, routed to every token. ``FFNLayout.experts`` then lists
every width and ``FFNLayout.active`` = (top-k, routed experts): the widths past the routed experts
are shared (``statprune.flops`` prices them at the full FLOPs of a dense neuron).

Qwen2-MoE and Qwen3-MoE layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) have
a dense SwiGLU ``mlp`` and are pruned as Llama's. Attention: Llama's layout; Qwen3-MoE's q/k norms are per
head (nothing to slice), OLMoE's span every head like OLMo2's (sliced with the kept heads).
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.base import FFNLayout
from statprune.adapters.llama import LlamaAdapter

EXPERT_PATHS = ("mlp.experts.gate_linear", "mlp.experts.up_linear")


class MoEAdapter(LlamaAdapter):
    """Routed experts in ``mlp.experts``, their router in ``mlp.gate`` (``top_k``)."""

    def ffn(self, layer: nn.Module) -> FFNLayout:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:  # a dense layer of a MoE model
            return super().ffn(layer)
        if hasattr(experts, "widths"):
            widths, routed = tuple(experts.widths), experts.num_experts
        else:  # the stock fused tensors: (E, H, I), and a shared expert where there is one
            n, _, width = experts.down_proj.shape
            widths, routed = (int(width),) * int(n), int(n)
            shared = getattr(layer.mlp, "shared_expert", None)
            widths += () if shared is None else (int(shared.up_proj.out_features),)
        return FFNLayout(
            inputs=EXPERT_PATHS,
            output="mlp.experts.down_linear",
            width=sum(widths),
            experts=widths,
            probe="mlp.experts",
            active=(int(layer.mlp.gate.top_k), routed),
        )

    def prepare(self, base_model: nn.Module) -> list[dict]:
        """Every layer's fused experts replaced by ``StatprunedExperts`` holding the same weights."""
        import torch

        from statprune.modeling_statprune import apply_op

        ops = []
        for i, layer in enumerate(self.layers(base_model)):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None or hasattr(experts, "widths"):
                continue
            n, hidden, width = experts.down_proj.shape
            op = {
                "op": "experts",
                "path": f"{self.layer_path(i)}.mlp.experts",
                "hidden": int(hidden),
                "widths": [int(width)] * int(n),
                "act": self.config.hidden_act,
            }
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
            module = apply_op(base_model, op)
            with torch.no_grad():
                module.gate_linear.weight.copy_(gate_up[:, :width].reshape(-1, hidden))
                module.up_linear.weight.copy_(gate_up[:, width:].reshape(-1, hidden))
                module.down_linear.weight.copy_(down.permute(1, 0, 2).reshape(hidden, -1))
            ops.append(op)
        return ops

    def neuron_attributes(self, layer: nn.Module, kept) -> dict[str, dict]:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            return {}
        widths, start, kept = [], 0, kept.cpu()
        for width in experts.widths:
            widths.append(int(((kept >= start) & (kept < start + width)).sum()))
            start += width
        return {"mlp.experts": {"widths": widths}}


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)


class Qwen2MoeAdapter(MoEAdapter):
    """Routed experts plus a gated shared expert per sparse layer (see the module doc)."""

    model_types = ("qwen2_moe",)

    def prepare(self, base_model: nn.Module) -> list[dict]:
        """Every sparse block replaced by ``StatprunedSharedMoeBlock``: the same router and shared
        gate, the routed experts' neurons then the shared expert's in one experts module."""
        import torch

        from statprune.modeling_statprune import apply_op

        ops = []
        for i, layer in enumerate(self.layers(base_model)):
            block = layer.mlp
            if not hasattr(block, "shared_expert"):  # dense, or converted already
                continue
            n, hidden, width = block.experts.down_proj.shape
            shared = block.shared_expert
            op = {
                "op": "shared_experts",
                "path": f"{self.layer_path(i)}.mlp",
                "hidden": int(hidden),
                "widths": [int(width)] * int(n) + [int(shared.up_proj.out_features)],
                "shared": 1,
                "act": self.config.hidden_act,
            }
            gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
            module = apply_op(base_model, op).experts
            with torch.no_grad():
                gate = torch.cat([gate_up[:, :width].reshape(-1, hidden), shared.gate_proj.weight])
                up = torch.cat([gate_up[:, width:].reshape(-1, hidden), shared.up_proj.weight])
                down = torch.cat([down.permute(1, 0, 2).reshape(hidden, -1), shared.down_proj.weight], 1)
                module.gate_linear.weight.copy_(gate)
                module.up_linear.weight.copy_(up)
                module.down_linear.weight.copy_(down)
            ops.append(op)
        return ops


class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)


class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)

    def head_parameters(self, layer: nn.Module) -> tuple[tuple[str, str], ...]:
        return (("self_attn.q_norm.weight", "q"), ("self_attn.k_norm.weight", "kv"))
