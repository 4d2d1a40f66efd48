"""Re-ranking's neighbour step through a k-NN backend (``knn.backend``): the plumbing equals the exact
pass where the backend is exact, and approximate backends stay close to exact re-ranking."""
import json

import numpy as np
import pytest
from test_rerank import clustered, metrics_close

import torchreid_ext.metrics.rerank as rerank_mod
from torchreid_ext.config import get_default_config, merge_from_list
from torchreid_ext.metrics import EvaluationOptions, evaluate_features, evaluate_test_features
from torchreid_ext.metrics.distance import prepare_features
from torchreid_ext.metrics.knn import RunningTopK
from torchreid_ext.metrics.knn_index import KNNOptions, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install -e '.[faiss]')")


class _Bar:
    def update(self, n):
        pass


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_neighbours_from_an_exact_index_equal_the_exact_pass(metric, monkeypatch):
    """With an exact index and a sample of every item, the approximate path's neighbours, their
    distances and the largest distances are the exact pass's."""
    monkeypatch.setattr(rerank_mod, "_MAX_SAMPLE", 10 ** 6)
    qf, gf, _ = clustered(0)
    source = rerank_mod._FeatureSource(*prepare_features(qf, gf, metric, False))
    n, k = source.x.shape[0], 11
    top = RunningTopK(n, k, source.dtype, source.device)
    source.neighbours(top, 37, _Bar())
    rank, near = top.ranked()
    a_rank, a_near, a_max = source.approximate_neighbours(k, KNNOptions(), _Bar())
    np.testing.assert_allclose(a_near.numpy(), near.numpy(), rtol=1e-5, atol=1e-4)  # self: 0 vs matmul rounding
    clear = np.ones(rank.shape, dtype=bool)  # places not next to a near-tie
    gaps = np.diff(near.numpy(), axis=1) > 1e-4
    clear[:, :-1] &= gaps
    clear[:, 1:] &= gaps
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(a_rank.numpy()[clear], rank.numpy()[clear])
    np.testing.assert_allclose(a_max.numpy(), top.amax.numpy(), rtol=1e-5)


def test_a_small_sample_underestimates_the_largest_distance_only(monkeypatch):
    monkeypatch.setattr(rerank_mod, "_MAX_SAMPLE", 16)
    qf, gf, _ = clustered(1)
    source = rerank_mod._FeatureSource(*prepare_features(qf, gf, "euclidean", False))
    top = RunningTopK(source.x.shape[0], 11, source.dtype, source.device)
    source.neighbours(top, 37, _Bar())
    _, near, amax = source.approximate_neighbours(11, KNNOptions(), _Bar())
    assert (amax <= top.amax * (1 + 1e-5)).all() and (amax >= near[:, -1]).all()
    assert (amax < top.amax * 0.999).any()  # the sample missed some items' farthest


def test_the_knn_section_reaches_re_ranking_through_the_evaluation_options():
    cfg = get_default_config()
    merge_from_list(cfg, ["test.rerank", "True", "knn.ivf_nprobe", "7"])
    opts = EvaluationOptions.from_config(cfg)
    assert opts.knn == KNNOptions(ivf_nprobe=7)
    record = json.loads(json.dumps(opts.as_dict()))  # metrics.json records it
    assert record["knn"]["ivf_nprobe"] == 7 and record["knn"]["backend"] == "exact"
    assert EvaluationOptions.from_config(cfg, knn=KNNOptions(hnsw_m=8)).knn.hnsw_m == 8


@needs_faiss
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_faiss_flat_re_ranking_equals_exact(metric, monkeypatch):
    monkeypatch.setattr(rerank_mod, "_MAX_SAMPLE", 10 ** 6)  # every item: the exact largest distances
    qf, gf, labels = clustered(2)
    exact = evaluate_features(qf, gf, *labels, metric=metric, max_rank=20, rerank=True, k1=10, k2=3)
    flat = evaluate_features(qf, gf, *labels, metric=metric, max_rank=20, rerank=True, k1=10, k2=3,
                             knn=KNNOptions(backend="faiss-flat"))
    metrics_close(flat, exact, 1e-6)


@needs_faiss
@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_approximate_re_ranking_stays_close_to_exact(backend, monkeypatch):
    """Approximate neighbours and largest distances from a sample of 64 items (of 240): mAP within 0.02
    of exact re-ranking, and re-ranking still differs from none."""
    monkeypatch.setattr(rerank_mod, "_MAX_SAMPLE", 64)
    qf, gf, labels = clustered(3)
    plain = evaluate_features(qf, gf, *labels, max_rank=20)
    exact = evaluate_features(qf, gf, *labels, max_rank=20, rerank=True, k1=10, k2=3)
    approx = evaluate_features(qf, gf, *labels, max_rank=20, rerank=True, k1=10, k2=3,
                               knn=KNNOptions(backend=backend))
    assert abs(approx.mAP - exact.mAP) <= 0.02, (approx.mAP, exact.mAP)
    assert abs(exact.mAP - plain.mAP) > 0.005


@needs_faiss
def test_the_evaluator_uses_the_backend_for_re_ranking_only(monkeypatch):
    """knn.backend changes re-ranked results only through the neighbour step: without re-ranking the
    evaluation is the same whatever the backend."""
    calls = []
    real = rerank_mod.build_index
    monkeypatch.setattr(rerank_mod, "build_index", lambda *a, **k: calls.append(a[1].backend) or real(*a, **k))
    qf, gf, labels = clustered(4)
    hnsw = KNNOptions(backend="faiss-hnsw")
    a = evaluate_test_features(qf, gf, *labels, EvaluationOptions(knn=hnsw))
    b = evaluate_test_features(qf, gf, *labels, EvaluationOptions())
    assert a.mAP == b.mAP and calls == []
    evaluate_test_features(qf, gf, *labels, EvaluationOptions(knn=hnsw, rerank=True, rerank_k1=10, rerank_k2=3))
    assert calls == ["faiss-hnsw"]
