"""torchreid_ext.msgr (METHOD.md G): exact penalty vs brute force, double backward vs finite
differences, fast mode vs exact, BatchNorm statistics, dropout replay, errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchreid_ext import msgr
from torchreid_ext.msgr import (
    StageCapture,
    dual_direction,
    feature_gradient_penalty,
    msgr_backward,
    stage_modules,
)

INF = float("inf")
STAGES = ["stage1", "stage2"]


class TinyNet(nn.Module):
    """Two named stages; smooth activations so finite differences are clean."""

    def __init__(self, bn=False, dropout=0.0, classes=5, width=4, relu=False):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Softplus
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), act())
        self.stage1 = nn.Sequential(nn.Conv2d(width, 6, 3, stride=2, padding=1), norm(6), nn.Tanh())
        # relu: a max-pool and a functional ReLU after stage 1, ReLU modules elsewhere
        self.pool = nn.MaxPool2d(3, 1, 1) if relu else nn.Identity()
        self.relu = relu
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), norm(8), act())
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        x = self.pool(self.stage1(self.stem(x)))
        x = self.stage2(F.relu(x) - 0.1 * F.relu(-x) if self.relu else x)
        return self.classifier(self.drop(x.mean((2, 3))))


def make(seed=0, dtype=torch.float64, batch=6, size=8, **kw):
    torch.manual_seed(seed)
    net = TinyNet(**kw).to(dtype)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    y = torch.randint(0, 5, (batch,))
    return net, x, y


def ref_norm(v, q, squared):
    v = v.flatten()
    n = v.abs().max() if q == INF else v.abs().sum() if q == 1 else v.pow(2).sum().sqrt()
    return n ** 2 if squared else n


def brute_force_penalty(net, x, y, eps, q, squared, grad_of):
    """Per-sample gradients, one sample at a time (the net has no batch coupling)."""
    B = x.shape[0]
    per_stage = {s: [] for s in STAGES}
    for i in range(B):
        with StageCapture(net, STAGES) as cap:
            logits = net(x[i:i + 1])
        loss_i = F.cross_entropy(logits, y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss_i, [cap.outputs[s] for s in STAGES])
        for s, g in zip(STAGES, grads):
            g = g if grad_of == "sum" else g / B  # d L_mean / d x_i = (own gradient) / B
            per_stage[s].append(ref_norm(g, q, squared))
    return sum(e * torch.stack(per_stage[s]).mean() for s, e in zip(STAGES, eps))


@pytest.mark.parametrize("q", [1.0, 2.0, INF])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("grad_of", ["sum", "mean"])
def test_exact_penalty_equals_brute_force(q, squared, grad_of):
    net, x, y = make()
    eps = [0.3, 0.05]
    with StageCapture(net, STAGES) as cap:
        logits = net(x)
    loss_mean = F.cross_entropy(logits, y)
    a = x.shape[0] if grad_of == "sum" else 1
    pen = feature_gradient_penalty(a * loss_mean, cap.outputs, eps, q=q, squared=squared)
    ref = brute_force_penalty(net, x, y, eps, q, squared, grad_of)
    assert pen.penalty.dtype == torch.float64
    torch.testing.assert_close(pen.penalty, ref, rtol=1e-10, atol=0)
    assert sum(pen.stage_penalty.values()).item() == pytest.approx(pen.penalty.item(), rel=1e-12)
    # the diagnostics: per-stage mean gradient norm, never squared
    assert pen.stage_gnorm["stage1"].item() == pytest.approx(
        pen.stage_penalty["stage1"].item() / 0.3 if not squared else pen.stage_gnorm["stage1"].item())
    g1 = torch.autograd.grad(a * loss_mean, cap.outputs["stage1"], retain_graph=True)[0]
    gnorm = torch.stack([ref_norm(g1[i], q, False) for i in range(x.shape[0])]).mean()
    assert pen.stage_gnorm["stage1"].item() == pytest.approx(gnorm.item(), rel=1e-10)


def test_grad_scale_divides_the_gradients_and_half_gradients_are_widened():
    net, x, y = make(dtype=torch.float32)
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y, reduction="sum")
    plain = feature_gradient_penalty(loss, cap.outputs, 0.1)
    scaled = feature_gradient_penalty(loss * 1024.0, cap.outputs, 0.1, grad_scale=1024.0)
    torch.testing.assert_close(scaled.penalty, plain.penalty, rtol=1e-6, atol=0)
    half = {"a": torch.randn(3, 5, 4).half()}
    assert msgr.per_sample_norm(half["a"], 2).dtype == torch.float32


def test_penalty_errors_name_frozen_and_unused_stages():
    net, x, y = make()
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y)
    with pytest.raises(ValueError, match="do not require grad"):
        feature_gradient_penalty(loss, {"frozen": torch.zeros(2, 3)}, 0.1)
    unused = torch.zeros(6, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"does not depend on .*\['unused'\]"):
        feature_gradient_penalty(loss, {"stage1": cap.outputs["stage1"], "unused": unused}, 0.1)


def flat_grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def objective(net, x, y, eps, q, squared, grad_of="sum"):
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y)
    a = x.shape[0] if grad_of == "sum" else 1
    return loss + feature_gradient_penalty(a * loss, cap.outputs, eps, q=q, squared=squared).penalty


@pytest.mark.parametrize("q, squared", [(2.0, False), (2.0, True), (1.0, False), (INF, True)])
def test_exact_parameter_gradients_match_central_finite_differences(q, squared):
    """The double backward is right: d(L + R)/d theta vs central differences (float64)."""
    net, x, y = make(seed=1, batch=4, size=6)
    eps = [0.5, 0.2]
    net.zero_grad()
    msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, eps, q=q, squared=squared)
    analytic = flat_grads(net)
    params = list(net.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    gen = torch.Generator().manual_seed(0)
    coords = torch.randperm(flat.numel(), generator=gen)[:10].tolist()
    direction = torch.randn(flat.numel(), generator=gen, dtype=flat.dtype)
    step = 1e-6

    def f(vec):
        torch.nn.utils.vector_to_parameters(vec, params)
        return objective(net, x, y, eps, q, squared).item()

    for c in coords:
        e = torch.zeros_like(flat)
        e[c] = step
        numeric = (f(flat + e) - f(flat - e)) / (2 * step)
        assert analytic[c].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), c
    numeric = (f(flat + step * direction) - f(flat - step * direction)) / (2 * step)
    assert (analytic @ direction).item() == pytest.approx(numeric, rel=1e-6)
    torch.nn.utils.vector_to_parameters(flat, params)


def test_penalty_gradient_is_not_zero():
    """Guard for the test above: R contributes a sizeable part of the gradient."""
    net, x, y = make(seed=1, batch=4, size=6)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    plain = flat_grads(net).clone()
    net.zero_grad()
    msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, [0.5, 0.2])
    assert (flat_grads(net) - plain).norm() > 0.05 * plain.norm()


def run_mode(net, x, y, mode, **kw):
    net.zero_grad()
    torch.manual_seed(123)  # same dropout masks in both modes
    step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, kw.pop("eps", [0.3, 0.1]),
                         mode=mode, **kw)
    return step, flat_grads(net).clone()


def plain_grads(net, x, y):
    net.zero_grad()
    torch.manual_seed(123)
    F.cross_entropy(net(x), y).backward()
    return flat_grads(net).clone()


def cosine(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


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


def test_frozen_stages_are_skipped_and_backward_is_plain():
    net, x, y = make(seed=4)
    for p in list(net.stem.parameters()) + list(net.stage1.parameters()):
        p.requires_grad_(False)
    g_plain = None
    for mode in ("exact", "fast"):
        net.zero_grad()
        step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.1, mode=mode)
        assert step.skipped == ["stage1"] and list(step.penalty.stage_penalty) == ["stage2"]
    for p in net.parameters():
        p.requires_grad_(False)
    net.classifier.weight.requires_grad_(True)
    net.zero_grad()
    step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.1)
    assert step.skipped == STAGES and step.penalty is None and net.classifier.weight.grad is not None
    g_plain = net.classifier.weight.grad.clone()
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert torch.equal(net.classifier.weight.grad, g_plain)


def test_unknown_stage_lists_the_models_children():
    net, _, _ = make()
    with pytest.raises(ValueError, match=r"'layer9'.*\['stem', 'stage1', 'pool', 'stage2', 'drop', 'classifier'\]"):
        stage_modules(net, ["stage1", "layer9"])
    # DataParallel / DDP wrappers are looked through
    assert stage_modules(nn.DataParallel(net), ["stage1"])["stage1"] is net.stage1


def test_sync_batchnorm_is_refused_in_exact_mode():
    net, x, y = make(bn=True)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    with pytest.raises(RuntimeError, match="SyncBatchNorm"):
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.1, mode="exact")


def test_in_place_change_of_a_stage_output_is_caught():
    net, x, y = make()
    net.stage1.append(nn.Identity())
    net.stage2.insert(0, nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match=r"\['stage1'\] were modified in place"):
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.1)


def test_stage_capture_perturbs_and_requires_single_call():
    net, x, _ = make()
    with StageCapture(net, ["stage2"]) as cap:
        base = net(x)
    delta = torch.randn_like(cap.outputs["stage2"])
    with StageCapture(net, ["stage2"], {"stage2": delta}) as cap2:
        pert = net(x)
    ref = net.classifier((cap.outputs["stage2"] + delta).mean((2, 3)))
    torch.testing.assert_close(pert, ref)
    torch.testing.assert_close(cap2.outputs["stage2"], cap.outputs["stage2"] + delta)
    assert not torch.allclose(pert, base)
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, lin)  # one module run twice
    with pytest.raises(RuntimeError, match="ran twice"):
        with StageCapture(shared, ["0"]):
            shared(torch.zeros(2, 4))


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


def test_fast_mode_auto_step_in_float32():
    net, x, y = make(seed=2, bn=True, relu=True, size=16, batch=8, dtype=torch.float32)
    exact, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    fast, g_fast = run_mode(net, x, y, "fast", h=None)
    assert fast.fast.rel_step == pytest.approx(3e-6, rel=1e-3)
    assert fast.fast.penalty_fd.item() == pytest.approx(exact.penalty.penalty.item(), rel=1e-2)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.999


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_gradients_accumulate_like_backward(mode):
    net, x, y = make(seed=7, relu=True)

    def step():
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2, mode=mode, h=1e-3)

    net.zero_grad()
    step()
    once = flat_grads(net).clone()
    step()
    torch.testing.assert_close(flat_grads(net), 2 * once, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape, affine", [((4, 3, 5, 2), True), ((6, 3), True), ((4, 3, 3), False)])
def test_fused_batchnorm_double_backward_passes_gradgradcheck(shape, affine):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None

    def bn(*t):
        with msgr.FusedBatchNormDoubleBackward():
            return F.batch_norm(t[0], None, None, *(t[1:] if affine else (None, None)), training=True)

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


def test_fused_batchnorm_gives_the_native_exact_step():
    results = []
    for fused in (True, False):
        net, x, y = make(seed=8, bn=True, relu=True)
        net.zero_grad()
        step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, [0.3, 0.1],
                             fused_bn=fused)
        results.append((flat_grads(net).clone(), step.penalty.penalty, dict(net.named_buffers())))
    (g1, r1, b1), (g2, r2, b2) = results
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r1, r2, rtol=1e-12, atol=0)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], rtol=1e-12, atol=0)


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

    rec = msgr.PiecewiseReplay()
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
    assert msgr._reaches_upstream(loss, cap.upstream[1])  # the skip path is seen
    seq, xs, ys = make(relu=True)
    with StageCapture(seq, STAGES, split_first=True) as cap:
        loss = F.cross_entropy(seq(xs), ys)
    assert cap.upstream[0] == "stage1" and not msgr._reaches_upstream(loss, cap.upstream[1])
    _, g_exact = run_mode(net, x, y, "exact")
    g_plain = plain_grads(net, x, y)
    _, g_fast = run_mode(net, x, y, "fast", h=1e-3)
    assert cosine(g_fast - g_plain, g_exact - g_plain) > 0.999
    assert cosine(g_fast, g_exact) > 0.9999


def test_ddp_single_process_gives_the_same_gradients(tmp_path):
    """G6: DDP with default settings (gloo, world size 1), two steps per mode, frozen stages too."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for mode in ("exact", "fast"):
            for frozen in (False, True):
                net, x, y = make(seed=3, bn=True, relu=True)
                if frozen:  # fixbase-like: nothing below the classifier trains
                    for p in list(net.parameters())[:-2]:
                        p.requires_grad_(False)
                wrapped = nn.parallel.DistributedDataParallel(net)
                grads = []
                for model in (net, wrapped):
                    for _ in range(2):
                        net.zero_grad()
                        torch.manual_seed(0)
                        msgr_backward(model, lambda: model(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2,
                                      mode=mode, h=1e-3)
                    grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
                torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    finally:
        dist.destroy_process_group()
