"""evaluate_test_features / EvaluationOptions: the one evaluation from features (engine and scripts)."""
import numpy as np
import pytest
import torch
from test_aqe import fastreid_aqe
from test_rerank import clustered, torchreid_matrices

from torchreid_ext.adapter import torchreid
from torchreid_ext.config import ConfigError, load_config
from torchreid_ext.metrics import (
    EvaluationOptions,
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
    evaluate_test_features,
    evaluation_distance_matrix,
    re_ranking,
)

MAX_RANK = 20


def torchreid_reference(qf, gf, labels, metric="euclidean", normalize=False, rerank=False, aqe=None, **rr):
    """Torchreid's engine steps (plus FastReID's AQE first, in float64), its evaluator."""
    tr = torchreid()
    if aqe is not None:
        qf, gf = (x.astype(np.float32) for x in fastreid_aqe(qf, gf, *aqe))
    if normalize:
        qf, gf = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (qf, gf))
    mats = torchreid_matrices(qf, gf, metric)
    distmat = tr.utils.re_ranking(*mats, **rr) if rerank else mats[0]
    return tr.metrics.evaluate_rank(distmat, *labels, max_rank=MAX_RANK, use_cython=False)


@pytest.mark.parametrize("options, ref", [
    (dict(), dict()),
    (dict(dist_metric="cosine"), dict(metric="cosine")),
    (dict(normalize_feature=True), dict(normalize=True)),
    (dict(rerank=True), dict(rerank=True)),
    (dict(rerank=True, rerank_k1=10, rerank_k2=3, rerank_lambda=0.5, dist_metric="cosine"),
     dict(rerank=True, k1=10, k2=3, lambda_value=0.5, metric="cosine")),
    (dict(aqe=True), dict(aqe=(1, 5, 3.0))),
    (dict(aqe=True, aqe_k=3, aqe_alpha=2.0, aqe_rounds=2, normalize_feature=True, rerank=True),
     dict(aqe=(2, 3, 2.0), normalize=True, rerank=True)),
])
def test_equals_torchreid_steps(options, ref):
    qf, gf, labels = clustered(11, num_q=50, num_g=250)
    res = evaluate_test_features(qf, gf, *labels, EvaluationOptions(max_rank=MAX_RANK, **options))
    cmc, mAP = torchreid_reference(qf, gf, labels, **ref)
    assert np.max(np.abs(res.cmc - cmc)) <= 1e-3 and abs(res.mAP - mAP) <= 1e-3
    assert res.mINP is not None and res.num_valid_queries == 50


def test_torchreid_evaluator_is_torchreids_own_path():
    qf, gf, labels = clustered(12)
    opts = EvaluationOptions(max_rank=MAX_RANK, evaluator="torchreid", rerank=True, rerank_k1=10, rerank_k2=3)
    res = evaluate_test_features(qf, gf, *labels, opts)
    cmc, mAP = torchreid_reference(qf, gf, labels, rerank=True, k1=10, k2=3)
    np.testing.assert_array_equal(res.cmc, cmc)
    assert res.mAP == mAP and res.mINP is None and res.num_valid_queries is None
    fast = evaluate_test_features(qf, gf, *labels, opts.replace(evaluator="fast"))
    assert np.max(np.abs(fast.cmc - res.cmc)) <= 1e-3 and abs(fast.mAP - res.mAP) <= 1e-3


def test_distance_matrix_is_what_gets_ranked():
    qf, gf, labels = clustered(13)
    for opts, expected in (
        (EvaluationOptions(), compute_distance_matrix(qf, gf).numpy()),
        (EvaluationOptions(rerank=True, rerank_k2=1), re_ranking(*torchreid_matrices(qf, gf), k2=1)),
    ):
        distmat = evaluation_distance_matrix(qf, gf, opts)
        np.testing.assert_allclose(distmat, expected, rtol=1e-5, atol=1e-5)
        a = evaluate_rank(distmat, *labels, max_rank=50)
        b = evaluate_test_features(qf, gf, *labels, opts)
        assert abs(a.mAP - b.mAP) <= 1e-9 and np.max(np.abs(a.cmc - b.cmc)) <= 1e-9


def test_from_config_reads_test_keys_and_names_bad_ones():
    cfg = load_config(None, ["test.rerank", "True", "test.rerank_k1", "12", "test.rerank_k2", "4",
                             "test.rerank_lambda", "0.5", "test.flip", "True", "test.aqe", "True",
                             "test.aqe_k", "7", "test.aqe_alpha", "2", "test.aqe_rounds", "2",
                             "test.dist_metric", "cosine", "test.ranks", "[1, 60]",
                             "cuhk03.use_metric_cuhk03", "True"])
    opts = EvaluationOptions.from_config(cfg)
    assert opts == EvaluationOptions(dist_metric="cosine", use_metric_cuhk03=True, max_rank=60, rerank=True,
                                     rerank_k1=12, rerank_k2=4, rerank_lambda=0.5, flip=True, aqe=True,
                                     aqe_k=7, aqe_alpha=2.0, aqe_rounds=2, ranks=(1, 60))
    assert EvaluationOptions.from_config(cfg, progress=True).progress
    defaults = EvaluationOptions.from_config(load_config(None, []))
    assert (defaults.rerank_k1, defaults.rerank_k2, defaults.rerank_lambda) == (20, 6, 0.3)
    assert (defaults.flip, defaults.aqe, defaults.aqe_k, defaults.aqe_alpha, defaults.aqe_rounds) == \
        (False, False, 5, 3.0, 1)


@pytest.mark.parametrize("overrides, message", [
    (["test.rerank_k1", "0"], "test.rerank_k1 = 0 must be an integer >= 1"),
    (["test.rerank_k2", "0"], "test.rerank_k2 = 0 must be an integer in [1, test.rerank_k1 = 20]"),
    (["test.rerank_k1", "5", "test.rerank_k2", "6"],
     "test.rerank_k2 = 6 must be an integer in [1, test.rerank_k1 = 5]"),
    (["test.rerank_lambda", "1.5"], "test.rerank_lambda = 1.5 must be a number in [0, 1]"),
    (["test.rerank_lambda", "-0.1"], "test.rerank_lambda = -0.1 must be a number in [0, 1]"),
    (["test.aqe_k", "0"], "test.aqe_k = 0 must be an integer >= 1"),
    (["test.aqe_alpha", "-2"], "test.aqe_alpha = -2.0 must be a finite number >= 0"),
    (["test.aqe_rounds", "0"], "test.aqe_rounds = 0 must be an integer >= 1"),
])
def test_bad_config_values_name_the_key(overrides, message):
    """Checked whether or not test.rerank / test.aqe is on (a later run may switch it on)."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)


def test_bad_options_at_function_level():
    with pytest.raises(ValueError, match=r"rerank_k1 = 0 must be an integer >= 1"):
        EvaluationOptions(rerank_k1=0)
    with pytest.raises(ValueError, match=r"evaluator = 'slow' is not valid; choose one of \['fast', 'torchreid'\]"):
        EvaluationOptions(evaluator="slow")
    with pytest.raises(ValueError, match=r"dist_metric = 'l1'"):
        EvaluationOptions(dist_metric="l1")
    qf, gf, labels = clustered(0, num_q=5, num_g=10)
    with pytest.raises(ValueError, match=r"k1 = 20 needs at least k1 \+ 1 = 21 query \+ gallery items, got 15"):
        evaluate_test_features(qf, gf, *labels, EvaluationOptions(rerank=True))


def test_tensors_on_any_device_and_numpy_give_one_result():
    qf, gf, labels = clustered(14)
    opts = EvaluationOptions(rerank=True, aqe=True)
    a = evaluate_test_features(qf, gf, *labels, opts)
    b = evaluate_test_features(torch.from_numpy(qf), torch.from_numpy(gf), *(torch.from_numpy(x) for x in labels), opts)
    assert a.mAP == b.mAP and np.array_equal(a.cmc, b.cmc)
    plain = evaluate_features(qf, gf, *labels)
    assert abs(plain.mAP - a.mAP) > 1e-4
