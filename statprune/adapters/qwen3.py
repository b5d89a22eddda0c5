"""Qwen3 decoders: Llama's layout plus RMSNorms on the queries and keys (``q_norm``/``k_norm``).

Those norms act on one head's ``head_dim`` features with one weight vector shared by every head
(``Qwen3RMSNorm(head_dim)`` applied after ``view(..., -1, head_dim)``), so they need no slicing when
heads go: the sliced ``q_proj``/``k_proj`` rows are whole heads.
"""

from __future__ import annotations

from statprune.adapters.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
