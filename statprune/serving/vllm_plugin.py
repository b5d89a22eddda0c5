"""vLLM plugin: serves statprune-compressed Llama, Mistral and Qwen2 decoders natively.

vLLM calls ``register`` in each of its processes through the entry point group
``vllm.general_plugins`` (declared in statprune's ``pyproject.toml``), so once statprune is
installed next to vLLM, ``vllm.LLM(model=DIR)`` and ``vllm serve DIR`` load a compressed folder
whose ``architectures`` names one of ``VLLM_ARCHITECTURES``' values (``statprune.save`` writes
them). The classes are registered by name, so vLLM imports ``statprune.serving.vllm_model``
only when it builds such a model.
"""

from __future__ import annotations

from statprune.serving.widths import VLLM_ARCHITECTURES

MODEL_CLASS = "statprune.serving.vllm_model:StatpruneLlamaForCausalLM"


def register() -> None:
    """Register the compressed-decoder architectures with vLLM's ``ModelRegistry`` (idempotent:
    vLLM may call plugins more than once per process)."""
    from vllm import ModelRegistry

    from statprune.serving.configs import register as register_configs

    register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for name in VLLM_ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, MODEL_CLASS)
