"""Running one layer over the calibration batches with hooks that stream its statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from statprune.adapters import ModelAdapter
from statprune.guards import non_finite
from statprune.linalg import CrossAccumulator, GramAccumulator
from statprune.options import CompressionOptions
from statprune.pipeline.records import Calibration, LayerStats


def layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Remove ``handles`` afterwards; non-finite activations met by an accumulator are a ModelError."""
    try:
        yield
    except FloatingPointError as exc:
        raise non_finite(str(exc).replace(" contain NaN or Inf", "")) from None
    finally:
        for h in handles:
            h.remove()


def finite(out: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise non_finite("activations", out.dtype)
    return out


def run_layer(
    layer: nn.Module,
    calib: Calibration,
    inputs: list[torch.Tensor],
    stats: LayerStats | None,
    hooks: dict[str, GramAccumulator],
) -> list[torch.Tensor]:
    """Run one layer over every batch; stream the hooked activations into the accumulators."""
    current: dict[str, torch.Tensor] = {}
    handles = []
    for path, acc in hooks.items():

        def pre_hook(module, args, acc=acc):
            if hasattr(acc, "add_call"):  # routed experts: their weighted activations (statprune.moe)
                acc.add_call(module, args, current["mask"])
                return
            x = args[0]
            acc.add_batch(x.reshape(-1, x.shape[-1])[current["mask"]])

        handles.append(layer.get_submodule(path).register_forward_pre_hook(pre_hook))
    outputs = []
    with hooked(handles):
        for hidden, args, kwargs, mask in zip(inputs, calib.args, calib.kwargs, calib.masks, strict=True):
            current["mask"] = mask.reshape(-1)
            if stats is not None:
                stats.add_token_energy(hidden.reshape(-1, hidden.shape[-1])[current["mask"]])
            outputs.append(finite(layer_output(layer(hidden, *args, **kwargs))))
    return outputs


def new_stats(
    adapter: ModelAdapter, layer: nn.Module, options: CompressionOptions, device: torch.device
) -> LayerStats:
    """Empty accumulators for the blocks of ``layer`` that may be pruned."""
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    dtype = getattr(torch, options.gram_dtype)
    neurons = None
    if "neurons" in options.prune and ffn.width and ffn.experts is not None:  # a Gram per routed expert
        from statprune.moe import ExpertGramAccumulator

        name = f"layer {getattr(getattr(layer, attn.block, None), 'layer_idx', '?')}"
        neurons = ExpertGramAccumulator(ffn.experts, device, dtype, name)
    elif "neurons" in options.prune and ffn.width:
        neurons = GramAccumulator(ffn.width, device, dtype)
    return LayerStats(
        heads=GramAccumulator(attn.n_heads * attn.head_dim, device, dtype)
        if "heads" in options.prune and attn.n_heads
        else None,
        neurons=neurons,
    )


def collect(
    adapter: ModelAdapter,
    layer: nn.Module,
    calib: Calibration,
    inputs: list[torch.Tensor],
    options: CompressionOptions,
    device: torch.device,
    uses_activations: bool = True,
) -> tuple[LayerStats, list[torch.Tensor]]:
    """The layer's statistics on ``inputs`` and its outputs. Without ``uses_activations`` (a
    method that reads weights only) nothing is run: the inputs pass through unused."""
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    stats = new_stats(adapter, layer, options, device)
    if not uses_activations:
        return stats, inputs
    hooks = {}
    if stats.heads is not None:
        hooks[attn.o] = stats.heads
    if stats.neurons is not None:
        hooks[ffn.probe or ffn.output] = stats.neurons
    outputs = run_layer(layer, calib, inputs, stats, hooks)
    return stats, outputs


def collect_with_targets(
    adapter: ModelAdapter,
    layer: nn.Module,
    calib: Calibration,
    inputs: list[torch.Tensor],
    originals: list[torch.Tensor],
    options: CompressionOptions,
    device: torch.device,
) -> tuple[LayerStats, list[torch.Tensor], list[torch.Tensor]]:
    """Statistics on the pruned model's inputs plus the correction targets.

    Every batch runs through the (still unpruned) layer twice: on the original model's inputs,
    recording each block's output there, and on the pruned model's inputs, streaming the Gram
    matrices and ``ZᵀΔ`` for the shifts Δ from each block's output to its target. Returns the
    statistics, the outputs on the pruned inputs and those on the original inputs (the next
    layer's original inputs).
    """
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    stats = new_stats(adapter, layer, options, device)
    blocks = {"heads": (attn.o, stats.heads), "neurons": (ffn.probe or ffn.output, stats.neurons)}
    blocks = {name: block for name, block in blocks.items() if block[1] is not None}
    dtype = getattr(torch, options.gram_dtype)
    out_path = {"heads": attn.o, "neurons": ffn.output}
    shifts = {}
    for name, (_, acc) in blocks.items():
        out_width = layer.get_submodule(out_path[name]).weight.shape[0]
        if hasattr(acc, "track_targets"):  # routed experts: ZᵀΔ filled expert by expert (statprune.moe)
            shifts[name] = acc.track_targets(out_width)
        else:
            shifts[name] = CrossAccumulator(acc.width, out_width, device, dtype)
    stats.head_targets, stats.neuron_targets = shifts.get("heads"), shifts.get("neurons")
    current: dict = {}
    seen: dict[str, torch.Tensor] = {}  # this batch's block inputs and outputs, per pass

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[current["mask"]]

    def block_hooks(name: str, acc: GramAccumulator):
        def before(module, args):
            if current["pass"] == "pruned" and not hasattr(acc, "add_call"):
                seen[f"in:{name}"] = rows(args[0])
                acc.add_batch(seen[f"in:{name}"])

        def after(module, args, output):
            seen[f"{current['pass']}:{name}"] = rows(output)
            if current["pass"] == "pruned" and hasattr(acc, "add_call"):
                # routed experts: the shift is known once the block has run, so their rows are
                # computed here, expert by expert, for the Gram and ZᵀΔ together (no dense z~)
                shift = seen[f"original:{name}"] - seen[f"pruned:{name}"]
                acc.add_call(module, args, current["mask"], shift)

        return before, after

    handles = []
    for name, (path, acc) in blocks.items():
        before, after = block_hooks(name, acc)
        module = layer.get_submodule(path)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    outputs, original_outputs = [], []
    with hooked(handles):
        batches = zip(inputs, originals, calib.args, calib.kwargs, calib.masks, strict=True)
        for hidden, original, args, kwargs, mask in batches:
            current["mask"] = mask.reshape(-1)
            current["pass"] = "original"
            original_outputs.append(finite(layer_output(layer(original, *args, **kwargs))))
            current["pass"] = "pruned"
            stats.add_token_energy(rows(hidden))
            outputs.append(finite(layer_output(layer(hidden, *args, **kwargs))))
            for name, acc in shifts.items():  # how far the block's output must move
                if f"in:{name}" in seen:  # (routed experts: added by their hook)
                    acc.add_batch(seen[f"in:{name}"], seen[f"original:{name}"] - seen[f"pruned:{name}"])
            seen.clear()
    return stats, outputs, original_outputs


def output_error(
    outputs: list[torch.Tensor], reference: list[torch.Tensor], masks: list[torch.Tensor]
) -> float:
    """``‖y_pruned − y‖ / ‖y‖`` over the real tokens of every batch."""
    num = den = 0.0
    for out, ref, mask in zip(outputs, reference, masks, strict=True):
        m = mask.reshape(-1)
        o = out.reshape(-1, out.shape[-1])[m].double()
        r = ref.reshape(-1, ref.shape[-1])[m].double()
        num += float(((o - r) ** 2).sum())
        den += float((r * r).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0
