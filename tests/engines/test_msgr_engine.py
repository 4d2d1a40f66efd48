"""MSGREngine (docs/methods.md G): one training step per loss and mode on synthreid_small, the
logged R against an independent computation, lazy MSGR (interval) against hand-built SGD
steps, fixbase skipping, build_engine, construction errors, the MSGR configs, and an
end-to-end run."""
import copy
import math
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, model_for, tiny_opts, tiny_setup
from torchreid_ext import build_engine, cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.config import ConfigError, load_config
from torchreid_ext.engines.msgr import MSGREngine, penalty_due
from torchreid_ext.msgr import StageCapture, feature_gradient_penalty

OSNET_STAGES = ["conv2", "conv3"]


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """``make(**overrides) -> (cfg, datamanager)``; the datamanager is built once."""
    return tiny_setup(data_root, str(tmp_path_factory.mktemp("msgr") / "log"),
                      **{"msgr.enabled": True, "msgr.stages": "[conv2, conv3]"})


def engine_for(cfg, dm):
    torch.manual_seed(0)
    model = model_for(cfg, dm.num_train_pids)
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
    cfg, _ = setup(**{"msgr.fast_h": 0.1})
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
        "msgr.enabled": True, "msgr.stages": "[conv2, conv3]", "msgr.mode": "fast", "train.max_epoch": 1,
        "msgr.interval": 2}))
    res = cli.run(cfg, args.config)
    assert 0.0 <= res["synthreid_small"]["rank1"] <= 1.0
    acc = EventAccumulator(save)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Train/msgr/R", "Train/msgr/R_conv2", "Train/msgr/gnorm_conv3", "Train/msgr/R_fd"} <= tags
    # lazy: R on steps 0, 2, 4, ...; TensorBoard gets the running mean of msgr/applied
    applied = [e.value for e in acc.Scalars("Train/msgr/applied")]
    assert len(applied) >= 3 and applied[:3] == pytest.approx([1.0, 0.5, 2 / 3])


@pytest.mark.parametrize("mode, loss", [("exact", "softmax"), ("fast", "softmax"), ("exact", "triplet")])
def test_logged_r_equals_an_independent_penalty_on_the_same_batch(setup, mode, loss):
    """msgr/R and its parts vs feature_gradient_penalty on a copy of the model taken before the
    step, with Torchreid's own loss classes on the same batch."""
    cfg, dm = setup(**{"loss.name": loss, "msgr.mode": mode, "msgr.eps": "[0.01, 0.02]"})
    engine, model = engine_for(cfg, dm)
    data = next(iter(dm.train_loader))
    twin = copy.deepcopy(model)  # the weights (and BatchNorm state) the step starts from
    summary = engine.forward_backward(data)
    imgs, pids = engine.train_inputs(data)
    with StageCapture(twin, OSNET_STAGES) as cap:
        outputs = twin(imgs)
    losses = torchreid().losses
    if loss == "softmax":
        ce = losses.CrossEntropyLoss(num_classes=dm.num_train_pids, use_gpu=False, label_smooth=True)
        loss_mean = ce(outputs, pids)
    else:  # cfg.loss.triplet: weight_t 1, weight_x 0
        loss_mean = losses.TripletLoss(margin=cfg.loss.triplet.margin)(outputs[1], pids)
    ref = feature_gradient_penalty(imgs.shape[0] * loss_mean, cap.outputs, {"conv2": 0.01, "conv3": 0.02})
    assert summary["loss"] == pytest.approx(loss_mean.item(), rel=1e-5)
    assert summary["msgr/applied"] == 1.0
    assert summary["msgr/R"] == pytest.approx(ref.penalty.item(), rel=1e-4)
    for s in OSNET_STAGES:
        assert summary[f"msgr/R_{s}"] == pytest.approx(ref.stage_penalty[s].item(), rel=1e-4)
        assert summary[f"msgr/gnorm_{s}"] == pytest.approx(ref.stage_gnorm[s].item(), rel=1e-4)


# ------------------------------------------------------------------ lazy MSGR (msgr.interval)

LAZY_EPS = {"layer1": 0.5, "layer2": 0.2}


class LazyNet(nn.Module):
    """No BatchNorm, smooth (tanh): a float64 SGD step can be rebuilt by hand exactly."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Tanh())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh())
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        return self.classifier(self.layer2(self.layer1(torch.tanh(self.conv1(x)))).mean((2, 3)))


def lazy_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 12, 6, generator=g, dtype=torch.float64), torch.arange(4).repeat_interleave(2)


def lazy_engine(net, mode, interval):
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=4, sources=[])
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    return MSGREngine(dm, net, opt, stages=list(LAZY_EPS), eps=list(LAZY_EPS.values()), mode=mode,
                      interval=interval, use_gpu=False, label_smooth=False)


def reference_params(net, imgs, pids, weight):
    """Parameters after one plain SGD step (lr 0.5) on CE + weight * R (R from
    feature_gradient_penalty; weight None: CE alone), from a copy of ``net``."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with StageCapture(net, list(LAZY_EPS)) as cap:
        loss = F.cross_entropy(net(imgs), pids)
    if weight is not None:
        loss = loss + weight * feature_gradient_penalty(imgs.shape[0] * loss, cap.outputs, LAZY_EPS).penalty
    opt.zero_grad()
    loss.backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_lazy_step_is_loss_plus_n_times_r_or_a_plain_step(mode):
    """interval N = 3, 4 batches per epoch: steps 0, 3, 6 (global index) apply R with weight N;
    the update equals SGD on CE + N * R there, SGD on CE alone elsewhere."""
    n, num_batches = 3, 4
    torch.manual_seed(0)
    init = LazyNet().double()
    imgs, pids = lazy_batch()
    start = torch.cat([p.detach().flatten() for p in init.parameters()])
    plain, weighted = reference_params(init, imgs, pids, None), reference_params(init, imgs, pids, n)
    once = reference_params(init, imgs, pids, 1)
    assert (weighted - plain).norm() > 2 * (once - plain).norm()  # guard: the weight N shows
    tol = 1e-12 if mode == "exact" else 1e-5  # fast mode: first order in its step
    for epoch, batch_idx in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2)]:
        net = copy.deepcopy(init)
        engine = lazy_engine(net, mode, n)
        engine.epoch, engine.batch_idx, engine.num_batches = epoch, batch_idx, num_batches
        summary = engine.forward_backward({"img": imgs, "pid": pids})
        after = torch.cat([p.detach().flatten() for p in net.parameters()])
        due = (epoch * num_batches + batch_idx) % n == 0
        assert summary["msgr/applied"] == float(due)
        ref = weighted if due else plain
        err = (after - ref).norm() / (ref - start).norm()
        assert err < (tol if due else 1e-13), (epoch, batch_idx, float(err))
        if due:  # R logged unweighted
            with StageCapture(init, list(LAZY_EPS)) as cap:
                loss = F.cross_entropy(init(imgs), pids)
            r = feature_gradient_penalty(imgs.shape[0] * loss, cap.outputs, LAZY_EPS).penalty.item()
            assert summary["msgr/R"] == pytest.approx(r, rel=1e-10)
        else:  # no R on this step: its keys are left out, not logged as 0
            assert not any(k.startswith("msgr/R") for k in summary)


def test_lazy_choice_depends_on_epoch_and_batch_index_only():
    """No counter: the same (epoch, batch_idx) gives the same choice however often and in
    whatever order it comes, and in a new engine (a resumed run); rank plays no part."""
    assert [penalty_due(e, b, 4, 3) for e in range(3) for b in range(4)] == [
        i % 3 == 0 for i in range(12)]
    assert all(penalty_due(e, b, 5, 1) for e in range(3) for b in range(5))
    torch.manual_seed(0)
    imgs, pids = lazy_batch()
    engine = lazy_engine(LazyNet().double(), "exact", 3)
    engine.num_batches = 4
    order = [(0, 1), (1, 2), (0, 1), (0, 0), (1, 2), (0, 1), (2, 0), (2, 0)]
    seen = []
    for epoch, batch_idx in order:
        engine.epoch, engine.batch_idx = epoch, batch_idx
        seen.append(engine.forward_backward({"img": imgs, "pid": pids})["msgr/applied"])
    assert seen == [float((4 * e + b) % 3 == 0) for e, b in order] == [0, 1, 0, 1, 1, 0, 0, 0]
    resumed = lazy_engine(LazyNet().double(), "exact", 3)
    resumed.epoch, resumed.batch_idx, resumed.num_batches = 1, 2, 4
    assert resumed.penalty_due() and resumed.forward_backward({"img": imgs, "pid": pids})["msgr/applied"] == 1


def test_interval_is_checked_and_read_from_the_config(setup, data_root, tmp_path):
    net = LazyNet().double()
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"msgr\.interval = .* is not valid.*integer N >= 1"):
            lazy_engine(net, "exact", bad)
    cfg, dm = setup(**{"msgr.interval": 4})
    assert engine_for(cfg, dm)[0].msgr_interval == 4
    with pytest.raises(ConfigError, match=r"msgr\.interval = 0 is not valid.*integer N >= 1"):
        cli.load_run_config(tiny_opts(data_root, str(tmp_path / "log"), **{"msgr.interval": 0}))
