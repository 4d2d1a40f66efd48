"""torchreid_ext.msgr.penalty (docs/methods.md G2, G4): the exact penalty and its per-stage
diagnostics against per-sample brute force, AMP scaling, errors."""
import pytest
import torch
import torch.nn.functional as F

from msgr_nets import INF, STAGES, make, ref_norm
from torchreid_ext.msgr import StageCapture, check_q, feature_gradient_penalty, per_sample_norm


def brute_force_norms(net, x, y, q, grad_of):
    """{stage: [||d L_grad / d x_{s,i}||_q for each sample i]}, one sample at a time (the net
    has no batch coupling), never squared."""
    B = x.shape[0]
    norms = {s: [] for s in STAGES}
    for i in range(B):
        with StageCapture(net, STAGES) as cap:
            logits = net(x[i:i + 1])
        loss_i = F.cross_entropy(logits, y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss_i, [cap.outputs[s] for s in STAGES])
        for s, g in zip(STAGES, grads):
            g = g if grad_of == "sum" else g / B  # d L_mean / d x_i = (own gradient) / B
            norms[s].append(ref_norm(g, q, False))
    return {s: torch.stack(v) for s, v in norms.items()}


@pytest.mark.parametrize("q", [1.0, 2.0, INF])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("grad_of", ["sum", "mean"])
def test_exact_penalty_equals_brute_force(q, squared, grad_of):
    net, x, y = make()
    eps = {"stage1": 0.3, "stage2": 0.05}
    with StageCapture(net, STAGES) as cap:
        logits = net(x)
    loss_mean = F.cross_entropy(logits, y)
    a = x.shape[0] if grad_of == "sum" else 1
    pen = feature_gradient_penalty(a * loss_mean, cap.outputs, list(eps.values()), q=q, squared=squared)
    norms = brute_force_norms(net, x, y, q, grad_of)
    ref = {s: eps[s] * (norms[s] ** 2 if squared else norms[s]).mean() for s in STAGES}
    assert pen.penalty.dtype == torch.float64
    torch.testing.assert_close(pen.penalty, sum(ref.values()), rtol=1e-10, atol=0)
    for s in STAGES:  # each stage's part, and its diagnostic: the mean norm, never squared
        torch.testing.assert_close(pen.stage_penalty[s], ref[s], rtol=1e-10, atol=0)
        torch.testing.assert_close(pen.stage_gnorm[s], norms[s].mean(), rtol=1e-10, atol=0)
        assert not pen.stage_gnorm[s].requires_grad
    # guard: the per-sample norms differ (a mean of squares is not the square of the mean)
    assert norms["stage1"].std() > 0.05 * norms["stage1"].mean()


def test_grad_scale_divides_the_gradients_and_half_gradients_are_widened():
    net, x, y = make(dtype=torch.float32)
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y, reduction="sum")
    plain = feature_gradient_penalty(loss, cap.outputs, 0.1)
    scaled = feature_gradient_penalty(loss * 1024.0, cap.outputs, 0.1, grad_scale=1024.0)
    torch.testing.assert_close(scaled.penalty, plain.penalty, rtol=1e-6, atol=0)
    half = {"a": torch.randn(3, 5, 4).half()}
    assert per_sample_norm(half["a"], 2).dtype == torch.float32


def test_penalty_errors_name_frozen_and_unused_stages():
    net, x, y = make()
    with StageCapture(net, STAGES) as cap:
        loss = F.cross_entropy(net(x), y)
    with pytest.raises(ValueError, match="do not require grad"):
        feature_gradient_penalty(loss, {"frozen": torch.zeros(2, 3)}, 0.1)
    unused = torch.zeros(6, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"does not depend on .*\['unused'\]"):
        feature_gradient_penalty(loss, {"stage1": cap.outputs["stage1"], "unused": unused}, 0.1)


def test_check_q_accepts_norm_orders_only():
    assert check_q(1) == 1.0 and check_q("inf") == INF and check_q(3) == 3.0
    with pytest.raises(ValueError, match=r"q = 0\.5 is not valid; q is a norm order >= 1"):
        check_q(0.5)
    with pytest.raises(ValueError, match="q = nan"):
        per_sample_norm(torch.ones(2, 3), float("nan"))
