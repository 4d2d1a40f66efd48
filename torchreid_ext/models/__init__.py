"""Model registry: our factories, plus a ``build_model`` that also reaches Torchreid's.

Factories register in :mod:`.registry`; :func:`torchreid_ext.register` copies every factory into
Torchreid's own model factory, so ``torchreid.models.build_model('<our model>', ...)``
works in any Torchreid script (with default options: Torchreid passes no kwargs).
"""
from __future__ import annotations

from typing import List

import torch.nn as nn

from ..adapter import torchreid
from ..losses import get_loss
from .options import ModelOptions
from .registry import MODEL_OPTIONS, MODELS, UnknownModelError, register_model

__all__ = [
    "MODELS",
    "MODEL_OPTIONS",
    "register_model",
    "available_models",
    "build_model",
    "build_model_from_options",
    "ModelOptions",
    "UnknownModelError",
]


def available_models() -> List[str]:
    """Every buildable name: ours and Torchreid's."""
    return sorted(set(MODELS) | set(torchreid().model_factory()))


def build_model(
    name: str,
    num_classes: int,
    loss: str = "softmax",
    pretrained: bool = True,
    use_gpu: bool = True,
    **kwargs,
) -> nn.Module:
    """Build one of our models (with options) or a Torchreid model (options not allowed).

    ``loss`` is a registered loss name (:mod:`torchreid_ext.losses.registry`). Torchreid's own
    models know only ``loss='softmax'`` and ``'triplet'``; for every loss whose model must return
    features they are built with ``'triplet'``, so that training mode returns ``(logits, features)``.
    """
    if name in MODELS:
        return MODELS[name](
            num_classes=num_classes, loss=loss, pretrained=pretrained, use_gpu=use_gpu, **kwargs
        )
    factory = torchreid().model_factory()
    if name not in factory:
        raise UnknownModelError(f"model.name = {name!r} is unknown; choose one of {available_models()}")
    if kwargs:
        raise TypeError(f"Torchreid model '{name}' takes no extra options, got {sorted(kwargs)}")
    tr_loss = "triplet" if get_loss(loss).needs_features else "softmax"
    return factory[name](
        num_classes=num_classes, loss=tr_loss, pretrained=pretrained, use_gpu=use_gpu
    )


def build_model_from_options(options: ModelOptions, num_classes: int, use_gpu: bool = True) -> nn.Module:
    """Build ``options.name`` with the options its factory declares (:class:`ModelOptions`)."""
    return build_model(options.name, num_classes=num_classes, loss=options.loss, pretrained=options.pretrained,
                       use_gpu=use_gpu, **options.factory_options)


from . import complexity, msfl  # noqa: E402,F401
