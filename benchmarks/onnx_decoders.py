"""KV-cache ONNX export of every decoder family, driven by a greedy loop in onnxruntime.

    python benchmarks/onnx_decoders.py [FAMILY ...]     # -> benchmarks/onnx_decoders.json

For each family of ``tests/families.py`` (tiny random-weight ``…ForCausalLM``, compressed by STAT
to 50 % FLOPs, so layers keep uneven heads): ``export_onnx(folder, folder)`` (KV cache on, checked
by its own prefill + cached-step verification), then ``statprune.export.greedy_generate`` on a
left-padded batch of two prompts for 6 tokens against transformers' cached greedy ``generate``:
whether the tokens are the same, and the relative error of the per-step logits.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common  # noqa: F401  (puts tests/ on the import path: the tiny families)

HERE = Path(__file__).resolve().parent


def check(family: str, root: Path) -> dict:
    import numpy as np
    import torch
    from conftest import _build_tiny_tokenizer, tiny_texts
    from families import build

    import statprune
    from statprune.export import export_onnx, greedy_generate, onnx_session, relative_error

    start = time.perf_counter()
    tokenizer = _build_tiny_tokenizer()
    model = build(family, "ForCausalLM")
    pruned, report = statprune.compress(
        model, tokenizer, tiny_texts(200), keep_flops=0.5, seq_len=32, samples=64, progress=False
    )
    folder = statprune.save(pruned, root / family, tokenizer=tokenizer)
    result = export_onnx(folder, folder)
    loaded = statprune.load(folder)
    loaded.generation_config.eos_token_id = None  # all 6 steps, as greedy_generate
    ids = torch.tensor([[0, 0, 2, 6, 7, 8, 9, 10], [2, 11, 12, 13, 14, 15, 16, 17]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    tokens, logits = greedy_generate(onnx_session(result.path), ids.numpy(), mask.numpy(), 6)
    return {
        "heads_kept_per_layer": [len(layer.heads_kept) for layer in report.layers],
        "verified_relative_error": result.relative_error,
        "same_tokens_as_transformers_cached_generate": bool(np.array_equal(tokens, out.sequences[:, 8:])),
        "logits_relative_error": relative_error(logits, torch.stack(out.logits, 1).numpy()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str]) -> int:
    from families import FAMILIES

    warnings.simplefilter("ignore")
    families = argv or [name for name, fam in FAMILIES.items() if fam.decoder]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            try:
                results[family] = check(family, Path(tmp))
            except Exception as exc:  # a family that fails is a result too
                results[family] = {"error": str(exc).strip().splitlines()[0][:300]}
            print(family, results[family], flush=True)
    command = "python benchmarks/onnx_decoders.py" + "".join(f" {f}" for f in argv)
    payload = {"command": command, "results": results}
    (HERE / "onnx_decoders.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
