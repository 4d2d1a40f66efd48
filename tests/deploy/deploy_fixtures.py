"""Helpers shared by the tests/deploy tests (imported by them; fixtures included)."""
import os
import os.path as osp

import pytest
import torch

from conftest import tiny_opts
from torchreid_ext.checkpoint import load_checkpoint, save_checkpoint
from torchreid_ext.config import load_config
from torchreid_ext.models import build_model

ACCEPTANCE_MODELS = ("msfl_resnet50", "resnet50_bnfc512", "osnet_x0_25")
# Subprocesses run single-threaded too (see one_thread).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these tests' modules (restored after). On the shared test machine,
    with more runnable processes than cores, torch's two OpenMP threads wait for each other:
    measured 50 s instead of 0.7 s for three OSNet forward passes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def deploy_cfg(root, save_dir, name="osnet_x0_25", **overrides):
    """The tiny test config (64x32, synthreid_small) for model ``name``."""
    return load_config(None, tiny_opts(root, save_dir, **{"model.name": name, **overrides}))


def calibrated_model(name, seed=0):
    """``name`` with random weights and BN statistics from a few train-mode passes, so that its
    features have a trained model's scale (uncalibrated, deep ResNets give features ~1e3)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=7, loss="softmax", pretrained=False, use_gpu=False)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 32))
    return model.eval()


def write_checkpoint(model, path):
    """A checkpoint as our engine writes its weights (plain tensors and numbers)."""
    save_checkpoint({"state_dict": model.state_dict(), "epoch": 1, "rank1": 0.25}, str(path))
    return str(path)


def reference_model(name, weights):
    """``name`` with ``weights`` loaded directly (not through torchreid_ext.deploy), eval mode."""
    model = build_model(name, num_classes=7, loss="softmax", pretrained=False, use_gpu=False)
    state = load_checkpoint(weights)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``checkpoints(name) -> path`` of a calibrated checkpoint, written once per session."""
    folder = tmp_path_factory.mktemp("deploy-weights")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = write_checkpoint(calibrated_model(name), folder / f"{name}.pth.tar")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def query_images(data_root, tmp_path_factory):
    """Paths of synthreid_small's query images (the dataset is generated on first use)."""
    from torchreid_ext.deploy.images import dataset_images

    cfg = deploy_cfg(data_root, str(tmp_path_factory.mktemp("unused")))
    return dataset_images(cfg, "synthreid_small", "query").paths


def listing(folder):
    """Every file under ``folder`` (relative paths), to check that nothing was written."""
    return sorted(osp.relpath(osp.join(r, n), folder) for r, _, names in os.walk(folder) for n in names)
