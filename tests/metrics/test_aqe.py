"""Alpha query expansion against a float64 transcription of FastReID's ``aqe``."""
import numpy as np
import pytest
import torch

from tensor_probe import LargestTensor
from torchreid_ext.metrics import alpha_query_expansion


def fastreid_aqe(qf, gf, qe_times, qe_k, alpha):
    """FastReID's fastreid/evaluation/query_expansion.py formula, row by row, in float64."""
    all_feat = np.concatenate([qf, gf]).astype(np.float64)
    for _ in range(qe_times):
        unit = all_feat / np.linalg.norm(all_feat, axis=1, keepdims=True)
        rows = []
        for sim in unit @ unit.T:
            top = np.argpartition(-sim, range(1, qe_k + 1))[:qe_k]
            weights = np.power(sim[top], alpha).reshape(-1, 1)
            rows.append(np.mean(all_feat[top] * weights, axis=0))
        all_feat = np.stack(rows)
    return all_feat[: len(qf)], all_feat[len(qf):]


def features(seed, num_q=30, num_g=90, dim=12, ids=15, dtype=np.float32):
    rng = np.random.RandomState(seed)
    centers = rng.randn(ids, dim) * 2
    qf = centers[rng.randint(0, ids, num_q)] + rng.randn(num_q, dim)
    gf = centers[rng.randint(0, ids, num_g)] + rng.randn(num_g, dim)
    return qf.astype(dtype), gf.astype(dtype)


@pytest.mark.parametrize("k, alpha, rounds", [(5, 3.0, 1), (10, 3.0, 2), (3, 0.0, 1), (5, 2.5, 3), (1, 3.0, 1)])
def test_equals_fastreid_formula(k, alpha, rounds):
    qf, gf = features(k + rounds)
    eq, eg = fastreid_aqe(qf, gf, rounds, k, alpha)
    q, g = alpha_query_expansion(qf, gf, k=k, alpha=alpha, rounds=rounds, block_rows=17)
    np.testing.assert_allclose(q.numpy(), eq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), eg, rtol=1e-5, atol=1e-5)
    if k == 1:  # itself only, weight 1: unchanged
        np.testing.assert_allclose(q.numpy(), qf, rtol=1e-5, atol=1e-5)
    else:
        assert np.abs(q.numpy() - qf).max() > 0.1


def test_float64_is_exact_and_blocks_do_not_matter():
    qf, gf = features(3, dtype=np.float64)
    eq, eg = fastreid_aqe(qf, gf, 2, 4, 3.0)
    for block_rows in (None, 1, 50):
        q, g = alpha_query_expansion(torch.from_numpy(qf), torch.from_numpy(gf), k=4, rounds=2, block_rows=block_rows)
        assert q.dtype == torch.float64
        np.testing.assert_allclose(q.numpy(), eq, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g.numpy(), eg, rtol=1e-12, atol=1e-12)


def test_bounded_memory():
    qf, gf = features(4, num_q=100, num_g=500)
    n = 600
    with LargestTensor() as probe:
        alpha_query_expansion(qf, gf, k=5, block_rows=20)
    assert probe.numel <= max(20 * n, n * 12), probe.numel  # one 20 x N block, never N x N


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(k=0), r"k = 0 must be an integer >= 1"),
    (dict(k=2.0), r"k = 2.0 must be an integer >= 1"),
    (dict(k=500), r"k = 500 exceeds the number of query \+ gallery features \(120\)"),
    (dict(alpha=-1), r"alpha = -1 must be a finite number >= 0"),
    (dict(alpha=float("inf")), r"alpha = inf must be a finite number >= 0"),
    (dict(rounds=0), r"rounds = 0 must be an integer >= 1"),
])
def test_bad_arguments(kwargs, pattern):
    qf, gf = features(0)
    with pytest.raises(ValueError, match=pattern):
        alpha_query_expansion(qf, gf, **kwargs)


def test_negative_similarity_with_fractional_alpha_is_an_error():
    qf = np.array([[1.0, 0.0], [-1.0, 0.1]], np.float32)
    gf = np.array([[0.9, 0.1]], np.float32)
    with pytest.raises(ValueError, match=r"alpha = 2.5 is not an integer and a top-3 cosine similarity is negative"):
        alpha_query_expansion(qf, gf, k=3, alpha=2.5)
    q, _ = alpha_query_expansion(qf, gf, k=3, alpha=3.0)  # integer powers of negatives are defined
    assert torch.isfinite(q).all()
