"""Losses: the registry of ``loss.name`` choices and our metric losses.

Every metric loss is called ``loss(features, targets)`` -> scalar tensor (:class:`MetricLoss`);
the engine logs each loss's ``last_stats``. Built in: ``softmax`` (cross-entropy alone),
``triplet`` (Torchreid's ``TripletLoss``, upstream's config section), ``drsl``
(:class:`DRSLoss`, docs/methods.md D) and ``sn`` (:class:`SupportNeighborLoss`, docs/methods.md S).
Ours subclass :class:`BaseMetricLoss` (per-anchor losses, an injected distance and reducer; one
loss per module, registered there). Add one with :func:`register_loss` (see
:mod:`torchreid_ext.losses.registry`).

A module that registers losses can be named in ``$TORCHREID_EXT_PLUGINS`` (:mod:`torchreid_ext.console`):
every command line imports it first, so its losses exist in ``scripts/main.py``, each run of
``scripts/compare.py`` and each torchrun rank.
"""
from __future__ import annotations

# drsl.py and sn.py register themselves on import, after registry.py's softmax and triplet
from .base import AnchorLosses, BaseMetricLoss, MetricLoss
from .distances import DISTANCES, CosineDistance, EuclideanDistance
from .drsl import DRSLoss, drsl_loss
from .reducers import MeanReducer
from .registry import (
    LossOptions,
    LossSpec,
    UnknownLossError,
    build_loss,
    build_loss_terms,
    check_loss_weights,
    get_loss,
    loss_names,
    register_loss,
    unregister_loss,
)
from .sn import SupportNeighborLoss, support_neighbor_loss

__all__ = [
    "MetricLoss",
    "BaseMetricLoss",
    "AnchorLosses",
    "EuclideanDistance",
    "CosineDistance",
    "DISTANCES",
    "MeanReducer",
    "DRSLoss",
    "SupportNeighborLoss",
    "drsl_loss",
    "support_neighbor_loss",
    "LossSpec",
    "LossOptions",
    "UnknownLossError",
    "register_loss",
    "unregister_loss",
    "get_loss",
    "loss_names",
    "build_loss",
    "build_loss_terms",
    "check_loss_weights",
]
