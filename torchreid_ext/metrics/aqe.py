"""Alpha query expansion (alpha-QE, Radenovic et al.; FastReID's ``aqe``) in bounded memory.

Each round replaces every feature (query and gallery alike) by the mean of its ``k`` most similar
features (cosine similarity, itself included) weighted by ``similarity ** alpha``:

    f'_i = (1 / k) sum_{j in top-k(i)} s_ij^alpha f_j,    s_ij = cos(f_i, f_j)

with the un-normalised features ``f_j`` (as FastReID: only the similarities use unit vectors).
FastReID builds the full ``N x N`` similarity matrix of the ``N = Q + G`` features; here the
similarities are computed ``block_rows`` rows at a time, so memory is the features plus one
``block_rows x N`` block.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

from ..options import is_int, is_number
from .distance import ArrayLike, as_features

__all__ = ["alpha_query_expansion", "check_aqe_args"]

_BLOCK_ELEMENTS = 1 << 24  # similarities per block (64 MB in float32)


def check_aqe_args(k, alpha, rounds, names: Tuple[str, str, str] = ("k", "alpha", "rounds")) -> None:
    """Raise ``ValueError`` naming the bad value (``names``: how the caller calls them)."""
    nk, na, nr = names
    if not is_int(k) or k < 1:
        raise ValueError(f"{nk} = {k!r} must be an integer >= 1 (neighbours averaged per feature)")
    if not is_number(alpha) \
            or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{na} = {alpha!r} must be a finite number >= 0 (weights are similarity ** alpha)")
    if not is_int(rounds) or rounds < 1:
        raise ValueError(f"{nr} = {rounds!r} must be an integer >= 1 (expansion rounds)")


@torch.no_grad()
def alpha_query_expansion(
    qf: ArrayLike,
    gf: ArrayLike,
    k: int = 5,
    alpha: float = 3.0,
    rounds: int = 1,
    block_rows: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(qf', gf')`` after ``rounds`` rounds of alpha query expansion over the query and gallery
    features together (FastReID's ``aqe(qf, gf, qe_times=rounds, qe_k=k, alpha=alpha)``).

    Runs on the features' device; float32 unless the features are float64. A negative similarity
    among the top ``k`` with a non-integer ``alpha`` has no real power and raises ``ValueError``.
    """
    check_aqe_args(k, alpha, rounds)
    q = as_features(qf, "qf")
    g = as_features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"qf and gf must have the same feature dimension, got {q.shape[1]} and {g.shape[1]}")
    if q.device != g.device:
        raise ValueError(f"qf and gf must be on the same device, got {q.device} and {g.device}")
    feats = torch.cat([q, g.to(q.dtype)])
    n = feats.shape[0]
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of query + gallery features ({n})")
    rows = block_rows or max(1, _BLOCK_ELEMENTS // n)
    integer_alpha = float(alpha).is_integer()
    for _ in range(rounds):
        unit = F.normalize(feats, p=2, dim=1)
        out = torch.empty_like(feats)
        for a in range(0, n, rows):
            b = min(a + rows, n)
            sims, idx = torch.topk(unit[a:b] @ unit.t(), k, dim=1, largest=True, sorted=False)
            if not integer_alpha and bool((sims < 0).any()):
                raise ValueError(f"alpha = {alpha} is not an integer and a top-{k} cosine similarity is "
                                 f"negative ({float(sims.min()):.3g}): similarity ** alpha is undefined")
            weights = sims.pow(alpha)
            out[a:b] = torch.einsum("rk,rkd->rd", weights, feats[idx]) / k
        feats = out
    return feats[: q.shape[0]], feats[q.shape[0]:]
