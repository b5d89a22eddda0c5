"""The compression report: what was kept, what it costs, how well it reconstructs.

Saved as ``statprune.json`` beside the model and printed by ``statprune info``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerReport:
    layer: int
    heads_total: int
    heads_kept: list[int]
    neurons_total: int
    neurons_kept: list[int]
    attention_error: float  # relative reconstruction error of the attention block (calibration)
    ffn_error: float  # relative reconstruction error of the FFN block (calibration)
    # ‖y_pruned − y‖ / ‖y‖ of the layer output on its calibration inputs; None when not measured
    # (with original activations the pruned layers are never run)
    output_error: float | None


@dataclass
class CompressionReport:
    """Everything ``statprune.json`` records about one compression run."""

    budget_kind: str  # "flops", "params" or "latency"
    budget: float
    flops_kept: float
    params_kept: float
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seq_len: int
    calibration_examples: int
    calibration_tokens: int
    options: dict[str, Any]
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    source_model: str | None = None
    architecture: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_device_mb: float | None = None
    # latency budgets: predicted and measured latency (statprune.latency.LatencyReport.to_dict())
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["latency"] is None:  # only latency budgets record it
            del data["latency"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        data = dict(data)
        data["layers"] = [LayerReport(**layer) for layer in data.get("layers", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CompressionReport:
        return cls.from_dict(json.loads(path.read_text()))

    def summary(self) -> str:
        """A human-readable table: sizes before/after and the per-layer counts."""
        lines = [
            f"budget        : keep {self.budget:.0%} of {self.budget_kind} (seq len {self.seq_len})",
            f"FLOPs         : {self.flops_before / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G "
            f"({self.flops_kept:.1%} kept)",
            f"parameters    : {self.params_before / 1e6:.2f} M -> {self.params_after / 1e6:.2f} M "
            f"({self.params_kept:.1%} kept; attention + FFN)",
            *([_latency_line(self.latency)] if self.latency else []),
            f"calibration   : {self.calibration_examples} examples, {self.calibration_tokens} tokens",
            "options       : " + ", ".join(f"{k}={v}" for k, v in self.options.items() if k != "device"),
            f"time          : {self.seconds:.1f} s",
            "",
            "layer  heads kept  neurons kept   attn err   ffn err   layer out err",
        ]
        for lr in self.layers:
            lines.append(
                f"{lr.layer:>5}  {len(lr.heads_kept):>4} / {lr.heads_total:<4} "
                f"{len(lr.neurons_kept):>6} / {lr.neurons_total:<6}"
                f"{lr.attention_error:>9.4f} {lr.ffn_error:>9.4f} {_optional(lr.output_error):>14}"
            )
        return "\n".join(lines)


def _optional(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _latency_line(latency: dict[str, Any]) -> str:
    measured = latency.get("measured_fraction")
    where = f"{latency['kind']}, batch {latency['batch']} x {latency['seq_len']} tokens, {latency['device']}"
    text = (
        f"latency       : predicted {latency['predicted_ms']:.1f} ms of {latency['dense_ms']:.1f} ms "
        f"({latency['predicted_fraction']:.1%})"
    )
    if measured is not None:
        text += f", measured {latency['measured_ms']:.1f} ms ({measured:.1%})"
    return text + f" [{where}]"
