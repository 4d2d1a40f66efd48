"""The engine registry: ``train.engine`` names (a leaf of the engines package).

An engine class provides ``from_options(options, datamanager, model, optimizer, scheduler, **common)``
(:func:`torchreid_ext.builders.build_run_engine` passes the run's options and the base engines'
arguments as ``common``).
"""
from __future__ import annotations

from ..registry import Registry

__all__ = ["ENGINES", "register_engine"]

ENGINES: Registry = Registry("engine")


def register_engine(name: str, engine_cls: type) -> type:
    """Register an engine class (with a ``from_options`` classmethod) as ``train.engine`` ``name``."""
    if not callable(getattr(engine_cls, "from_options", None)):
        raise TypeError(f"engine '{name}': {engine_cls!r} has no from_options(options, datamanager, model, "
                        "optimizer, scheduler, **common) classmethod")
    return ENGINES.register(name, engine_cls)
