"""Tiny random-weight configs of every supported family, built in code: the registry that
``tests/test_conformance.py`` runs the shared adapter checks over.

Adding a family: its adapter file in ``statprune/adapters/`` and ONE line in ``FAMILIES`` below
(config class, the fields that differ from the shared tiny shape, the transformers class-name
prefix, the task classes to check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conftest import TINY_SPECIALS, TINY_WORDS

VOCAB = len(TINY_SPECIALS) + len(TINY_WORDS)
# 2 layers, hidden 32, 4 heads of 8, FFN 64; pad id 0 as in the tiny tokenizer
ENCODER = {
    "vocab_size": VOCAB,
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "num_labels": 3,
}
DISTILBERT = {"vocab_size": VOCAB, "n_layers": 2, "dim": 32, "n_heads": 4, "hidden_dim": 64}
DISTILBERT |= {"max_position_embeddings": 64, "pad_token_id": 0, "num_labels": 3}
# grouped-query attention: 4 query heads sharing 2 key/value heads; tied embeddings (Qwen3: heads
# of 16, twice hidden / heads, as in the real Qwen3 models whose head_dim is set apart)
DECODER = {**ENCODER, "num_key_value_heads": 2, "tie_word_embeddings": True}
# multi-head attention (key/value heads go with their query heads: OLMo2's k_norm is sliced too), as
# in OLMo2-7B (and for Gemma3 here). With grouped queries, the 70% FLOPs budget of the conformance test strips
# every head of these random post-norm models (each block's output is normalized to unit RMS, far
# above the embeddings), which leaves their logits further than their own norm from the dense ones.
MHA = {**DECODER, "num_key_value_heads": 4}
# Gemma: head_dim must be given (its default is 256); 8 = hidden / heads (with 16 the float32 Gram
# of the 64 head features, rank <= 32, leaves 3e-5 on duplicated heads; float64 gives 1e-7).
# Gemma2/3: heads of 16 (head_dim set apart), a sliding window of 4 tokens on the first layer (the
# test inputs are longer), soft-capped attention and final logits
GEMMA_LAYERS = ["sliding_attention", "full_attention"]
GEMMA2 = {**DECODER, "head_dim": 16, "sliding_window": 4, "layer_types": GEMMA_LAYERS}
GEMMA2 |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16}
# Gemma3 (q/k norms): multi-head, heads of 8 (Gemma2 covers heads of 16 apart from the hidden size;
# with 16 here the float32 Gram leaves 5e-5 on duplicated heads)
GEMMA3 = {**GEMMA2, **MHA, "head_dim": 8, "query_pre_attn_scalar": 8}
# Granite: every multiplier away from 1
GRANITE = {**DECODER, "embedding_multiplier": 2.0, "residual_multiplier": 0.5}
GRANITE |= {"attention_multiplier": 0.2, "logits_scaling": 4.0}
# OPT: multi-head attention, ReLU FFN, learned positions numbered from 2
OPT = {"vocab_size": VOCAB, "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
OPT |= {"ffn_dim": 64, "max_position_embeddings": 64, "word_embed_proj_dim": 32, "pad_token_id": 0}
OPT |= {"enable_bias": True}
# fused projections (issue 16). Phi-3: stacked qkv_proj and gate_up_proj, grouped queries.
PHI3 = {**DECODER, "original_max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}
# GPT-2: Conv1D layers (weights stored (in, out)), stacked c_attn, learned positions, biases
GPT2 = {"vocab_size": VOCAB, "n_layer": 2, "n_embd": 32, "n_head": 4, "n_inner": 64, "n_positions": 64}
GPT2 |= {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# GPT-NeoX (Pythia): query_key_value interleaved head by head, parallel residual, partial rotary
NEOX = {"vocab_size": VOCAB, "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
NEOX |= {"intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}
NEOX |= {"use_parallel_residual": True}
# mixture of experts: 4 experts of 32 neurons, top-2 (Qwen3-MoE: layer 0 dense, as its
# mlp_only_layers allow; OLMoE: its q/k norms span every head, as OLMo2's)
MOE = {**DECODER, "num_experts_per_tok": 2}
MIXTRAL = {**MOE, "num_local_experts": 4, "intermediate_size": 32}
QWEN3_MOE = {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8, "mlp_only_layers": [0]}
OLMOE = {**MOE, "num_experts": 4, "intermediate_size": 32}
# Qwen2-MoE: a gated shared expert of 16 neurons beside the routed ones in every layer (a dense
# layer is checked in tests/test_moe.py); router weights unnormalized over the top-k (its default)
QWEN2_MOE = {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 16}
# DeBERTa-v3's layout (shared key/query projections for positions, relative positions only, no
# segment ids, log-bucketed distances); the -pos-proj variant has its own position projections
# (sliced with the kept heads) and an absolute position table
DEBERTA_V3 = {**ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "share_att_key": True}
DEBERTA_V3 |= {"position_biased_input": False, "position_buckets": 8, "norm_rel_ebd": "layer_norm"}
# weights 5x the default scale: at 0.02 the FFN inputs of this model without absolute positions
# are nearly rank-deficient and the allocation splits duplicated neurons 30/34 at a 1e-6 error
DEBERTA_V3 |= {"type_vocab_size": 0, "initializer_range": 0.1}
DEBERTA_POS = {**DEBERTA_V3, "share_att_key": False, "position_biased_input": True, "type_vocab_size": 2}
# ModernBERT: a global layer then a local one (sliding window of 8 tokens: the test inputs are
# longer), special-token ids inside the tiny vocabulary
MODERNBERT = {**ENCODER, "layer_types": ["full_attention", "sliding_attention"], "local_attention": 8}
MODERNBERT |= {"cls_token_id": 2, "sep_token_id": 3, "bos_token_id": 2, "eos_token_id": 3}
ENCODER_HEADS = ("Model", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")
# question answering stays last: the ONNX check exports each family's last task class
ENCODER_HEADS += ("ForMultipleChoice", "ForQuestionAnswering")
DECODER_HEADS = ("ForCausalLM",)


@dataclass(frozen=True)
class Family:
    config: str  # the transformers config class
    fields: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # class names are prefix + head, e.g. "Bert" + "ForMaskedLM"
    heads: tuple[str, ...] = ENCODER_HEADS
    names: dict[str, str] = field(default_factory=dict)  # head -> class name, where not prefix + head

    def class_name(self, head: str) -> str:
        return self.names.get(head, self.prefix + head)

    @property
    def decoder(self) -> bool:
        return self.heads == DECODER_HEADS


# fmt: off
FAMILIES: dict[str, Family] = {
    "bert": Family("BertConfig", ENCODER, "Bert"),
    "roberta": Family("RobertaConfig", {**ENCODER, "type_vocab_size": 1}, "Roberta"),
    "xlm-roberta": Family("XLMRobertaConfig", {**ENCODER, "type_vocab_size": 1}, "XLMRoberta"),
    "camembert": Family("CamembertConfig", {**ENCODER, "type_vocab_size": 1}, "Camembert"),
    "electra": Family("ElectraConfig", {**ENCODER, "embedding_size": 16}, "Electra"),
    "distilbert": Family("DistilBertConfig", DISTILBERT, "DistilBert"),
    "mpnet": Family("MPNetConfig", ENCODER, "MPNet"),
    "deberta-v2": Family("DebertaV2Config", DEBERTA_V3, "DebertaV2"),
    "deberta-v2-pos-proj": Family("DebertaV2Config", DEBERTA_POS, "DebertaV2"),
    "modernbert": Family("ModernBertConfig", MODERNBERT, "ModernBert"),
    "llama": Family("LlamaConfig", DECODER, "Llama", DECODER_HEADS),
    "mistral": Family("MistralConfig", DECODER, "Mistral", DECODER_HEADS),
    "qwen2": Family("Qwen2Config", DECODER, "Qwen2", DECODER_HEADS),
    "qwen3": Family("Qwen3Config", {**DECODER, "head_dim": 16}, "Qwen3", DECODER_HEADS),
    "gemma": Family("GemmaConfig", {**DECODER, "head_dim": 8}, "Gemma", DECODER_HEADS),
    "gemma2": Family("Gemma2Config", GEMMA2, "Gemma2", DECODER_HEADS),
    "gemma3": Family("Gemma3TextConfig", GEMMA3, "Gemma3", DECODER_HEADS),
    "granite": Family("GraniteConfig", GRANITE, "Granite", DECODER_HEADS),
    "olmo2": Family("Olmo2Config", MHA, "Olmo2", DECODER_HEADS),
    "opt": Family("OPTConfig", OPT, "OPT", DECODER_HEADS),
    "phi3": Family("Phi3Config", PHI3, "Phi3", DECODER_HEADS),
    "gpt2": Family("GPT2Config", GPT2, "GPT2", DECODER_HEADS, {"ForCausalLM": "GPT2LMHeadModel"}),
    "gpt_neox": Family("GPTNeoXConfig", NEOX, "GPTNeoX", DECODER_HEADS),
    "mixtral": Family("MixtralConfig", MIXTRAL, "Mixtral", DECODER_HEADS),
    "qwen2_moe": Family("Qwen2MoeConfig", QWEN2_MOE, "Qwen2Moe", DECODER_HEADS),
    "qwen3_moe": Family("Qwen3MoeConfig", QWEN3_MOE, "Qwen3Moe", DECODER_HEADS),
    "olmoe": Family("OlmoeConfig", OLMOE, "Olmoe", DECODER_HEADS),
}
# fmt: on

CASES: list[tuple[str, str]] = [(name, head) for name, fam in FAMILIES.items() for head in fam.heads]


def build(family: str, head: str, seed: int = 0) -> Any:
    """The tiny random-weight model of ``family`` with task class ``head`` (eval mode)."""
    import torch
    import transformers

    spec = FAMILIES[family]
    fields = {**spec.fields, "num_labels": 2} if head == "ForQuestionAnswering" else spec.fields
    config = getattr(transformers, spec.config)(**fields)
    torch.manual_seed(seed)
    return getattr(transformers, spec.class_name(head))(config).eval()


def main_head(family: str) -> str:
    """The task class the per-family checks use: a classifier for encoders, the LM for decoders."""
    return "ForCausalLM" if FAMILIES[family].decoder else "ForSequenceClassification"
