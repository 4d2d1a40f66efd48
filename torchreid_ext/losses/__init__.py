"""Metric losses on the embedding, each called ``loss(features, targets)`` -> scalar tensor.

``build_metric_loss(name, cfg)`` builds one from ``cfg.loss``: 'triplet' (Torchreid's TripletLoss),
'drsl' (METHOD.md D), 'sn' (METHOD.md S). The engine logs each loss's ``last_stats``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from ..adapter import torchreid
from .drsl import DRSLoss, drsl_loss
from .sn import SupportNeighborLoss, support_neighbor_loss

__all__ = [
    "DRSLoss",
    "SupportNeighborLoss",
    "drsl_loss",
    "support_neighbor_loss",
    "METRIC_LOSSES",
    "build_metric_loss",
]


def _triplet(cfg) -> nn.Module:
    return torchreid().losses.TripletLoss(margin=cfg.loss.triplet.margin)


def _drsl(cfg) -> nn.Module:
    sec = cfg.loss.drsl
    return DRSLoss(tau_rel=sec.tau_rel, lambda_sort=sec.lambda_sort)


def _sn(cfg) -> nn.Module:
    sec = cfg.loss.sn
    return SupportNeighborLoss(alpha=sec.alpha, k=sec.k, weight_squeeze=sec.weight_squeeze, squeeze=sec.squeeze)


METRIC_LOSSES: Dict[str, Callable[..., nn.Module]] = {"triplet": _triplet, "drsl": _drsl, "sn": _sn}


def build_metric_loss(name: str, cfg) -> nn.Module:
    """The metric loss ``name`` ('triplet', 'drsl', 'sn') configured from ``cfg.loss.<name>``."""
    try:
        builder = METRIC_LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown metric loss {name!r}; valid names: {sorted(METRIC_LOSSES)}") from None
    return builder(cfg)
