"""The evaluator on CUDA (docs/methods.md E1-E4): ``evaluate_rank`` on device tensors against a
brute-force numpy reference (ties included) and Torchreid's ``evaluate_rank``;
``evaluate_features`` (distances a block at a time on the device) and its re-ranking path
(``rerank=True``), ``re_ranking`` on device matrices and ``evaluate_test_features`` (AQE,
normalisation, re-ranking) on the device against the CPU.

``pytest -m cuda``; without CUDA these tests skip (``TORCHREID_EXT_TEST_DEVICE=cpu``: run on the CPU).
"""
import numpy as np
import pytest
import torch

from cuda_env import DEVICE, MARKS, strict_fp32
from torchreid_ext.adapter import torchreid
from torchreid_ext.metrics import (
    EvaluationOptions,
    evaluate_features,
    evaluate_rank,
    evaluate_test_features,
    re_ranking,
    reranked_distance_matrix,
)

pytestmark = MARKS

MAX_RANK = 20


@pytest.fixture(autouse=True)
def no_tf32():
    with strict_fp32():
        yield


def labels(rng, num_q, num_g, num_ids, num_cams=4):
    q_pids = rng.randint(1, num_ids + 1, num_q)
    g_pids = np.concatenate([rng.randint(1, num_ids + 1, num_g - num_g // 10), np.zeros(num_g // 10, np.int64)])
    q_cams, g_cams = rng.randint(0, num_cams, num_q), rng.randint(0, num_cams, num_g)
    return q_pids.astype(np.int64), g_pids.astype(np.int64), q_cams.astype(np.int64), g_cams.astype(np.int64)


def features(seed, num_q=120, num_g=700, num_ids=50, dim=16, integer=False, dtype=np.float32):
    """Clustered query / gallery features and labels. ``integer``: small integer entries, so
    squared distances are exact in float32 on any device and ties are frequent."""
    rng = np.random.RandomState(seed)
    lab = labels(rng, num_q, num_g, num_ids)
    centres = rng.randn(num_ids + 1, dim) * 2.0
    qf = centres[lab[0]] + rng.randn(num_q, dim)
    gf = centres[lab[1]] + rng.randn(num_g, dim)
    gf[lab[1] == 0] = rng.randn(int((lab[1] == 0).sum()), dim) * 2.0
    if integer:
        qf, gf = np.round(qf), np.round(gf)
    return qf.astype(dtype), gf.astype(dtype), lab


def sq_dist(qf, gf):
    qf, gf = qf.astype(np.float64), gf.astype(np.float64)
    return ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)


def brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK):
    """E1-E3 per query, in numpy; same pid and camera as the query: junk; ties: negatives first."""
    cmc, aps, inps = np.zeros(max_rank), [], []
    for q in range(distmat.shape[0]):
        keep = ~((g_pids == q_pids[q]) & (g_cams == q_cams[q]))
        d, is_pos = distmat[q][keep], g_pids[keep] == q_pids[q]
        if not is_pos.any():
            continue
        order = np.lexsort((is_pos, d))
        ranks = np.flatnonzero(is_pos[order]) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        cmc[ranks[0] - 1:] += 1
    return cmc / len(aps), float(np.mean(aps)), float(np.mean(inps))


def assert_same(res, ref, tol=1e-12):
    cmc, mAP, mINP = ref if isinstance(ref, tuple) else (ref.cmc, ref.mAP, ref.mINP)
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=tol)
    assert abs(res.mAP - mAP) <= tol and abs(res.mINP - mINP) <= tol


def dev(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE) for a in arrays]


@pytest.mark.parametrize("kind", ["tied_integers", "random", "clustered"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_evaluate_rank_on_device_equals_numpy_brute_force(kind, chunk_size):
    qf, gf, lab = features(0, integer=kind == "tied_integers")
    distmat = np.random.RandomState(1).rand(len(qf), len(gf)) if kind == "random" else sq_dist(qf, gf)
    distmat = distmat.astype(np.float32)
    ref = brute_force(distmat, *lab)
    if kind == "tied_integers":  # the tie rule is exercised
        assert len(np.unique(distmat[0])) < distmat.shape[1] / 2
    on_device = evaluate_rank(*dev(distmat), *lab, max_rank=MAX_RANK, chunk_size=chunk_size)
    assert_same(on_device, ref)
    labels_on_device = evaluate_rank(*dev(distmat), *dev(*lab), max_rank=MAX_RANK, chunk_size=chunk_size)
    assert_same(labels_on_device, ref)
    assert_same(evaluate_rank(distmat, *lab, max_rank=MAX_RANK), ref)  # the numpy input, on the CPU


def test_evaluate_rank_on_device_equals_torchreid():
    qf, gf, lab = features(2)
    distmat = sq_dist(qf, gf).astype(np.float32)  # continuous: no ties, so Torchreid's order is ours
    cmc, mAP = torchreid().metrics.evaluate_rank(distmat, *lab, max_rank=MAX_RANK, use_cython=False)
    res = evaluate_rank(*dev(distmat), *lab, max_rank=MAX_RANK)
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-6)
    assert res.mAP == pytest.approx(mAP, abs=1e-6)
    # CUHK03's single-shot protocol (random gallery draws from numpy's global RNG)
    np.random.seed(0)
    cmc03, mAP03 = torchreid().metrics.evaluate_rank(distmat, *lab, max_rank=MAX_RANK, use_metric_cuhk03=True,
                                                     use_cython=False)
    np.random.seed(0)
    ours = evaluate_rank(distmat, *lab, max_rank=MAX_RANK, use_metric_cuhk03=True)
    np.random.seed(0)
    res03 = evaluate_rank(*dev(distmat), *lab, max_rank=MAX_RANK, use_metric_cuhk03=True)
    np.testing.assert_allclose(res03.cmc, ours.cmc, rtol=0, atol=1e-12)
    assert np.max(np.abs(res03.cmc - cmc03)) <= 1e-3 and abs(res03.mAP - mAP03) <= 1e-3


@pytest.mark.parametrize("chunk_size", [None, 13])
def test_evaluate_features_on_device_equals_cpu_with_ties(chunk_size):
    """Integer features: the device's distances are exact, so every metric is equal, ties included."""
    qf, gf, lab = features(3, integer=True)
    ref = brute_force(sq_dist(qf, gf), *lab)
    cpu = evaluate_features(qf, gf, *lab, max_rank=MAX_RANK)
    res = evaluate_features(*dev(qf, gf), *lab, max_rank=MAX_RANK, chunk_size=chunk_size)
    assert_same(cpu, ref)
    assert_same(res, ref)


@pytest.mark.parametrize("metric, normalize", [("cosine", False), ("euclidean", True)])
def test_evaluate_features_on_device_float64(metric, normalize):
    qf, gf, lab = features(4, dtype=np.float64)
    cpu = evaluate_features(qf, gf, *lab, metric=metric, normalize=normalize, max_rank=MAX_RANK)
    res = evaluate_features(*dev(qf, gf), *lab, metric=metric, normalize=normalize, max_rank=MAX_RANK,
                            chunk_size=11)
    assert_same(res, cpu, tol=1e-9)


# Re-ranking computes in float32 on every device (Torchreid's precision), and the devices round
# the distance products and Jaccard sums differently (~1e-7): the values agree to 1e-5, and a
# metric may move by ~1e-5 where two gallery items are that close, hence 1e-4 on metrics.
RERANK_TOL = 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reranked_evaluation_on_device_equals_cpu(dtype):
    qf, gf, lab = features(5, num_q=80, num_g=500, dtype=dtype)
    expected = reranked_distance_matrix(qf, gf)
    got = reranked_distance_matrix(*dev(qf, gf))
    assert got.shape == (80, 500) and float(np.max(np.abs(got - expected))) <= 1e-5
    cpu = evaluate_features(qf, gf, *lab, max_rank=MAX_RANK, rerank=True)
    res = evaluate_features(*dev(qf, gf), *lab, max_rank=MAX_RANK, rerank=True)
    assert_same(res, cpu, tol=RERANK_TOL)
    # it is the re-ranked evaluation: plain distances give other metrics
    plain = evaluate_features(qf, gf, *lab, max_rank=MAX_RANK)
    assert abs(plain.mAP - cpu.mAP) > 1e-4


def test_re_ranking_drop_in_on_device_matrices():
    qf, gf, _ = features(6, num_q=60, num_g=300)
    tr = torchreid()
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    mats = [tr.metrics.compute_distance_matrix(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))]
    expected = tr.utils.re_ranking(*mats)
    out = re_ranking(*dev(*mats))
    assert isinstance(out, torch.Tensor) and out.device.type == DEVICE.type and out.dtype == torch.float32
    assert float(np.max(np.abs(out.cpu().numpy() - expected))) <= 1e-5
    assert float(np.max(np.abs(re_ranking(*mats) - expected))) <= 1e-5


@pytest.mark.parametrize("options", [
    dict(normalize_feature=True),
    dict(aqe=True, normalize_feature=True),
    dict(rerank=True, rerank_k1=10, rerank_k2=3),
    dict(aqe=True, rerank=True, dist_metric="cosine"),
], ids=["normalize", "aqe", "rerank", "aqe_rerank_cosine"])
def test_evaluate_test_features_on_device_equals_cpu(options):
    """The engine's evaluation from features (device tensors, as ReIDEngine passes them)."""
    qf, gf, lab = features(7, num_q=80, num_g=500, dtype=np.float64)
    opts = EvaluationOptions(max_rank=MAX_RANK, **options)
    cpu = evaluate_test_features(qf, gf, *lab, opts)
    res = evaluate_test_features(*dev(qf, gf), *lab, opts)
    assert_same(res, cpu, tol=RERANK_TOL if opts.rerank else 1e-9)
