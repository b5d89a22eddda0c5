"""The config classes of compressed Llama-family folders for serving engines.

A compressed folder's ``config.json`` says ``model_type: statprune_<stock type>`` (so that plain
transformers asks for ``trust_remote_code`` instead of building the stock, wider model). These
are the stock config classes under that name, defined at module level so that engines which
pickle configs between processes (vLLM) can; ``register`` makes ``AutoConfig`` read such
folders without remote code. The widths come from ``statprune_ops`` (``statprune.serving.widths``).
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from statprune.serving.widths import CUSTOM_TYPE_PREFIX


class StatprunedLlamaConfig(LlamaConfig):
    model_type = CUSTOM_TYPE_PREFIX + LlamaConfig.model_type


class StatprunedMistralConfig(MistralConfig):
    model_type = CUSTOM_TYPE_PREFIX + MistralConfig.model_type


class StatprunedQwen2Config(Qwen2Config):
    model_type = CUSTOM_TYPE_PREFIX + Qwen2Config.model_type


CONFIGS = (StatprunedLlamaConfig, StatprunedMistralConfig, StatprunedQwen2Config)


def register() -> None:
    """Register the ``statprune_<type>`` config classes with ``AutoConfig`` (idempotent)."""
    for config_class in CONFIGS:
        if config_class.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_class.model_type, config_class)
