"""k-reciprocal re-ranking: ours (matrix drop-in and features path) against Torchreid's ``re_ranking``."""
import itertools

import numpy as np
import pytest
import torch

import torchreid_ext.metrics.knn as knn_mod
import torchreid_ext.metrics.rerank as rerank_mod
from tensor_probe import LargestTensor
from torchreid_ext.adapter import torchreid
from torchreid_ext.metrics import (
    evaluate_features,
    evaluate_rank,
    re_ranking,
    reranked_distance_blocks,
    reranked_distance_matrix,
)

MAX_RANK = 20


def clustered(seed, num_q=40, num_g=200, num_ids=25, num_cams=4, dim=16, dtype=np.float32):
    """Features that look trained (identity blobs, camera offsets, pid-0 distractors) and labels."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(num_ids + 1, dim) * 1.5
    cam_bias = rng.randn(num_cams, dim) * 0.3

    def sample(n):
        pids = rng.randint(1, num_ids + 1, n)
        cams = rng.randint(0, num_cams, n)
        feats = centers[pids] + cam_bias[cams] + rng.randn(n, dim) * np.exp(0.3 * rng.randn(n, 1))
        return feats.astype(dtype), pids, cams

    qf, q_pids, q_cams = sample(num_q)
    gf, g_pids, g_cams = sample(num_g)
    nd = num_g // 8
    gf[:nd] = (rng.randn(nd, dim) * 2).astype(dtype)
    g_pids[:nd] = 0
    return qf, gf, (q_pids, g_pids, q_cams, g_cams)


def torchreid_matrices(qf, gf, metric="euclidean"):
    """What Torchreid's engine hands to ``re_ranking`` (its own ``compute_distance_matrix``)."""
    tr = torchreid()
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    return tuple(tr.metrics.compute_distance_matrix(a, b, metric).numpy() for a, b in ((q, g), (q, q), (g, g)))


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles, row blocks and join budgets far below the problem size, so every blocked path runs
    (running top-k merges, several QE / Jaccard blocks, chunked gathers)."""
    monkeypatch.setattr(rerank_mod, "_TILE", {"cpu": 37, "other": 37})
    monkeypatch.setattr(rerank_mod, "_ROWS", 23)
    monkeypatch.setattr(rerank_mod, "_PAIR_BUDGET", 700)
    monkeypatch.setattr(rerank_mod, "_GATHER_BUDGET", 101)
    monkeypatch.setattr(knn_mod, "_GROUP", 8)  # runs of 8 in tiles of 37: full runs and a short one


def metrics_close(a, b, tol):
    assert np.max(np.abs(a.cmc - b.cmc)) <= tol
    assert abs(a.mAP - b.mAP) <= tol and abs(a.mINP - b.mINP) <= tol


GRID = list(itertools.product((10, 20), (1, 3, 6), (0.0, 0.3, 1.0)))


@pytest.mark.parametrize("k1, k2, lam", GRID)
def test_matrix_drop_in_equals_torchreid(k1, k2, lam):
    seed = GRID.index((k1, k2, lam))
    qf, gf, labels = clustered(seed)
    qg, qq, gg = torchreid_matrices(qf, gf)
    expected = torchreid().utils.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    ours = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.max(np.abs(ours - expected)) <= 1e-5  # brief: <= 1e-3 (float32 sums in another order)
    # and the re-ranking changed something (the test would notice a no-op)
    assert np.max(np.abs(expected - qg / qg.max())) > 1e-2
    metrics_close(evaluate_rank(ours, *labels, max_rank=MAX_RANK),
                  evaluate_rank(expected, *labels, max_rank=MAX_RANK), 1e-9)
    if lam > 0:  # tie-free (lambda 0 leaves every unrelated pair at exactly 1): Torchreid's evaluator too
        cmc, mAP = torchreid().metrics.evaluate_rank(expected, *labels, max_rank=MAX_RANK, use_cython=False)
        res = evaluate_rank(ours, *labels, max_rank=MAX_RANK)
        assert np.max(np.abs(res.cmc - cmc)) <= 1e-3 and abs(res.mAP - mAP) <= 1e-3


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_blocked_paths_equal_torchreid(seed, metric, small_blocks):
    qf, gf, labels = clustered(seed + 10, num_q=50, num_g=230)
    mats = torchreid_matrices(qf, gf, metric)
    expected = torchreid().utils.re_ranking(*mats, k1=20, k2=6, lambda_value=0.3)
    assert np.max(np.abs(re_ranking(*mats) - expected)) <= 1e-5
    assert np.max(np.abs(reranked_distance_matrix(qf, gf, metric) - expected)) <= 1e-5
    blocks = list(reranked_distance_blocks(qf, gf, metric, chunk_size=7))
    starts = [a for a, _ in blocks]
    sizes = [b.shape[0] for _, b in blocks]
    assert starts == list(np.cumsum([0] + sizes[:-1])) and sum(sizes) == 50 and max(sizes) <= 7
    assert np.max(np.abs(np.concatenate([b.numpy() for _, b in blocks]) - expected)) <= 1e-5


@pytest.mark.parametrize("metric, normalize", [("euclidean", False), ("euclidean", True), ("cosine", False)])
@pytest.mark.parametrize("cuhk03", [False, True])
def test_features_path_equals_matrix_path(metric, normalize, cuhk03, small_blocks):
    qf, gf, labels = clustered(3, num_q=60, num_g=260)
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    if normalize:
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    mats = torchreid_matrices(q.numpy(), g.numpy(), metric)
    np.random.seed(5)
    ref = evaluate_rank(re_ranking(*mats, k1=10, k2=3, lambda_value=0.2), *labels, max_rank=MAX_RANK,
                        use_metric_cuhk03=cuhk03)
    np.random.seed(5)
    res = evaluate_features(qf, gf, *labels, metric=metric, normalize=normalize, max_rank=MAX_RANK,
                            use_metric_cuhk03=cuhk03, rerank=True, k1=10, k2=3, lambda_value=0.2, chunk_size=9)
    metrics_close(res, ref, 1e-9)
    assert res.num_valid_queries == ref.num_valid_queries
    plain = evaluate_features(qf, gf, *labels, metric=metric, normalize=normalize, max_rank=MAX_RANK)
    assert abs(plain.mAP - res.mAP) > 1e-4  # re-ranking was applied
    if cuhk03:  # CUHK03's classic CMC with re-ranking equals Torchreid's on its re-ranked matrix
        np.random.seed(5)
        cmc, mAP = torchreid().metrics.evaluate_rank(torchreid().utils.re_ranking(*mats, k1=10, k2=3, lambda_value=0.2),
                                                     *labels, max_rank=MAX_RANK, use_metric_cuhk03=True,
                                                     use_cython=False)
        assert np.max(np.abs(res.cmc - cmc)) <= 1e-3 and abs(res.mAP - mAP) <= 1e-3


def test_float64_features_and_tensor_inputs():
    qf, gf, labels = clustered(4, dtype=np.float64)
    mats = torchreid_matrices(qf, gf)
    expected = torchreid().utils.re_ranking(*mats)
    assert np.max(np.abs(reranked_distance_matrix(qf, gf) - expected)) <= 1e-5
    out = re_ranking(*(torch.from_numpy(m) for m in mats))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert np.max(np.abs(out.numpy() - expected)) <= 1e-5


def test_asymmetric_matrices_follow_torchreids_orientation():
    """Torchreid normalises and ranks by the *columns* of the concatenated matrix."""
    rng = np.random.RandomState(6)
    qg, qq, gg = rng.rand(15, 60), rng.rand(15, 15), rng.rand(60, 60)
    expected = torchreid().utils.re_ranking(qg, qq, gg, k1=6, k2=2, lambda_value=0.4)
    assert np.max(np.abs(re_ranking(qg, qq, gg, k1=6, k2=2, lambda_value=0.4) - expected)) <= 1e-5


def test_features_path_holds_no_n_by_n_or_q_by_g_tensor(monkeypatch):
    monkeypatch.setattr(rerank_mod, "_TILE", {"cpu": 256, "other": 256})
    monkeypatch.setattr(rerank_mod, "_PAIR_BUDGET", 30000)
    monkeypatch.setattr(rerank_mod, "_ROWS", 256)  # index work in row blocks (default 4096 rows)
    num_q, num_g = 400, 2000
    n = num_q + num_g
    qf, gf, labels = clustered(7, num_q=num_q, num_g=num_g, num_ids=120)
    with LargestTensor() as probe:
        res = evaluate_features(qf, gf, *labels, max_rank=MAX_RANK, rerank=True, k1=10, k2=3, chunk_size=10)
    # the largest tensors are the sparse V after query expansion (N x O(k1 k2) entries; here about
    # 80 a row), far below Q x G (and N x N), which grow with N^2
    assert probe.numel <= 100 * n <= num_q * num_g / 3, probe.numel
    ref = evaluate_rank(re_ranking(*torchreid_matrices(qf, gf), k1=10, k2=3), *labels, max_rank=MAX_RANK)
    metrics_close(res, ref, 1e-9)


def test_progress_bar_and_generator_checks_inputs_at_the_call(capsys):
    qf, gf, labels = clustered(8)
    with pytest.raises(ValueError, match="k1 = 0"):
        reranked_distance_blocks(qf, gf, k1=0)  # raised before iterating
    evaluate_features(qf, gf, *labels, rerank=True, progress=True)
    assert "re-ranking" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu():
    qf, gf, labels = clustered(9, num_q=80, num_g=500)
    dev = torch.device("cuda")
    cpu = evaluate_features(qf, gf, *labels, max_rank=MAX_RANK, rerank=True)
    gpu = evaluate_features(torch.from_numpy(qf).to(dev), torch.from_numpy(gf).to(dev), *labels,
                            max_rank=MAX_RANK, rerank=True)
    metrics_close(gpu, cpu, 1e-6)
    mats = [torch.from_numpy(m).to(dev) for m in torchreid_matrices(qf, gf)]
    assert float((re_ranking(*mats).cpu() - torch.from_numpy(re_ranking(*(m.cpu().numpy() for m in mats))))
                 .abs().max()) <= 1e-5


# ---------------------------------------------------------------- bad input

BAD = [
    (dict(k1=0), r"k1 = 0 must be an integer >= 1"),
    (dict(k1=2.5), r"k1 = 2.5 must be an integer"),
    (dict(k1=True), r"k1 = True must be an integer"),
    (dict(k2=0), r"k2 = 0 must be an integer in \[1, k1 = 20\]"),
    (dict(k1=5, k2=6), r"k2 = 6 must be an integer in \[1, k1 = 5\]"),
    (dict(lambda_value=-0.1), r"lambda_value = -0.1 must be a number in \[0, 1\]"),
    (dict(lambda_value=1.5), r"lambda_value = 1.5 must be a number in \[0, 1\]"),
    (dict(lambda_value=float("nan")), r"lambda_value = nan must be a number in \[0, 1\]"),
    (dict(k1=30), r"k1 = 30 needs at least k1 \+ 1 = 31 query \+ gallery items, got 30"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD)
def test_bad_arguments_name_the_value(kwargs, pattern):
    qf, gf, labels = clustered(0, num_q=6, num_g=24)
    mats = torchreid_matrices(qf, gf)
    with pytest.raises(ValueError, match=pattern):
        re_ranking(*mats, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        evaluate_features(qf, gf, *labels, rerank=True, **kwargs)


def test_bad_matrices():
    qf, gf, _ = clustered(0, num_q=6, num_g=40)
    qg, qq, gg = torchreid_matrices(qf, gf)
    with pytest.raises(ValueError, match=r"g_g_dist must have shape \(40, 40\)"):
        re_ranking(qg, qq, gg[:, :30], k1=5, k2=2)
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(6, 6\)"):
        re_ranking(qg, qg, gg, k1=5, k2=2)
    bad = gg.copy()
    bad[3, 7] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        re_ranking(qg, qq, bad, k1=5, k2=2)


def test_non_finite_features_are_named():
    """Issue 19: +inf features were reported as 'distmat contains NaN'."""
    qf, gf, labels = clustered(0)
    gf[5, 3] = np.inf
    for kwargs in (dict(), dict(rerank=True)):
        with pytest.raises(ValueError, match=r"gf contains non-finite values \(first inf at item 5, dimension 3\)"):
            evaluate_features(qf, gf, *labels, **kwargs)
    distmat = np.zeros((len(qf), len(gf)))
    distmat[2, 4] = np.nan
    with pytest.raises(ValueError, match=r"distmat contains non-finite values: NaN \(first at query 2, gallery 4\)"):
        evaluate_rank(distmat, *labels)


@pytest.mark.parametrize("group", [8, 32])
@pytest.mark.parametrize("reduce_dim", [0, 1])
def test_running_top_k_equals_topk(group, reduce_dim, monkeypatch):
    """Items along either axis, tiles with full runs and a short one, signed values (|d| ranks)."""
    monkeypatch.setattr(knn_mod, "_GROUP", group)
    torch.manual_seed(reduce_dim + group)
    n, k, tile = 150, 7, 37
    d = torch.randn(n, n, dtype=torch.float64)  # columns are the items
    top = knn_mod.RunningTopK(n, k, d.dtype, d.device)
    for c0 in range(0, n, tile):
        for r0 in range(0, n, tile):
            t = d[r0:r0 + tile, c0:c0 + tile]
            top.update(t if reduce_dim == 0 else t.t().contiguous(), reduce_dim, c0, r0)
    idx, vals = top.ranked()
    ref = d.abs().t().topk(k, dim=1, largest=False, sorted=True)
    assert torch.equal(idx, ref.indices) and torch.equal(vals, ref.values)
    assert torch.equal(top.amax, d.abs().amax(0))
