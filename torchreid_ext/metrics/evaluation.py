"""Evaluation from query and gallery features: the one function the engine and scripts call.

:func:`evaluate_test_features` turns features into metrics exactly as ``ReIDEngine.test`` does
(``scripts/evaluate.py`` on saved features calls it too, so both give identical results):

1. alpha query expansion (``test.aqe``, :mod:`torchreid_ext.metrics.aqe`), on the features as extracted;
2. L2 normalisation (``test.normalize_feature``), as Torchreid's engine;
3. distances (``test.dist_metric``: squared Euclidean or cosine, docs/methods.md E2) and, with
   ``test.rerank``, k-reciprocal re-ranking (:mod:`torchreid_ext.metrics.rerank`);
4. CMC / mAP / mINP (docs/methods.md E1-E4) by the fast evaluator, or by Torchreid's own code
   (``test.evaluator torchreid``: its ``compute_distance_matrix``, ``re_ranking`` and ``evaluate_rank``);
5. same-person verification over the cross-camera pairs (E6, :mod:`torchreid_ext.metrics.verification`):
   ROC AUC, and TPR and distance threshold at FPR 1e-4, 1e-3 and 1e-2, on the distances of step 3
   *before* re-ranking (thresholds are in ``test.dist_metric`` units, after AQE and normalisation), so a
   threshold applies to plain distances whatever ``test.rerank`` says.

``test.flip`` is applied where features are extracted (:func:`torchreid_ext.features.extract_loader`);
it is carried here so that one object holds every test-time option.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..options import ConfigOptions, is_int
from .aqe import alpha_query_expansion, check_aqe_args
from .distance import METRICS, ArrayLike, as_features
from .knn_index import KNNOptions
from .rank import LabelLike, RankResult, check_max_rank, evaluate_features
from .rerank import check_rerank_args, reranked_distance_matrix
from .verification import (
    VerificationPasses,
    VerificationResult,
    second_pass_from_features,
    verification_from_features,
    verification_line,
    verification_metrics,
)

__all__ = ["EVALUATORS", "EvaluationOptions", "evaluate_test_features", "evaluation_distance_matrix",
           "format_results", "ranking_features", "results_dict"]

EVALUATORS = ("fast", "torchreid")

logger = logging.getLogger(__name__)


def _ranks(ranks: Sequence[Any]) -> Optional[str]:
    if ranks and all(is_int(r) and r >= 1 for r in ranks):
        return None
    return "is not valid; ranks are integers >= 1 (Rank-1 is the top match)"


@dataclass(frozen=True)
class EvaluationOptions(ConfigOptions):
    """Test-time options: the ``test.*`` keys of the same names (and ``cuhk03.use_metric_cuhk03``);
    :meth:`from_config` reads them, ``max_rank`` is the largest of 50 and ``test.ranks``."""

    SECTION: ClassVar[str] = "test"
    KEYS: ClassVar[Dict[str, Optional[str]]] = {"use_metric_cuhk03": "cuhk03.use_metric_cuhk03", "max_rank": None,
                                                "progress": None, "knn": None}
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"dist_metric": METRICS, "evaluator": EVALUATORS}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {"ranks": _ranks}

    dist_metric: str = "euclidean"
    normalize_feature: bool = False
    use_metric_cuhk03: bool = False
    max_rank: int = 50
    evaluator: str = "fast"  # fast (torchreid_ext.metrics) | torchreid
    rerank: bool = False  # k-reciprocal re-ranking: Torchreid's k1, k2, lambda_value
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    flip: bool = False  # features averaged with those of the horizontally flipped image (at extraction)
    aqe: bool = False  # alpha query expansion (FastReID's AQE): top-k, alpha, rounds
    aqe_k: int = 5
    aqe_alpha: float = 3.0
    aqe_rounds: int = 1
    progress: bool = False
    # reported and drawn (upstream's keys)
    ranks: Tuple[int, ...] = (1, 5, 10, 20)  # CMC ranks printed and recorded
    visrank: bool = False  # rank lists drawn into the save dir
    visrank_topk: int = 10
    # the k-NN backend of re-ranking's neighbour step (the knn section; exact: Torchreid's numbers)
    knn: KNNOptions = KNNOptions()

    @classmethod
    def from_config(cls, cfg, **overrides) -> "EvaluationOptions":
        """Options from a torchreid_ext config; a bad value raises :class:`ConfigError` naming its key."""
        ranks = list(cfg.test.ranks)
        max_rank = max([50, *ranks]) if _ranks(ranks) is None else 50  # a bad test.ranks: its own error
        knn = overrides.pop("knn", None) or KNNOptions.from_config(cfg)
        return super().from_config(cfg, **{"max_rank": max_rank, "knn": knn, **overrides})

    def replace(self, **changes) -> "EvaluationOptions":
        return replace(self, **changes)

    def for_call(self, **torchreid_args) -> "EvaluationOptions":
        """These options with the arguments of Torchreid's ``Engine.test`` / ``run`` (dist_metric,
        normalize_feature, use_metric_cuhk03, ranks, rerank, visrank, visrank_topk) and any other
        field given; ``max_rank`` follows ``ranks``."""
        changes = {k: tuple(v) if k == "ranks" else v for k, v in torchreid_args.items()}
        ranks = changes.get("ranks", self.ranks)
        return replace(self, max_rank=max([50, *ranks]), **changes)

    @property
    def _rerank_keys(self) -> Tuple[str, ...]:
        return tuple(map(self.describe, ("rerank_k1", "rerank_k2", "rerank_lambda")))

    def check(self) -> None:
        """The rules between options (re-ranking's k2 <= k1, ...), naming the config keys."""
        try:
            check_max_rank(self.max_rank)
            check_rerank_args(self.rerank_k1, self.rerank_k2, self.rerank_lambda, names=self._rerank_keys)
            check_aqe_args(self.aqe_k, self.aqe_alpha, self.aqe_rounds,
                           names=tuple(map(self.describe, ("aqe_k", "aqe_alpha", "aqe_rounds"))))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def as_dict(self) -> dict:
        """Plain values (the ``knn`` options as a dict of their own), for metrics.json."""
        return {f.name: asdict(self.knn) if f.name == "knn" else getattr(self, f.name) for f in fields(self)}

    def check_sizes(self, num_query: int, num_gallery: int) -> None:
        """Raise :class:`ConfigError` (naming the config key) unless the options fit a query and
        gallery of these sizes: re-ranking's ``k1`` and AQE's ``k`` need that many items."""
        n = num_query + num_gallery
        if self.rerank:
            try:
                check_rerank_args(self.rerank_k1, self.rerank_k2, self.rerank_lambda, num_items=n,
                                  names=self._rerank_keys)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.aqe and self.aqe_k > n:
            raise ConfigError(f"{self.describe('aqe_k')} = {self.aqe_k} exceeds the number of query + gallery features "
                             f"({num_query} + {num_gallery} = {n})")


def ranking_features(qf: ArrayLike, gf: ArrayLike, opts: EvaluationOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: AQE, then L2 normalisation: the features distances are computed from."""
    q, g = as_features(qf, "qf"), as_features(gf, "gf")
    if opts.aqe:
        q, g = alpha_query_expansion(q, g, k=opts.aqe_k, alpha=opts.aqe_alpha, rounds=opts.aqe_rounds)
    if opts.normalize_feature:
        q, g = F.normalize(q, p=2, dim=1), F.normalize(g, p=2, dim=1)
    return q, g


def _torchreid_distances(q: torch.Tensor, g: torch.Tensor, opts: EvaluationOptions) -> np.ndarray:
    """Torchreid's own path: its distance matrices and (with ``rerank``) its ``re_ranking``."""
    from ..adapter import torchreid

    tr = torchreid()
    q, g = q.cpu(), g.cpu()
    distmat = tr.metrics.compute_distance_matrix(q, g, opts.dist_metric).numpy()
    if opts.rerank:
        qq = tr.metrics.compute_distance_matrix(q, q, opts.dist_metric).numpy()
        gg = tr.metrics.compute_distance_matrix(g, g, opts.dist_metric).numpy()
        distmat = tr.utils.re_ranking(distmat, qq, gg, k1=opts.rerank_k1, k2=opts.rerank_k2,
                                      lambda_value=opts.rerank_lambda)
    return distmat


@torch.no_grad()
def evaluate_test_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: LabelLike,
    g_pids: LabelLike,
    q_camids: LabelLike,
    g_camids: LabelLike,
    options: Optional[EvaluationOptions] = None,
) -> RankResult:
    """Metrics of query / gallery features under ``options`` (see the module docstring).

    Features may be numpy arrays or tensors on any device (the fast evaluator runs there).
    With ``evaluator='torchreid'`` the result has ``mINP = None`` and ``num_valid_queries = None``
    (Torchreid's ``evaluate_rank`` returns neither).
    """
    opts = options or EvaluationOptions()
    q, g = ranking_features(qf, gf, opts)
    if opts.evaluator == "torchreid":
        from ..adapter import torchreid

        distmat = _torchreid_distances(q, g, opts)
        cmc, mAP = torchreid().metrics.evaluate_rank(
            distmat, np.asarray(q_pids), np.asarray(g_pids), np.asarray(q_camids), np.asarray(g_camids),
            max_rank=opts.max_rank, use_metric_cuhk03=opts.use_metric_cuhk03,
        )
        result = RankResult(cmc=np.asarray(cmc, dtype=np.float64), mAP=float(mAP), mINP=None,
                            num_valid_queries=None, num_skipped_queries=None)
        # its own distances where it ranked by them, else (re-ranked) the plain ones from the features
        verification = _verification(q, g, q_pids, g_pids, q_camids, g_camids, opts,
                                     distmat=None if opts.rerank else distmat)
        return replace(result, verification=verification)
    labels = (q_pids, g_pids, q_camids, g_camids)
    passes = None if opts.rerank else _verification_passes(*labels, q.shape[0], g.shape[0], q.device)
    result = evaluate_features(
        q, g, *labels, metric=opts.dist_metric, max_rank=opts.max_rank,
        use_metric_cuhk03=opts.use_metric_cuhk03, progress=opts.progress, rerank=opts.rerank,
        k1=opts.rerank_k1, k2=opts.rerank_k2, lambda_value=opts.rerank_lambda, knn=opts.knn,
        block_hook=None if passes is None else passes.first,  # the first pass reads the ranking's distances
    )
    return replace(result, verification=_verification(q, g, *labels, opts, passes=passes))


def _verification_passes(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int,
                         device) -> Optional[VerificationPasses]:
    try:
        return VerificationPasses(q_pids, g_pids, q_camids, g_camids, num_q, num_g, device)
    except ValueError as exc:
        logger.warning("verification metrics not computed: %s", exc)
        return None


def _verification(q, g, q_pids, g_pids, q_camids, g_camids, opts: EvaluationOptions, distmat=None,
                  passes: Optional[VerificationPasses] = None) -> Optional[VerificationResult]:
    """Step 5: from ``distmat``, or finishing ``passes`` (whose first pass saw the ranking's blocks), or
    from the features; None (with a warning) where the set has no same-person or no different-person
    pair across cameras: the ranking metrics still stand."""
    if passes is not None:
        result = second_pass_from_features(passes, q, g, opts.dist_metric)
    else:
        try:
            if distmat is not None:
                result = verification_metrics(distmat, q_pids, g_pids, q_camids, g_camids)
            else:
                result = verification_from_features(q, g, q_pids, g_pids, q_camids, g_camids, metric=opts.dist_metric)
        except ValueError as exc:
            logger.warning("verification metrics not computed: %s", exc)
            return None
    # what a threshold means: these distances, of features extracted and prepared this way, not re-ranked
    return replace(result, distance={"dist_metric": opts.dist_metric, "normalize_feature": opts.normalize_feature,
                                     "flip": opts.flip, "aqe": opts.aqe, "rerank": False})


@torch.no_grad()
def evaluation_distance_matrix(qf: ArrayLike, gf: ArrayLike, options: Optional[EvaluationOptions] = None) -> np.ndarray:
    """The full ``Q x G`` float32 distance matrix :func:`evaluate_test_features` ranks by (for rank
    lists and ``test.visrank``; needs ``Q * G`` floats)."""
    opts = options or EvaluationOptions()
    q, g = ranking_features(qf, gf, opts)
    if opts.evaluator == "torchreid":
        return _torchreid_distances(q, g, opts)
    if opts.rerank:
        return reranked_distance_matrix(q, g, opts.dist_metric, k1=opts.rerank_k1, k2=opts.rerank_k2,
                                        lambda_value=opts.rerank_lambda, knn=opts.knn)
    from .distance import compute_distance_matrix

    return compute_distance_matrix(q, g, opts.dist_metric).cpu().numpy()


def results_dict(result: RankResult, ranks: Sequence[int]) -> Dict[str, Any]:
    """A :class:`RankResult` as the engine returns and records it (``rank1``, ``rank<r>``, ``mAP``,
    ``mINP``, ``num_valid_queries``, ``cmc`` up to the largest rank, and ``verification`` where
    computed: :meth:`VerificationResult.as_dict`); plain floats for metrics.json."""
    cmc = np.asarray(result.cmc)
    out = {"rank1": float(cmc[0]), **{f"rank{r}": float(cmc[r - 1]) for r in ranks},
           "mAP": float(result.mAP), "mINP": None if result.mINP is None else float(result.mINP),
           "num_valid_queries": None if result.num_valid_queries is None else int(result.num_valid_queries),
           "cmc": [float(c) for c in cmc[: max(ranks)]]}
    if result.verification is not None:
        out["verification"] = result.verification.as_dict()
    return out


def format_results(res: Dict[str, Any], ranks: Sequence[int]) -> str:
    """The results block printed after an evaluation (Torchreid's layout, plus mINP when known and
    one line of verification metrics when recorded)."""
    lines = ["** Results **", f"mAP: {res['mAP']:.1%}"]
    if res.get("mINP") is not None:
        lines.append(f"mINP: {res['mINP']:.1%}")
    lines.append("CMC curve")
    lines += [f"Rank-{r:<3}: {res['cmc'][r - 1]:.1%}" for r in ranks]
    if res.get("verification"):
        lines.append(verification_line(res["verification"]))
    return "\n".join(lines)
