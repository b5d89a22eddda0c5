"""Pruning methods: one class each, registered by name.

Every module in this package defines one :class:`~statprune.methods.base.PruningMethod` subclass
decorated with :func:`register`; the package finds them itself, so adding a method is adding one
file here (and its tests). Names are listed in each class's ``order`` (STAT first), and every list
of method names (the CLI's ``--method`` choices, ``sweep --methods``, error messages) comes from
:func:`method_names`. The modules import torch only inside their methods, so the command line can
list the names without loading it.
"""

from __future__ import annotations

import importlib
import pkgutil

from statprune.errors import OptionsError
from statprune.methods.base import PruningMethod

_REGISTRY: dict[str, type[PruningMethod]] = {}
_LOADED = False


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``--method cls.name`` (replacing a same-named one)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (for tests that register their own)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")


def method_names() -> tuple[str, ...]:
    """Registered method names, in listing order (each class's ``order``, then name)."""
    _load_builtins()
    return tuple(sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].order, name)))


def default_sweep_methods() -> tuple[str, ...]:
    """The methods ``sweep`` runs when none are named (those with ``in_default_sweep``)."""
    return tuple(name for name in method_names() if _REGISTRY[name].in_default_sweep)


def get_method(name: str) -> PruningMethod:
    """An instance of the method registered as ``name``; ``OptionsError`` if there is none."""
    _load_builtins()
    if name not in _REGISTRY:
        raise OptionsError(f"unknown method {name!r}; choose {', '.join(method_names())}")
    return _REGISTRY[name]()


__all__ = [
    "PruningMethod",
    "default_sweep_methods",
    "get_method",
    "method_names",
    "register",
    "unregister",
]
