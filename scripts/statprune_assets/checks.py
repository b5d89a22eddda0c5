"""Summaries of a loaded model and tokenizer, and the check that an encoder folder loads."""

from __future__ import annotations

from .cache import AssetError

_SIM_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
]


def config_summary(cfg) -> dict:
    keys = [
        "model_type",
        "architectures",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "dtype",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    ]
    out = {}
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            out[k] = v if isinstance(v, (int, float, str, bool, list, dict)) else str(v)
    return out


def tok_summary(tok) -> dict:
    return {
        "class": type(tok).__name__,
        "pad_token": tok.pad_token,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "unk_token": tok.unk_token,
        "vocab": len(tok),
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }


def model_summary(model, tok) -> dict:
    """What a worker reports of a loaded model: class, main config fields, parameters, tokenizer."""
    return {
        "model_class": type(model).__name__,
        "config": config_summary(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer": tok_summary(tok),
    }


def worker_verify_encoder(folder: str) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model, loading = AutoModel.from_pretrained(folder, output_loading_info=True)
    model.eval()
    missing = [k for k in loading.get("missing_keys", []) if "pooler" not in k]
    if missing or loading.get("mismatched_keys"):
        raise AssetError(
            f"weights do not match the model: missing={missing[:5]} "
            f"mismatched={list(loading.get('mismatched_keys', []))[:5]}"
        )
    batch = tok(_SIM_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    if not torch.isfinite(emb).all():
        raise AssetError("non-finite embeddings")
    sim_close, sim_far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    if not sim_close > sim_far:
        raise AssetError(
            f"embeddings look wrong: sim(paraphrase)={sim_close:.3f} <= sim(unrelated)={sim_far:.3f}"
        )
    described = model_summary(model, tok)
    cfg, params = described["config"], described["params"]
    return {
        **described,
        "loading": {k: list(v)[:10] for k, v in loading.items() if v},
        "sim_paraphrase": round(sim_close, 4),
        "sim_unrelated": round(sim_far, 4),
        "summary": (
            f"{type(model).__name__} {cfg.get('num_hidden_layers')}L "
            f"h{cfg.get('hidden_size')} {params / 1e6:.1f}M params, mean-pooled cos "
            f"paraphrase {sim_close:.3f} vs unrelated {sim_far:.3f}"
        ),
    }
