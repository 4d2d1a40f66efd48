"""k-NN backends: exact (against a float64 brute force), faiss-flat (equals exact), faiss-ivf / faiss-hnsw
(recall), the ``knn`` config section, and the error without faiss."""
import numpy as np
import pytest
import torch

import torchreid_ext.metrics.knn_index as knn_index
from torchreid_ext.config import get_default_config, merge_from_list, validate_config
from torchreid_ext.errors import ConfigError, MissingDependencyError
from torchreid_ext.metrics import compute_distance_matrix
from torchreid_ext.metrics.knn_index import KNNOptions, build_index, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install -e '.[faiss]')")

# approximate backends on clustered data of this size, with the default parameters, find at least this
# fraction of the exact 10 nearest (measured 1.0 for both; the bound leaves room for other faiss builds)
RECALL_AT_10 = 0.95


def clustered(seed, n=1500, num_q=200, dim=32, clusters=40):
    rng = np.random.RandomState(seed)
    centers = rng.randn(clusters, dim) * 2

    def sample(m):
        return (centers[rng.randint(0, clusters, m)] + rng.randn(m, dim)).astype(np.float32)

    return sample(num_q), sample(n)


def brute_force(q, g, k, metric):
    """k nearest by a float64 distance matrix; ties by gallery index (a stable sort)."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        d = 1 - q @ g.T
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.fixture
def small_tiles(monkeypatch):
    """Query blocks and gallery tiles far below the problem size: the running top-k merges run."""
    monkeypatch.setattr(knn_index, "_QUERY_ROWS", 16)
    monkeypatch.setattr(knn_index, "_TILE_ELEMENTS", 16 * 50)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_equals_brute_force(metric, small_tiles):
    q, g = clustered(0, n=400, num_q=40)
    d, i = build_index(g, metric=metric).search(q, 15)
    ref_d, ref_i = brute_force(q, g, 15, metric)
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == i.shape == (40, 15)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    # the evaluator's units: squared Euclidean / 1 - cos, as compute_distance_matrix
    full = compute_distance_matrix(q, g, metric)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full.numpy(), ref_i, 1), rtol=1e-5, atol=1e-5)


def test_exact_ties_come_by_index_and_k_may_be_the_whole_gallery(small_tiles):
    rng = np.random.RandomState(1)
    q = rng.randint(0, 3, (30, 4)).astype(np.float32)  # integer features: many equal distances
    g = rng.randint(0, 3, (120, 4)).astype(np.float32)
    d, i = build_index(torch.from_numpy(g)).search(torch.from_numpy(q), 120)
    ref_d, ref_i = brute_force(q, g, 120, "euclidean")
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_array_equal(d.numpy(), ref_d)
    assert (np.diff(d.numpy(), axis=1) == 0).any()  # ties were there to order


def test_exact_search_never_holds_the_query_by_gallery_matrix(small_tiles):
    from tensor_probe import LargestTensor

    q, g = clustered(2, n=600, num_q=64)
    index = build_index(g)
    with LargestTensor() as probe:
        index.search(torch.from_numpy(q), 10)
    assert probe.numel <= 64 * 600 / 8, probe.numel


def test_bad_arguments():
    q, g = clustered(3, n=50, num_q=5)
    index = build_index(g)
    for k in (0, 51, 2.0, True):
        with pytest.raises(ValueError, match=r"k = .* must be an integer in \[1, 50\]"):
            index.search(q, k)
    with pytest.raises(ValueError, match="query features are 8-d, the indexed gallery 32-d"):
        index.search(q[:, :8], 3)
    with pytest.raises(ValueError, match="metric = 'manhattan' is not valid"):
        build_index(g, metric="manhattan")


def test_knn_section_in_the_config():
    cfg = get_default_config()
    assert cfg.knn.backend == "exact"
    assert KNNOptions.from_config(cfg) == KNNOptions()
    for key, value, message in [("knn.backend", "annoy", "knn.backend = 'annoy' is not valid; choose one of"),
                                ("knn.ivf_nprobe", "0", "knn.ivf_nprobe = 0 is not valid"),
                                ("knn.hnsw_m", "1", "knn.hnsw_m = 1 is not valid")]:
        bad = get_default_config()
        merge_from_list(bad, [key, value])
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)


def test_a_faiss_backend_without_faiss_names_the_extra(monkeypatch):
    monkeypatch.setattr(knn_index, "faiss_available", lambda: False)
    for backend in ("faiss-flat", "faiss-ivf", "faiss-hnsw"):
        with pytest.raises(MissingDependencyError, match=r"knn.backend = '.*' needs faiss, which is not installed; "
                                                         r"install it with: pip install -e '\.\[faiss\]'") as info:
            KNNOptions(backend=backend)
        assert "\n" not in str(info.value)
        cfg = get_default_config()
        merge_from_list(cfg, ["knn.backend", backend])
        with pytest.raises(MissingDependencyError, match="needs faiss"):
            validate_config(cfg)  # when the config is loaded: before any work
    assert KNNOptions().backend == "exact"  # the default needs nothing


@needs_faiss
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_faiss_flat_equals_exact(metric):
    q, g = clustered(4)
    exact_d, exact_i = build_index(g, metric=metric).search(q, 10)
    d, i = build_index(g, KNNOptions(backend="faiss-flat"), metric).search(q, 10)
    np.testing.assert_allclose(d.numpy(), exact_d.numpy(), rtol=1e-4, atol=1e-4)
    gaps = np.diff(exact_d.numpy(), axis=1)
    clear = np.ones_like(exact_i.numpy(), dtype=bool)  # places not next to a near-tie
    clear[:, :-1] &= gaps > 1e-5
    clear[:, 1:] &= gaps > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(i.numpy()[clear], exact_i.numpy()[clear])


@needs_faiss
@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_approximate_backends_reach_the_stated_recall(backend, metric):
    q, g = clustered(5)
    _, exact_i = build_index(g, metric=metric).search(q, 10)
    d, i = build_index(g, KNNOptions(backend=backend), metric).search(q, 10)
    found = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i.numpy(), exact_i.numpy())])
    assert found >= RECALL_AT_10, found
    assert (np.diff(d.numpy(), axis=1) >= 0).all()  # ascending
    # distances of what was found are the evaluator's distances of those pairs
    full = compute_distance_matrix(q, g, metric).numpy()
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full, i.numpy(), 1), rtol=1e-4, atol=1e-4)


@needs_faiss
def test_a_poor_ivf_setting_lowers_recall_and_marks_missing_places():
    """The parameters reach faiss: one probed cell of many finds fewer of the true neighbours (of
    unclustered data, whose neighbours straddle cells)."""
    q, g = clustered(6, clusters=1)
    _, exact_i = build_index(g).search(q, 10)
    _, i = build_index(g, KNNOptions(backend="faiss-ivf", ivf_nlist=38, ivf_nprobe=1)).search(q, 10)
    found = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i.numpy(), exact_i.numpy())])
    assert found < 0.9
    tiny = build_index(g[:80], KNNOptions(backend="faiss-ivf", ivf_nlist=2, ivf_nprobe=1))
    d, i = tiny.search(q, 79)
    assert ((i < 0) == torch.isinf(d)).all()
