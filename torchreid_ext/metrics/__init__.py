"""Fast re-ID evaluation (METHOD.md E1-E5): CMC, mAP and mINP equal to Torchreid's ``evaluate_rank``.

* :func:`evaluate_rank`: from a query x gallery distance matrix (numpy or torch, CPU or GPU);
* :func:`evaluate_features`: from features, distances computed a block of queries at a time, so the
  full matrix is never held (MSMT17-sized sets in a few GB);
* :func:`compute_distance_matrix` / :func:`reranked_distance_matrix`: the full-matrix path (needed for
  re-ranking, which holds Q x G, Q x Q and G x G matrices).
"""
from .distance import METRICS, compute_distance_matrix, iter_distance_chunks, reranked_distance_matrix
from .rank import RankResult, evaluate_features, evaluate_rank

__all__ = [
    "METRICS",
    "RankResult",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "iter_distance_chunks",
    "reranked_distance_matrix",
]
