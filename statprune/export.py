"""Export a model folder (compressed or not) to ONNX that serves, then check it against PyTorch.

The model goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` tracing; the
legacy TorchScript exporter gives wrong outputs with transformers 5 and is never used) with
dynamic axes. Three kinds of graph:

* **encoders**: inputs ``input_ids`` and ``attention_mask`` [batch, sequence] (and
  ``token_type_ids`` when the model has more than one token type); outputs ``logits`` for task
  heads (``start_logits``/``end_logits`` for question answering), ``last_hidden_state`` for base
  models;
* **embedding models** (a sentence-transformers folder: ``modules.json`` with a ``Pooling`` and
  maybe a ``Normalize``): ``last_hidden_state`` [batch, sequence, hidden] and
  ``sentence_embedding`` [batch, dim], computed by sentence-transformers' own pooling and
  normalization modules inside the graph, so it equals ``SentenceTransformer(folder).encode``;
* **causal LMs with a KV cache** (optimum's naming): inputs ``input_ids``, ``attention_mask``
  [batch, past + sequence], ``position_ids`` and ``past_key_values.{i}.key`` / ``.value``
  [batch, kv_heads_i, past, head_dim_i] for every layer ``i``; outputs ``logits`` and
  ``present.{i}.key`` / ``.value`` [batch, kv_heads_i, past + sequence, head_dim_i]. Each layer
  has its own head count (a layer without heads has 0, its tensors are empty but still carry the
  length). The first step feeds a past of length 0. ``greedy_generate`` is a reference loop.

After exporting, onnxruntime runs the file on inputs of another batch size and sequence length
(with padding; decoders: a prefill and one cached step) and its outputs must match PyTorch's on
the real tokens within ``rtol`` (relative error ‖onnx − torch‖ / ‖torch‖). The file (and its
``.data`` file, when the weights are too large for one protobuf) is written with
``statprune.atomic.atomic_file`` and moved into place only after it passed, so a failed export
leaves nothing behind. An output path without the ``.onnx`` suffix is a folder, and the file
goes to ``FOLDER/onnx/model.onnx``, where sentence-transformers' and optimum's ONNX loaders look.
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

from statprune import st_folder
from statprune.argtypes import positive_int
from statprune.atomic import atomic_file
from statprune.errors import ModelError, OptionsError, OutputError, StatpruneError
from statprune.guards import check_seq_len, max_positions  # noqa: F401  (bench imports them from here)

INPUT_AXES = {0: "batch", 1: "sequence"}
# decoders with a KV cache: optimum's axis names
DECODER_AXES = {0: "batch_size", 1: "sequence_length"}
MASK_AXES = {0: "batch_size", 1: "total_sequence_length"}
PAST_AXES = {0: "batch_size", 2: "past_sequence_length"}
ONNX_SUBPATH = Path("onnx") / "model.onnx"  # where sentence-transformers (backend="onnx") looks


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


def _wrapper(model, names: tuple[str, ...], embedding: list | None = None):
    """The encoder graph; with ``embedding`` (sentence-transformers modules) it also pools."""
    from torch import nn

    causal = is_causal_lm(model)

    class Exported(nn.Module):
        """Plain tensors in, a tuple of tensors out: what the ONNX graph computes."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.embedding = nn.ModuleList(embedding or [])

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            if causal:
                kwargs["use_cache"] = False
            out = self.model(**kwargs, return_dict=True)
            if not len(self.embedding):
                return tuple(out[name] for name in names)
            hidden = out["last_hidden_state"]
            features = {"token_embeddings": hidden, "attention_mask": attention_mask}
            for module in self.embedding:
                features = module(features)
            return hidden, features["sentence_embedding"]

    return Exported().eval()


def _cache_argument(model) -> str:
    """The name under which ``model.forward`` takes the cache (``cache`` from transformers 5.24)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _takes_position_ids(model) -> bool:
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def _returned_cache(out):
    cache = out.get("cache") if "cache" in out else None
    return cache if cache is not None else out.get("past_key_values")


def cache_shapes(model) -> list[tuple[int, int, int, int]]:
    """(key heads, key head size, value heads, value head size) of every layer's KV cache, read
    from the cache a one-token forward pass fills (so uneven and zero-head layers are as they run)."""
    import torch

    kwargs = {
        "input_ids": torch.full((1, 2), min(4, int(model.config.vocab_size) - 1), dtype=torch.long),
        "use_cache": True,
        "return_dict": True,
    }
    with torch.no_grad():
        out = model(**kwargs)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ModelError(f"{type(model).__name__} returns no per-layer KV cache; export it with --no-past")
    shapes = []
    for layer in layers:
        k, v = layer.keys, layer.values
        if k.dim() != 4 or v.dim() != 4:
            raise ModelError(f"{type(model).__name__} keeps a KV cache of another layout; use --no-past")
        shapes.append((int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])))
    return shapes


def past_names(n_layers: int) -> tuple[list[str], list[str]]:
    """optimum's names: ``past_key_values.{i}.key/value`` in, ``present.{i}.key/value`` out."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, present


def _past_wrapper(model, n_layers: int):
    """The decoder graph: (ids, mask, [positions], *past) -> (logits, *present)."""
    from torch import nn
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from statprune.modeling_statprune import keep_length_layer

    cache_arg = _cache_argument(model)
    positions = _takes_position_ids(model)

    class ExportedWithPast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            position_ids = rest[0] if positions else None
            past = rest[1:] if positions else rest
            cache = DynamicCache()
            # counted by their sequence axis, so a layer 0 without heads still gives the past length
            cache.layers = [keep_length_layer(DynamicLayer()) for _ in range(n_layers)]
            for i, layer in enumerate(cache.layers):
                layer.update(past[2 * i], past[2 * i + 1])
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, cache_arg: cache}
            if positions:
                kwargs["position_ids"] = position_ids
            out = self.model(**kwargs, use_cache=True, return_dict=True)
            present = []
            for layer in _returned_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out["logits"], *present)

    return ExportedWithPast().eval()


def position_ids_for(attention_mask):
    """Positions of the tokens of a (left-)padded batch, as transformers' ``generate`` makes them:
    ``cumsum(mask) - 1``, and 1 at padding. ``attention_mask`` [batch, total] (numpy or torch)."""
    import numpy as np

    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def empty_past(session, batch: int, dtype=None) -> dict:
    """Zero-length ``past_key_values.*`` inputs for ``session`` (shapes read from the graph)."""
    import numpy as np

    feed = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            heads, size = spec.shape[1], spec.shape[3]
            feed[spec.name] = np.zeros((batch, heads, 0, size), dtype=dtype or np.float32)
    return feed


def greedy_generate(session, input_ids, attention_mask=None, max_new_tokens: int = 8):
    """Greedy decoding through a KV-cache ONNX export (``export_onnx`` of a causal LM).

    ``input_ids`` [batch, prompt] (left-padded, ``attention_mask`` 0 at padding); each step feeds
    the new tokens with the ``present.*`` of the last step as ``past_key_values.*``. Returns
    (tokens [batch, max_new_tokens], logits [batch, max_new_tokens, vocab]) as numpy arrays.
    """
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    names = [o.name for o in session.get_outputs()]
    wants_positions = any(i.name == "position_ids" for i in session.get_inputs())
    past = empty_past(session, ids.shape[0])
    step_ids, tokens, logits = ids, [], []
    for _ in range(max_new_tokens):
        feed = {"input_ids": step_ids, "attention_mask": mask, **past}
        if wants_positions:
            feed["position_ids"] = position_ids_for(mask)[:, -step_ids.shape[1] :]
        outputs = dict(zip(names, session.run(names, feed), strict=True))
        last = outputs["logits"][:, -1, :]
        nxt = last.argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        logits.append(last)
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in outputs.items() if n != "logits"}
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        step_ids = nxt
    return np.concatenate(tokens, axis=1), np.stack(logits, axis=1)


# --- export -----------------------------------------------------------------------------------


def onnx_path(out: str | Path) -> Path:
    """``out`` itself when it ends in ``.onnx``; else the folder ``out`` and ``onnx/model.onnx`` in it."""
    out = Path(out)
    return out if out.suffix == ".onnx" else out / ONNX_SUBPATH


@dataclass
class _Plan:
    """What to trace: the wrapper, its example arguments and the graph's names and axes."""

    wrapper: Any
    args: tuple
    kwargs: dict
    inputs: list[str]
    outputs: tuple[str, ...]
    dynamic_shapes: Any
    axes: dict[str, dict[int, str]]
    notes: list[str]


def _encoder_plan(model, batch: int, seq_len: int, embedding: list | None) -> _Plan:
    import torch

    example = synthetic_inputs(model, batch, seq_len, lengths=[seq_len, max(1, seq_len - 3)])
    with torch.no_grad():
        names = output_names(model, model(**_forward_kwargs(model, example), return_dict=True))
    notes = []
    if embedding is not None:
        if names != ("last_hidden_state",):
            raise ModelError(
                f"{type(model).__name__} returns {', '.join(names)}, not token embeddings: its "
                "sentence-transformers pooling cannot follow; pass --no-pooling"
            )
        names = ("last_hidden_state", "sentence_embedding")
        kinds = " → ".join(type(m).__name__ for m in embedding)
        notes.append(f"sentence_embedding = {kinds} of last_hidden_state (sentence-transformers' modules)")
    elif is_causal_lm(model):
        notes.append("causal LM exported without KV cache (--no-past): full-sequence logits")
    axes = {name: dict(INPUT_AXES) for name in example}
    return _Plan(
        _wrapper(model, names, embedding), (), example, list(example), names, dict(axes), axes, notes
    )


def _decoder_example_lengths(batch: int, seq_len: int) -> tuple[int, int]:
    """(new tokens, past length) of the tracing example: about a third new, all sizes distinct."""
    new = max(3, seq_len // 3)
    past_len = max(new + 1, seq_len - new)
    while past_len in (batch, new):
        past_len += 1
    return new, past_len


def _decoder_plan(model, batch: int, seq_len: int) -> _Plan:
    import torch

    shapes = cache_shapes(model)
    n_layers = len(shapes)
    past_in, present_out = past_names(n_layers)
    # seq_len tokens in all, split into new ones and a past; distinct sizes for batch, new tokens
    # and past, so that no two axes are traced as one
    new, past_len = _decoder_example_lengths(batch, seq_len)
    spec = input_spec(model)
    ids = token_inputs(spec, batch, new, seed=0)["input_ids"]
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    positions = torch.from_numpy(position_ids_for(mask.numpy())[:, -new:])
    gen = torch.Generator().manual_seed(0)
    past = []
    for hk, dk, hv, dv in shapes:
        past += [
            torch.randn(batch, hk, past_len, dk, generator=gen),
            torch.randn(batch, hv, past_len, dv, generator=gen),
        ]
    takes_positions = _takes_position_ids(model)
    inputs = ["input_ids", "attention_mask", *(["position_ids"] if takes_positions else []), *past_in]
    args = (ids, mask, *([positions] if takes_positions else []), *past)
    head = [dict(DECODER_AXES), dict(MASK_AXES), *([dict(DECODER_AXES)] if takes_positions else [])]
    # forward(input_ids, attention_mask, *rest): the rest (positions, past) is one tuple to torch.export
    dynamic = (*head[:2], (*head[2:], *(dict(PAST_AXES) for _ in past)))
    axes = dict(zip(inputs, [*head, *(dict(PAST_AXES) for _ in past)], strict=True))
    heads = sorted({s[0] for s in shapes})
    notes = [
        f"KV cache: {n_layers} layers, key/value heads per layer {[s[0] for s in shapes]}"
        + (" (a layer with 0 heads has empty past/present tensors)" if 0 in heads else "")
    ]
    return _Plan(
        _past_wrapper(model, n_layers), args, {}, inputs, ("logits", *present_out), dynamic, axes, notes
    )


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
    past: bool | None = None,
    pooling: bool | None = None,
) -> ExportResult:
    """Export ``model_dir`` to ``out_path`` (an ``.onnx`` file, written atomically; a path without
    that suffix is a folder and the file goes to ``onnx/model.onnx`` in it).

    ``past`` (default: for causal LMs) exports a decoder with a KV cache (``past_key_values.*`` in,
    ``present.*`` out); ``pooling`` (default: for sentence-transformers folders with a Pooling
    module) adds the ``sentence_embedding`` output. ``seq_len`` and ``batch`` shape the tracing
    example (both at least 2, so the axes stay dynamic); ``verify`` runs onnxruntime on another
    shape and raises ``ModelError`` if the relative error exceeds ``rtol``. An existing file is
    replaced only with ``overwrite``. Raises ``OptionsError`` for ``past`` on a model that is not
    a causal LM or ``pooling`` on a folder without sentence-transformers modules.
    """
    from statprune.adapters import task_head

    start = time.perf_counter()
    if seq_len < 2 or batch < 2:
        raise ValueError("seq_len and batch must be at least 2 (a size-1 example fixes that axis)")
    out = _check_output(onnx_path(out_path), overwrite)
    model = load_model(model_dir)
    arch = type(model).__name__
    if getattr(task_head(model), "kind", None) == "multiple-choice":
        raise ModelError(f"{arch} takes 3-D inputs; export-onnx supports 2-D (batch, sequence) models only")
    causal = is_causal_lm(model)
    if past and not causal:
        raise OptionsError(f"{arch} is not a causal LM: a KV cache (--past) applies to decoders only")
    past = causal if past is None else bool(past)
    folder = Path(model_dir)
    if pooling is None:
        pooling = not causal and st_folder.is_embedding_folder(folder)
    embedding = None
    if pooling:
        modules = st_folder.read_modules(folder)
        if not modules or causal:
            raise OptionsError(
                f"{folder} is not a sentence-transformers folder (modules.json): nothing to pool"
            )
        embedding = st_folder.embedding_modules(folder, modules)
    if past:
        check_seq_len(model, sum(_decoder_example_lengths(batch, seq_len)))
        plan = _decoder_plan(model, batch, seq_len)
    else:
        check_seq_len(model, seq_len)
        plan = _encoder_plan(model, batch, seq_len, embedding)
    hint = "; --no-past exports it without the cache" if past else ""
    program = _torch_export(plan, opset, arch, hint)

    existed = out.exists()
    with atomic_file(out) as tmp_file:
        program.save(tmp_file)
        # external weights: the exporter names them f"{out.name}.data"; they move along with the file
        extra = sorted(p for p in tmp_file.parent.iterdir() if p.name != out.name and p.is_file())
        verified, rel, shape = False, None, None
        if verify:
            check = _verify_past if past else _verify
            rel, shape = check(tmp_file, plan, model, batch, seq_len, rtol)
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
        inputs=tuple(plan.inputs),
        outputs=plan.outputs,
        dynamic_axes=plan.axes,
        size_bytes=size,
        external_data=out.parent / extra[0].name if extra else None,
        verified=verified,
        relative_error=rel,
        verify_shape=shape,
        seconds=round(time.perf_counter() - start, 3),
        notes=plan.notes,
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


def _torch_export(plan: _Plan, opset: int | None, arch: str, hint: str = ""):
    import torch

    # axis names (strings) become Dim.DYNAMIC for tracing and the dim_params of the ONNX graph
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                plan.wrapper,
                plan.args,
                kwargs=plan.kwargs or None,
                dynamo=True,
                dynamic_shapes=plan.dynamic_shapes,
                input_names=list(plan.inputs),
                output_names=list(plan.outputs),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.onnx.export (dynamo) failed for {arch}: {reason[:300]}{hint}") from exc
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


def _run(path: Path, names, feed: dict):
    try:
        session = onnx_session(path)
        return session, session.run(list(names), feed)
    except StatpruneError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot run the exported model: {reason[:300]}") from exc


def _check_errors(errors: dict[str, float], rtol: float, where: str, hint: str = "") -> float:
    worst = max(errors, key=errors.get)
    if not errors[worst] <= rtol:
        raise ModelError(
            f"the ONNX {worst} differ from PyTorch (relative error {errors[worst]:.2e} > {rtol:g}) at "
            f"{where}; nothing was written — report this, or pass --no-verify{hint}"
        )
    return errors[worst]


def _verify_shape(batch: int, seq_len: int) -> tuple[int, int]:
    v_seq = seq_len // 2 + 1 if seq_len // 2 + 1 != seq_len else seq_len + 1
    return batch + 1, v_seq


def _verify(path: Path, plan: _Plan, model, batch: int, seq_len: int, rtol: float):
    """Run onnxruntime on a shape the export never saw and compare with PyTorch."""
    import torch

    v_batch, v_seq = _verify_shape(batch, seq_len)
    lengths = [v_seq] + [max(1, v_seq - 1 - 2 * i) for i in range(v_batch - 1)]
    inputs = synthetic_inputs(model, v_batch, v_seq, lengths=lengths, seed=1)
    with torch.no_grad():
        expected = [t.float().numpy() for t in plan.wrapper(**inputs)]
    _, got = _run(path, plan.outputs, {k: v.numpy() for k, v in inputs.items()})
    mask = inputs["attention_mask"].numpy()
    pairs = zip(plan.outputs, got, expected, strict=True)
    errors = {name: relative_error(g, e, mask) for name, g, e in pairs}
    return _check_errors(errors, rtol, f"batch {v_batch}, length {v_seq}"), (v_batch, v_seq)


def _cache_error(got, expected, mask) -> float:
    """``relative_error`` of a [batch, heads, time, size] cache tensor over the real positions."""
    import numpy as np

    if np.asarray(expected).size == 0:  # a layer without heads: only the shape can differ
        return 0.0 if np.shape(got) == np.shape(expected) else float("inf")
    return relative_error(np.moveaxis(got, 2, 1), np.moveaxis(expected, 2, 1), mask)


def _verify_past(path: Path, plan: _Plan, model, batch: int, seq_len: int, rtol: float):
    """A left-padded prefill from an empty past, then one cached step fed with onnxruntime's own
    ``present.*``: logits and caches compared with PyTorch at a shape the export never saw."""
    import numpy as np
    import torch

    v_batch, v_seq = _verify_shape(batch, seq_len)
    spec = input_spec(model)
    ids = token_inputs(spec, v_batch, v_seq, seed=1)["input_ids"].numpy()
    mask = np.ones((v_batch, v_seq), dtype=np.int64)
    for row in range(1, v_batch):
        mask[row, : min(v_seq - 1, 2 * row)] = 0  # left padding, as for batched generation
    session = onnx_session(path)
    past = empty_past(session, v_batch)
    takes_positions = "position_ids" in plan.inputs
    errors: dict[str, float] = {}
    for step in range(2):
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if takes_positions:
            feed["position_ids"] = position_ids_for(mask)[:, -ids.shape[1] :]
        args = [torch.from_numpy(feed[name]) for name in plan.inputs]
        with torch.no_grad():
            expected = [t.float().numpy() for t in plan.wrapper(*args)]
        _, got = _run(path, plan.outputs, feed)
        real = mask[:, -ids.shape[1] :]
        for name, g, e in zip(plan.outputs, got, expected, strict=True):
            err = relative_error(g, e, real) if name == "logits" else _cache_error(g, e, mask)
            errors[f"{name} (step {step})"] = err
        outputs = dict(zip(plan.outputs, got, strict=True))
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in outputs.items() if n != "logits"}
        ids = outputs["logits"][:, -1:, :].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    where = f"batch {v_batch}, prompt {v_seq} (left-padded) and one cached step"
    return _check_errors(errors, rtol, where, " (or --no-past)"), (v_batch, v_seq)


# --- command line -----------------------------------------------------------------------------


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2, so that the sequence axis stays dynamic")
    return value


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export-onnx DIR OUT`` on a ``parser.add_subparsers()`` object."""
    p = subparsers.add_parser(
        "export-onnx",
        help="export a model folder to ONNX (dynamic axes; decoders with a KV cache, embedding models "
        "with pooling), checked with onnxruntime",
    )
    p.add_argument("model", type=Path, help="model folder (compressed or not)")
    p.add_argument(
        "out",
        type=Path,
        help="the .onnx file to write (atomically); a folder (e.g. the model folder itself) gets "
        "onnx/model.onnx, where sentence-transformers' ONNX backend and optimum look",
    )
    p.add_argument(
        "--past",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoders: past_key_values.* in, present.* out, for cached generation (default: on for "
        "causal LMs; --no-past gives full-sequence logits only)",
    )
    p.add_argument(
        "--pooling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sentence-transformers folders: add the sentence_embedding output (their Pooling and "
        "Normalize in the graph; default: on when modules.json has a Pooling)",
    )
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
        past=getattr(args, "past", None),
        pooling=getattr(args, "pooling", None),
    )
    size = result.size_bytes / 2**20
    print(f"wrote {result.path} ({size:.1f} MiB, opset {result.opset}, {result.architecture})")
    print(f"inputs: {_listing(result.inputs)}; outputs: {_listing(result.outputs)}")
    if result.external_data is not None:
        print(f"weights: {result.external_data} (keep it next to the .onnx file)")
    if result.verified:
        b, s = result.verify_shape
        err = result.relative_error
        print(f"verified with onnxruntime at batch {b}, length {s}: relative error {err:.1e}")
        if any(name.startswith("present.") for name in result.outputs):
            print("  (a prefill from an empty past, then one cached step fed with the graph's present.*)")
    else:
        print("not verified (--no-verify)")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _listing(names) -> str:
    """``a, b, past_key_values.{0..29}.key/value``: per-layer names folded into one entry."""
    import re

    out, layers = [], {}
    for name in names:
        match = re.fullmatch(r"(past_key_values|present)\.(\d+)\.(key|value)", name)
        if match is None:
            out.append(name)
            continue
        if match.group(1) not in layers:
            out.append(match.group(1))
        layers.setdefault(match.group(1), set()).add(int(match.group(2)))
    return ", ".join(f"{n}.{{0..{max(layers[n])}}}.key/value" if n in layers else n for n in out)
