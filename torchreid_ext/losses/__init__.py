"""Losses: the registry of ``loss.name`` choices and our metric losses.

Every metric loss is called ``loss(features, targets)`` -> scalar tensor (:class:`MetricLoss`);
the engine logs each loss's ``last_stats``. Built in: ``softmax`` (cross-entropy alone),
``triplet`` (Torchreid's ``TripletLoss``, upstream's config section), ``drsl``
(:class:`DRSLoss`, docs/methods.md D) and ``sn`` (:class:`SupportNeighborLoss`, docs/methods.md S).
Add one with :func:`register_loss` (see :mod:`torchreid_ext.losses.registry`).

A module that registers losses can be named in ``$TORCHREID_EXT_PLUGINS`` (:mod:`torchreid_ext.console`):
every command line imports it first, so its losses exist in ``scripts/main.py``, each run of
``scripts/compare.py`` and each torchrun rank.
"""
from __future__ import annotations

import torch.nn as nn

from ..adapter import torchreid
from .base import BaseMetricLoss, MetricLoss
from .drsl import LAMBDA_SORT, TAU_REL, DRSLoss, drsl_loss
from .registry import (
    LossSpec,
    UnknownLossError,
    _add,
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
    "DRSLoss",
    "SupportNeighborLoss",
    "drsl_loss",
    "support_neighbor_loss",
    "LossSpec",
    "UnknownLossError",
    "register_loss",
    "unregister_loss",
    "get_loss",
    "loss_names",
    "build_loss",
    "build_loss_terms",
    "check_loss_weights",
]


def _triplet(section) -> nn.Module:
    return torchreid().losses.TripletLoss(margin=section.margin)


def _drsl(section) -> nn.Module:
    return DRSLoss(tau_rel=section.tau_rel, lambda_sort=section.lambda_sort)


def _sn(section) -> nn.Module:
    return SupportNeighborLoss(
        alpha=section.alpha, k=section.k, weight_squeeze=section.weight_squeeze, squeeze=section.squeeze
    )


def _sn_min_batch(section):
    # docs/methods.md S4: the support set needs k neighbours and one more image beyond them
    return int(section.k) + 2, f"the Support Neighbor loss needs batch_size - 1 >= k + 1 (loss.sn.k = {section.k})"


# Cross-entropy alone: no metric term, the model returns logits only.
_add(LossSpec("softmax", None, {"label_smooth": True}, term_key=None, ce_key=None, triplet_key=None,
              needs_positives=False))
# Upstream Torchreid's section, unchanged: its term is weighted by weight_t, CE by weight_x.
_add(LossSpec("triplet", _triplet, {"margin": 0.3, "weight_t": 1.0, "weight_x": 0.0},
              term_key="weight_t", triplet_key=None, summary_name="loss_t"))
# docs/methods.md D5: CE + DRSL by default.
register_loss("drsl", _drsl, {"tau_rel": TAU_REL, "lambda_sort": LAMBDA_SORT})
# docs/methods.md S4-S5: the authors train with SN alone (weight_x 0).
register_loss("sn", _sn, {"alpha": 50.0, "k": 10, "weight_squeeze": 0.1, "squeeze": "spread", "weight_x": 0.0},
              min_batch_size=_sn_min_batch)
