"""Fast re-ID evaluation (docs/methods.md E1-E5): CMC, mAP and mINP equal to Torchreid's ``evaluate_rank``.

* :func:`evaluate_test_features` with :class:`EvaluationOptions` (``from_config(cfg)``): the evaluation
  the engine and ``scripts/evaluate.py`` run on extracted features (AQE, normalisation, distances,
  re-ranking, ranking);
* :func:`evaluate_rank`: from a query x gallery distance matrix (numpy or torch, CPU or GPU);
* :func:`evaluate_features`: from features, distances computed a block of queries at a time, so the
  full matrix is never held (MSMT17-sized sets in a few GB), optionally re-ranked (``rerank=True``);
* :func:`re_ranking`: drop-in for Torchreid's ``re_ranking`` (k-reciprocal, from its three matrices);
  :func:`reranked_distance_blocks` / :func:`reranked_distance_matrix`: the same from features;
* :func:`alpha_query_expansion`: FastReID's AQE in bounded memory;
* :func:`compute_distance_matrix`: the full matrix (visualisation).
"""
from .aqe import alpha_query_expansion
from .distance import METRICS, compute_distance_matrix, iter_distance_chunks
from .evaluation import (EVALUATORS, EvaluationOptions, evaluate_test_features, evaluation_distance_matrix,
                         format_results, results_dict)
from .rank import RankResult, evaluate_features, evaluate_rank
from .rerank import check_rerank_args, re_ranking, reranked_distance_blocks, reranked_distance_matrix

__all__ = [
    "EVALUATORS",
    "METRICS",
    "EvaluationOptions",
    "RankResult",
    "alpha_query_expansion",
    "check_rerank_args",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_test_features",
    "evaluation_distance_matrix",
    "format_results",
    "results_dict",
    "iter_distance_chunks",
    "re_ranking",
    "reranked_distance_blocks",
    "reranked_distance_matrix",
]
