"""Torchreid model-zoo weights through model.load_weights, and zero-shot evaluation equal to
Torchreid's own pipeline (skipped where the real data is absent)."""
import json
import logging
import os.path as osp

import numpy as np
import pytest
import torch

from conftest import MSMT17_WEIGHTS
from torchreid_ext import cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.checkpoint import load_model_weights
from torchreid_ext.data.image_list import load_items
from torchreid_ext.data.real import REAL_SPECS

SPECS = {spec.name: spec for spec in REAL_SPECS}


def test_model_zoo_file_loads_with_the_classifier_reinitialised(real_data, caplog):
    zoo = torch.load(MSMT17_WEIGHTS, map_location="cpu", weights_only=True)
    model = torchreid().models.build_model("osnet_x0_25", num_classes=743, loss="softmax", pretrained=False)
    fresh = model.classifier.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="torchreid_ext.checkpoint"):
        report = load_model_weights(model, MSMT17_WEIGHTS)
    assert report["reinitialised"] == ["classifier.weight", "classifier.bias"]
    state = model.state_dict()
    assert len(report["loaded"]) == len(zoo) - 2
    for key in report["loaded"]:
        assert torch.equal(state[key], zoo[key]), key
    assert tuple(zoo["classifier.weight"].shape) == (1041, 512)
    assert torch.equal(model.classifier.weight, fresh) and model.classifier.weight.shape == (743, 512)
    assert "re-initialised 2 whose shape differs" in caplog.text
    assert "(1041, 512) in the file vs (743, 512)" in caplog.text


def _torchreid_zero_shot(name, root, height, width):
    """mAP / rank-k of the MSMT17 weights on ``name``, by Torchreid's own pieces only: its model
    factory, test transform, image reader, compute_distance_matrix and evaluate_rank."""
    tr = torchreid()
    model = tr.models.build_model("osnet_x0_25", num_classes=1041, loss="softmax", pretrained=False)
    model.load_state_dict(torch.load(MSMT17_WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    _, transform = tr.submodule("data.transforms").build_transforms(height, width)
    items = load_items(SPECS[name], root)
    reader = tr.submodule("utils.tools").read_image

    def features(rows):
        with torch.no_grad():
            return torch.cat([model(torch.stack([transform(reader(p)) for p, _, _ in rows[i:i + 100]]))
                              for i in range(0, len(rows), 100)])

    dist = tr.metrics.compute_distance_matrix(features(items.query), features(items.gallery), "euclidean").numpy()
    arr = lambda rows, k: np.asarray([r[k] for r in rows])  # noqa: E731
    cmc, mAP = tr.metrics.evaluate_rank(dist, arr(items.query, 1), arr(items.gallery, 1), arr(items.query, 2),
                                        arr(items.gallery, 2), use_metric_cuhk03=False)
    return {"mAP": float(mAP), "rank1": float(cmc[0]), "rank5": float(cmc[4]), "rank10": float(cmc[9])}


@pytest.mark.parametrize("targets, height, width", [
    (["cuhk03_pair1"], 256, 128),  # the documented zero-shot size
    (["viper_full"], 128, 64),  # the study's cross-domain set, at the study's size (cheaper)
])
def test_zero_shot_equals_torchreids_pipeline(real_data, tmp_path, targets, height, width):
    save_dir = str(tmp_path / "zero_shot")
    cli.train(["--config", "configs/real/zero_shot.yaml", "--root", real_data, "model.load_weights", MSMT17_WEIGHTS,
              "data.targets", str(targets), "data.height", str(height), "data.width", str(width),
              "data.save_dir", save_dir, "data.workers", "0"])
    ours = json.load(open(osp.join(save_dir, "metrics-test.json")))["evaluations"][-1]["results"]
    for name in targets:
        ref = _torchreid_zero_shot(name, real_data, height, width)
        for key, value in ref.items():
            assert ours[name][key] == pytest.approx(value, abs=1e-4), (name, key)
