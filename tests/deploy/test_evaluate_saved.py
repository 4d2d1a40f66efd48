"""Extract then evaluate equals the engine's own evaluation of a briefly trained model."""
import contextlib
import io
import json
import os.path as osp

import numpy as np
import pytest

from conftest import tiny_opts
from deploy_fixtures import one_thread  # noqa: F401
from torchreid_ext import cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.deploy import evaluate_files, load_features, save_features
from torchreid_ext.deploy.commands import evaluate_main, extract_main


def _block(text):
    """The results block: from '** Results **' to the last 'Rank-' line."""
    lines = text[text.index("** Results **"):].splitlines()
    end = max(i for i, line in enumerate(lines) if line.startswith("Rank-"))
    return "\n".join(lines[: end + 1])


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A 1-epoch tiny run on synthreid_small, its engine output, and its query / gallery files."""
    folder = tmp_path_factory.mktemp("trained")
    opts = tiny_opts(data_root, str(folder / "run"), **{"train.max_epoch": 1})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = cli.train(opts)["synthreid_small"]
    weights = str(folder / "run" / "model" / "model.pth.tar-1")
    files = {}
    for split in ("query", "gallery"):
        files[split] = str(folder / f"{split}.h5")
        assert extract_main(["--weights", weights, "--dataset", "synthreid_small", "--split", split,
                             "--out", files[split], *opts]) == 0
    return {"results": results, "stdout": out.getvalue(), "opts": opts, "folder": folder, **files}


def test_extract_then_evaluate_equals_the_engine(trained, capsys, tmp_path):
    capsys.readouterr()
    assert evaluate_main(["--query", trained["query"], "--gallery", trained["gallery"], "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert _block(printed) == _block(trained["stdout"])  # the block training printed
    record = json.loads((tmp_path / "metrics.json").read_text())
    engine, ours = trained["results"], record["results"]
    assert abs(ours["mAP"] - engine["mAP"]) <= 1e-6
    for key in ("rank1", "rank5", "rank10", "rank20", "mINP", "num_valid_queries"):
        assert ours[key] == pytest.approx(engine[key], abs=1e-6), key
    np.testing.assert_allclose(ours["cmc"], engine["cmc"], atol=1e-6)
    assert 0 < engine["mAP"] < 1
    assert record["query"] == trained["query"] and record["model"] == "osnet_x0_25"


def test_options_override_the_saved_config_and_match_a_float64_reference(trained):
    record = evaluate_files(trained["query"], trained["gallery"],
                            ["test.dist_metric", "cosine", "test.normalize_feature", "True", "test.ranks", "[1,3]"],
                            write=False)
    q, g = load_features(trained["query"]), load_features(trained["gallery"])
    qf = q.features.astype(np.float64)
    gf = g.features.astype(np.float64)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    distmat = 1 - qf @ gf.T  # Torchreid's cosine distance
    cmc, mAP = torchreid().metrics.evaluate_rank(distmat, q.pids, g.pids, q.camids, g.camids, max_rank=50,
                                                 use_cython=False)
    res = record["results"]
    assert abs(res["mAP"] - mAP) <= 1e-6 and res["rank3"] == pytest.approx(cmc[2], abs=1e-6)
    assert record["ranks"] == [1, 3] and "rank5" not in res
    assert record["options"]["dist_metric"] == "cosine" and record["metrics_file"] == ""
    assert abs(res["mAP"] - trained["results"]["mAP"]) > 1e-6  # the overrides took effect


def test_a_training_runs_metrics_json_is_never_overwritten(trained, capsys):
    run = trained["folder"] / "run"
    before = (run / "metrics.json").read_text()
    assert evaluate_main(["--query", trained["query"], "--gallery", trained["gallery"], "--out", str(run)]) == 2
    assert "was not written by the saved-features evaluation" in capsys.readouterr().err
    assert (run / "metrics.json").read_text() == before


def test_default_output_is_next_to_the_query_file_and_is_rewritten(trained, tmp_path):
    q, g = load_features(trained["query"]), load_features(trained["gallery"])
    qp, gp = save_features(q, str(tmp_path / "q.h5")), save_features(g, str(tmp_path / "g.h5"))
    first = evaluate_files(qp, gp)
    second = evaluate_files(qp, gp, ["test.ranks", "[1]"])
    assert first["metrics_file"] == second["metrics_file"] == str(tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text())["ranks"] == [1]


def test_features_of_different_models_or_without_labels_are_refused(trained, tmp_path, capsys):
    q = load_features(trained["query"])
    other = save_features(q.__class__(q.features, q.paths, q.pids, q.camids, "osnet_x1_0", q.config, q.meta),
                          str(tmp_path / "other.h5"))
    assert evaluate_main(["--query", trained["query"], "--gallery", other, "--no-write"]) == 2
    assert "model 'osnet_x0_25'" in capsys.readouterr().err
    bare = save_features(q.__class__(q.features, q.paths, model_name=q.model_name, config=q.config, meta=q.meta),
                         str(tmp_path / "bare.h5"))
    assert evaluate_main(["--query", bare, "--gallery", trained["gallery"], "--no-write"]) == 2
    assert "no pids / camids" in capsys.readouterr().err
    assert not osp.exists(tmp_path / "metrics.json")


def test_verification_metrics_are_logged_and_recorded_by_both_writers(trained, tmp_path):
    """Training and torchreid-ext-evaluate record the same verification block (with the distance it
    is in); both files give the threshold back; the block equals the metrics of the features' matrix."""
    from torchreid_ext.metrics import compute_distance_matrix
    from torchreid_ext.metrics.verification import threshold_from_metrics, verification_metrics

    line = next(x for x in trained["stdout"].splitlines() if "Verification (" in x)
    assert "ROC AUC" in line and "TPR@FPR=0.01" in line
    run_file = str(trained["folder"] / "run" / "metrics.json")
    engine = json.loads(open(run_file).read())["evaluations"][-1]["results"]["synthreid_small"]["verification"]
    record = evaluate_files(trained["query"], trained["gallery"], out_dir=str(tmp_path))
    saved = record["results"]["verification"]
    assert set(saved["at_fpr"]) == {"0.0001", "0.001", "0.01"}
    assert saved["distance"] == {"dist_metric": "euclidean", "normalize_feature": False, "flip": False, "aqe": False,
                                 "rerank": False}
    assert saved["num_positive"] == engine["num_positive"] > 0 and saved["num_negative"] == engine["num_negative"]
    assert saved["roc_auc"] == pytest.approx(engine["roc_auc"], abs=1e-6) and 0.5 < saved["roc_auc"] < 1
    q, g = load_features(trained["query"]), load_features(trained["gallery"])
    ref = verification_metrics(compute_distance_matrix(q.features, g.features), q.pids, g.pids, q.camids, g.camids)
    assert ref.roc_auc == pytest.approx(saved["roc_auc"], abs=1e-6)
    for fpr in (1e-4, 1e-3, 1e-2):
        key = f"{fpr:f}".rstrip("0")
        assert saved["at_fpr"][key]["tpr"] == pytest.approx(ref.at_fpr[fpr][0], abs=1e-6)
        assert threshold_from_metrics(str(tmp_path / "metrics.json"), fpr) == saved["at_fpr"][key]["threshold"]
        assert threshold_from_metrics(run_file, fpr) == engine["at_fpr"][key]["threshold"]
        assert threshold_from_metrics(run_file, fpr, target="synthreid_small") == engine["at_fpr"][key]["threshold"]
