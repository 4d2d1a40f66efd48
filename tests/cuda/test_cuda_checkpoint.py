"""Checkpoints across devices (torchreid_ext.checkpoint through ReIDEngine.save_model / resume): one
saved by a CUDA engine resumes a CPU engine, and one saved on the CPU resumes a CUDA engine, with
the same weights, optimizer state (SGD momentum) and epoch, and the next step agrees.

``pytest -m cuda``; without CUDA these tests skip (``TORCHREID_EXT_TEST_DEVICE=cpu``: run on the CPU).
"""
import os.path as osp

import pytest
import torch

from conftest import model_for, tiny_setup
from cuda_env import DEVICE, MARKS, ON_GPU, strict_fp32
from torchreid_ext import build_engine
from torchreid_ext.builders import build_optimizer
from torchreid_ext.checkpoint import load_checkpoint
from torchreid_ext.run_options import RunOptions

pytestmark = MARKS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    return tiny_setup(data_root, str(tmp_path_factory.mktemp("cuda-ckpt") / "log"), use_gpu=ON_GPU,
                      **{"train.optim": "sgd", "train.lr": 0.01, "loss.name": "triplet",
                         "loss.triplet.weight_x": 1.0})


@pytest.fixture(autouse=True)
def no_tf32():
    with strict_fp32():
        yield


def engine_on(setup, device, seed):
    cfg, dm = setup(use_gpu=device.type == "cuda")
    torch.manual_seed(seed)
    model = model_for(cfg, dm.num_train_pids).to(device)
    engine = build_engine(cfg, dm, model, build_optimizer(RunOptions(cfg), model))
    assert engine.device.type == device.type
    return engine, model, dm


def to_cpu(state):
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def momentum(optimizer):
    return [optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups for p in g["params"]
            if "momentum_buffer" in optimizer.state[p]]


@pytest.mark.parametrize("source, target", [(DEVICE, CPU), (CPU, DEVICE)],
                         ids=[f"{DEVICE.type}_to_cpu", f"cpu_to_{DEVICE.type}"])
def test_checkpoint_resumes_on_the_other_device(setup, tmp_path, source, target):
    saver, model_a, dm = engine_on(setup, source, seed=0)
    data = next(iter(dm.train_loader))
    saver.forward_backward(data)
    saver.save_model(0, 0.0, str(tmp_path))
    path = osp.join(str(tmp_path), "model", "model.pth.tar-1")
    ckpt = load_checkpoint(path)
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())  # read to the CPU

    resumed, model_b, _ = engine_on(setup, target, seed=1)  # other initial weights
    assert not torch.equal(next(model_b.parameters()).cpu(), next(model_a.parameters()).cpu())
    assert resumed.resume(path) == 1
    a, b = to_cpu(model_a.state_dict()), to_cpu(model_b.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.device.type == target.type for p in model_b.parameters())
    bufs_a, bufs_b = momentum(saver.optimizer), momentum(resumed.optimizer)
    assert len(bufs_b) == len(bufs_a) > 0
    assert all(x.device.type == target.type for x in bufs_b)  # optimizer state follows the parameters
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(bufs_a, bufs_b))

    # the next step from the same state on the same batch: equal up to the devices' rounding
    saver.forward_backward(data)
    resumed.forward_backward(data)
    a, b = to_cpu(model_a.state_dict()), to_cpu(model_b.state_dict())
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
    moved = sum(float((a[k] - ckpt["state_dict"][k]).abs().sum()) for k in a if a[k].is_floating_point())
    assert moved > 0
