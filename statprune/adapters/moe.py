"""Mixture-of-experts decoders: Mixtral, Qwen3-MoE, OLMoE (Llama-style attention, routed experts).

Each decoder layer's ``mlp`` is a sparse block: a top-k router (``mlp.gate``, left untouched) and
the experts, which transformers 5 stores as fused 3-D tensors (``mlp.experts.gate_up_proj``
(E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)) that force one width on every expert. Before
anything is measured, :meth:`MoEAdapter.prepare` replaces them in every layer by
``StatprunedExperts`` (the same weights, the experts' neurons concatenated, one width per expert;
an ``experts`` op, replayed when a saved folder loads). From then on the layer's FFN is "all the
experts' neurons" (``FFNLayout.experts``: their widths) and the generic surgery slices it; the
statistics are gathered per expert over the tokens routed to it (``statprune.moe``).

Qwen3-MoE layers listed in ``mlp_only_layers`` (or off its ``decoder_sparse_step``) have a dense
SwiGLU ``mlp`` and are pruned as Llama's. Attention: Llama's layout; Qwen3-MoE's q/k norms are per
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
            widths = tuple(experts.widths)
        else:  # the stock fused tensors: (E, H, I)
            n, _, width = experts.down_proj.shape
            widths = (int(width),) * int(n)
        return FFNLayout(
            inputs=EXPERT_PATHS,
            output="mlp.experts.down_linear",
            width=sum(widths),
            experts=widths,
            probe="mlp.experts",
            active=(int(layer.mlp.gate.top_k), len(widths)),
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


class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)


class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)

    def head_parameters(self, layer: nn.Module) -> tuple[tuple[str, str], ...]:
        return (("self_attn.q_norm.weight", "q"), ("self_attn.k_norm.weight", "kv"))
