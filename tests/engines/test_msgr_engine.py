"""MSGREngine (METHOD.md G): one training step per loss and mode on synthreid_small, fixbase
skipping, build_engine, construction errors, the MSGR configs, and an end-to-end run."""
import math
import os.path as osp

import pytest
import torch

from torchreid_ext import cli
from torchreid_ext.config import load_config
from torchreid_ext.engines import build_engine
from torchreid_ext.engines.msgr import MSGREngine

from conftest import REPO, tiny_setup

OSNET_STAGES = ["conv2", "conv3"]


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """``make(**overrides) -> (cfg, datamanager)``; the datamanager is built once."""
    return tiny_setup(data_root, str(tmp_path_factory.mktemp("msgr") / "log"),
                      **{"msgr.enabled": True, "msgr.stages": "[conv2, conv3]"})


def engine_for(cfg, dm):
    torch.manual_seed(0)
    model = cli.build_model(cfg, dm.num_train_pids)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return build_engine(cfg, dm, model, opt), model


LOSS_KEYS = {"softmax": {"loss_x", "acc"}, "triplet": {"loss_t"}, "drsl": {"loss_drsl"}, "sn": {"loss_sn"}}


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("loss", ["softmax", "triplet", "drsl", "sn"])
def test_one_msgr_step_per_loss_and_mode(setup, loss, mode):
    over = {"loss.name": loss, "msgr.mode": mode, "msgr.eps": "[0.01, 0.02]"}
    if loss == "sn":
        over["loss.sn.weight_x"] = 1.0
    cfg, dm = setup(**over)
    engine, model = engine_for(cfg, dm)
    assert isinstance(engine, MSGREngine) and engine.msgr_mode == mode
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    keys = {"loss", "msgr/R"} | {f"msgr/{k}_{s}" for k in ("R", "gnorm") for s in OSNET_STAGES}
    keys |= LOSS_KEYS[loss] | ({"msgr/R_fd", "msgr/fast_h"} if mode == "fast" else set())
    assert keys <= set(summary), keys - set(summary)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert summary["msgr/R"] > 0
    parts = summary["msgr/R_conv2"] + summary["msgr/R_conv3"]
    assert summary["msgr/R"] == pytest.approx(parts, rel=1e-5)
    assert summary["msgr/R_conv2"] == pytest.approx(0.01 * summary["msgr/gnorm_conv2"], rel=1e-5)
    if mode == "fast":  # the finite difference tracks the exact value of R
        assert summary["msgr/R_fd"] == pytest.approx(summary["msgr/R"], rel=0.05)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("conv2.") for k in changed) and any(k.startswith("conv1.") for k in changed)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_msfl_resnet50_step(setup, mode):
    cfg, dm = setup(**{"model.name": "msfl_resnet50", "msgr.stages": "[layer1, layer2]",
                       "msgr.mode": mode, "train.batch_size": 8})
    engine, model = engine_for(cfg, dm)
    before = model.layer1[0].conv1.weight.detach().clone()
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert {"msgr/R_layer1", "msgr/gnorm_layer2"} <= set(summary)
    assert all(math.isfinite(v) for v in summary.values()) and summary["msgr/R"] > 0
    assert not torch.equal(model.layer1[0].conv1.weight, before)


def test_fixbase_epoch_skips_r_and_logs_once_per_epoch(setup, capsys):
    cfg, dm = setup(**{"msgr.mode": "fast"})
    engine, model = engine_for(cfg, dm)
    batches = iter(dm.train_loader)
    engine.epoch = 0
    engine.two_stepped_transfer_learning(0, 1, ["classifier"])  # what Torchreid's train() does
    capsys.readouterr()
    frozen = model.conv2.state_dict()
    summaries = [engine.forward_backward(next(batches)) for _ in range(2)]
    out = capsys.readouterr().out
    assert out.count("MSGR: epoch 1:") == 1 and "['conv2', 'conv3']" in out
    assert all(s["msgr/R"] == 0.0 and "msgr/R_conv2" not in s for s in summaries)
    assert all(torch.equal(v, model.conv2.state_dict()[k]) for k, v in frozen.items())
    engine.epoch = 1  # open again: R is back, no skip line
    engine.two_stepped_transfer_learning(1, 1, ["classifier"])
    capsys.readouterr()
    summary = engine.forward_backward(next(batches))
    assert "MSGR:" not in capsys.readouterr().out and summary["msgr/R"] > 0


def test_build_engine_and_construction_errors(setup):
    cfg, dm = setup()
    engine, model = engine_for(cfg, dm)
    assert type(engine) is MSGREngine
    assert engine.msgr_stages == OSNET_STAGES and engine.msgr_eps == {"conv2": 0.01, "conv3": 0.01}
    assert engine.msgr_fast_h is None  # config default fast_h 0: automatic step
    cfg.msgr.fast_h = 0.1
    assert engine_for(cfg, dm)[0].msgr_fast_h == pytest.approx(0.1)  # a fixed G5 step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'layer1' is not a submodule.*\['conv1', 'maxpool', 'conv2'"):
        MSGREngine(dm, model, opt, stages=["layer1"])
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(ValueError, match="exact mode needs a double backward.*SyncBatchNorm"):
        MSGREngine(dm, sync, opt, stages=OSNET_STAGES, mode="exact")
    assert MSGREngine(dm, sync, opt, stages=OSNET_STAGES, mode="fast").msgr_mode == "fast"
    cfg0, _ = setup(**{"msgr.fast_h": 0})
    assert engine_for(cfg0, dm)[0].msgr_fast_h is None  # auto


@pytest.mark.parametrize("name, model", [("msfl_msgr_market.yaml", "msfl_resnet50"),
                                         ("resnet50_msgr_market.yaml", "resnet50_bnfc512")])
def test_msgr_configs_load(name, model):
    cfg = load_config(osp.join(REPO, "configs", name))
    assert cfg.model.name == model and cfg.msgr.enabled and cfg.msgr.mode == "exact"
    assert list(cfg.msgr.stages) == ["layer1", "layer2"] and list(cfg.msgr.eps) == [0.01]
    assert cfg.msgr.q == 2.0 and cfg.loss.name == "softmax" and cfg.train.lr == pytest.approx(3.5e-4)
    assert cfg.data.save_dir.startswith("log/")


def test_msgr_run_end_to_end_logs_to_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = str(tmp_path / "run")
    cfg, args = cli.load_run_config(tiny(save_dir=save, **{
        "msgr.enabled": True, "msgr.stages": "[conv2, conv3]", "msgr.mode": "fast", "train.max_epoch": 1}))
    res = cli.run(cfg, args.config)
    assert 0.0 <= res["synthreid_small"]["rank1"] <= 1.0
    acc = EventAccumulator(save)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Train/msgr/R", "Train/msgr/R_conv2", "Train/msgr/gnorm_conv3", "Train/msgr/R_fd"} <= tags
