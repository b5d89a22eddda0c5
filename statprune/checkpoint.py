"""Resumable runs: progress saved after every layer, so a killed run continues where it stopped.

A checkpoint folder holds ``meta.json`` (a fingerprint of the model config, options and
calibration tokens: resuming a different job is refused), one JSON state per pass (``analyse``,
``prune``: the last finished layer and what was decided so far), the inputs of the next layer
(``inputs-<pass>-<layer>.safetensors``) and, for the pruning pass, the weights of every finished
layer (``layer-<i>.safetensors``). Every file is written to a temporary name and renamed, and the
state JSON is written last, so a kill at any instant leaves a consistent checkpoint. Tensors are
stored with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from statprune.atomic import atomic_file, write_text
from statprune.errors import OutputError

# a file up to this size is hashed whole; a larger one by its size and _SAMPLES evenly spread
# samples of _SAMPLE bytes (64 MiB read, however large: a 14 GB checkpoint is not read through)
_WHOLE = 256 << 20
_SAMPLE = 1 << 20
_SAMPLES = 64


def file_digest(path: str | Path) -> str:
    """Identity of a file's or a folder's contents (SHA-256, hex): files up to 256 MiB (text
    data, tokenizers, configs, small models) whole; a larger file by its size and 64 evenly
    spread 1 MiB samples (weights fine-tuned again differ in every one); a folder by its files'
    relative names and digests (hidden files skipped). Same path, other contents: another
    digest."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(path) if file != path else Path(file.name)
        if any(part.startswith(".") for part in relative.parts):
            continue
        size = file.stat().st_size
        digest.update(f"{relative.as_posix()}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= _WHOLE:
                for chunk in iter(lambda: f.read(_SAMPLE), b""):
                    digest.update(chunk)
                continue
            step = (size - _SAMPLE) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * step)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def weights_digest(model: nn.Module, values: int = 4096) -> str:
    """Identity of a model's weights (SHA-256, hex): every tensor's name, shape and dtype, and its
    first and last ``values`` entries (a model fine-tuned again differs there)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        for part in (flat[:values], flat[-values:]):
            digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(config_json: str, options: dict, batches, weights: str = "") -> str:
    """Identity of a compression job: same model config and weights (:func:`weights_digest`),
    options and calibration tokens."""
    digest = hashlib.sha256(config_json.encode())
    digest.update(weights.encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for batch in batches:
        for key in sorted(batch.inputs):
            digest.update(key.encode())
            digest.update(batch.inputs[key].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class PassState:
    """What a pass had finished: layers ``0 … done`` and the data it carries forward."""

    done: int
    data: dict
    inputs: list[torch.Tensor]


class Checkpoint:
    """Progress of one compression job in a folder."""

    def __init__(self, folder: str | Path, job: str, resume: bool) -> None:
        self.folder = Path(folder)
        meta = self.folder / "meta.json"
        if meta.is_file():
            if not resume:
                raise OutputError(
                    f"checkpoint folder {self.folder} holds an unfinished run; pass --resume to "
                    "continue it or remove the folder"
                )
            if json.loads(meta.read_text()).get("job") != job:
                raise OutputError(
                    f"checkpoint in {self.folder} belongs to a different model, data or options; "
                    "use another --checkpoint-dir or remove it"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            if any(self.folder.iterdir()):
                raise OutputError(f"checkpoint folder {self.folder} is not empty and not a checkpoint")
            self._write_json("meta.json", {"job": job})

    def _write_json(self, name: str, data: dict) -> None:
        write_text(self.folder / name, json.dumps(data))

    def _write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_file(self.folder / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))

    def load(self, stage: str, device: torch.device) -> PassState | None:
        """The saved state of a pass, or None if it has not finished a layer yet."""
        file = self.folder / f"{stage}.json"
        if not file.is_file():
            return None
        state = json.loads(file.read_text())
        tensors = load_file(str(self.folder / state["inputs"]), device=str(device))
        inputs = [tensors[str(i)] for i in range(len(tensors))]
        return PassState(done=state["done"], data=state["data"], inputs=inputs)

    def save(self, stage: str, layer: int, data: dict, inputs: list[torch.Tensor]) -> None:
        """Record that ``layer`` of ``stage`` is finished; ``inputs`` feed the next layer."""
        name = f"inputs-{stage}-{layer}.safetensors"
        self._write_tensors(name, {str(i): t for i, t in enumerate(inputs)})
        self._write_json(f"{stage}.json", {"done": layer, "data": data, "inputs": name})
        for old in self.folder.glob(f"inputs-{stage}-*.safetensors"):
            if old.name != name:
                old.unlink()

    def save_layer(self, index: int, layer: nn.Module) -> None:
        self._write_tensors(f"layer-{index}.safetensors", dict(layer.state_dict()))

    def restore_layer(self, index: int, layer: nn.Module) -> None:
        state = load_file(str(self.folder / f"layer-{index}.safetensors"))
        layer.load_state_dict(state, strict=True)

    def finish(self) -> None:
        """The job completed: the checkpoint is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
