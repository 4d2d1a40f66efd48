"""DistributedDataParallel on CPU (gloo): a 2-process step equals a 1-process step on the
concatenated batch; the distributed identity sampler; torchrun end to end (resume, rank 0
writes)."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import REPO, free_port
from ddp_net import StageNet
from torchreid_ext import distributed
from torchreid_ext.adapter import torchreid
from torchreid_ext.checkpoint import load_checkpoint
from torchreid_ext.data.sampler import DistributedIdentitySampler
from torchreid_ext.engines import ImageMetricEngine
from torchreid_ext.engines.msgr import MSGREngine

WORLD, P, K, CLASSES = 2, 2, 4, 4


def TinyNet():
    """No BatchNorm: without SyncBatchNorm (CUDA only) each rank would normalise with its own
    batch statistics, and the DDP step could not equal the one-process step."""
    return StageNet(CLASSES)


def batch():
    """The global batch, float64: 4 identities x K = 4; rank r holds identities 2r, 2r + 1."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * P * K, 3, 12, 6, generator=g, dtype=torch.float64), \
        torch.arange(WORLD * P).repeat_interleave(K)


CASES = ("softmax", "triplet_gathered", "msgr_exact", "msgr_fast")


def make_engine(case, model):
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=CLASSES, sources=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    kwargs = dict(use_gpu=False, label_smooth=True)
    if case == "triplet_gathered":
        triplet = torchreid().losses.TripletLoss(margin=0.3)
        return ImageMetricEngine(dm, model, opt, metric_losses={"triplet": (1.0, triplet)},
                                 gather_features=True, **kwargs)
    if case.startswith("msgr"):
        return MSGREngine(dm, model, opt, stages=["layer1", "layer2"], eps=0.5, grad_of="sum",
                          mode=case[5:], **kwargs)
    return ImageMetricEngine(dm, model, opt, **kwargs)


def one_step(case, rank=0, world=1):
    """Parameters after one step on this rank's share of ``batch()`` (the whole with world 1)."""
    torch.manual_seed(0)
    net = TinyNet().double()
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    imgs, pids = batch()
    n = imgs.shape[0] // world
    make_engine(case, model).forward_backward({"img": imgs[rank * n:(rank + 1) * n],
                                               "pid": pids[rank * n:(rank + 1) * n]})
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {case: one_step(case, rank, WORLD) for case in CASES}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "params.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.mark.parametrize("case", CASES)
def test_ddp_step_equals_single_process_step_on_concatenated_batch(ddp_results, case):
    """softmax: DDP's gradient average = the global batch mean. triplet_gathered:
    dist.gather_features (the loss sees both ranks' features, x world size in the backward).
    MSGR with grad_of 'sum': per-sample penalties, so the mean over ranks of the local means
    is the global mean (equal batch sizes); fast mode is exact to first order in its step."""
    single = one_step(case)
    torch.manual_seed(0)
    init = dict(TinyNet().double().named_parameters())
    moved = sum(float((single[k] - init[k].detach()).norm()) for k in single)
    assert moved > 1e-2  # the step is not trivial
    tol = 1e-7 if case == "msgr_fast" else 1e-10
    for k, v in single.items():
        assert torch.allclose(ddp_results[case][k], v, rtol=0, atol=tol), (k, (ddp_results[case][k] - v).abs().max())


def test_all_gather_with_grad_without_process_group_is_identity():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(t) is t and distributed.get_world_size() == 1


# ------------------------------------------------------------------ sampler


def fake_train(counts):
    """Torchreid train items (path, pid, camid, dsetid), ``counts[pid]`` images per identity."""
    return [(f"{pid}_{i}.jpg", pid, 0, 0) for pid, n in enumerate(counts) for i in range(n)]


def test_distributed_identity_sampler_splits_the_single_process_plan():
    data = fake_train([4, 8, 5, 2, 12, 4, 9, 7, 4, 3, 6, 8])
    world, p, k = 3, 2, 4
    ranks = [DistributedIdentitySampler(data, p * k, k, num_replicas=world, rank=r, seed=5) for r in range(world)]
    single = DistributedIdentitySampler(data, world * p * k, k, num_replicas=1, rank=0, seed=5)
    for epoch in (0, 1):
        for s in ranks + [single]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0]) > 0
        steps = len(per_rank[0]) // (p * k)
        glued = []
        for step in range(steps):
            pid_sets = []
            for r in range(world):
                chunk = per_rank[r][step * p * k:(step + 1) * p * k]
                pids = Counter(data[i][1] for i in chunk)
                assert len(pids) == p and set(pids.values()) == {k}  # P x K
                pid_sets.append(set(pids))
                glued += chunk
            assert len(set.union(*pid_sets)) == p * world  # no identity on two ranks in a step
        assert glued == list(single)  # the union is the single-process sampler's plan
    a, b = list(ranks[1]), DistributedIdentitySampler(data, p * k, k, num_replicas=world, rank=1, seed=5)
    b.set_epoch(1)
    assert list(b) == a  # epoch-seeded: reproducible
    b.set_epoch(0)
    assert list(b) != a


def test_distributed_identity_sampler_errors():
    data = fake_train([4] * 5)
    with pytest.raises(ValueError, match="batch_size = 10 must be a positive multiple of num_instances = 4"):
        DistributedIdentitySampler(data, 10, 4, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="5 identities, fewer than P x world size = 2 x 3 = 6"):
        DistributedIdentitySampler(data, 8, 4, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match=r"rank = 2 is not in \[0, num_replicas = 2\)"):
        DistributedIdentitySampler(data, 8, 4, num_replicas=2, rank=2)


# ------------------------------------------------------------------ torchrun end to end


def torchrun(opts, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), osp.join(REPO, "scripts", "main.py")] + opts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_torchrun_resume_is_exact_and_only_rank_0_writes(tiny, tmp_path):
    """Two epochs straight vs one epoch, then ``model.resume auto`` for the second: equal
    weights on every rank (epoch-seeded sampler, RNG reseeded from (seed, epoch, rank))."""
    common = {"data.workers": 0, "train.batch_size": 8, "model.resume": "auto", "loss.name": "triplet",
              "loss.triplet.weight_x": 1.0, "dist.gather_features": True, "train.deterministic": True}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    cwd = tempfile.mkdtemp(dir=tmp_path)
    out = torchrun(tiny(save_dir=straight, **{**common, "train.max_epoch": 2}), cwd).stdout
    assert out.count("Show configuration") == 1 and out.count("=> Final test") == 1  # rank 0 prints
    torchrun(tiny(save_dir=resumed, **{**common, "train.max_epoch": 1}), cwd)
    torchrun(tiny(save_dir=resumed, **{**common, "train.max_epoch": 2}), cwd)
    a = load_checkpoint(osp.join(straight, "model", "model.pth.tar-2"))
    b = load_checkpoint(osp.join(resumed, "model", "model.pth.tar-2"))
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert json.load(open(osp.join(straight, "metrics.json")))["world_size"] == 2
    # rank 0 alone wrote: one log and one event file per launch, nothing in the working directory
    assert os.listdir(cwd) == []
    assert sorted(os.listdir(osp.join(straight, "model"))) == ["model.pth.tar-2"]  # epoch 1: rolling, removed
    logs = glob.glob(osp.join(straight, "train.log-*"))
    assert len(logs) == 1 and open(logs[0]).read().count("Show configuration") == 1
    assert len(glob.glob(osp.join(straight, "events.out.tfevents.*"))) == 1
    assert len(glob.glob(osp.join(resumed, "events.out.tfevents.*"))) == 2
    assert "processes 2 (batch size 8 per process)" in open(logs[0]).read()


# ------------------------------------------------------------------ model preparation, torchrun rules


def test_prepare_model_converts_and_wrap_ddp_is_a_no_op_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    out = distributed.prepare_model(model, torch.device("cpu"), sync_bn=True, channels_last=True)
    assert isinstance(out[1], nn.SyncBatchNorm)
    assert out[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = distributed.prepare_model(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cpu"))
    assert type(plain[0]) is nn.BatchNorm2d
    alone = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert distributed.wrap_ddp(out, alone, find_unused_parameters=True) is out


def test_torchrun_rules_apply_under_torchrun_only(monkeypatch):
    from torchreid_ext.config import ConfigError, get_default_config
    from torchreid_ext.preflight import check_torchrun
    from torchreid_ext.run_options import RunOptions

    cfg = get_default_config()
    cfg.sampler.train_sampler = "RandomDomainSampler"
    cfg.train.sync_bn = True
    check_torchrun(RunOptions(cfg))  # one process: anything goes
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"'RandomDomainSampler' has no distributed form"):
        check_torchrun(RunOptions(cfg))
    cfg.sampler.train_sampler = "RandomSampler"
    with pytest.raises(ConfigError, match=r"train.sync_bn = True under torchrun needs GPUs"):
        check_torchrun(RunOptions(cfg, use_gpu=False))
    cfg.train.sync_bn = False
    check_torchrun(RunOptions(cfg, use_gpu=False))
