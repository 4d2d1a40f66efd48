"""Fast re-ID evaluation (docs/methods.md E1-E6): CMC, mAP and mINP equal to Torchreid's ``evaluate_rank``.

* :func:`evaluate_test_features` with :class:`EvaluationOptions` (``from_config(cfg)``): the evaluation
  the engine and ``scripts/evaluate.py`` run on extracted features (AQE, normalisation, distances,
  re-ranking, ranking);
* :func:`evaluate_rank`: from a query x gallery distance matrix (numpy or torch, CPU or GPU);
* :func:`evaluate_features`: from features, distances computed a block of queries at a time, so the
  full matrix is never held (MSMT17-sized sets in a few GB), optionally re-ranked (``rerank=True``);
* :func:`re_ranking`: drop-in for Torchreid's ``re_ranking`` (k-reciprocal, from its three matrices);
  :func:`reranked_distance_blocks` / :func:`reranked_distance_matrix`: the same from features;
* :func:`alpha_query_expansion`: FastReID's AQE in bounded memory;
* :func:`compute_distance_matrix`: the full matrix (visualisation);
* :func:`verification_metrics`: same-person verification over cross-camera pairs (ROC AUC, TPR and
  distance threshold at FPR 1e-4 / 1e-3 / 1e-2; the evaluator records them), and
  :func:`threshold_from_metrics` to read a threshold back from a metrics.json;
* :func:`build_index` with :class:`KNNOptions` (``knn.*``): k nearest gallery items, exact or through faiss.
"""
from .aqe import alpha_query_expansion
from .distance import METRICS, compute_distance_matrix, iter_distance_chunks
from .evaluation import (
    EVALUATORS,
    EvaluationOptions,
    evaluate_test_features,
    evaluation_distance_matrix,
    format_results,
    results_dict,
)
from .knn_index import KNNIndex, KNNOptions, build_index
from .rank import RankResult, evaluate_features, evaluate_rank
from .rerank import check_rerank_args, re_ranking, reranked_distance_blocks, reranked_distance_matrix
from .verification import VerificationResult, threshold_from_metrics, verification_metrics

__all__ = [
    "EVALUATORS",
    "METRICS",
    "EvaluationOptions",
    "KNNIndex",
    "KNNOptions",
    "RankResult",
    "alpha_query_expansion",
    "build_index",
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
    "threshold_from_metrics",
    "VerificationResult",
    "verification_metrics",
]
