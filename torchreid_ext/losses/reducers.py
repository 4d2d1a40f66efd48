"""Reducers: one term's per-anchor losses (a 1-D tensor) -> the batch's value of that term.

A :class:`~torchreid_ext.losses.base.BaseMetricLoss` reduces each of its terms with the reducer
it was given (pytorch-metric-learning style); the default is the mean over the anchors used. Any
callable ``reducer(losses) -> scalar tensor`` works, e.g. ``torch.sum`` (every anchor counts in
full, so a larger batch gives a larger loss) or one that keeps the hardest anchors only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MeanReducer"]


class MeanReducer(nn.Module):
    """The mean over the anchors used (each anchor weighs the same)."""

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.mean()
