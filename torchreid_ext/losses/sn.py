"""Support Neighbor loss (Li et al., ACM MM 2018, arXiv 1808.06030; docs/methods.md S1-S4).

Written from the formulas in docs/methods.md S (which follow the authors' released code), not from that code.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import is_int
from .base import AnchorLosses, BaseMetricLoss, Reducer
from .distances import distance_named
from .registry import register_loss

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


@torch.no_grad()
def _support_sets(
    d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, self_mask: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """S1 (no gradient): each anchor's S+ and S- masks, threshold t_a (A x 1) and nearest positive
    (A x 1), from its distances ``d`` (A x B) and masks of its positives, negatives and itself."""
    d_off = d.masked_fill(self_mask, float("inf"))
    t = d_off.kthvalue(k + 1, dim=1, keepdim=True).values  # (k+1)-th smallest, j != a
    near = d_off < t
    s_pos = pos & near
    s_neg = neg & near
    nearest = d.masked_fill(~pos, float("inf")).argmin(1, keepdim=True)
    lonely = ~s_pos.any(1, keepdim=True)  # S+ empty -> {nearest positive}
    s_pos.scatter_(1, nearest, lonely | s_pos.gather(1, nearest))
    return s_pos, s_neg, t, nearest


def _separation(d: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """S2 per anchor: -log(sum_S+ exp(-alpha d) / sum_{S+ U S-} exp(-alpha d)), written as
    softplus(lse_neg - lse_pos) (S+ and S- are disjoint). The same quantity as lse_all - lse_pos,
    without subtracting two separately rounded logsumexps: when S- weighs little the difference
    cancels and float32 gradients lose ~3 digits."""
    logits = -alpha * d
    lse_pos = logits.masked_fill(~s_pos, float("-inf")).logsumexp(1)
    has_neg = s_neg.any(1, keepdim=True)
    # rows with an empty S- get finite dummy logits (an all -inf logsumexp has a NaN gradient)
    # and a zero term
    lse_neg = logits.masked_fill(~s_neg, float("-inf")).where(has_neg, 0.0).logsumexp(1)
    return torch.where(has_neg.squeeze(1), F.softplus(lse_neg - lse_pos, threshold=_SOFTPLUS_LINEAR), 0.0)


def _squeeze(d: torch.Tensor, s_pos: torch.Tensor, nearest: torch.Tensor, mode: str) -> torch.Tensor:
    """S3 per anchor. 'spread': furthest minus nearest support positive, d itself if only one;
    'nearest': the distance to the nearest positive (released code)."""
    if mode == "nearest":
        return d.gather(1, nearest).squeeze(1)
    far = d.masked_fill(~s_pos, float("-inf")).amax(1)
    close = d.masked_fill(~s_pos, float("inf")).amin(1)
    return torch.where(s_pos.sum(1) == 1, far, far - close)


class SupportNeighborLoss(BaseMetricLoss):
    """Support Neighbor loss, ``loss(features, targets)`` -> scalar (docs/methods.md S1-S4).

    On L2-normalised features, each anchor's support set is its k nearest neighbours (S1); a
    softmax-like term separates the support positives from the support negatives (S2) and a squeeze
    term shrinks the positives (S3: 'spread' = furthest - nearest support positive, the abstract;
    'nearest' = nearest-positive distance, the released code). Each anchor's loss is sep + w * squeeze;
    ``reducer`` (default: the mean over anchors, S4) makes the batch loss. The distance between the
    normalised features is Euclidean by default (``distance``: any module ``f -> B x B``). Needs
    batch_size - 1 >= k + 1 (S4). Anchors without a positive are skipped and counted; fp16/bf16 and
    autocast run in float32.

    ``last_stats``: sep, squeeze (means over the anchors used, whatever the reducer), s_pos, s_neg
    (mean |S+|, |S-|), threshold (mean t_a), skipped (anchors without a positive), no_positives (1.0
    when no anchor had a positive and the loss is the graph-connected zero, else 0.0).
    """

    label = "Support Neighbor loss"

    def __init__(
        self,
        alpha: float = 50.0,
        k: int = 10,
        weight_squeeze: float = 0.1,
        squeeze: str = "spread",
        distance: Optional[nn.Module] = None,
        reducer: Optional[Reducer] = None,
    ):
        super().__init__(distance=distance, reducer=reducer)
        _check_params(alpha, k, weight_squeeze, squeeze)
        self.alpha = float(alpha)
        self.k = int(k)
        self.weight_squeeze = float(weight_squeeze)
        self.squeeze = squeeze

    @classmethod
    def from_config(cls, section) -> "SupportNeighborLoss":
        """The loss of config section ``loss.sn``."""
        return cls(alpha=section.alpha, k=section.k, weight_squeeze=section.weight_squeeze, squeeze=section.squeeze,
                   distance=distance_named(section.distance, key="loss.sn.distance"))

    def compute_losses(self, f: torch.Tensor, targets: torch.Tensor) -> AnchorLosses:
        """Per anchor with a positive: sep + weight_squeeze * squeeze (S1-S4); memory B x B."""
        b = f.size(0)
        if b - 1 < self.k + 1:
            raise ValueError(
                f"batch size {b} is too small for k={self.k}: Support Neighbor loss needs batch_size - 1 >= k + 1"
            )
        same = targets[:, None] == targets[None, :]
        eye = torch.eye(b, dtype=torch.bool, device=f.device)
        pos_mask = same & ~eye
        has_pos = pos_mask.any(1)
        skipped = float(b - int(has_pos.sum()))
        if not bool(has_pos.any()):
            stats = dict(
                sep=0.0, squeeze=0.0, s_pos=0.0, s_neg=0.0, threshold=0.0, skipped=skipped, no_positives=1.0
            )
            return AnchorLosses({}, stats)

        d = self.distance(F.normalize(f, dim=1))[has_pos]  # A x B, on the unit sphere (S1)
        s_pos, s_neg, t, nearest = _support_sets(d, pos_mask[has_pos], ~same[has_pos], eye[has_pos], self.k)
        sep = _separation(d, s_pos, s_neg, self.alpha)
        sq = _squeeze(d, s_pos, nearest, self.squeeze)
        stats = dict(
            sep=sep.detach().mean().item(),
            squeeze=sq.detach().mean().item(),
            s_pos=s_pos.sum(1).float().mean().item(),
            s_neg=s_neg.sum(1).float().mean().item(),
            threshold=t.mean().item(),
            skipped=skipped,
            no_positives=0.0,
        )
        return AnchorLosses({"sn": sep + self.weight_squeeze * sq}, stats)  # S4

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, k={self.k}, weight_squeeze={self.weight_squeeze}, squeeze={self.squeeze!r}"


def support_neighbor_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 50.0,
    k: int = 10,
    weight_squeeze: float = 0.1,
    squeeze: str = "spread",
) -> Tuple[torch.Tensor, Mapping[str, float]]:
    """SN loss of a batch (S1-S4) and its diagnostics, as a function: :class:`SupportNeighborLoss`'s
    ``compute``."""
    return SupportNeighborLoss(alpha, k, weight_squeeze, squeeze).compute(features, targets)


def _min_batch(section) -> Tuple[int, str]:
    # docs/methods.md S4: the support set needs k neighbours and one more image beyond them
    return int(section.k) + 2, f"the Support Neighbor loss needs batch_size - 1 >= k + 1 (loss.sn.k = {section.k})"


# docs/methods.md S4-S5: the authors train with SN alone (weight_x 0).
register_loss("sn", SupportNeighborLoss.from_config,
              {"alpha": 50.0, "k": 10, "weight_squeeze": 0.1, "squeeze": "spread", "distance": "euclidean",
               "weight_x": 0.0},
              min_batch_size=_min_batch)
