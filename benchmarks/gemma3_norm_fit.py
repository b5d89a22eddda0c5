"""Gemma-3-270M, one layer at a time: how a pruned block's error looks after Gemma's post-block
RMSNorm ("sandwich" norm), and whether STAT's correction, fitted to the block's output *before*
that norm, is mis-targeted.

    python benchmarks/gemma3_norm_fit.py --layers 12 --keep 0.7 --windows 64

For each layer: the FFN (``down_proj`` input, neurons chosen by column-pivoted QR of the
activations scaled by the weight columns' norms) and the attention (``o_proj`` input, whole heads
of 256 removed greedily by least-squares output error) keep ``--keep`` of their units; the kept
units' output weights are then refitted by least squares on ``--windows`` packed 128-token OANC
windows, either ``plain`` (what STAT does: every token's pre-norm error counts alike), ``weighted``
(each token's row scaled by 1/rms(y_t), y_t the dense block output: the first-order error after
the RMSNorm), ``ridge0.1``/``wridge0.1`` (the same damped by 0.1 x the mean Gram diagonal) or
``none`` (no correction). Printed: the relative error ‖Ŷ − Y‖/‖Y‖ before the norm and
‖N(Ŷ) − N(Y)‖/‖N(Y)‖ after it, on the fitting windows and on 8 held-out windows.
"""

from __future__ import annotations

import argparse

import scipy.linalg
import torch
import transformers
from common import assets

import statprune
from statprune.calibration import pack_examples


def _head_columns(heads: list[int], size: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])


def _greedy_heads(z: torch.Tensor, y: torch.Tensor, n_heads: int, size: int, keep: int) -> torch.Tensor:
    """Columns of the heads left after removing, one at a time, the head whose removal (with a
    least-squares refit) leaves the smallest output error, until ``keep`` columns remain."""
    heads = list(range(n_heads))

    def cost(h: int) -> float:
        c = _head_columns([g for g in heads if g != h], size)
        return float((z[:, c] @ torch.linalg.lstsq(z[:, c], y).solution - y).norm())

    while len(heads) * size > keep:
        heads.remove(min(heads, key=cost))
    return _head_columns(heads, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="12", help="comma-separated layer indices")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of neurons / heads kept")
    parser.add_argument("--windows", type=int, default=64, help="fitting windows (8 more are held out)")
    args = parser.parse_args()
    folder, corpora = assets.ensure("gemma3"), assets.ensure("corpora")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = statprune.load(folder).eval()
    texts = (corpora / "oanc-calib.txt").read_text().splitlines()
    batches = pack_examples(tokenizer, texts, args.windows + 8, 0, seq_len=128, batch_size=8)
    layers = [int(x) for x in args.layers.split(",")]
    inputs: dict[tuple[str, int], list[torch.Tensor]] = {}

    def recorder(key):
        return lambda module, a: inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))

    for i in layers:
        layer = model.model.layers[i]
        layer.mlp.down_proj.register_forward_pre_hook(recorder(("down", i)))
        layer.self_attn.o_proj.register_forward_pre_hook(recorder(("o", i)))
    torch.set_grad_enabled(False)
    for b in batches:
        model.model(
            input_ids=b.inputs["input_ids"], attention_mask=b.inputs["attention_mask"], use_cache=False
        )
    split = args.windows * 128

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for i in layers:
        layer = model.model.layers[i]
        blocks = (
            ("down", layer.mlp.down_proj, layer.post_feedforward_layernorm, 1),
            ("o", layer.self_attn.o_proj, layer.post_attention_layernorm, model.config.head_dim),
        )
        for name, module, norm, group in blocks:
            z = torch.cat(inputs[(name, i)]).double()
            w = module.weight.double()
            y = z @ w.T
            weights = 1 / y.pow(2).mean(-1).sqrt()
            zf, yf, wf = z[:split], y[:split], weights[:split]
            width = z.shape[1]
            k = round(args.keep * width / group) * group
            if group == 1:
                _, _, pivots = scipy.linalg.qr((zf * w.norm(dim=0)).numpy(), mode="economic", pivoting=True)
                kept = torch.tensor(sorted(pivots[:k]))
            else:
                kept = _greedy_heads(zf, yf, width // group, group, k)
            fits = (("none", None, 0.0), ("plain", 1.0, 0.0), ("weighted", wf, 0.0))
            fits += (("ridge0.1", 1.0, 0.1), ("wridge0.1", wf, 0.1))
            for fit, rw, ridge in fits:
                if rw is None:
                    coef = w[:, kept].T
                else:
                    a = zf[:, kept] * (rw[:, None] if isinstance(rw, torch.Tensor) else rw)
                    gram = a.T @ a
                    gram += ridge * gram.diagonal().mean() * torch.eye(len(kept), dtype=gram.dtype)
                    target = yf * (rw[:, None] if isinstance(rw, torch.Tensor) else rw)
                    coef = torch.linalg.solve(gram, a.T @ target)
                for part, zx, yx in (("fit", zf, yf), ("held-out", z[split:], y[split:])):
                    pred = zx[:, kept] @ coef
                    after = rel(norm(pred.float()).double(), norm(yx.float()).double())
                    print(
                        f"layer {i} {name:4s} keep {k}/{width} fit {fit:9s} {part:8s}: "
                        f"pre-norm {rel(pred, yx):.4f}  post-norm {after:.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
