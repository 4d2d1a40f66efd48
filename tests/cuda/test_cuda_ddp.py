"""Two-process DistributedDataParallel over NCCL, one GPU per process (needs at least 2 GPUs; else
a skip saying so): a DDP step equals a one-process step on the concatenated batch, for
cross-entropy with SyncBatchNorm (against plain BatchNorm on the whole batch, running statistics
included), gathered triplet features (dist.gather_features), exact MSGR and fast MSGR with
SyncBatchNorm (fast mode needs no double backward). Float64, as tests/test_distributed.py (gloo).

``pytest -m cuda``. ``TORCHREID_EXT_TEST_DEVICE=cpu`` runs the cases without SyncBatchNorm over gloo
on the CPU (a development check of the harness; SyncBatchNorm needs CUDA).
"""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import free_port
from cuda_env import FORCED_CPU, MARKS
from ddp_net import StageNet
from torchreid_ext.adapter import torchreid
from torchreid_ext.engines import ImageMetricEngine
from torchreid_ext.engines.msgr import MSGREngine

WORLD, P, K, CLASSES = 2, 2, 4, 4
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = MARKS + [pytest.mark.skipif(
    not FORCED_CPU and GPUS < WORLD,
    reason=f"two-process NCCL DDP needs at least {WORLD} CUDA GPUs; this machine has {GPUS}")]

# case: (engine, model uses BatchNorm -> SyncBatchNorm under DDP)
CASES = {
    "softmax_syncbn": ("softmax", True),
    "triplet_gathered": ("triplet_gathered", False),
    "msgr_exact": ("msgr_exact", False),
    "msgr_fast_syncbn": ("msgr_fast", True),
}
RUN = [c for c, (_, bn) in CASES.items() if not (bn and FORCED_CPU)]


def Net(bn):
    return StageNet(CLASSES, bn)


def batch():
    """The global batch: 4 identities x K; rank r holds identities 2r, 2r + 1."""
    g = torch.Generator().manual_seed(7)
    return (torch.randn(WORLD * P * K, 3, 12, 6, generator=g, dtype=torch.float64),
            torch.arange(WORLD * P).repeat_interleave(K))


def make_engine(kind, model, use_gpu):
    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=CLASSES, sources=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    kwargs = dict(use_gpu=use_gpu, label_smooth=True)
    if kind == "triplet_gathered":
        triplet = torchreid().losses.TripletLoss(margin=0.3)
        return ImageMetricEngine(dm, model, opt, metric_losses={"triplet": (1.0, triplet)},
                                 gather_features=True, **kwargs)
    if kind.startswith("msgr"):
        return MSGREngine(dm, model, opt, stages=["layer1", "layer2"], eps=0.5, grad_of="sum",
                          mode=kind[5:], **kwargs)
    return ImageMetricEngine(dm, model, opt, **kwargs)


def one_step(case, device, rank=0, world=1):
    """Parameters and buffers (CPU) after one step on this rank's share of ``batch()``."""
    kind, bn = CASES[case]
    torch.manual_seed(0)
    net = Net(bn).double()
    if world > 1:
        if bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = net.to(device)
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = net = net.to(device)
    imgs, pids = batch()
    n = imgs.shape[0] // world
    engine = make_engine(kind, model, device.type == "cuda")
    engine.forward_backward({"img": imgs[rank * n:(rank + 1) * n], "pid": pids[rank * n:(rank + 1) * n]})
    state = {k: v.detach().cpu().clone() for k, v in net.named_parameters()}
    state.update({"buffer:" + k: v.detach().cpu().clone() for k, v in net.named_buffers()})
    return state


def _worker(rank, port, out, cases):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if FORCED_CPU:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(backend, rank=rank, world_size=WORLD,
                            device_id=device if device.type == "cuda" else None)
    try:
        results = {case: one_step(case, device, rank, WORLD) for case in cases}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nccl") / "params.pt")
    mp.spawn(_worker, args=(free_port(), out, RUN), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_step_equals_one_process_step_on_the_concatenated_batch(ddp_results, case):
    if case not in RUN:
        pytest.skip("SyncBatchNorm needs CUDA (the CPU development run has no such case)")
    device = torch.device("cpu") if FORCED_CPU else torch.device("cuda", 0)
    single = one_step(case, device)
    torch.manual_seed(0)
    init = {k: v.detach() for k, v in Net(CASES[case][1]).double().named_parameters()}
    moved = sum(float((single[k] - init[k]).norm()) for k in init)
    assert moved > 1e-2  # the step is not trivial
    got = ddp_results[case]
    assert got.keys() == single.keys()
    # fast MSGR: each rank picks its own finite-difference step, equal to first order
    tol = 1e-6 if case.startswith("msgr_fast") else 1e-10
    for k, v in single.items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, rtol=0, atol=tol), (k, (got[k] - v).abs().max())
        else:
            assert torch.equal(got[k], v), k
