"""What the batch ranking losses (DRSL, SN) share: input checks, compute dtype, pairwise distances."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["check_inputs", "compute_dtype", "pairwise_distance", "no_positive_result"]

# Squared distances below this are clamped before sqrt: sqrt has an infinite slope at 0 (diagonal,
# identical features), so the clamp (gradient 0 below it) keeps the backward pass finite.
_SQ_EPS = 1e-12


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


def pairwise_distance(f: torch.Tensor) -> torch.Tensor:
    """B x B Euclidean distances (not squared), sqrt clamped at 0 so its gradient stays finite."""
    sq = f.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :]).addmm_(f, f.t(), alpha=-2)
    return d2.clamp_min(_SQ_EPS).sqrt()


def no_positive_result(f: torch.Tensor, stats: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """No anchor has a positive: a zero that is still part of the graph, so backward() works."""
    return f.sum() * 0.0, stats
