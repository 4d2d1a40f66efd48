"""What a metric loss is, and the base class our losses share (pytorch-metric-learning style).

The engines call every metric loss the same way: ``loss(features, targets)`` on the embedding
(B x D, float32; B identity labels) returns a scalar tensor to back-propagate (:class:`MetricLoss`).
A loss may also keep a ``last_stats`` dict of floats about the last call (e.g. how many anchors had
no positive); the engine puts each entry in the loss summary as ``<name>/<key>``, hence on the
console and in TensorBoard.

:class:`BaseMetricLoss` is the extension point. A subclass implements one method,
:meth:`~BaseMetricLoss.compute_losses`, which returns :class:`AnchorLosses`: each term's loss per
anchor, the terms' weights and the batch's diagnostics. The base checks the inputs, runs outside
autocast in float32 (float64 stays float64), reduces each term with the injected ``reducer``
(default: the mean over the anchors used) and adds the reduced terms with their weights. The
pairwise distance is injected as well (``self.distance``, default Euclidean). A loss that is not a
sum of per-anchor terms overrides :meth:`~BaseMetricLoss.compute` instead, which returns the batch
loss and its diagnostics.

Any other ``nn.Module`` with that ``forward`` works as a loss too (Torchreid's ``TripletLoss``,
which has no ``last_stats``). Register a loss under a name with
:func:`torchreid_ext.losses.register_loss` so that configs can select it (``loss.name``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Protocol, Tuple

import torch
import torch.nn as nn

from .distances import EuclideanDistance
from .reducers import MeanReducer

__all__ = ["MetricLoss", "BaseMetricLoss", "AnchorLosses", "Reducer", "check_inputs", "compute_dtype"]

# one term's per-anchor losses (1-D) -> its batch value (0-D)
Reducer = Callable[[torch.Tensor], torch.Tensor]


class MetricLoss(Protocol):
    """The interface the engines rely on, for type hints (``last_stats`` is optional and read
    with ``getattr``). Not runtime-checkable: every ``nn.Module`` would pass ``isinstance``."""

    def __call__(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class AnchorLosses:
    """One batch before reduction: ``terms`` maps a term's name to its loss per anchor used (1-D,
    one entry per anchor; no term at all when no anchor could be used), ``weights`` a term's weight
    in the batch loss (1 if absent), ``stats`` the batch's diagnostics (plain floats)."""

    terms: Mapping[str, torch.Tensor]
    stats: Mapping[str, float]
    weights: Mapping[str, float] = field(default_factory=dict)


def check_inputs(features: torch.Tensor, targets: torch.Tensor, who: str) -> None:
    """Raise a clear error for features that are not (B, D) floats or labels that are not (B,)."""
    if not torch.is_tensor(features) or features.dim() != 2:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"{who}: features must be a 2-D tensor (batch_size, dim), got shape {shape}")
    if not features.is_floating_point():
        raise TypeError(f"{who}: features must be floating point, got {features.dtype}")
    if not torch.is_tensor(targets) or targets.dim() != 1:
        shape = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"{who}: targets must be a 1-D tensor of identity labels, got shape {shape}")
    if targets.numel() != features.size(0):
        raise ValueError(
            f"{who}: {features.size(0)} feature rows but {targets.numel()} targets; "
            "they must have the same length"
        )


def compute_dtype(features: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 (D6); float32 and float64 stay as they are."""
    if features.dtype in (torch.float16, torch.bfloat16):
        return features.float()
    return features


class BaseMetricLoss(nn.Module):
    """Base class of metric losses: implement ``compute_losses(f, targets) -> AnchorLosses``.

    ``distance`` (a module ``distance(f) -> B x B``, default :class:`EuclideanDistance`) is for
    the subclass to use; ``reducer`` (default :class:`MeanReducer`) turns each term's per-anchor
    losses into its batch value. ``label`` names the loss in input errors (default: the class name).
    After each call, the diagnostics are in ``last_stats``.
    """

    label = ""

    def __init__(self, distance: Optional[nn.Module] = None, reducer: Optional[Reducer] = None) -> None:
        super().__init__()
        self.distance = distance if distance is not None else EuclideanDistance()
        self.reducer = reducer if reducer is not None else MeanReducer()
        self.last_stats: Dict[str, float] = {}

    def compute_losses(self, f: torch.Tensor, targets: torch.Tensor) -> AnchorLosses:
        """Each term's loss per anchor, for features ``f`` (B x D, float32 or float64, checked)
        and ``targets`` (B labels on ``f``'s device)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute_losses(f, targets) (or compute(features, targets))"
        )

    def compute(self, features: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Mapping[str, float]]:
        """The batch loss and its diagnostics: the inputs checked, :meth:`compute_losses` run in
        float32 / float64 outside autocast, its terms reduced and weighted (:meth:`reduce`)."""
        check_inputs(features, targets, self.label or type(self).__name__)
        targets = targets.to(features.device)
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = compute_dtype(features)
            losses = self.compute_losses(f, targets)
            return self.reduce(losses, f), losses.stats

    def reduce(self, losses: AnchorLosses, f: torch.Tensor) -> torch.Tensor:
        """sum over terms of weight x reducer(per-anchor losses). With no anchor (no term, or an
        empty one) the value is a zero that is still part of ``f``'s graph, so backward() works."""
        total: Optional[torch.Tensor] = None
        for name, per_anchor in losses.terms.items():
            value = self.reducer(per_anchor) if per_anchor.numel() else f.sum() * 0.0
            if value.dim() != 0:
                raise ValueError(f"{type(self).__name__}: the reducer returned shape {tuple(value.shape)} for "
                                 f"term '{name}'; a reducer must return a scalar")
            term = losses.weights.get(name, 1.0) * value
            total = term if total is None else total + term
        return f.sum() * 0.0 if total is None else total

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, stats = self.compute(features, targets)
        self.last_stats = {key: float(value) for key, value in stats.items()}
        return loss
