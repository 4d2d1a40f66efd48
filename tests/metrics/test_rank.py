"""torchreid_ext.metrics against Torchreid's Python evaluator and a plain float64 brute force (E1-E4)."""
import numpy as np
import pytest
import torch

import torchreid_ext.metrics.rank as rank_mod
from torchreid_ext.adapter import torchreid
from torchreid_ext.metrics import (
    RankResult,
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
    iter_distance_chunks,
)

MAX_RANK = 20
# every evaluation path: (sparse-path fraction limit, numpy scan)
PATHS = {
    "auto": (None, True),
    "dense": (-1.0, True),
    "sparse-numpy": (1.0, True),
    "sparse-torch": (1.0, False),
}


@pytest.fixture(params=sorted(PATHS))
def path(request, monkeypatch):
    fraction, numpy_scan = PATHS[request.param]
    if fraction is not None:
        monkeypatch.setattr(rank_mod, "_SPARSE_MAX_FRACTION", dict.fromkeys(("numpy", "packed", "sorted"), fraction))
    monkeypatch.setattr(rank_mod, "_NUMPY_SCAN", numpy_scan)
    return request.param


def make_labels(rng, num_q=80, num_g=400, num_ids=40, num_cams=4):
    """Labels with pid-0 distractors, junk, a query absent from the gallery and a junk-only query."""
    g_pids = rng.randint(1, num_ids + 1, num_g)
    g_pids[: num_g // 7] = 0  # distractors (E1: negatives for everyone)
    g_cams = rng.randint(0, num_cams, num_g)
    q_pids = rng.randint(1, num_ids + 1, num_q)
    q_cams = rng.randint(0, num_cams, num_q)
    q_pids[0] = num_ids + 7  # not in the gallery: skipped (E2)
    # identity num_ids seen only by camera 0: its camera-0 queries have junk but no positive (E2)
    g_cams[g_pids == num_ids] = 0
    q_pids[1], q_cams[1] = num_ids, 0
    q_cams[q_pids == num_ids] = 0
    q_pids[2] = 0  # a distractor query: the other cameras' distractors are its positives
    return q_pids, g_pids, q_cams, g_cams


def make_case(seed, kind="random", num_q=80, num_g=400, num_ids=40, dim=16):
    rng = np.random.RandomState(seed)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, num_q, num_g, num_ids)
    if kind == "random":
        distmat = rng.rand(num_q, num_g)
    else:  # clustered: identities are blobs, so positives are near (few negatives before them)
        centers = rng.randn(num_ids + 10, dim) * 2.0
        qf = centers[q_pids % (num_ids + 10)] + rng.randn(num_q, dim)
        gf = centers[g_pids] + rng.randn(num_g, dim)
        gf[g_pids == 0] = rng.randn(int((g_pids == 0).sum()), dim) * 2.0
        distmat = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    return distmat, q_pids, g_pids, q_cams, g_cams


def brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """E1-E3 per query, written plainly; ties: negatives before positives (the documented rule)."""
    cmc, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for q in range(distmat.shape[0]):
        keep = ~((g_pids == q_pids[q]) & (g_cams == q_cams[q]))
        d = distmat[q][keep].astype(np.float64)
        is_pos = g_pids[keep] == q_pids[q]
        if not is_pos.any():
            skipped += 1
            continue
        order = np.lexsort((is_pos, d))  # by distance, negatives first on equal distance
        ranks = np.flatnonzero(is_pos[order]) + 1  # 1-based ranks of the positives
        hits = np.arange(1, len(ranks) + 1)
        aps.append(np.mean(hits / ranks))
        inps.append(len(ranks) / ranks[-1])
        cmc[ranks[0] - 1 :] += 1
    nv = len(aps)
    return cmc / nv, float(np.mean(aps)), float(np.mean(inps)), nv, skipped


def torchreid_eval(distmat, q_pids, g_pids, q_cams, g_cams, cuhk03=False, max_rank=MAX_RANK):
    return torchreid().metrics.evaluate_rank(
        distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, use_metric_cuhk03=cuhk03, use_cython=False
    )


def assert_result(res, distmat, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK, atol=1e-6):
    cmc, mAP, mINP, nv, skipped = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=atol)
    assert res.mAP == pytest.approx(mAP, abs=atol)
    assert res.mINP == pytest.approx(mINP, abs=atol)
    assert (res.num_valid_queries, res.num_skipped_queries) == (nv, skipped)


# ---------------------------------------------------------------------------------------------------
# equality with Torchreid (tie-free float64 input) and the brute force


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchreid(path, kind, seed, dtype):
    distmat, *labels = make_case(seed, kind)
    case = (distmat.astype(dtype), *labels)
    cmc_ref, map_ref = torchreid_eval(*case)
    res = evaluate_rank(*case, max_rank=MAX_RANK, chunk_size=23)
    assert isinstance(res, RankResult) and res.cmc.dtype == np.float64 and res.cmc.shape == (MAX_RANK,)
    np.testing.assert_allclose(res.cmc, cmc_ref, rtol=0, atol=1e-6)
    assert res.mAP == pytest.approx(map_ref, abs=1e-6)
    assert_result(res, *case)  # mINP and the valid / skipped counts
    assert res.num_skipped_queries >= 2  # the absent and the junk-only query
    if path == "dense":
        assert res.extras["sparse_chunks"] == 0
    elif path.startswith("sparse"):
        assert res.extras["dense_chunks"] == 0


def test_clustered_input_takes_sparse_path_by_default():
    # E4: only the items at or below each row's hardest positive are ordered (here ~2% of the matrix)
    res = evaluate_rank(*make_case(3, "clustered", num_g=2000, num_ids=200))
    assert res.extras["sparse_chunks"] > 0 and res.extras["dense_chunks"] == 0
    assert 0 < res.extras["near_items"] < 0.1 * res.num_valid_queries * 2000


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("chunk_size", [None, 9])
def test_cuhk03_matches_torchreid(seed, chunk_size):
    case = make_case(seed, "clustered" if seed else "random")
    np.random.seed(seed)
    cmc_ref, map_ref = torchreid_eval(*case, cuhk03=True)
    after_ref = np.random.rand()
    np.random.seed(seed)
    res = evaluate_rank(*case, max_rank=MAX_RANK, use_metric_cuhk03=True, chunk_size=chunk_size)
    after = np.random.rand()
    np.testing.assert_allclose(res.cmc, cmc_ref, rtol=0, atol=1e-6)
    assert res.mAP == pytest.approx(map_ref, abs=1e-6)
    assert after == after_ref  # the global generator advanced exactly as Torchreid's draws
    # AP and mINP do not depend on the sampling
    _, mAP, mINP, nv, _ = brute_force(*case, MAX_RANK)
    assert (res.mAP, res.mINP, res.num_valid_queries) == (pytest.approx(mAP), pytest.approx(mINP), nv)


def test_cuhk03_differs_from_market_metric():
    case = make_case(4)
    np.random.seed(0)
    a = evaluate_rank(*case, use_metric_cuhk03=True, max_rank=MAX_RANK)
    b = evaluate_rank(*case, max_rank=MAX_RANK)
    assert not np.allclose(a.cmc, b.cmc)  # the flag is honoured: sampled CMC
    assert (a.mAP, a.mINP) == (b.mAP, b.mINP)  # AP and INP come from the full list in both


# ---------------------------------------------------------------------------------------------------
# ties


def test_tie_rule_negative_ties_rank_ahead():
    # one query (pid 1, cam 0); gallery: positive at 0.5, negatives at 0.2, 0.5 (tie), 0.9;
    # junk (pid 1, cam 0) at 0.1 is removed. Pessimistic: the tied negative ranks first -> rank 3.
    distmat = np.array([[0.5, 0.2, 0.5, 0.9, 0.1]])
    res = evaluate_rank(distmat, [1], [1, 2, 3, 4, 1], [0], [1, 1, 1, 1, 0], max_rank=4)
    np.testing.assert_allclose(res.cmc, [0, 0, 1, 1])
    assert res.mAP == pytest.approx(1 / 3) and res.mINP == pytest.approx(1 / 3)


def test_tie_rule_collapsed_model_scores_worst(path):
    # all distances equal: every positive ranks after every negative (no free perfect score)
    q_pids, g_pids, q_cams, g_cams = make_labels(np.random.RandomState(0))
    distmat = np.ones((len(q_pids), len(g_pids)), dtype=np.float32)
    res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)
    assert res.cmc[0] == 0.0
    assert_result(res, distmat, q_pids, g_pids, q_cams, g_cams)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_tie_rule_many_ties_equals_brute_force(path, seed, dtype):
    distmat, *labels = make_case(seed)
    distmat = (np.round(distmat * 12) / 12 - 0.5).astype(dtype)  # 13 values, some negative: ties everywhere
    distmat[distmat == 0] = -0.0  # -0.0 equals 0.0 (one tie, not two values)
    distmat[:, ::5] = np.where(distmat[:, ::5] == -0.0, 0.0, distmat[:, ::5])
    res = evaluate_rank(distmat, *labels, max_rank=MAX_RANK, chunk_size=17)
    assert_result(res, distmat, *labels, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_infinite_distances_equal_brute_force(path, dtype):
    # +inf (e.g. masked pairs) ties among itself, so only the brute force with the tie rule is exact
    distmat, *labels = make_case(0, "clustered")
    rng = np.random.RandomState(1)
    distmat[rng.rand(*distmat.shape) < 0.1] = np.inf
    distmat[rng.rand(*distmat.shape) < 0.01] = -np.inf
    distmat = distmat.astype(dtype)
    res = evaluate_rank(distmat, *labels, max_rank=MAX_RANK, chunk_size=17)
    assert_result(res, distmat, *labels, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# feature path, input types, devices


@pytest.mark.parametrize("metric,normalize", [("euclidean", False), ("euclidean", True), ("cosine", False)])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 33])
def test_features_chunked_equals_matrix(metric, normalize, chunk_size):
    rng = np.random.RandomState(11)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng)
    centers = rng.randn(60, 32)
    qf = centers[q_pids % 60] + rng.randn(len(q_pids), 32) * 1.5
    gf = centers[g_pids % 60] + rng.randn(len(g_pids), 32) * 1.5
    full = compute_distance_matrix(qf, gf, metric=metric, normalize=normalize)
    ref = evaluate_rank(full, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, normalize=normalize,
                            max_rank=MAX_RANK, chunk_size=chunk_size)
    np.testing.assert_allclose(res.cmc, ref.cmc, rtol=0, atol=1e-12)
    assert (res.mAP, res.mINP) == (pytest.approx(ref.mAP, abs=1e-12), pytest.approx(ref.mINP, abs=1e-12))
    # the blocks are rows of the full matrix, and the full matrix is Torchreid's
    blocks = torch.cat([b for _, b in iter_distance_chunks(qf, gf, metric, normalize, chunk_size)])
    torch.testing.assert_close(blocks, full, rtol=1e-12, atol=1e-10)
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    if normalize:
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    expected = torchreid().metrics.compute_distance_matrix(q, g, metric)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-10)
    assert_result(res, full.numpy(), q_pids, g_pids, q_cams, g_cams)


def test_features_auto_blocks_are_ranked_in_sub_blocks(monkeypatch):
    # automatic blocks: distances for >= _MATMUL_MIN_ROWS rows at once, ranked a few rows at a time
    import torchreid_ext.metrics.distance as distance_mod

    monkeypatch.setitem(distance_mod._CHUNK_ELEMENTS, "cpu", 400 * 6)  # rank 6 rows at a time
    monkeypatch.setattr(rank_mod, "_MATMUL_MIN_ROWS", 32)  # distances for 36 rows at a time
    blocks, ranked = [], []
    add, make_blocks = rank_mod._RankAccumulator.add, rank_mod.distance_blocks

    def spy_add(self, start, dist):
        ranked.append((start, len(dist)))
        add(self, start, dist)

    def spy_blocks(*args):
        for start, block in make_blocks(*args):
            blocks.append((start, len(block)))
            yield start, block

    monkeypatch.setattr(rank_mod._RankAccumulator, "add", spy_add)
    monkeypatch.setattr(rank_mod, "distance_blocks", spy_blocks)
    rng = np.random.RandomState(12)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng)
    qf, gf = rng.randn(len(q_pids), 8), rng.randn(len(g_pids), 8)
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)
    assert blocks == [(0, 36), (36, 36), (72, 8)]
    assert ranked == [(s, 6) for s in range(0, 72, 6)] + [(72, 6), (78, 2)]
    assert_result(res, compute_distance_matrix(qf, gf).numpy(), q_pids, g_pids, q_cams, g_cams)


def test_features_match_torchreid_float32():
    # float32 features through Torchreid's own distance + evaluator vs ours (Torchreid's engine path)
    rng = np.random.RandomState(3)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng)
    qf = torch.from_numpy(rng.randn(len(q_pids), 64).astype(np.float32))
    gf = torch.from_numpy(rng.randn(len(g_pids), 64).astype(np.float32))
    distmat = torchreid().metrics.compute_distance_matrix(qf, gf, "euclidean").numpy()
    cmc_ref, map_ref = torchreid_eval(distmat, q_pids, g_pids, q_cams, g_cams)
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK, chunk_size=10)
    np.testing.assert_allclose(res.cmc, cmc_ref, rtol=0, atol=1e-6)
    assert res.mAP == pytest.approx(map_ref, abs=1e-6)


def test_torch_inputs_equal_numpy():
    distmat, q_pids, g_pids, q_cams, g_cams = make_case(7, "clustered")
    ref = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)
    as_t = [torch.from_numpy(x) for x in (distmat, q_pids, g_pids, q_cams, g_cams)]
    res = evaluate_rank(*as_t, max_rank=MAX_RANK)
    res_lists = evaluate_rank(distmat, *(x.tolist() for x in (q_pids, g_pids, q_cams, g_cams)), max_rank=MAX_RANK)
    res_f32 = evaluate_rank(as_t[0].float(), *as_t[1:], max_rank=MAX_RANK)  # may break near-ties only
    res_fortran = evaluate_rank(np.asfortranarray(distmat), q_pids, g_pids, q_cams, g_cams, max_rank=MAX_RANK)
    for other in (res, res_lists, res_fortran):
        np.testing.assert_array_equal(other.cmc, ref.cmc)
        assert (other.mAP, other.mINP) == (ref.mAP, ref.mINP)
    np.testing.assert_allclose(res_f32.cmc, ref.cmc, atol=1e-6)
    assert res_f32.mAP == pytest.approx(ref.mAP, abs=1e-6)


def test_big_endian_and_memory_mapped_inputs(tmp_path):
    distmat, *labels = make_case(6, "clustered")
    ref = evaluate_rank(distmat, *labels, max_rank=MAX_RANK)
    np.save(tmp_path / "d.npy", distmat)
    big_labels = [x.astype(">i8") for x in labels]
    for d in (distmat.astype(">f8"), np.load(tmp_path / "d.npy", mmap_mode="r")):
        res = evaluate_rank(d, *big_labels, max_rank=MAX_RANK)
        np.testing.assert_array_equal(res.cmc, ref.cmc)
        assert (res.mAP, res.mINP) == (ref.mAP, ref.mINP)
    rng = np.random.RandomState(6)
    qf, gf = rng.randn(len(labels[0]), 8), rng.randn(len(labels[1]), 8)
    a = evaluate_features(qf, gf, *labels, max_rank=MAX_RANK)
    b = evaluate_features(qf.astype(">f8"), gf.astype(">f8"), *big_labels, max_rank=MAX_RANK)
    assert (a.mAP, a.mINP) == (b.mAP, b.mINP)


def test_max_rank_beyond_gallery_and_threads_restored():
    distmat, *labels = make_case(8, num_g=30, num_ids=6)
    threads = torch.get_num_threads()
    res = evaluate_rank(distmat, *labels, max_rank=50, progress=True)
    assert torch.get_num_threads() == threads
    assert res.cmc.shape == (50,) and np.all(res.cmc[30:] == 1.0)
    assert_result(res, distmat, *labels, max_rank=50)
    assert res.rank(1) == res.cmc[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_gpu_equals_cpu(kind):
    distmat, *labels = make_case(2, kind)
    ref = evaluate_rank(distmat, *labels, max_rank=MAX_RANK)
    dev = torch.device("cuda")
    res = evaluate_rank(torch.from_numpy(distmat).to(dev), *(torch.from_numpy(x).to(dev) for x in labels),
                        max_rank=MAX_RANK)
    np.testing.assert_allclose(res.cmc, ref.cmc, atol=1e-12)
    assert (res.mAP, res.mINP) == (pytest.approx(ref.mAP, abs=1e-12), pytest.approx(ref.mINP, abs=1e-12))
    np.random.seed(0)
    ref03 = evaluate_rank(distmat, *labels, max_rank=MAX_RANK, use_metric_cuhk03=True)
    np.random.seed(0)
    res03 = evaluate_rank(torch.from_numpy(distmat).to(dev), *labels, max_rank=MAX_RANK, use_metric_cuhk03=True)
    np.testing.assert_allclose(res03.cmc, ref03.cmc, atol=1e-12)
    qf, gf = torch.randn(80, 16, dtype=torch.float64), torch.randn(400, 16, dtype=torch.float64)
    a = evaluate_features(qf, gf, *labels, max_rank=MAX_RANK, metric="cosine")
    b = evaluate_features(qf.to(dev), gf.to(dev), *labels, max_rank=MAX_RANK, metric="cosine", chunk_size=13)
    assert b.mAP == pytest.approx(a.mAP, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# bad input


def _bad_cases():
    d, qp, gp, qc, gc = make_case(0, num_q=10, num_g=50, num_ids=5)
    f = np.zeros((10, 4))
    nan = d.copy()
    nan[3, 7] = np.nan
    ok = dict(distmat=d, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
    return [
        (dict(ok, q_pids=qp[:-1]), ValueError, "q_pids has length 9, expected 10"),
        (dict(ok, g_camids=gc[:, None]), ValueError, "g_camids must be 1-D"),
        (dict(ok, distmat=d[0]), ValueError, "distmat must be 2-D"),
        (dict(ok, distmat=d[:, :0]), ValueError, "non-empty"),
        (dict(ok, distmat=d.tolist()), TypeError, "numpy array or a torch tensor, got list"),
        (dict(ok, distmat=d > 0.5), TypeError, "distmat must hold real numbers, got dtype bool"),
        (dict(ok, q_pids=qp.astype(float)), TypeError, "q_pids must hold integers, got dtype float64"),
        (dict(ok, max_rank=0), ValueError, "max_rank must be an integer >= 1, got 0"),
        (dict(ok, max_rank=2.5), ValueError, "max_rank must be an integer >= 1, got 2.5"),
        (dict(ok, chunk_size=0), ValueError, "chunk_size must be a positive integer or None, got 0"),
        (dict(ok, num_threads=0), ValueError, "num_threads must be a positive integer or None, got 0"),
        (dict(ok, distmat=nan), ValueError, r"NaN \(first at query 3, gallery 7\)"),
        (dict(ok, g_pids=gp + 1000), ValueError, "no valid query"),
        (dict(qf=f, gf=np.zeros((50, 3)), q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc), ValueError,
         "same feature dimension"),
        (dict(qf=f, gf=np.zeros((50, 4)), q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc, metric="l1"),
         ValueError, r"metric = 'l1' is unknown; choose one of \['euclidean', 'cosine'\]"),
        (dict(qf=f[0], gf=np.zeros((50, 4)), q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc), ValueError,
         r"qf must be 2-D \(num_samples x feature_dim\), got shape \(4,\)"),
        (dict(qf=f.astype(str), gf=np.zeros((50, 4)), q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc), TypeError,
         "qf must hold real numbers, got dtype <U32"),
        (dict(qf=f, gf=np.zeros((50, 4)), q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc, chunk_size=-3),
         ValueError, "chunk_size must be a positive integer or None, got -3"),
        (dict(qf=f, gf=np.zeros((50, 4)), q_pids=qp, g_pids=gp[:3], q_camids=qc, g_camids=gc), ValueError,
         "g_pids has length 3, expected 50"),
    ]


@pytest.mark.parametrize("kwargs,exc,message", _bad_cases())
def test_bad_input_raises(kwargs, exc, message):
    fn = evaluate_features if "qf" in kwargs else evaluate_rank
    with pytest.raises(exc, match=message):
        fn(**kwargs)
