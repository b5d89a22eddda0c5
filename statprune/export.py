"""Export a model folder (compressed or not) to ONNX, then check it against PyTorch.

The model goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` tracing; the
legacy TorchScript exporter gives wrong outputs with transformers 5 and is never used) with
dynamic batch and sequence axes. Inputs are ``input_ids`` and ``attention_mask`` (and
``token_type_ids`` when the model has more than one token type); the output is ``logits`` for
task heads (``start_logits``/``end_logits`` for question answering) and ``last_hidden_state`` for
base models. Causal LMs are exported without a KV cache (``use_cache=False``): full-sequence
logits, not a generation loop.

After exporting, onnxruntime runs the file on inputs of another batch size and sequence length
(with padding) and its outputs must match PyTorch's on the real tokens within ``rtol``
(relative error ‖onnx − torch‖ / ‖torch‖). The file (and its ``.data`` file, when the weights are
too large for one protobuf) is written with ``statprune.atomic.atomic_file`` and moved into place
only after it passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statprune.argtypes import positive_int
from statprune.atomic import atomic_file
from statprune.errors import ModelError, OutputError, StatpruneError
from statprune.guards import check_seq_len, max_positions  # noqa: F401  (bench imports them from here)

INPUT_AXES = {0: "batch", 1: "sequence"}


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how it was checked."""

    path: Path
    architecture: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    size_bytes: int  # the .onnx file plus its external data, if any
    external_data: Path | None = None
    verified: bool = False
    relative_error: float | None = None  # largest over the outputs; None when not verified
    verify_shape: tuple[int, int] | None = None  # (batch, sequence) of the verification inputs
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "opset": self.opset,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
            "size_bytes": self.size_bytes,
            "external_data": None if self.external_data is None else str(self.external_data),
            "verified": self.verified,
            "relative_error": self.relative_error,
            "verify_shape": None if self.verify_shape is None else list(self.verify_shape),
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


# --- model inspection, shared with statprune.bench ---------------------------------------------


def load_model(model_dir: str | Path, device: str | None = None, dtype=None):
    """``statprune.load`` in float32 unless another dtype is asked for."""
    import torch

    from statprune.persist import load

    return load(model_dir, device=device, dtype=torch.float32 if dtype is None else dtype)


def is_causal_lm(model) -> bool:
    """Whether ``model`` is a causal LM (the adapters' one check, ``ModelAdapter.is_causal_lm``)."""
    from statprune.adapters import is_causal_lm as causal

    return causal(model)


def uses_token_types(model) -> bool:
    """Whether inputs carry ``token_type_ids`` (``ModelAdapter.uses_token_types``)."""
    from statprune.adapters import adapter_class

    return adapter_class(model.config).uses_token_types(model)


def input_spec(model) -> dict[str, Any]:
    """What synthetic inputs for ``model`` need: vocabulary size, pad id, segment ids or not."""
    vocab = int(model.config.vocab_size)
    pad = model.config.pad_token_id
    pad = int(pad) if pad is not None and 0 <= int(pad) < vocab else None
    return {"vocab_size": vocab, "pad_token_id": pad, "token_types": uses_token_types(model)}


def token_inputs(spec: dict, batch: int, seq_len: int, lengths: list[int] | None = None, seed: int = 0):
    """Random token ids (never the pad id), right-padded to ``lengths`` (default: no padding)."""
    import torch

    vocab, pad = spec["vocab_size"], spec["pad_token_id"]
    gen = torch.Generator().manual_seed(seed)
    low = min(4, vocab - 1)  # skip the usual special tokens of small vocabularies
    ids = torch.randint(low, vocab, (batch, seq_len), generator=gen)
    if pad is not None:
        ids[ids == pad] = (pad + 1) % vocab
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = 0
        ids[row, length:] = 0 if pad is None else pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if spec["token_types"]:
        types = torch.zeros(batch, seq_len, dtype=torch.long)
        types[:, seq_len // 2 :] = 1  # two segments, so segment embeddings matter
        inputs["token_type_ids"] = types * mask
    return inputs


def synthetic_inputs(model, batch: int, seq_len: int, lengths: list[int] | None = None, seed: int = 0):
    """``token_inputs`` for ``model`` (CPU tensors)."""
    return token_inputs(input_spec(model), batch, seq_len, lengths, seed)


def output_names(model, out) -> tuple[str, ...]:
    keys = set(out.keys())
    for names in (("logits",), ("start_logits", "end_logits"), ("last_hidden_state",)):
        if set(names) <= keys:
            return names
    raise ModelError(f"{type(model).__name__} returns none of logits / last_hidden_state; cannot export it")


def _wrapper(model, names: tuple[str, ...]):
    from torch import nn

    causal = is_causal_lm(model)

    class Exported(nn.Module):
        """Plain tensors in, a tuple of tensors out: what the ONNX graph computes."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            if causal:
                kwargs["use_cache"] = False
            out = self.model(**kwargs, return_dict=True)
            return tuple(out[name] for name in names)

    return Exported().eval()


# --- export -----------------------------------------------------------------------------------


def export_onnx(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    opset: int | None = None,
    seq_len: int = 16,
    batch: int = 2,
    verify: bool = True,
    rtol: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model_dir`` to ``out_path`` (an ``.onnx`` file, written atomically).

    ``seq_len`` and ``batch`` shape the tracing example (both at least 2, so the axes stay
    dynamic); ``verify`` runs onnxruntime on another shape and raises ``ModelError`` if the
    relative error exceeds ``rtol``. An existing file is replaced only with ``overwrite``.
    """
    import torch

    from statprune.adapters import task_head

    start = time.perf_counter()
    if seq_len < 2 or batch < 2:
        raise ValueError("seq_len and batch must be at least 2 (a size-1 example fixes that axis)")
    out = _check_output(Path(out_path), overwrite)
    model = load_model(model_dir)
    arch = type(model).__name__
    if getattr(task_head(model), "kind", None) == "multiple-choice":
        raise ModelError(f"{arch} takes 3-D inputs; export-onnx supports 2-D (batch, sequence) models only")
    check_seq_len(model, seq_len)
    example = synthetic_inputs(model, batch, seq_len, lengths=[seq_len, max(1, seq_len - 3)])
    with torch.no_grad():
        names = output_names(model, model(**_forward_kwargs(model, example), return_dict=True))
    wrapper = _wrapper(model, names)
    dynamic = {name: dict(INPUT_AXES) for name in example}
    program = _torch_export(wrapper, example, names, dynamic, opset, arch)

    existed = out.exists()
    with atomic_file(out) as tmp_file:
        program.save(tmp_file)
        # external weights: the exporter names them f"{out.name}.data"; they move along with the file
        extra = sorted(p for p in tmp_file.parent.iterdir() if p.name != out.name and p.is_file())
        verified, rel, shape = False, None, None
        if verify:
            rel, shape = _verify(tmp_file, wrapper, model, names, batch, seq_len, rtol)
            verified = True
        opset_used = _opset_of(tmp_file)
        size = tmp_file.stat().st_size + sum(p.stat().st_size for p in extra)
    stale = out.parent / f"{out.name}.data"
    if existed and not extra and stale.is_file():
        stale.unlink()  # the replaced export's external data, now unreferenced
    return ExportResult(
        path=out,
        architecture=arch,
        opset=opset_used,
        inputs=tuple(example),
        outputs=names,
        dynamic_axes={name: dict(INPUT_AXES) for name in example},
        size_bytes=size,
        external_data=out.parent / extra[0].name if extra else None,
        verified=verified,
        relative_error=rel,
        verify_shape=shape,
        seconds=round(time.perf_counter() - start, 3),
        notes=["causal LM exported without KV cache (use_cache=False)"] if is_causal_lm(model) else [],
    )


def _forward_kwargs(model, inputs: dict) -> dict:
    kwargs = dict(inputs)
    if is_causal_lm(model):
        kwargs["use_cache"] = False
    return kwargs


def _check_output(out: Path, overwrite: bool) -> Path:
    out = out.expanduser().absolute()
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give the path of the .onnx file to write")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite or choose another path")
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"cannot write {out}: {existing} is not writable")
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (torchvision notices, deprecation warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torch_export(wrapper, example: dict, names, dynamic: dict, opset: int | None, arch: str):
    import torch

    # axis names (strings) become Dim.DYNAMIC for tracing and the dim_params of the ONNX graph
    dynamic_shapes = {name: dict(axes) for name, axes in dynamic.items()}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs=example,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(example),
                output_names=list(names),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.onnx.export (dynamo) failed for {arch}: {reason[:300]}") from exc
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise ModelError("torch.onnx.export returned no program; this torch version is not supported")
    return program


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def relative_error(got, expected, mask=None) -> float:
    """‖got − expected‖ / ‖expected‖ over real tokens (``mask`` [batch, seq]) when given."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return float("inf")
    if mask is not None and expected.ndim >= 2 and expected.shape[:2] == mask.shape:
        keep = np.asarray(mask, dtype=bool)
        got, expected = got[keep], expected[keep]
    if not np.isfinite(got).all():
        return float("inf")
    den = float(np.linalg.norm(expected))
    num = float(np.linalg.norm(got - expected))
    return num / den if den > 0 else num


def onnx_session(path: str | Path, device: str = "cpu", threads: int | None = None):
    """An onnxruntime session on CPU (or CUDA, when onnxruntime was built with it)."""
    import onnxruntime as ort

    from statprune.errors import DeviceError

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError(
                "this onnxruntime has no CUDA support; install onnxruntime-gpu or use --device cpu"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _verify(path: Path, wrapper, model, names, batch: int, seq_len: int, rtol: float):
    """Run onnxruntime on a shape the export never saw and compare with PyTorch."""
    import torch

    v_batch = batch + 1
    v_seq = seq_len // 2 + 1 if seq_len // 2 + 1 != seq_len else seq_len + 1
    lengths = [v_seq] + [max(1, v_seq - 1 - 2 * i) for i in range(v_batch - 1)]
    inputs = synthetic_inputs(model, v_batch, v_seq, lengths=lengths, seed=1)
    with torch.no_grad():
        expected = [t.float().numpy() for t in wrapper(**inputs)]
    try:
        session = onnx_session(path)
        got = session.run(list(names), {k: v.numpy() for k, v in inputs.items()})
    except StatpruneError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot run the exported model: {reason[:300]}") from exc
    mask = inputs["attention_mask"].numpy()
    errors = {name: relative_error(g, e, mask) for name, g, e in zip(names, got, expected, strict=True)}
    worst = max(errors, key=errors.get)
    if not errors[worst] <= rtol:
        raise ModelError(
            f"the ONNX {worst} differ from PyTorch (relative error {errors[worst]:.2e} > {rtol:g}) at "
            f"batch {v_batch}, length {v_seq}; nothing was written — report this, or pass --no-verify"
        )
    return errors[worst], (v_batch, v_seq)


# --- command line -----------------------------------------------------------------------------


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2, so that the sequence axis stays dynamic")
    return value


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export-onnx DIR OUT.onnx`` on a ``parser.add_subparsers()`` object."""
    p = subparsers.add_parser(
        "export-onnx",
        help="export a model folder to ONNX (dynamic batch and sequence axes), checked with onnxruntime",
    )
    p.add_argument("model", type=Path, help="model folder (compressed or not)")
    p.add_argument("out", type=Path, help="the .onnx file to write (atomically)")
    p.add_argument("--seq-len", type=_at_least_two, default=16, help="sequence length of the tracing example")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative error the check accepts")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    result = export_onnx(
        args.model,
        args.out,
        opset=args.opset,
        seq_len=args.seq_len,
        verify=not args.no_verify,
        rtol=getattr(args, "rtol", 1e-4),
        overwrite=getattr(args, "overwrite", False),
    )
    size = result.size_bytes / 2**20
    print(f"wrote {result.path} ({size:.1f} MiB, opset {result.opset}, {result.architecture})")
    print(f"inputs: {', '.join(result.inputs)} [batch, sequence]; outputs: {', '.join(result.outputs)}")
    if result.external_data is not None:
        print(f"weights: {result.external_data} (keep it next to the .onnx file)")
    if result.verified:
        b, s = result.verify_shape
        err = result.relative_error
        print(f"verified with onnxruntime at batch {b}, length {s}: relative error {err:.1e}")
    else:
        print("not verified (--no-verify)")
    for note in result.notes:
        print(f"note: {note}")
    return 0
