"""Verification metrics (ROC AUC, TPR and threshold at FPR) against a brute-force loop over all pairs.

scikit-learn is not a dependency of the project, so the reference is written out here: every
(query, gallery) pair is visited, same-camera pairs skipped, and the ROC is read off by trying every
distinct pair distance as the threshold (float64).
"""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tensor_probe import LargestTensor
from torchreid_ext.errors import UserError
from torchreid_ext.metrics import iter_distance_chunks
from torchreid_ext.metrics.verification import (
    FPRS,
    VerificationResult,
    fpr_key,
    read_verification,
    threshold_from_metrics,
    verification_from_features,
    verification_metrics,
)


def problem(seed, num_q=30, num_g=90, num_ids=12, num_cams=3, dim=8, dtype=np.float32):
    """Clustered features (identity centres, noise) with pid-0 distractors, and their labels."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(num_ids + 1, dim)

    def sample(n):
        pids = rng.randint(0, num_ids + 1, n)
        cams = rng.randint(0, num_cams, n)
        return (centers[pids] + 0.7 * rng.randn(n, dim)).astype(dtype), pids, cams

    qf, q_pids, q_cams = sample(num_q)
    gf, g_pids, g_cams = sample(num_g)
    return qf, gf, (q_pids, g_pids, q_cams, g_cams)


def squared_euclidean(qf, gf):
    q, g = qf.astype(np.float64), gf.astype(np.float64)
    return ((q[:, None, :] - g[None, :, :]) ** 2).sum(2)


def brute_force(distmat, q_pids, g_pids, q_cams, g_cams, fprs=FPRS):
    """(auc, {fpr: (tpr, threshold)}, num_pos, num_neg) by visiting every pair and every threshold."""
    pos, neg = [], []
    for i in range(distmat.shape[0]):
        for j in range(distmat.shape[1]):
            if q_cams[i] == g_cams[j]:
                continue
            (pos if q_pids[i] == g_pids[j] else neg).append(float(distmat[i, j]))
    pos, neg = np.array(pos), np.array(neg)
    # AUC: every (positive, negative) pair, a tie counted half
    auc = ((pos[:, None] < neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    out = {}
    for f in fprs:
        best = None
        for d in np.unique(np.concatenate([pos, neg])):  # ascending: the last one allowed is the largest
            if (neg <= d).sum() / neg.size <= f:
                best = d
        out[f] = (float((pos <= best).sum() / pos.size) if best is not None else 0.0, best)
    return float(auc), out, pos.size, neg.size


def check_against(res, ref, distmat_dtype=np.float64):
    auc, at, num_pos, num_neg = ref
    assert isinstance(res, VerificationResult)
    assert (res.num_positive, res.num_negative) == (num_pos, num_neg)
    assert res.roc_auc == pytest.approx(auc, abs=1e-12)
    assert list(res.at_fpr) == list(at)
    for f, (tpr, threshold) in at.items():
        got_tpr, got_threshold = res.at_fpr[f]
        assert got_tpr == pytest.approx(tpr, abs=1e-12), f
        if threshold is None:  # no pair below the first disallowed negative: TPR 0, a threshold below it
            assert got_tpr == 0.0
        else:
            assert got_threshold == threshold, f


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_on_float64_distances(seed):
    qf, gf, labels = problem(seed)
    distmat = squared_euclidean(qf, gf)
    fprs = (0.005, 0.05, 0.2, 0.5)  # several negatives allowed at this size (about 1,800 negatives)
    ref = brute_force(distmat, *labels, fprs=fprs)
    check_against(verification_metrics(distmat, *labels, fprs=fprs), ref)
    # blocks of a few query rows give the same answer
    check_against(verification_metrics(torch.from_numpy(distmat), *labels, fprs=fprs, chunk_size=7), ref)
    # the pairs are not trivially separated (the test would notice a wrong sign or a dropped tie)
    assert 0.6 < ref[0] < 0.999


@pytest.mark.parametrize("seed", range(3))
def test_ties_between_and_among_positives_and_negatives(seed):
    qf, gf, labels = problem(10 + seed)
    distmat = np.round(squared_euclidean(qf, gf))  # integer distances: hundreds of ties
    fprs = (0.001, 0.01, 0.1, 0.3, 0.6)
    ref = brute_force(distmat, *labels, fprs=fprs)
    res = verification_metrics(distmat.astype(np.float32), *labels, fprs=fprs, chunk_size=4)
    check_against(res, ref)
    q_pids, g_pids, q_cams, g_cams = labels
    cross = q_cams[:, None] != g_cams[None]
    same = q_pids[:, None] == g_pids[None]
    assert np.isin(distmat[cross & same], distmat[cross & ~same]).any()  # ties across the classes exist


def test_threshold_semantics_and_the_empty_case():
    """The threshold keeps FPR <= target, the next larger pair distance would not; and where the
    smallest pair is a negative and no negative is allowed, TPR is 0 below that negative."""
    qf, gf, labels = problem(20)
    distmat = squared_euclidean(qf, gf)
    q_pids, g_pids, q_cams, g_cams = labels
    cross = q_cams[:, None] != g_cams[None]
    same = q_pids[:, None] == g_pids[None]
    neg = distmat[cross & ~same]
    res = verification_metrics(distmat, *labels, fprs=(0.01, 0.1))
    for f, (tpr, d) in res.at_fpr.items():
        assert (neg <= d).sum() / neg.size <= f
        above = np.unique(distmat[cross])
        nxt = above[above > d][0]
        assert (neg <= nxt).sum() / neg.size > f
        assert tpr == (distmat[cross & same] <= d).sum() / (cross & same).sum()

    # make the smallest cross-camera distance a negative: with 1e-4 (fewer than one negative allowed)
    # nothing may be accepted
    i, j = np.argwhere(cross & ~same)[0]
    distmat = distmat.copy()
    distmat[i, j] = -1.0
    res = verification_metrics(distmat, *labels, fprs=(1e-4,))
    tpr, d = res.at_fpr[1e-4]
    assert tpr == 0.0 and d < -1.0 and d == np.nextafter(-1.0, -np.inf)


def test_features_path_equals_the_matrix_path_and_skips_same_camera_pairs():
    qf, gf, labels = problem(30, num_q=25, num_g=70)
    for metric in ("euclidean", "cosine"):
        rows = 6
        distmat = torch.cat([b for _, b in iter_distance_chunks(qf, gf, metric, chunk_size=rows)])
        from_matrix = verification_metrics(distmat, *labels, chunk_size=rows)
        from_features = verification_from_features(qf, gf, *labels, metric=metric, chunk_size=rows)
        assert from_features.as_dict() == from_matrix.as_dict()
        check_against(from_features, brute_force(distmat.numpy(), *labels))
    # a same-camera pair with the smallest distance changes nothing: it is left out
    q_pids, g_pids, q_cams, g_cams = labels
    distmat = squared_euclidean(qf, gf)
    before = verification_metrics(distmat, *labels).as_dict()
    distmat[q_cams[:, None] == g_cams[None]] = -5.0
    assert verification_metrics(distmat, *labels).as_dict() == before


def test_memory_is_blocked():
    """No tensor as large as the query x gallery matrix is made (from features: it never exists)."""
    qf, gf, labels = problem(40, num_q=64, num_g=400, num_ids=30)
    with LargestTensor() as probe:
        res = verification_from_features(qf, gf, *labels, chunk_size=8)
    assert probe.numel <= 64 * 400 / 4, probe.numel
    distmat = torch.from_numpy(squared_euclidean(qf, gf))  # (from numpy: a no-copy op the probe would see)
    with LargestTensor() as probe:
        assert verification_metrics(distmat, *labels, chunk_size=8).as_dict()["num_positive"] == res.num_positive
    assert probe.numel <= 64 * 400 / 4, probe.numel


def test_as_dict_and_summary():
    qf, gf, labels = problem(50)
    res = verification_metrics(squared_euclidean(qf, gf), *labels)
    d = res.as_dict()
    assert list(d["at_fpr"]) == ["0.0001", "0.001", "0.01"]
    assert set(d) == {"roc_auc", "num_positive", "num_negative", "at_fpr"}
    assert all(set(v) == {"tpr", "threshold"} for v in d["at_fpr"].values())
    assert fpr_key(1e-5) == "0.00001" and fpr_key(0.5) == "0.5"
    line = res.summary()
    assert "\n" not in line and "ROC AUC" in line and "TPR@FPR=0.0001" in line


@pytest.mark.parametrize("fprs, match", [((), "empty"), ((0.0,), "0.0"), ((1.0,), "1.0"), ((float("nan"),), "nan"),
                                         (("0.1",), "'0.1'")])
def test_bad_fprs(fprs, match):
    qf, gf, labels = problem(60)
    with pytest.raises(ValueError, match=match):
        verification_metrics(squared_euclidean(qf, gf), *labels, fprs=fprs)


def test_no_pairs_and_nan():
    qf, gf, (q_pids, g_pids, q_cams, g_cams) = problem(70)
    distmat = squared_euclidean(qf, gf)
    with pytest.raises(ValueError, match="0 same-person"):
        verification_metrics(distmat, q_pids + 1000, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="0 same-person and 0 different-person"):
        verification_metrics(distmat, q_pids, g_pids, np.zeros_like(q_cams), np.zeros_like(g_cams))
    distmat[3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN .* query 3, gallery 5"):
        verification_metrics(distmat, q_pids, g_pids, q_cams, g_cams)


# ----------------------------------------------------------------------------------------------
# reading a threshold back from metrics.json


def _block(threshold=0.5):
    qf, gf, labels = problem(80)
    block = verification_metrics(squared_euclidean(qf, gf), *labels).as_dict()
    block["at_fpr"]["0.01"]["threshold"] = threshold
    return block


def _write(tmp_path, name, record):
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return str(path)


def test_threshold_from_a_training_run_and_a_saved_features_evaluation(tmp_path):
    run = {"model": "osnet", "evaluations": [
        {"epoch": 5, "results": {"market1501": {"mAP": 0.1, "verification": _block(9.0)}}},
        {"epoch": 10, "results": {"market1501": {"mAP": 0.2, "verification": _block(0.75)}}},
    ]}
    path = _write(tmp_path, "metrics.json", run)
    assert threshold_from_metrics(path, 0.01) == 0.75  # the last evaluation's
    assert threshold_from_metrics(path, 0.01, target="market1501") == 0.75
    assert threshold_from_metrics(path, 1e-4) == _block()["at_fpr"]["0.0001"]["threshold"]
    saved = {"kind": "saved_features_evaluation", "results": {"mAP": 0.3, "verification": _block(1.25)}}
    assert threshold_from_metrics(_write(tmp_path, "saved.json", saved), np.float64(0.01)) == 1.25
    two = {"evaluations": [{"epoch": 1, "results": {"a": {"verification": _block(1.0)},
                                                     "b": {"verification": _block(2.0)}}}]}
    two_path = _write(tmp_path, "two.json", two)
    assert threshold_from_metrics(two_path, 0.01, target="b") == 2.0
    with pytest.raises(UserError, match=r"several datasets \['a', 'b'\]"):
        threshold_from_metrics(two_path, 0.01)
    with pytest.raises(UserError, match=r"no evaluation of dataset 'c' .* it evaluated \['a', 'b'\]"):
        threshold_from_metrics(two_path, 0.01, target="c")
    with pytest.raises(UserError, match="applies to a training run's"):
        threshold_from_metrics(_write(tmp_path, "saved.json", saved), 0.01, target="a")
    assert read_verification(path)["num_positive"] == _block()["num_positive"]


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.01", None])
def test_fpr_outside_0_1_is_one_line_user_error(tmp_path, fpr):
    path = _write(tmp_path, "metrics.json", {"kind": "saved_features_evaluation",
                                             "results": {"verification": _block()}})
    with pytest.raises(UserError, match=r"fpr = .* is not a false positive rate in \(0, 1\)") as info:
        threshold_from_metrics(path, fpr)
    assert "\n" not in str(info.value)


def test_unrecorded_fpr_names_the_file_and_the_recorded_rates(tmp_path):
    path = _write(tmp_path, "metrics.json", {"kind": "saved_features_evaluation",
                                             "results": {"verification": _block()}})
    with pytest.raises(UserError, match=r"metrics.json' records thresholds at FPR 0.0001, 0.001, 0.01, not at 0.05"):
        threshold_from_metrics(path, 0.05)


@pytest.mark.parametrize("record, match", [
    ({"kind": "saved_features_evaluation", "results": {"mAP": 0.3}}, "has no verification metrics"),
    ({"evaluations": [{"epoch": 3, "results": {"m": {"mAP": 0.1}}}]},
     r"has no verification metrics \(last evaluation, epoch 3, dataset 'm'\)"),
    ({"evaluations": []}, "records no evaluation yet"),
    ({"something": 1}, "is not a metrics.json of torchreid-ext"),
    ([1, 2], "is not a metrics.json of torchreid-ext"),
])
def test_files_without_verification_metrics(tmp_path, record, match):
    with pytest.raises(UserError, match=match) as info:
        threshold_from_metrics(_write(tmp_path, "metrics.json", record), 0.01)
    assert "\n" not in str(info.value) and "metrics.json" in str(info.value)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        threshold_from_metrics(str(tmp_path / "nope.json"), 0.01)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not a readable metrics.json") as info:
        threshold_from_metrics(str(bad), 0.01)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_values_signed_zeros_and_a_wide_range(dtype):
    """Positives and negatives at +-0.0, tiny negatives, and values near the float range's ends:
    the integer keys and bins of the counter stay exact."""
    qf, gf, labels = problem(90)
    distmat = squared_euclidean(qf, gf).astype(dtype)
    q_pids, g_pids, q_cams, g_cams = labels
    cross = q_cams[:, None] != g_cams[None]
    same = q_pids[:, None] == g_pids[None]
    pos_at, neg_at = np.argwhere(cross & same), np.argwhere(cross & ~same)
    big = np.finfo(dtype).max / 2
    for (i, j), value in zip(pos_at[:6], [-0.0, 0.0, -big, big, -1e-7, 3.0]):
        distmat[i, j] = value
    for (i, j), value in zip(neg_at[:6], [0.0, -0.0, -big, big, -1e-7, 3.0]):
        distmat[i, j] = value
    fprs = (0.001, 0.01, 0.3)
    check_against(verification_metrics(distmat, *labels, fprs=fprs, chunk_size=5),
                  brute_force(distmat.astype(np.float64), *labels, fprs=fprs))


# ----------------------------------------------------------------------------------------------
# in the evaluator


def test_the_evaluator_reports_verification_of_plain_distances_whatever_the_evaluator_and_reranking():
    from torchreid_ext.metrics import EvaluationOptions, compute_distance_matrix, evaluate_test_features, results_dict

    qf, gf, labels = problem(100, num_q=40, num_g=160)
    ref = verification_metrics(compute_distance_matrix(qf, gf), *labels).as_dict()
    seen = []
    for evaluator in ("fast", "torchreid"):
        for rerank in (False, True):
            opts = EvaluationOptions(evaluator=evaluator, rerank=rerank, rerank_k1=10, rerank_k2=3)
            res = results_dict(evaluate_test_features(qf, gf, *labels, opts), [1, 5])
            got = res["verification"]
            assert got["distance"] == {"dist_metric": "euclidean", "normalize_feature": False, "flip": False,
                                       "aqe": False, "rerank": False}
            assert (got["num_positive"], got["num_negative"]) == (ref["num_positive"], ref["num_negative"])
            assert got["roc_auc"] == pytest.approx(ref["roc_auc"], abs=1e-6)
            for key, entry in ref["at_fpr"].items():
                assert got["at_fpr"][key]["tpr"] == pytest.approx(entry["tpr"], abs=1e-6)
                assert got["at_fpr"][key]["threshold"] == pytest.approx(entry["threshold"], rel=1e-5)
            seen.append(res["mAP"])
    assert seen[0] != seen[1]  # re-ranking changed the ranking, not the verification
    cosine = evaluate_test_features(qf, gf, *labels, EvaluationOptions(dist_metric="cosine")).verification
    assert cosine.distance["dist_metric"] == "cosine"
    assert cosine.at_fpr[0.01][1] < 2 < ref["at_fpr"]["0.01"]["threshold"]  # 1 - cos vs squared Euclidean


def test_the_evaluators_first_pass_reads_the_ranking_blocks():
    """The fast evaluator's verification: the first pass sees the blocks the ranking sees (block_hook),
    the second recomputes exactly those blocks; equal to the standalone two passes."""
    from torchreid_ext.metrics import EvaluationOptions, evaluate_features, evaluate_test_features

    qf, gf, labels = problem(110, num_q=50, num_g=120)
    seen = []
    evaluate_features(qf, gf, *labels, chunk_size=7, block_hook=lambda start, block: seen.append((start, block.shape)))
    assert seen == [(s, (min(7, 50 - s), 120)) for s in range(0, 50, 7)]
    got = evaluate_test_features(qf, gf, *labels, EvaluationOptions()).verification
    alone = verification_from_features(qf, gf, *labels)
    assert replace(got, distance=None).as_dict() == alone.as_dict()


def test_a_set_without_negative_pairs_still_evaluates(caplog):
    from torchreid_ext.metrics import EvaluationOptions, evaluate_test_features

    qf, gf, (q_pids, g_pids, q_cams, g_cams) = problem(120)
    one = (np.ones_like(q_pids), np.ones_like(g_pids), q_cams, g_cams)  # one identity: no different-person pair
    res = evaluate_test_features(qf, gf, *one, EvaluationOptions())
    assert res.verification is None and res.mAP > 0
    assert "verification metrics not computed" in caplog.text
