"""Compression as a short sequence of named stages (``stages``) over typed records (``records``),
with device visits, checkpoints and caching kept apart (``execution``) and the hooks that stream
a layer's statistics in ``statistics``. ``statprune.compress`` (``statprune.driver``) runs them."""
