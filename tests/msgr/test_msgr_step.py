"""torchreid_ext.msgr.step (docs/methods.md G4-G6): the exact step against central finite
differences, R's weight (lazy MSGR), frozen stages, gradient accumulation, DDP, dispatch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msgr_nets import INF, STAGES, cosine, flat_grads, make, plain_grads, run_mode
from torchreid_ext.msgr import StageCapture, exact_step, fast_step, feature_gradient_penalty, msgr_backward


def objective(net, x, y, eps, q, squared, grad_of="sum", weight=1.0):
    """L_mean + weight * R, built by hand from feature_gradient_penalty."""
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y)
    a = x.shape[0] if grad_of == "sum" else 1
    return loss + weight * feature_gradient_penalty(a * loss, cap.outputs, eps, q=q, squared=squared).penalty


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


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_weight_multiplies_r_in_the_objective_only(mode):
    """weight N: the gradient of L_mean + N * R (built by hand), R itself reported unweighted."""
    net, x, y = make(seed=2, bn=True, relu=True)
    eps, n = [0.3, 0.1], 4.0
    net.zero_grad()
    torch.manual_seed(0)
    ref = objective(net, x, y, eps, 2.0, False, weight=n)
    ref.backward()
    g_ref = flat_grads(net).clone()
    g_plain = plain_grads(net, x, y)
    one, _ = run_mode(net, x, y, mode, eps=eps, h=1e-4)
    step, g = run_mode(net, x, y, mode, eps=eps, h=1e-4, weight=n)
    assert step.penalty.penalty.item() == pytest.approx(one.penalty.penalty.item(), rel=1e-12)
    if mode == "exact":
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    else:  # first order in h; R_fd still estimates the unweighted R
        assert cosine(g - g_plain, g_ref - g_plain) > 0.9999
        assert (g - g_plain).norm().item() == pytest.approx((g_ref - g_plain).norm().item(), rel=1e-3)
        assert step.fast.penalty_fd.item() == pytest.approx(step.penalty.penalty.item(), rel=1e-3)
    # guard: the weight matters
    assert (g_ref - g_plain).norm() > 2 * (g_ref - g_plain).norm() / n
    with pytest.raises(ValueError, match="weight = 0.0 must be > 0"):
        (exact_step if mode == "exact" else fast_step)(net, lambda: net(x), lambda o: F.cross_entropy(o, y),
                                                         STAGES, eps, weight=0)


def test_frozen_stages_are_skipped_and_backward_is_plain():
    net, x, y = make(seed=4)
    for p in list(net.stem.parameters()) + list(net.stage1.parameters()):
        p.requires_grad_(False)
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


def test_msgr_backward_dispatches_on_mode():
    net, x, y = make(seed=7)
    for mode in ("exact", "fast"):
        st = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2, mode=mode)
        assert (st.fast is not None) == (mode == "fast")
    with pytest.raises(ValueError, match=r"mode = 'slow' is not valid; choose one of \['exact', 'fast'\]"):
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2, mode="slow")
    with pytest.raises(ValueError, match=r"grad_of = 'total' is not valid; choose one of \['sum', 'mean'\]"):
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2, grad_of="total")


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
                        torch.manual_seed(0)  # the closures run inside msgr_backward, before the loop moves on
                        msgr_backward(model, lambda: model(x), lambda out: F.cross_entropy(out, y), STAGES, 0.2,  # noqa: B023
                                      mode=mode, h=1e-3)
                    grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
                torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    finally:
        dist.destroy_process_group()
