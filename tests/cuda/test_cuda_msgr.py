"""MSGR on CUDA (docs/methods.md G4, G5): the exact penalty and its parameter gradient against the
CPU float64 values on the same weights and batch (contiguous and channels-last, native and fused
BatchNorm double backward, bf16 autocast), the fused BatchNorm double backward on the device
(gradgradcheck), and fast vs exact mode with dropout (the device RNG replay) and ReLU / max-pool
kinks, with a control that breaks the replay.

``pytest -m cuda``; without CUDA these tests skip (``TORCHREID_EXT_TEST_DEVICE=cpu``: run on the CPU).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchreid_ext.msgr.step as step_mod
from cuda_env import DEVICE, MARKS, strict_fp32, sync
from torchreid_ext.msgr import (
    FusedBatchNormDoubleBackward,
    RNGSnapshot,
    StageCapture,
    feature_gradient_penalty,
    msgr_backward,
)

pytestmark = MARKS

STAGES = ["stage1", "stage2"]
EPS = {"stage1": 0.3, "stage2": 0.1}


@pytest.fixture(autouse=True)
def no_tf32():
    with strict_fp32():
        yield


class KinkNet(nn.Module):
    """A small ResNet-like network: conv-BN-ReLU stem, two stages, a max-pool, dropout."""

    def __init__(self, dropout=0.0, classes=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12),
                                    nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.stage2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stage2(self.pool(self.stage1(self.stem(x))))
        return self.classifier(self.drop(x.mean((2, 3))))


def make(seed=0, dropout=0.0, batch=8, size=(16, 8)):
    """A float64 CPU network and batch (the reference), generated on the CPU."""
    torch.manual_seed(seed)
    net = KinkNet(dropout).double()
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    y = torch.arange(batch) % 6
    return net, x, y


def on_device(net, x, memory_format=torch.contiguous_format):
    net = copy.deepcopy(net).float().to(DEVICE).to(memory_format=memory_format)
    return net, x.float().to(DEVICE).contiguous(memory_format=memory_format)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def penalty_and_gradient(net, x, y, fused=False, autocast_dtype=None):
    """R = sum_s eps_s mean_i ||d(B CE)/dx_s,i||_2 (G2) and dR/dtheta."""
    amp = torch.autocast(DEVICE.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    bn = FusedBatchNormDoubleBackward() if fused else contextlib.nullcontext()
    with bn:
        with amp, StageCapture(net, STAGES) as cap:
            out = net(x)
        loss = F.cross_entropy(out.float(), y)
        pen = feature_gradient_penalty(x.shape[0] * loss, cap.outputs, EPS)
        grads = torch.autograd.grad(pen.penalty, list(net.parameters()))
    sync()
    return pen, flat(grads)


@pytest.mark.parametrize("fused", [False, True], ids=["native_bn", "fused_bn"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_exact_penalty_and_its_gradient_match_cpu_float64(fused, memory_format):
    ref_net, x, y = make(seed=1)
    ref, g_ref = penalty_and_gradient(ref_net, x, y)
    net, xd = on_device(make(seed=1)[0], x, memory_format)
    pen, g = penalty_and_gradient(net, xd, y.to(DEVICE), fused=fused)
    assert pen.penalty.dtype == torch.float32 and pen.penalty.device.type == DEVICE.type
    assert pen.penalty.item() == pytest.approx(ref.penalty.item(), rel=1e-4)
    for s in STAGES:
        assert pen.stage_gnorm[s].item() == pytest.approx(ref.stage_gnorm[s].item(), rel=1e-4)
    assert g_ref.norm() > 0 and rel_err(g, g_ref) < 1e-3, rel_err(g, g_ref)
    # the running statistics were updated as on the CPU (one forward)
    for (k, b), (_, b_ref) in zip(net.named_buffers(), ref_net.named_buffers()):
        torch.testing.assert_close(b.cpu().to(b_ref.dtype), b_ref, rtol=1e-4, atol=1e-6, msg=k)


def test_exact_penalty_under_bf16_autocast_is_close_to_float64():
    """G4/G6: under bf16 autocast the stage gradients are widened and the norms taken in float32."""
    ref_net, x, y = make(seed=2)
    ref, g_ref = penalty_and_gradient(ref_net, x, y)
    net, xd = on_device(make(seed=2)[0], x, torch.channels_last)
    pen, g = penalty_and_gradient(net, xd, y.to(DEVICE), fused=True, autocast_dtype=torch.bfloat16)
    assert pen.penalty.dtype == torch.float32
    assert pen.penalty.item() == pytest.approx(ref.penalty.item(), rel=0.05)
    assert cosine(g, g_ref) > 0.95, cosine(g, g_ref)


def test_exact_msgr_step_matches_cpu_float64():
    """The whole exact step (fused BatchNorm double backward; gradients of L + R in .grad)."""
    ref_net, x, y = make(seed=3)
    net, xd = on_device(make(seed=3)[0], x, torch.channels_last)
    grads = []
    for m, inp, lab in ((ref_net, x, y), (net, xd, y.to(DEVICE))):
        m.zero_grad()
        st = msgr_backward(m, lambda m=m, inp=inp: m(inp), lambda out, lab=lab: F.cross_entropy(out, lab),
                           STAGES, [EPS[s] for s in STAGES], mode="exact")
        grads.append((flat(p.grad for p in m.parameters()), st.penalty.penalty.item()))
    (g_ref, r_ref), (g, r) = grads
    assert r == pytest.approx(r_ref, rel=1e-4)
    assert rel_err(g, g_ref) < 1e-3, rel_err(g, g_ref)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_fused_batchnorm_double_backward_gradgradcheck_on_device(memory_format):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 2, dtype=torch.float64) * 2 + 1).to(DEVICE).contiguous(memory_format=memory_format)
    x.requires_grad_()
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def bn(*t):
        with FusedBatchNormDoubleBackward():
            return F.batch_norm(t[0], None, None, t[1], t[2], training=True)

    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradgradcheck(bn, (x, w, b))


# ------------------------------------------------------------------ fast vs exact (G5)


def mode_grads(net, x, y, mode, **kw):
    """Gradients of one MSGR step from zero (mode 'plain': CE alone), same dropout seed."""
    net.zero_grad()
    torch.manual_seed(123)  # CPU and CUDA generators: same dropout masks in every mode
    if mode == "plain":
        F.cross_entropy(net(x), y).backward()
        st = None
    else:
        st = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES,
                           [EPS[s] for s in STAGES], mode=mode, **kw)
    sync()
    return st, flat(p.grad for p in net.parameters())


def fast_vs_exact(memory_format=torch.contiguous_format):
    net, x, y = make(seed=4, dropout=0.3, batch=16, size=(32, 16))
    net, xd = on_device(net, x, memory_format)
    y = y.to(DEVICE)
    exact, g_exact = mode_grads(net, xd, y, "exact")
    _, g_plain = mode_grads(net, xd, y, "plain")
    fast, g_fast = mode_grads(net, xd, y, "fast", h=None)
    return exact, fast, g_exact, g_plain, g_fast


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_fast_mode_gradient_agrees_with_exact_mode(memory_format):
    """Float32, dropout 0.3, ReLU and max-pool: fast mode's R and dR/dtheta against exact mode's."""
    exact, fast, g_exact, g_plain, g_fast = fast_vs_exact(memory_format)
    r = exact.penalty.penalty.item()
    assert fast.penalty.penalty.item() == pytest.approx(r, rel=1e-4)  # logged R: from the exact g
    assert fast.fast.penalty_fd.item() == pytest.approx(r, rel=5e-2)
    reg_fast, reg_exact = g_fast - g_plain, g_exact - g_plain
    assert reg_exact.norm() > 1e-3 * g_plain.norm()  # the regulariser's share is not negligible
    assert cosine(reg_fast, reg_exact) > 0.99, cosine(reg_fast, reg_exact)
    assert cosine(g_fast, g_exact) > 0.999


class _NoDeviceReplay(RNGSnapshot):
    """A broken snapshot: the second forward does not get the first one's RNG state back on
    the model's device (new dropout masks there)."""

    @contextlib.contextmanager
    def replay(self):
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.cpu)
                yield
        else:
            yield


def test_without_the_device_rng_replay_fast_mode_is_wrong(monkeypatch):
    """Control: the agreement above depends on replaying the device's RNG (dropout)."""
    monkeypatch.setattr(step_mod, "RNGSnapshot", _NoDeviceReplay)
    exact, fast, g_exact, g_plain, g_fast = fast_vs_exact()
    assert cosine(g_fast - g_plain, g_exact - g_plain) < 0.9
    assert abs(fast.fast.penalty_fd.item() / exact.penalty.penalty.item() - 1) > 0.1


def test_fast_step_leaves_device_rng_and_running_stats_as_a_plain_step():
    net, x, y = make(seed=5, dropout=0.2)
    net, xd = on_device(net, x)
    y = y.to(DEVICE)
    twin = copy.deepcopy(net)
    torch.manual_seed(7)
    F.cross_entropy(twin(xd), y).backward()
    states_plain = (torch.get_rng_state(), torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None)
    torch.manual_seed(7)
    st = msgr_backward(net, lambda: net(xd), lambda out: F.cross_entropy(out, y), STAGES, 0.01, mode="fast")
    assert st.fast is not None
    assert torch.equal(torch.get_rng_state(), states_plain[0])
    if DEVICE.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(DEVICE), states_plain[1])
    ref = dict(twin.named_buffers())
    for k, b in net.named_buffers():
        assert torch.equal(b, ref[k]), k
