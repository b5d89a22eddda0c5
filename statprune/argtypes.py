"""Small helpers shared by the command-line parsers (kept free of heavy imports)."""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def fraction(text: str) -> float:
    """argparse type: a number (range checks belong to the budget validation)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.6") from None


def current_umask() -> int:
    """The process umask (new output folders get ordinary permissions, not mkdtemp's 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_device(name: str | None):
    """``auto`` → CUDA when available, else CPU; a clear error for a missing GPU or a bad name."""
    import torch

    from statprune.errors import DeviceError

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str | None):
    """A torch dtype name (``float32``, ``bfloat16``, ``float16``) as a ``torch.dtype``; None stays
    None (the checkpoint's own dtype). Raises ``DataError`` for any other name."""
    import torch

    from statprune.errors import DataError

    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DataError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype
