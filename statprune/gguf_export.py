"""``statprune export-gguf``: a compressed Llama/Mistral/Qwen2 decoder as a GGUF file for llama.cpp.

llama.cpp's plain ``llama`` architecture sizes every layer from the first layer's head count and
FFN length, so uneven widths do not load there. Its ``deci`` architecture (written for NVIDIA's
pruned Llama-3.1-Nemotron models) is the Llama block with per-layer widths: the loader reads
``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length``
as arrays with one entry per layer (``llama_model_loader::get_key_or_arr`` into ``n_head_arr``,
``n_head_kv_arr``, ``n_ff_arr``), creates each layer's tensors from its own widths and runs the
same RMSNorm / rotary attention / SwiGLU graph, with the optional ``attn_output.bias`` and
``ffn_down.bias`` that statprune's bias compensation adds. So this writer targets ``deci``.

Layers that lost every head or neuron get one all-zero head (zero query, key, value and output
weights: its output is exactly the output bias, or zero) or one all-zero neuron (its output is the
down projection's bias). This keeps bias compensation exact, keeps layer 0 (from which llama.cpp
derives the head size) non-empty, and avoids the attention-free and FFN-free special cases.

Query and key rows are permuted from Hugging Face's rotate-half rotary layout to llama.cpp's
adjacent-pair layout (the same reordering llama.cpp's converter applies to Llama checkpoints).
The tokenizer must be byte-level BPE (GPT-2 style, e.g. SmolLM2, Llama 3): its tokens, types and
merges, special token ids and chat template are written with the ``gguf`` library
(``gguf.SpecialVocab``).

Checked in llama.cpp itself (llama-cpp-python 0.3.36): ``benchmarks/serve_check.py`` and the slow
``tests/test_gguf.py::test_llama_cpp_computes_the_compressed_model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statprune.atomic import atomic_file
from statprune.errors import ModelError, OutputError, StatpruneError

ARCH = "deci"
SUPPORTED = ("llama", "mistral", "qwen2")
OUTTYPES = ("f32", "f16", "bf16")
# The pre-tokenizer splits of Llama 3's and Qwen2's tokenizer.json (llama.cpp's "llama-bpe" and
# "qwen2"; they differ in digits: runs of up to three, or one at a time).
_SPLIT_TAIL = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_SPLIT_HEAD = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
_SPLITS = {
    _SPLIT_HEAD + "|\\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",
    _SPLIT_HEAD + "|\\p{N}" + _SPLIT_TAIL: "qwen2",
}


if TYPE_CHECKING:
    import numpy as np
    import torch


class GGUFExportError(StatpruneError):
    """The model cannot be written as a GGUF file that llama.cpp runs faithfully."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("export-gguf needs the gguf package: pip install 'statprune[gguf]'") from None
    return gguf


# --- geometry ----------------------------------------------------------------------------------


def to_rope_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection (or bias) from rotate-half to adjacent pairs.

    Hugging Face rotates dimension ``i`` of each head with ``i + d/2``; llama.cpp's normal rotary
    mode rotates ``2i`` with ``2i + 1``. ``weight``: ``(n_heads * d, …)``; returns the same shape.
    """
    head_dim = weight.shape[0] // n_heads
    shape = weight.shape
    return weight.reshape(n_heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_exportable(config) -> None:
    """Refuse what llama.cpp's ``deci`` graph would not compute like transformers does."""
    family = config.model_type
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if family not in SUPPORTED or not arch.endswith("ForCausalLM"):
        raise GGUFExportError(
            f"export-gguf writes Llama-family causal LMs ({', '.join(SUPPORTED)}), not "
            f"{arch}; use export-onnx for other models"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"export-gguf needs SwiGLU FFNs (silu), not {config.hidden_act}")
    window = getattr(config, "sliding_window", None)
    if family == "mistral" and window is not None and window < config.max_position_embeddings:
        raise GGUFExportError(
            f"this Mistral model uses a sliding window of {window} tokens, which llama.cpp's deci "
            "architecture does not apply; it cannot be exported faithfully"
        )
    if family == "qwen2" and getattr(config, "use_sliding_window", False):
        raise GGUFExportError(
            "this Qwen2 model uses sliding-window attention, which llama.cpp's deci architecture "
            "does not apply; it cannot be exported faithfully"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3"):
        raise GGUFExportError(f"export-gguf supports default and llama3 rotary scaling, not {kind!r}")


def layer_widths(model) -> list[dict[str, Any]]:
    """Per layer: query heads, key/value heads and FFN neurons as llama.cpp will see them, with
    ``padded_heads`` / ``padded_ffn`` set where an empty block gets one all-zero unit."""
    from statprune.modeling_statprune import EmptyAttention

    head_dim = _head_dim(model.config)
    widths = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn, EmptyAttention):
            heads, kv, padded_heads = 1, 1, True
        else:
            heads, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
            padded_heads = False
        n_ff = mlp.gate_proj.out_features
        widths.append(
            {
                "heads": heads,
                "kv_heads": kv,
                "ffn": max(n_ff, 1),
                "padded_heads": padded_heads,
                "padded_ffn": n_ff == 0,
            }
        )
    return widths


def _zeros_like_rows(rows: int, cols: int) -> torch.Tensor:
    import torch

    return torch.zeros(rows, cols)


def _layer_tensors(layer, width: dict[str, Any], head_dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """The layer's GGUF tensors (Hugging Face ``(out, in)`` orientation), by GGUF name suffix."""
    t: dict[str, torch.Tensor] = {
        "attn_norm.weight": layer.input_layernorm.weight,
        "ffn_norm.weight": layer.post_attention_layernorm.weight,
    }
    import torch

    attn, mlp = layer.self_attn, layer.mlp
    if width["padded_heads"]:
        t["attn_q.weight"] = _zeros_like_rows(head_dim, hidden)
        t["attn_k.weight"] = _zeros_like_rows(head_dim, hidden)
        t["attn_v.weight"] = _zeros_like_rows(head_dim, hidden)
        t["attn_output.weight"] = _zeros_like_rows(hidden, head_dim)
        if attn.bias is not None:
            t["attn_output.bias"] = attn.bias
    else:
        heads, kv = width["heads"], width["kv_heads"]
        t["attn_q.weight"] = to_rope_pairs(attn.q_proj.weight, heads)
        t["attn_k.weight"] = to_rope_pairs(attn.k_proj.weight, kv)
        t["attn_v.weight"] = attn.v_proj.weight
        t["attn_output.weight"] = attn.o_proj.weight
        for proj, name, groups in ((attn.q_proj, "attn_q", heads), (attn.k_proj, "attn_k", kv)):
            if proj.bias is not None:
                t[f"{name}.bias"] = to_rope_pairs(proj.bias, groups)
        for proj, name in ((attn.v_proj, "attn_v"), (attn.o_proj, "attn_output")):
            if proj.bias is not None:
                t[f"{name}.bias"] = proj.bias
    if width["padded_ffn"]:
        t["ffn_gate.weight"] = _zeros_like_rows(1, hidden)
        t["ffn_up.weight"] = _zeros_like_rows(1, hidden)
        t["ffn_down.weight"] = _zeros_like_rows(hidden, 1)
        for proj, name in ((mlp.gate_proj, "ffn_gate"), (mlp.up_proj, "ffn_up")):
            if proj.bias is not None:
                t[f"{name}.bias"] = torch.zeros(1)
    else:
        t["ffn_gate.weight"] = mlp.gate_proj.weight
        t["ffn_up.weight"] = mlp.up_proj.weight
        t["ffn_down.weight"] = mlp.down_proj.weight
        for proj, name in ((mlp.gate_proj, "ffn_gate"), (mlp.up_proj, "ffn_up")):
            if proj.bias is not None:
                t[f"{name}.bias"] = proj.bias
    if mlp.down_proj.bias is not None:
        t["ffn_down.bias"] = mlp.down_proj.bias
    return t


def _rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (the divisor of each rotary frequency) for llama3 scaling,
    from transformers' own rotary initialisation (default frequencies / scaled ones)."""
    import torch

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = _head_dim(config)
    base = float(rope["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / scaled.double()).float()


# --- tokenizer ---------------------------------------------------------------------------------


def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json``.

    Raises ``GGUFExportError`` for a tokenizer that is not byte-level BPE, or whose pre-tokenizer
    is not one of the recognised ones (then ``--tokenizer-pre`` names it).
    """
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            "export-gguf writes byte-level BPE tokenizers (GPT-2 style, as in SmolLM2 or Llama 3); "
            f"this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") in _SPLITS:
        return _SPLITS[steps[0]["pattern"]["Regex"]]
    raise GGUFExportError(
        f"unrecognised pre-tokenizer {kinds}; pass --tokenizer-pre with llama.cpp's name for it "
        "(e.g. gpt-2, smollm, llama-bpe, qwen2)"
    )


def _vocab(tokenizer_json: dict[str, Any], n_vocab: int, gguf) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids ``0 … n_vocab - 1``."""
    by_id = {int(i): tok for tok, i in tokenizer_json["model"]["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tokenizer_json.get("added_tokens", []):
        i = int(added["id"])
        by_id[i] = added["content"]
        kinds[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id, default=-1) >= n_vocab:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(by_id)} but the embedding only {n_vocab} rows"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [int(kinds.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    return tokens, types


# --- writing -----------------------------------------------------------------------------------


def _array(tensor: torch.Tensor, outtype: str, gguf) -> tuple[np.ndarray, Any]:
    """(data, raw dtype) for ``GGUFWriter.add_tensor``; 1-D tensors (norms, biases) stay float32."""
    import numpy as np

    data = tensor.detach().float().cpu().contiguous().numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, None
    if outtype == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    outtype: str = "f16",
    tokenizer_pre_name: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the (compressed) causal LM in ``model_dir`` as a GGUF file for llama.cpp.

    ``outtype``: storage of the matrices (f32, f16 or bf16; norms and biases are float32).
    Returns a summary: path, per-layer ``head_count`` / ``head_count_kv`` / ``feed_forward_length``
    as written, ``padded_layers`` and the layers whose attention (``empty_attention``) or FFN
    (``empty_ffn``) was emptied, tokenizer pre-tokenizer, size in bytes. Written atomically (a temporary file
    renamed into place). Raises ``GGUFExportError`` for models or tokenizers llama.cpp cannot run
    faithfully, ``ModelError`` for unreadable folders, ``OutputError`` for a bad output path.
    """
    import torch

    from statprune.persist import check_model_dir, load, read_config

    gguf = _gguf()
    folder, out = Path(model_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    check_model_dir(folder)
    check_exportable(read_config(folder))
    if out.exists() and (out.is_dir() or not overwrite):
        raise OutputError(f"{out} exists; pass --overwrite or choose another file")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent} is not an existing folder")
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json (a fast tokenizer is needed)")
    try:
        tokenizer_json = json.loads(tok_file.read_text())
    except ValueError as exc:
        raise ModelError(f"cannot read {tok_file}: {exc}") from None

    model = load(folder, dtype=torch.float32)
    pre = tokenizer_pre_name or tokenizer_pre(tokenizer_json)
    config = model.config
    hidden, head_dim = int(config.hidden_size), _head_dim(config)
    widths = layer_widths(model)
    n_vocab = int(model.model.embed_tokens.weight.shape[0])
    tokens, types = _vocab(tokenizer_json, n_vocab, gguf)

    with atomic_file(out) as tmp:  # a .NAME.tmp-* folder beside out, renamed when complete
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(folder.resolve().name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(hidden)
        writer.add_block_count(len(widths))
        writer.add_feed_forward_length([w["ffn"] for w in widths])
        writer.add_head_count([w["heads"] for w in widths])
        writer.add_head_count_kv([w["kv_heads"] for w in widths])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
        writer.add_file_type(int(file_type.get(outtype, gguf.LlamaFileType.MOSTLY_BF16)))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)

        def add(name: str, tensor: torch.Tensor) -> None:
            data, raw = _array(tensor, outtype, gguf)
            writer.add_tensor(name, data, raw_dtype=raw)

        add("token_embd.weight", model.model.embed_tokens.weight)
        for i, (layer, width) in enumerate(zip(model.model.layers, widths, strict=True)):
            for suffix, tensor in _layer_tensors(layer, width, head_dim, hidden).items():
                add(f"blk.{i}.{suffix}", tensor)
        add("output_norm.weight", model.model.norm.weight)
        if not getattr(config, "tie_word_embeddings", False):
            add("output.weight", model.lm_head.weight)
        if (factors := _rope_factors(config)) is not None:
            add("rope_freqs.weight", factors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {
        "path": str(out),
        "architecture": ARCH,
        "head_count": [w["heads"] for w in widths],
        "head_count_kv": [w["kv_heads"] for w in widths],
        "feed_forward_length": [w["ffn"] for w in widths],
        "padded_layers": [i for i, w in enumerate(widths) if w["padded_heads"] or w["padded_ffn"]],
        "empty_attention": [i for i, w in enumerate(widths) if w["padded_heads"]],
        "empty_ffn": [i for i, w in enumerate(widths) if w["padded_ffn"]],
        "tokenizer_pre": pre,
        "size_bytes": out.stat().st_size,
    }


# --- command line ------------------------------------------------------------------------------


def add_gguf_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="write a compressed Llama-family LM as GGUF for llama.cpp (per-layer widths)",
    )
    p.add_argument("model", type=Path, help="model folder (compressed or not)")
    p.add_argument("out", type=Path, help="output .gguf file (written atomically)")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="matrix storage (default f16)")
    p.add_argument(
        "--tokenizer-pre",
        help="llama.cpp's pre-tokenizer name, when it is not recognised from tokenizer.json",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run_gguf(args: argparse.Namespace) -> int:
    summary = export_gguf(
        args.model, args.out, args.outtype, tokenizer_pre_name=args.tokenizer_pre, overwrite=args.overwrite
    )
    padded = summary["padded_layers"]
    print(f"wrote {summary['path']} ({summary['size_bytes'] / 2**20:.1f} MiB, llama.cpp architecture deci)")
    print("heads per layer   : " + " ".join(map(str, summary["head_count"])))
    print("kv heads per layer: " + " ".join(map(str, summary["head_count_kv"])))
    print("FFN per layer     : " + " ".join(map(str, summary["feed_forward_length"])))
    if padded:
        print(f"layers {padded} had no heads or no neurons left: written with one all-zero unit")
    return 0
