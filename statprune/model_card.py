"""The model card (``README.md``) written into every output folder.

Rendered with ``huggingface_hub.ModelCard`` from the Jinja template below: YAML metadata the Hub
reads (library, pipeline tag, licence and language kept from the input's own card), then what was
removed (heads and FFN neurons per layer), the budget and the achieved fractions, a description of
the calibration data (its name, example and token counts; never the data), the measured quality
when known, and how to load and serve the folder.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from statprune import st_folder
from statprune.report import CompressionReport

# Metadata of the input's card that still describes the compressed model.
_KEPT_METADATA = ("license", "language", "pipeline_tag", "library_name", "tags")

_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
)

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ source_line }} compressed with statprune (STAT, *Shrinking Transformers
After Training*, Flynn et al. 2024): whole attention heads and FFN neurons were removed without
retraining and the next layer's weights corrected by least squares on calibration activations.

## What was removed

{% if report %}
- Budget: keep {{ "%.0f"|format(report.budget * 100) }} % of the attention + FFN {{ report.budget_kind }}
  (FLOPs counted at sequence length {{ report.seq_len }}).
- Achieved: {{ "%.1f"|format(report.flops_kept * 100) }} % of the FLOPs
  ({{ "%.3f"|format(report.flops_before / 1e9) }} G → {{ "%.3f"|format(report.flops_after / 1e9) }} G) and
  {{ "%.1f"|format(report.params_kept * 100) }} % of the attention + FFN parameters
  ({{ "%.2f"|format(report.params_before / 1e6) }} M → {{ "%.2f"|format(report.params_after / 1e6) }} M).
- Method: `{{ report.options.get("method", "stat") }}`; every option is in `statprune.json`.

| layer | heads kept | FFN neurons kept |
|---|---|---|
{% for row in rows -%}
| {{ row | join(" | ") }} |
{% endfor %}
Total: {{ totals[0] }} of {{ totals[1] }} heads and {{ totals[2] }} of {{ totals[3] }} FFN neurons kept.
{% else %}
No compression report was given; the per-layer widths are in `config.json` (`statprune_ops`).
{% endif %}
{% if experts %}

Mixture-of-experts layers, FFN neurons kept per expert (routed experts in order{{ shared_note }}):

| layer | routed experts |{{ " shared expert |" if shared_note }}
|---|---|{{ "---|" if shared_note }}
{% for row in experts -%}
| {{ row | join(" | ") }} |
{% endfor %}
{% endif %}

Weights are stored in {{ dtype }}.

## Calibration data

{% if report %}
{{ calibration }}: {{ report.calibration_examples }} examples, {{ report.calibration_tokens }} tokens
(at most {{ report.seq_len }} per example). The data itself is not part of this folder.
{% else %}
Not recorded.
{% endif %}

## Quality

{% if quality %}
| metric | value |
|---|---|
{% for name, value in quality.items() -%}
| {{ name }} | {{ value }} |
{% endfor %}
{% else %}
Not measured when this folder was written. Measure it on your own data, against the original:
`statprune eval {{ folder_name }} --data checks.jsonl --against ORIGINAL_MODEL`.
{% endif %}

## Load and serve

With statprune installed (no remote code is run):

```python
import statprune
model = statprune.load("{{ folder_name }}")
```

With transformers alone{% if compressed %} (the folder ships `modeling_statprune.py`, which rebuilds the
uneven layer widths on the stock classes, so remote code must be allowed){% endif %}:

```python
from transformers import {{ auto_class }}, AutoTokenizer
model = {{ auto_class }}.from_pretrained("{{ folder_name }}"{{ trust }})
tokenizer = AutoTokenizer.from_pretrained("{{ folder_name }}"{{ trust }})
```
{% if compressed %}
Without `trust_remote_code=True` transformers refuses the folder (its `model_type` is
`{{ model_type }}`); never load it with `ignore_mismatched_sizes=True`, which would re-initialise
the pruned layers.
{% endif %}
{% if sentence_transformers %}
As a sentence-transformers model ({{ modules }}, kept from the input):

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{{ folder_name }}"{{ trust }})
embeddings = model.encode(["first sentence", "second sentence"])
```
{% endif %}
{% if decoder %}
For llama.cpp, `statprune export-gguf {{ folder_name }} model.gguf` writes a GGUF file with the
per-layer head counts and FFN lengths (Llama, Mistral, Qwen2).
{% if compressed %}
Engines that build the stock architecture from the standard config fields (vLLM, TGI, MLX) cannot
represent per-layer widths; `statprune compress … --uniform` writes a model they can load.
{% else %}
The folder uses the stock architecture with its standard config fields, so engines that read them
(e.g. vLLM: `LLM("{{ folder_name }}")`) need no remote code.
{% endif %}
{% endif %}
ONNX Runtime: `statprune export-onnx {{ folder_name }} {{ folder_name }}` writes `onnx/model.onnx`
{%- if decoder %} (with a KV cache: `past_key_values.*` in, `present.*` out)
{%- elif sentence_transformers %} (with a `sentence_embedding` output: pooling in the graph)
{%- endif %}.
"""


@dataclass
class ExpertWidths:
    """One MoE layer's FFN widths (neurons) per expert, kept and before compression."""

    layer: int
    routed: list[int]
    routed_before: list[int]
    shared: list[int]  # Qwen2-MoE's shared expert (empty when the layer has none)
    shared_before: list[int]

    def describe(self) -> str:
        """``routed 16, 21, 10, 10 of 32 each; shared 15 of 16``."""
        text = f"routed {_joined(self.routed)} of {_of(self.routed_before)}"
        if self.shared:
            text += f"; shared {_joined(self.shared)} of {_of(self.shared_before)}"
        return text


def _joined(widths: list[int]) -> str:
    return ", ".join(str(w) for w in widths)


def _of(widths: list[int]) -> str:
    return f"{widths[0]} each" if len(set(widths)) == 1 and len(widths) > 1 else _joined(widths)


def _shared(e: ExpertWidths) -> str:
    return f"{_joined(e.shared)} of {_joined(e.shared_before)}" if e.shared else "—"


def expert_widths(ops: list[dict] | None) -> list[ExpertWidths]:
    """Each MoE layer's per-expert widths, from a saved config's ``statprune_ops``: the ``experts``
    / ``shared_experts`` ops give the widths before compression (the shared experts last,
    ``shared`` of them), the later ``attrs`` ops on that experts module the kept ones (see
    ``modeling_statprune.apply_op``). Layers in order; empty for a model without experts."""
    found: dict[str, tuple[list[int], list[int], int]] = {}  # experts module path -> before, now, shared
    for op in ops or []:
        if op.get("op") in ("experts", "shared_experts"):
            path = op["path"] if op["op"] == "experts" else f"{op['path']}.experts"
            found[path] = (list(op["widths"]), list(op["widths"]), int(op.get("shared", 0)))
        elif op.get("op") == "attrs" and op.get("path") in found and "widths" in op.get("values", {}):
            before, _, shared = found[op["path"]]
            found[op["path"]] = (before, list(op["values"]["widths"]), shared)
    layers = []
    for path, (before, now, shared) in found.items():
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        split = len(before) - shared
        layers.append(
            ExpertWidths(
                int(match.group(1)) if match else len(layers),
                now[:split],
                before[:split],
                now[split:],
                before[split:],
            )
        )
    return sorted(layers, key=lambda e: e.layer)


def _auto_class(model: nn.Module) -> str:
    arch = type(model).__name__
    return next((auto for suffix, auto in _AUTO_CLASSES if arch.endswith(suffix)), "AutoModel")


def _source_metadata(source: Path | None) -> dict[str, Any]:
    """The metadata of the input's own ``README.md`` worth keeping (empty when there is none)."""
    if source is None or not (source / "README.md").is_file():
        return {}
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        data = ModelCard.load(source / "README.md", ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card without valid metadata is still a card: keep none of it
        return {}
    return {k: data[k] for k in _KEPT_METADATA if data.get(k)}


def render(
    model: nn.Module,
    report: CompressionReport | None,
    folder: Path,
    source: Path | None = None,
    calibration_data: str | None = None,
    quality: dict[str, Any] | None = None,
    sentence_transformers: bool = False,
) -> str:
    """The model card of ``model`` saved into ``folder`` (the Markdown text of ``README.md``).

    ``source`` is the input model folder (its card's licence, language and tags are kept; its
    sentence-transformers modules described), ``calibration_data`` a description of the data
    (e.g. the file name), ``quality`` a mapping of metric names to measured values.
    """
    config = model.config
    metadata = _source_metadata(source)
    tags = [t for t in metadata.pop("tags", []) if isinstance(t, str)]
    tags = list(dict.fromkeys([*tags, "statprune", "pruned"]))
    if sentence_transformers:
        metadata.setdefault("library_name", "sentence-transformers")
        metadata.setdefault("pipeline_tag", "sentence-similarity")
    else:
        metadata["library_name"] = "transformers"
    card_data = ModelCardData(tags=tags, **metadata)
    compressed = bool(getattr(config, "statprune_ops", None))
    layers = report.layers if report is not None else []
    name = source.name if source is not None else (report.source_model if report else None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    experts = expert_widths(getattr(config, "statprune_ops", None))
    has_shared = any(e.shared for e in experts)
    values = {
        "title": f"{Path(name).name} (pruned)" if name else "Pruned model",
        "source_line": f"`{Path(name).name}`" if name else "This model",
        "report": report,
        "rows": [
            (
                lr.layer,
                f"{len(lr.heads_kept)} / {lr.heads_total}",
                f"{len(lr.neurons_kept)} / {lr.neurons_total}",
            )
            for lr in layers
        ],
        "totals": (
            sum(len(lr.heads_kept) for lr in layers),
            sum(lr.heads_total for lr in layers),
            sum(len(lr.neurons_kept) for lr in layers),
            sum(lr.neurons_total for lr in layers),
        ),
        "experts": [
            (e.layer, f"{_joined(e.routed)} of {_of(e.routed_before)}", *([_shared(e)] if has_shared else []))
            for e in experts
        ],
        "shared_note": "; the shared expert runs on every token" if has_shared else "",
        "trust": ", trust_remote_code=True" if compressed else "",
        "calibration": f"`{calibration_data}`" if calibration_data else "Calibration data (not named)",
        "quality": quality or {},
        "folder_name": folder.name,
        "compressed": compressed,
        "model_type": f"statprune_{config.model_type}",
        "auto_class": _auto_class(model),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        "sentence_transformers": sentence_transformers,
        "decoder": bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM"),
    }
    if sentence_transformers and source is not None:
        modules = st_folder.read_modules(source) or []
        values["modules"] = st_folder.describe(modules)
        if (length := st_folder.max_seq_length(source)) is not None:
            values["modules"] += f", max sequence length {length}"
    card = ModelCard.from_template(card_data, template_str=TEMPLATE, **values)
    return str(card)
