"""Gemma, Gemma2 and Gemma3 text decoders: Llama's layout with a head size set apart.

What differs from Llama does not change the surgery:

* ``head_dim`` is a config field independent of ``hidden_size / num_attention_heads`` (Gemma-3
  270M: 4 heads of 256 in a hidden size of 640), and the attention scale comes from
  ``query_pre_attn_scalar``, not from the head count;
* the sandwich norms (before and after each block), the soft-capping of attention and final logits,
  the embedding scaling by sqrt(hidden_size) and the tied embeddings act on the hidden size or on
  single scores, which pruning leaves alone; Gemma3's ``q_norm``/``k_norm`` act on one head's
  ``head_dim`` features with one shared weight (as in Qwen3), so whole-head rows need no slicing;
* sliding-window layers (``layer_types``) keep their window when they lose heads: the window limits
  which positions a kept head sees, not which heads exist. A layer that loses every head still
  records zero-head keys/values in its (sliding or full) cache layer, so cache lengths stay right.
"""

from __future__ import annotations

from statprune.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")
