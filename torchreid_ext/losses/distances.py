"""Pairwise distances a metric loss can be given: ``distance(f)`` -> B x B, smaller = closer.

A loss takes its distance as a constructor argument (pytorch-metric-learning style), so one loss
formulation runs with several distances. ``loss.<name>.distance`` picks one by name from
:data:`DISTANCES`; from Python, pass any module whose ``forward(f)`` returns the B x B matrix.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

__all__ = ["EuclideanDistance", "CosineDistance", "DISTANCES", "distance_named"]

# Squared distances below this are clamped before sqrt: sqrt has an infinite slope at 0 (diagonal,
# identical features), so the clamp (gradient 0 below it) keeps the backward pass finite.
SQ_EPS = 1e-12


class EuclideanDistance(nn.Module):
    """||f_i - f_j|| (not squared), the sqrt clamped near 0 so that its gradient stays finite."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        sq = f.pow(2).sum(1)
        d2 = (sq[:, None] + sq[None, :]).addmm_(f, f.t(), alpha=-2)
        return d2.clamp_min(SQ_EPS).sqrt()


class CosineDistance(nn.Module):
    """1 - cos(f_i, f_j), in [0, 2]; the features' norms do not matter."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        fn = F.normalize(f, dim=1)
        return (1.0 - fn @ fn.t()).clamp_min(0.0)


# config name -> class (each built with no arguments)
DISTANCES: Registry = Registry("distance")
DISTANCES.register("euclidean", EuclideanDistance)
DISTANCES.register("cosine", CosineDistance)


def distance_named(name: str, key: str = "distance") -> nn.Module:
    """A new distance module from its registered name; ``key`` (the config key that gave the name)
    is named in the :class:`~torchreid_ext.errors.UnknownNameError` for an unknown one."""
    return DISTANCES.get(name, key=key)()
