"""IBM Granite decoders: Llama's layout with scalar multipliers (embedding, residual, attention
scale, logits), none of which depends on the number of heads or neurons."""

from __future__ import annotations

from statprune.adapters.llama import LlamaAdapter


class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)
