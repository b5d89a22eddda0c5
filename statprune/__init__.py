"""statprune: shrink trained transformers without retraining (STAT).

Removes whole attention heads and FFN neurons chosen by interpolative decompositions of
calibration activations, and corrects the next layer so the outputs barely move.

    model, report = statprune.compress(model, tokenizer, texts, keep_flops=0.6)
    statprune.save(model, "pruned/", tokenizer=tokenizer, report=report)
    model = statprune.load("pruned/")

The heavy modules (torch, transformers) are imported on first use, so the command line answers
Ctrl-C and ``--help`` at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "AnalysisCache": "statprune.pipeline.execution",
    "CompressionOptions": "statprune.options",
    "compress": "statprune.driver",
    "OptionsError": "statprune.errors",
    "StatpruneError": "statprune.errors",
    "load": "statprune.persist",
    "load_report": "statprune.persist",
    "save": "statprune.persist",
    "CompressionReport": "statprune.report",
    "LayerReport": "statprune.report",
}

if TYPE_CHECKING:
    from statprune.driver import compress
    from statprune.errors import OptionsError, StatpruneError
    from statprune.options import CompressionOptions
    from statprune.persist import load, load_report, save
    from statprune.pipeline.execution import AnalysisCache
    from statprune.report import CompressionReport, LayerReport


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'statprune' has no attribute {name!r}")


__all__ = [
    "AnalysisCache",
    "CompressionOptions",
    "CompressionReport",
    "LayerReport",
    "OptionsError",
    "StatpruneError",
    "__version__",
    "compress",
    "load",
    "load_report",
    "save",
]
