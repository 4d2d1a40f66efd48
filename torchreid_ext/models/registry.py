"""The model registry: our factories by name, with the config keys each one takes.

A factory has Torchreid's signature ``(num_classes, loss='softmax', pretrained=True,
use_gpu=True, **kwargs)``. ``options`` are dotted config keys (e.g. ``'model.msfl.lateral'``)
that :func:`torchreid_ext.models.build_model_from_options` passes to the factory as keyword
arguments named after the last part of the key.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch.nn as nn

from ..errors import UnknownNameError
from ..registry import Registry

__all__ = ["MODELS", "MODEL_OPTIONS", "register_model", "UnknownModelError"]

MODELS: Registry = Registry("model")
MODEL_OPTIONS: Dict[str, Tuple[str, ...]] = {}


class UnknownModelError(UnknownNameError):
    """``model.name`` names no model of ours or Torchreid's."""


def register_model(name: str, options: Sequence[str] = ()) -> Callable:
    """Decorator: add a factory to the registry under ``name`` (the registry's duplicate rule)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, factory)
        MODEL_OPTIONS[name] = tuple(options)
        return factory

    return decorator
