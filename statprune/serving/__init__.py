"""Serving compressed models in inference engines.

``statprune.serving.widths`` reads the per-layer widths of a compressed folder from its
``config.json`` (pure Python). ``statprune.serving.vllm_plugin`` is the vLLM plugin (entry point
group ``vllm.general_plugins``); it imports vLLM only when vLLM calls it, and
``statprune.serving.vllm_model`` (the model classes) only when vLLM builds such a model. Nothing
here is imported by ``import statprune``.
"""
