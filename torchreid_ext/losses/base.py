"""What a metric loss is: ``loss(features, targets) -> scalar``, with optional ``last_stats``.

The engines call every metric loss the same way: ``loss(features, targets)`` on the embedding
(B x D, float32; B identity labels) returns a scalar tensor to back-propagate. A loss may also
keep a ``last_stats`` dict of floats about the last call (e.g. how many anchors had no positive);
the engine puts each entry in the loss summary as ``<name>/<key>``, hence on the console and in
TensorBoard.

Two ways to write one (pytorch-metric-learning style):

* any ``nn.Module`` with that ``forward`` satisfies :class:`MetricLoss` (``DRSLoss`` and
  ``SupportNeighborLoss`` do; so does Torchreid's ``TripletLoss``, which has no ``last_stats``);
* subclass :class:`BaseMetricLoss` and implement :meth:`~BaseMetricLoss.compute`, which returns
  the loss and its stats; ``forward`` stores the stats in ``last_stats``.

Then register it under a name with :func:`torchreid_ext.losses.register_loss` so that configs
can select it (``loss.name``).
"""
from __future__ import annotations

from typing import Dict, Mapping, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["MetricLoss", "BaseMetricLoss"]


@runtime_checkable
class MetricLoss(Protocol):
    """The interface the engines rely on (``last_stats`` is optional and read with ``getattr``)."""

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ...

    def __call__(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ...


class BaseMetricLoss(nn.Module):
    """Base class for metric losses: implement ``compute(features, targets) -> (loss, stats)``.

    ``stats`` maps names to floats (plain numbers, not tensors that keep a graph alive); after
    each call they are in ``last_stats``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_stats: Dict[str, float] = {}

    def compute(self, features: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Mapping[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute(features, targets)")

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, stats = self.compute(features, targets)
        self.last_stats = {key: float(value) for key, value in stats.items()}
        return loss
