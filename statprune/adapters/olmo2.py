"""AllenAI OLMo2 decoders: Llama's layout with RMSNorms on the whole query and key projections.

Unlike Qwen3's per-head norms, ``q_norm``/``k_norm`` normalize the full ``n_heads * head_dim``
(``n_kv_heads * head_dim``) width with one weight entry per feature, so their weights are sliced
with the kept heads (``head_parameters``; key norms only when key/value heads go, which grouped
attention never does). The root mean square then runs over the kept heads' features only: removing
heads rescales each token's queries by a scalar (exact when the removed heads duplicate kept ones),
one more source of error that the least-squares correction of the output projection absorbs.
"""

from __future__ import annotations

from torch import nn

from statprune.adapters.llama import LlamaAdapter


class OLMo2Adapter(LlamaAdapter):
    model_types = ("olmo2",)

    def head_parameters(self, layer: nn.Module) -> tuple[tuple[str, str], ...]:
        return (("self_attn.q_norm.weight", "q"), ("self_attn.k_norm.weight", "kv"))
