"""Torchreid's own tools with our models: FeatureExtractor on our checkpoint; ImageNet caches."""
import os
import os.path as osp
import shutil

import numpy as np
import pytest
import torch
import torchvision

from conftest import tiny_setup
from deploy_fixtures import calibrated_model, deploy_cfg, one_thread, query_images  # noqa: F401
from torchreid_ext.adapter import torchreid
from torchreid_ext.builders import build_engine, build_optimizer, build_scheduler
from torchreid_ext.deploy import extract_features
from torchreid_ext.models import build_model
from torchreid_ext.models.msfl import BackboneWeightsError
from torchreid_ext.run_options import RunOptions


@pytest.fixture(scope="module")
def engine_checkpoint(data_root, tmp_path_factory):
    """msfl_resnet50's checkpoint as our engine writes it (optimizer, scheduler, RNG, history)."""
    folder = tmp_path_factory.mktemp("engine-ckpt")
    cfg, dm = tiny_setup(data_root, str(folder))(**{"model.name": "msfl_resnet50"})
    model = calibrated_model("msfl_resnet50")
    options = RunOptions(cfg)
    optimizer = build_optimizer(options, model)
    engine = build_engine(cfg, dm, model, optimizer, build_scheduler(options, optimizer))
    engine.max_epoch = 1
    engine.save_model(0, 0.5, str(folder))
    return str(folder / "model" / "model.pth.tar-1")


def test_torchreid_feature_extractor_loads_our_checkpoint(engine_checkpoint, query_images, data_root, tmp_path):
    extractor = torchreid().utils.FeatureExtractor(model_name="msfl_resnet50", model_path=engine_checkpoint,
                                                   image_size=(64, 32), device="cpu", verbose=False)
    paths = query_images[:4]
    theirs = extractor(paths).numpy()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, folder / f"{i}.jpg")
    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "msfl_resnet50")
    ours = extract_features(cfg, None, images=str(folder), weights=engine_checkpoint).features
    assert theirs.shape == (4, 512)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    # and the weights are the checkpoint's, not a fresh init (the extractor builds without ImageNet)
    fresh = build_model("msfl_resnet50", 1, pretrained=False, use_gpu=False).state_dict()
    loaded = extractor.model.state_dict()
    assert not torch.equal(loaded["head.0.running_mean"], fresh["head.0.running_mean"])


def _resnet50_state(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet50().state_dict()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty TORCH_HOME whose downloads fail (as on an offline machine); returns its cache folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    folder = osp.join(str(tmp_path / "torch"), "hub", "checkpoints")
    os.makedirs(folder)
    return folder, calls


def _backbone_equals(model, state):
    own = model.state_dict()
    keys = [k for k in state if not k.startswith("fc.")]
    return len(keys) == 318 and all(torch.equal(own[k], state[k]) for k in keys)


@pytest.mark.parametrize("present", [("resnet50-19c8e357.pth",), ("resnet50-0676ba61.pth",),
                                     ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth")])
def test_imagenet_init_finds_torchreids_cache_as_well_as_torchvisions(present, offline_hub):
    folder, calls = offline_hub
    states = {"resnet50-0676ba61.pth": _resnet50_state(1), "resnet50-19c8e357.pth": _resnet50_state(2)}
    for name in present:
        torch.save(states[name], osp.join(folder, name))
    model = build_model("msfl_resnet50", 5, pretrained=True, use_gpu=False)
    assert _backbone_equals(model, states[present[0]])  # torchvision's file is preferred when both exist
    assert calls == []


def test_imagenet_init_without_any_cache_is_a_clear_offline_error(offline_hub):
    folder, calls = offline_hub
    with pytest.raises(BackboneWeightsError, match="offline"):
        build_model("resnet50_bnfc512", 5, pretrained=True, use_gpu=False)
    assert calls  # it tried torchvision's download


def test_an_unreadable_cached_file_is_named(offline_hub):
    folder, _ = offline_hub
    bad = osp.join(folder, "resnet50-19c8e357.pth")
    with open(bad, "wb") as f:
        f.write(b"\x00" * 64)
    with pytest.raises(BackboneWeightsError, match="cached ImageNet weights: cannot read '.*resnet50-19c8e357.pth'"):
        build_model("msfl_resnet50", 5, pretrained=True, use_gpu=False)


def test_torchreid_loaders_go_through_the_safe_loader(tmp_path, monkeypatch):
    """After ``import torchreid_ext``, Torchreid's own load_pretrained_weights (used by its
    FeatureExtractor and scripts) reads files with weights_only: a code-running pickle is refused
    even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, and Torchreid's numpy-scalar checkpoints load."""
    from torchreid_ext.checkpoint import CheckpointError

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code-ran'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": RunsCode()}, str(evil))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    utils = torchreid().utils
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="Refusing to load"):
        utils.load_pretrained_weights(model, str(evil))
    with pytest.raises(CheckpointError, match="Refusing to load"):
        utils.FeatureExtractor(model_name="osnet_x0_25", model_path=str(evil), device="cpu", verbose=False)
    assert not (tmp_path / "code-ran").exists()

    src = torch.nn.Linear(3, 2)
    utils.save_checkpoint({"state_dict": src.state_dict(), "epoch": 1, "rank1": np.float64(0.5)}, str(tmp_path))
    utils.load_pretrained_weights(model, str(tmp_path / "model.pth.tar-1"))
    assert torch.equal(model.weight, src.weight)
