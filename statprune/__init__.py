"""statprune: shrink trained transformers without retraining (STAT).

Removes whole attention heads and FFN neurons chosen by interpolative decompositions of
calibration activations, and corrects the next layer so the outputs barely move.

    model, report = statprune.compress(model, tokenizer, texts, keep_flops=0.6)
    statprune.save(model, "pruned/", tokenizer=tokenizer, report=report)
    model = statprune.load("pruned/")
"""

__version__ = "0.1.0"

from statprune.compress import CompressionOptions, compress  # noqa: E402
from statprune.errors import StatpruneError  # noqa: E402
from statprune.persist import load, load_report, save  # noqa: E402
from statprune.report import CompressionReport, LayerReport  # noqa: E402

__all__ = [
    "CompressionOptions",
    "CompressionReport",
    "LayerReport",
    "StatpruneError",
    "__version__",
    "compress",
    "load",
    "load_report",
    "save",
]
