"""How well SmolLM2's pruned FFNs fit unseen text: calibration size, neuron selection, ridge.

    python benchmarks/ffn_fit.py                # writes benchmarks/ffn_fit.json, prints a table
    python benchmarks/ffn_fit.py --windows 16   # adds (replaces) the rows of one calibration size

A diagnostic of the 80 % target, layer by layer and without the rest of the pipeline. For every
third decoder layer, the Gram of the ``down_proj`` inputs is accumulated on N calibration windows
(128 tokens, packed from the OANC calibration lines as the benchmark does) and, separately, on 64
windows of the WSJ calibration portion (the validation text of ``validate.py``; no test split is
read). Neurons are chosen on the calibration Gram and the ``down_proj`` correction is fitted there;
the error that remains, ``‖Z Wᵀ − Z_S W_newᵀ‖²`` over the output, is then measured on both texts,
relative to the FFN's output energy ``‖Z Wᵀ‖²`` (mean over the layers, euclidean metric, original
activations). The rules: STAT's pivoting with next-layer column scales, and the exact greedy that
adds, at each step, the neuron lowering the output error most (``tr(W S Wᵀ)`` with ``S`` the
residual Gram), a reference for how far the scaled pivoting is from the objective. The correction
is solved by ``interpolation_matrix`` with a ridge of ``λ`` times the mean diagonal of the kept block
(λ = 0: the rounding-level floor every solve has).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import HERE, assets, ffn_fit_markdown

from statprune.adapters import adapter_for
from statprune.calibration import pack_examples, read_examples
from statprune.linalg import GramAccumulator, interpolation_matrix, select_columns
from statprune.persist import load, load_tokenizer

RIDGES = (0.0, 0.01, 0.1, 0.3)
KEEPS = (0.8, 0.6)


def down_proj_grams(model, tokenizer, path: Path, windows: int, seed: int, layers: list[int]) -> dict:
    """``ZᵀZ`` (float64) of every chosen layer's FFN output-projection input over packed windows."""
    batches = pack_examples(tokenizer, read_examples(path), windows, seed, seq_len=128, batch_size=16)
    width = ffn_output(model, layers[0]).in_features
    accumulators = {i: GramAccumulator(width, compute_dtype=torch.float64) for i in layers}
    handles = []
    for i, acc in accumulators.items():

        def hook(module, args, acc=acc):
            acc.add_batch(args[0].reshape(-1, args[0].shape[-1]))

        handles.append(ffn_output(model, i).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return {i: acc.finish().gram for i, acc in accumulators.items()}


def ffn_output(model, index: int) -> torch.nn.Linear:
    """Layer ``index``'s FFN output projection (``down_proj``), found through the model's adapter."""
    adapter = adapter_for(model.config)
    layer = adapter.layers(model.base_model)[index]
    return layer.get_submodule(adapter.ffn(layer).output)


def exact_greedy_order(gram: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Columns in the order that greedily lowers ``tr(W S Wᵀ)`` most, ``S`` the residual Gram."""
    schur = gram.clone()
    seen = weight @ schur
    m = gram.shape[0]
    chosen = torch.zeros(m, dtype=torch.bool)
    floor = 1e-12 * float(torch.diagonal(gram).max())
    order = []
    for _ in range(m):
        diag = torch.diagonal(schur)
        gain = (seen * seen).sum(0) / diag.clamp(min=floor)
        gain[chosen | (diag <= floor)] = -1.0
        j = int(torch.argmax(gain))
        if gain[j] < 0:
            break
        col, seen_j, pivot = schur[:, j].clone(), seen[:, j].clone(), float(schur[j, j])
        schur -= torch.outer(col, col) / pivot
        seen -= torch.outer(seen_j, col) / pivot
        chosen[j] = True
        order.append(j)
    return torch.tensor(order + [j for j in range(m) if not chosen[j]])


def relative_error(weight, order, keep, fit_gram, eval_gram, ridge) -> float:
    m = weight.shape[1]
    k = round(keep * m)
    kept, dropped = torch.sort(order[:k]).values, torch.sort(order[k:]).values
    interp = interpolation_matrix(fit_gram, kept, dropped, ridge)
    new = torch.zeros_like(weight)
    new[:, kept] = weight[:, kept] + weight[:, dropped] @ interp.T
    diff = weight - new
    return float(torch.trace(diff @ eval_gram @ diff.T) / torch.trace(weight @ eval_gram @ weight.T))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="128,512", help="calibration sizes to compare")
    parser.add_argument("--layer-step", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "ffn_fit.json")
    args = parser.parse_args()
    start = time.perf_counter()
    cache = assets.cache_dir()
    model = load(cache / "smollm2").eval()
    tokenizer = load_tokenizer(cache / "smollm2")
    layers = list(range(0, model.config.num_hidden_layers, args.layer_step))
    corpora = cache / "corpora"
    held_out = down_proj_grams(model, tokenizer, corpora / "wsj-calib.txt", 64, 1, layers)
    sizes = [int(w) for w in args.windows.split(",")]
    # rows of other calibration sizes are kept, so sizes can be added one run at a time
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    rows = [r for r in rows if r["calibration_windows"] not in sizes]
    for windows in sizes:
        fit = down_proj_grams(model, tokenizer, corpora / "oanc-calib.txt", windows, 0, layers)
        sums: dict[tuple, list[float]] = {}
        for i in layers:
            weight = ffn_output(model, i).weight.detach().double()
            orders = {
                "stat-pivoting": select_columns(fit[i], scale=torch.linalg.vector_norm(weight, dim=0)).order,
                "exact-greedy": exact_greedy_order(fit[i], weight),
            }
            for rule, order in orders.items():
                for keep in KEEPS:
                    for ridge in RIDGES:
                        for text, gram in (("calibration", fit[i]), ("wsj-validation", held_out[i])):
                            err = relative_error(weight, order, keep, fit[i], gram, ridge)
                            sums.setdefault((rule, keep, ridge, text), []).append(err)
            print(f"{windows} windows: layer {i} done ({time.perf_counter() - start:.0f} s)", flush=True)
        for (rule, keep, ridge, text), errs in sums.items():
            rows.append(
                {
                    "calibration_windows": windows,
                    "rule": rule,
                    "keep_neurons": keep,
                    "ridge": ridge,
                    "scored_on": text,
                    "relative_error": sum(errs) / len(errs),
                    "layers": layers,
                }
            )
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(ffn_fit_markdown(rows))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
