"""torchreid_ext.msgr.fast and fast_step (docs/methods.md G1, G5): the dual direction, fast
mode against exact mode, the step size actually applied, RNG and running statistics, the
piecewise replay."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msgr_nets import INF, STAGES, TinyNet, cosine, flat_grads, make, plain_grads, run_mode
from torchreid_ext.msgr import PiecewiseReplay, StageCapture, dual_direction, msgr_backward
from torchreid_ext.msgr.step import _reaches_upstream


@pytest.mark.parametrize("q", [2.0, 1.0, INF, 3.0])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("grad_of", ["sum", "mean"])
@pytest.mark.parametrize("dropout, relu", [(0.0, False), (0.3, True)])
def test_fast_mode_agrees_with_exact(q, squared, grad_of, dropout, relu):
    net, x, y = make(seed=2, bn=True, dropout=dropout, relu=relu)
    # 'mean' gradients are 1/B of 'sum' ones: scale eps so that R stays comparable
    k = 1 if grad_of == "sum" else x.shape[0] ** (2 if squared else 1)
    eps = [0.3 * k, 0.1 * k]
    exact, g_exact = run_mode(net, x, y, "exact", q=q, squared=squared, grad_of=grad_of, eps=eps)
    fast, g_fast = run_mode(net, x, y, "fast", q=q, squared=squared, grad_of=grad_of, h=1e-4, eps=eps)
    # the logged R of fast mode comes from the exact g: same value
    assert fast.penalty.penalty.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-10)
    # the finite difference: first order in h
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-3)
    assert cosine(g_fast, g_exact) > 0.999
    # the regulariser's own gradient (L + R minus L) agrees too
    g_plain = plain_grads(net, x, y)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.99
    assert (g_exact - g_plain).norm() > 1e-3 * g_plain.norm()


def test_fast_mode_default_h():
    net, x, y = make(seed=2, bn=True)
    exact, g_exact = run_mode(net, x, y, "exact")
    fast, g_fast = run_mode(net, x, y, "fast", h=0.1)
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=2e-2)
    assert cosine(g_fast, g_exact) > 0.999


def test_fast_step_leaves_running_stats_and_rng_as_a_plain_step():
    net, x, y = make(seed=3, bn=True, dropout=0.2, dtype=torch.float32)
    twin = copy.deepcopy(net)
    torch.manual_seed(5)
    F.cross_entropy(twin(x), y).backward()
    rng_plain = torch.get_rng_state()
    torch.manual_seed(5)
    step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.01, mode="fast")
    assert step.fast is not None
    assert torch.equal(torch.get_rng_state(), rng_plain)
    bufs, ref = dict(net.named_buffers()), dict(twin.named_buffers())
    assert any(k.endswith("num_batches_tracked") for k in bufs)
    for k in ref:
        assert torch.equal(bufs[k], ref[k]), k
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_dual_direction_is_unit_and_attains_the_norm():
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    g[1] = 0
    for q, p in [(2.0, 2.0), (1.0, INF), (INF, 1.0), (3.0, 1.5)]:
        v = dual_direction(g, q)
        assert v.shape == g.shape and torch.isfinite(v).all()
        for i in (0, 2, 3):
            assert torch.linalg.vector_norm(v[i].flatten(), p).item() == pytest.approx(1.0, rel=1e-12)
            assert (g[i] * v[i]).sum().item() == pytest.approx(
                torch.linalg.vector_norm(g[i].flatten(), q).item(), rel=1e-12)
        assert v[1].abs().sum() == 0


def test_fast_mode_needs_the_frozen_activation_pattern_on_relu_nets():
    """Without replaying ReLU masks / max-pool argmaxes the fast gradient is noise (guard)."""
    net, x, y = make(seed=2, bn=True, relu=True, size=16, batch=8)
    _, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    _, g_frozen = run_mode(net, x, y, "fast", h=0.1)
    _, g_free = run_mode(net, x, y, "fast", h=0.1, freeze_kinks=False)
    assert cosine(g_frozen - g_plain, g_exact - g_plain) > 0.999
    assert cosine(g_free - g_plain, g_exact - g_plain) < 0.9


def test_fast_mode_holds_stop_gradient_values_fixed():
    """A loss with a detached scale (like DRSL's temperature) and a no_grad branch: the
    finite difference must see them as constants, as autograd does."""
    net, x, y = make(seed=6, relu=True)

    def loss_fn(out):
        with torch.no_grad():
            w = torch.softmax(out, 1).amax(1)  # computed from grad-requiring logits
        return (w * F.cross_entropy(out / out.detach().std(), y, reduction="none")).mean()

    def run(mode, **kw):
        net.zero_grad()
        st = msgr_backward(net, lambda: net(x), loss_fn, STAGES, [0.3, 0.1], mode=mode, **kw)
        return st, flat_grads(net).clone()

    exact, g_exact = run("exact")
    fast, g_fast = run("fast", h=1e-3)
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-4)
    assert cosine(g_fast, g_exact) > 0.9999
    free, _ = run("fast", h=1e-3, freeze_kinks=False)
    assert abs(free.fast.penalty_fd.item() / exact.penalty.penalty.item() - 1) > 1e-2


class TappedNet(TinyNet):
    """TinyNet(relu=True) with an identity module right after stage 2, so a forward pre-hook
    sees what flows on from each stage (stage 1 flows into ``pool``)."""

    def __init__(self):
        super().__init__(bn=True, relu=True)
        self.tap2 = nn.Identity()

    def forward(self, x):
        x = self.pool(self.stage1(self.stem(x)))
        x = self.tap2(self.stage2(F.relu(x) - 0.1 * F.relu(-x)))
        return self.classifier(self.drop(x.mean((2, 3))))


def test_fast_mode_auto_step_perturbs_the_stage_outputs_by_rel_step():
    """The automatic step, measured: hooks record each stage's own output and what the next
    module receives; in the second forward their difference is the perturbation actually
    added. The largest stage's mean per-sample ||delta_i|| / mean ||x_i|| (L2) is rel_step."""
    torch.manual_seed(2)
    net = TappedNet()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    raw = {s: [] for s in STAGES}
    seen = {s: [] for s in STAGES}
    # the hooks keep references and call no torch function: inside fast mode's second forward,
    # PiecewiseReplay would answer e.g. a detach() with the first forward's value
    handles = [getattr(net, s).register_forward_hook(lambda m, i, o, s=s: raw[s].append(o))
               for s in STAGES]  # registered before the step's hooks: the output before any delta
    handles += [getattr(net, t).register_forward_pre_hook(lambda m, i, s=s: seen[s].append(i[0]))
                for s, t in zip(STAGES, ["pool", "tap2"])]
    exact, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    for s in STAGES:
        raw[s].clear(), seen[s].clear()
    fast, g_fast = run_mode(net, x, y, "fast", h=None)
    for hd in handles:
        hd.remove()
    rel = {}
    for s in STAGES:
        assert len(raw[s]) == len(seen[s]) == 2  # the two forwards of fast mode
        assert torch.equal(seen[s][0], raw[s][0])  # the first forward is not perturbed
        delta, base = seen[s][1] - raw[s][1], raw[s][0]
        d_norm = torch.linalg.vector_norm(delta.double().flatten(1), dim=1)
        x_norm = torch.linalg.vector_norm(base.double().flatten(1), dim=1)
        # q = 2: unit directions, so every sample is moved by the same L2 distance
        torch.testing.assert_close(d_norm, d_norm.mean().expand_as(d_norm), rtol=1e-2, atol=0)
        rel[s] = (d_norm.mean() / x_norm.mean()).item()
    assert max(rel.values()) == pytest.approx(3e-6, rel=1e-2)
    assert max(rel.values()) == pytest.approx(fast.fast.rel_step, rel=1e-2)
    # and the result: R from the difference and the gradient of R match exact mode
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-2)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.999


def test_fast_mode_auto_step_in_float32():
    net, x, y = make(seed=2, bn=True, relu=True, size=16, batch=8, dtype=torch.float32)
    exact, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    fast, g_fast = run_mode(net, x, y, "fast", h=None)
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-2)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.999


def test_piecewise_replay_reuses_every_recorded_decision():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    x2 = (x + 0.5 * torch.randn_like(x)).detach().requires_grad_()  # other values, same shapes
    pre = (x * 1).sum()  # before arm(): not recorded

    def program(t):
        relu = F.relu(t)
        inplace = torch.relu_(t * 1)
        leaky = F.leaky_relu(t, 0.2)
        pooled = F.max_pool2d(t, 2)
        decision = t > 0.1
        detached = t.detach().sum()
        with torch.no_grad():
            quiet = t.exp()
        return relu, inplace, leaky, pooled, decision, detached, quiet

    rec = PiecewiseReplay()
    with rec:
        pre = pre + 0
        rec.arm()
        first = program(x)
    with rec.replay():
        rec.arm()
        second = program(x2)
    rec.check_consumed()
    mask = x > 0
    torch.testing.assert_close(second[0], x2 * mask)
    torch.testing.assert_close(second[1], x2 * mask)
    torch.testing.assert_close(second[2], torch.where(mask, x2, 0.2 * x2))
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(second[3], x2.flatten(2).gather(2, idx.flatten(2)).view_as(idx))
    assert torch.equal(second[4], first[4]) and not torch.equal(second[4], x2 > 0.1)
    assert torch.equal(second[5], first[5]) and torch.equal(second[6], first[6])
    assert not torch.equal(second[6], x2.detach().exp())
    # gradients flow through the replayed ops with the recorded pattern
    (g,) = torch.autograd.grad(second[0].sum() + second[3].sum(), x2)
    assert torch.equal(g > 0, mask | (torch.zeros_like(x).flatten(2).scatter(2, idx.flatten(2), 1.0)
                                      .view_as(x) > 0))
    with pytest.raises(RuntimeError, match="differs from the first"):
        with rec.replay():
            rec.arm()
            F.relu(torch.randn(5, requires_grad=True))


class SkipNet(TinyNet):
    """stage2 also sees the stem directly: the graph below stage1 is reached twice."""

    def __init__(self):
        super().__init__(bn=True, relu=True)
        self.skip = nn.Conv2d(4, 6, 1, stride=2)

    def forward(self, x):
        s = self.stem(x)
        x = F.relu(self.stage1(s)) + self.skip(s)
        return self.classifier(self.stage2(x).mean((2, 3)))


def test_fast_mode_with_a_connection_around_the_first_stage():
    torch.manual_seed(0)
    net = SkipNet().double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    with StageCapture(net, STAGES, split_first=True) as cap:
        loss = F.cross_entropy(net(x), y)
    assert _reaches_upstream(loss, cap.upstream[1])  # the skip path is seen
    seq, xs, ys = make(relu=True)
    with StageCapture(seq, STAGES, split_first=True) as cap:
        loss = F.cross_entropy(seq(xs), ys)
    assert cap.upstream[0] == "stage1" and not _reaches_upstream(loss, cap.upstream[1])
    _, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    _, g_fast = run_mode(net, x, y, "fast", h=1e-3)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.999
    assert cosine(g_fast, g_exact) > 0.9999
