"""Support Neighbor loss (Li et al., ACM MM 2018, arXiv 1808.06030; docs/methods.md S1-S4).

Written from the formulas in docs/methods.md S (which follow the authors' released code), not from that code.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import is_int
from .batch import check_inputs, compute_dtype, no_positive_result, pairwise_distance

__all__ = ["SupportNeighborLoss", "support_neighbor_loss", "SQUEEZE_MODES"]

SQUEEZE_MODES = ("spread", "nearest")

# softplus(x) is returned as x above this (torch's default is 20): log1p(exp(-50)) is below
# float64's resolution of 50, so float64 results are those of log(1 + exp(x))
_SOFTPLUS_LINEAR = 50.0


def _check_params(alpha: float, k: int, weight_squeeze: float, squeeze: str) -> None:
    if not alpha > 0:
        raise ValueError(f"Support Neighbor loss: alpha must be > 0, got {alpha}")
    if not is_int(k) or k < 1:
        raise ValueError(f"Support Neighbor loss: k must be an integer >= 1, got {k!r}")
    if not weight_squeeze >= 0:
        raise ValueError(f"Support Neighbor loss: weight_squeeze must be >= 0, got {weight_squeeze}")
    if squeeze not in SQUEEZE_MODES:
        raise ValueError(f"Support Neighbor loss: squeeze={squeeze!r}; choose one of {list(SQUEEZE_MODES)}")


def support_neighbor_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 50.0,
    k: int = 10,
    weight_squeeze: float = 0.1,
    squeeze: str = "spread",
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """SN loss of a batch (S1-S4) and its diagnostics; memory B x B."""
    _check_params(alpha, k, weight_squeeze, squeeze)
    check_inputs(features, targets, "Support Neighbor loss")
    k = int(k)
    b = features.size(0)
    if b - 1 < k + 1:
        raise ValueError(
            f"batch size {b} is too small for k={k}: Support Neighbor loss needs batch_size - 1 >= k + 1"
        )
    targets = targets.to(features.device)
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = compute_dtype(features)
        same = targets[:, None] == targets[None, :]
        eye = torch.eye(b, dtype=torch.bool, device=f.device)
        pos_mask = same & ~eye
        has_pos = pos_mask.any(1)
        skipped = float(b - int(has_pos.sum()))
        if not bool(has_pos.any()):
            stats = dict(
                sep=0.0, squeeze=0.0, s_pos=0.0, s_neg=0.0, threshold=0.0, skipped=skipped, no_positives=1.0
            )
            return no_positive_result(f, stats)

        d = pairwise_distance(F.normalize(f, dim=1))[has_pos]  # A x B, on the unit sphere (S1)
        pos = pos_mask[has_pos]
        neg = ~same[has_pos]
        with torch.no_grad():  # S1: set selection carries no gradient
            d_off = d.masked_fill(eye[has_pos], float("inf"))
            t = d_off.kthvalue(k + 1, dim=1, keepdim=True).values  # (k+1)-th smallest, j != a
            near = d_off < t
            s_pos = pos & near
            s_neg = neg & near
            nearest = d.masked_fill(~pos, float("inf")).argmin(1, keepdim=True)
            lonely = ~s_pos.any(1, keepdim=True)  # S+ empty -> {nearest positive}
            s_pos.scatter_(1, nearest, lonely | s_pos.gather(1, nearest))
            n_sp = s_pos.sum(1)

        # S2: -log(sum_S+ exp(-alpha d) / sum_{S+ U S-} exp(-alpha d)), written as
        # softplus(lse_neg - lse_pos) (S+ and S- are disjoint). The same quantity as
        # lse_all - lse_pos, without subtracting two separately rounded logsumexps: when S-
        # weighs little the difference cancels and float32 gradients lose ~3 digits.
        logits = -alpha * d
        lse_pos = logits.masked_fill(~s_pos, float("-inf")).logsumexp(1)
        has_neg = s_neg.any(1, keepdim=True)
        # rows with an empty S- get finite dummy logits (an all -inf logsumexp has a NaN
        # gradient) and a zero term
        lse_neg = logits.masked_fill(~s_neg, float("-inf")).where(has_neg, 0.0).logsumexp(1)
        sep = torch.where(has_neg.squeeze(1), F.softplus(lse_neg - lse_pos, threshold=_SOFTPLUS_LINEAR), 0.0)

        if squeeze == "spread":  # S3: furthest minus nearest support positive; d itself if only one
            far = d.masked_fill(~s_pos, float("-inf")).amax(1)
            close = d.masked_fill(~s_pos, float("inf")).amin(1)
            sq = torch.where(n_sp == 1, far, far - close)
        else:  # "nearest": distance to the nearest positive (released code)
            sq = d.gather(1, nearest).squeeze(1)

        loss = (sep + weight_squeeze * sq).mean()  # S4
        stats = dict(
            sep=sep.mean().item(),
            squeeze=sq.mean().item(),
            s_pos=n_sp.float().mean().item(),
            s_neg=s_neg.sum(1).float().mean().item(),
            threshold=t.mean().item(),
            skipped=skipped,
            no_positives=0.0,
        )
        return loss, stats


class SupportNeighborLoss(nn.Module):
    """Support Neighbor loss, ``loss(features, targets)`` -> scalar (docs/methods.md S1-S4).

    On L2-normalised features, each anchor's support set is its k nearest neighbours (S1); a
    softmax-like term separates the support positives from the support negatives (S2) and a squeeze
    term shrinks the positives (S3: 'spread' = furthest - nearest support positive, the abstract;
    'nearest' = nearest-positive distance, the released code). Needs batch_size - 1 >= k + 1 (S4).
    Anchors without a positive are skipped and counted; fp16/bf16 and autocast run in float32.

    ``last_stats``: sep, squeeze (means over the anchors used), s_pos, s_neg (mean |S+|, |S-|),
    threshold (mean t_a), skipped (anchors without a positive), no_positives (1.0 when no anchor had a
    positive and the loss is the graph-connected zero, else 0.0).
    """

    def __init__(self, alpha: float = 50.0, k: int = 10, weight_squeeze: float = 0.1, squeeze: str = "spread"):
        super().__init__()
        _check_params(alpha, k, weight_squeeze, squeeze)
        self.alpha = float(alpha)
        self.k = int(k)
        self.weight_squeeze = float(weight_squeeze)
        self.squeeze = squeeze
        self.last_stats: Dict[str, float] = {}

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, self.last_stats = support_neighbor_loss(
            features, targets, self.alpha, self.k, self.weight_squeeze, self.squeeze
        )
        return loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, k={self.k}, weight_squeeze={self.weight_squeeze}, squeeze={self.squeeze!r}"
