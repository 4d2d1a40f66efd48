"""What every batch ranking loss of ours promises, checked once for all of them (DRSL, SN):
``loss(features, targets)`` is invariant to the batch order, a batch without positives gives a
connected zero, half-precision input and autocast are computed in float32, coincident features
give finite gradients, bad shapes are one-line errors, and no B x B x B tensor is formed
(docs/methods.md D6, S2)."""
import math

import pytest
import torch

from loss_batches import features, pk_labels
from tensor_probe import LargestTensor
from torchreid_ext.losses import DRSLoss, SupportNeighborLoss

# name -> (factory, largest tensor allowed for B items with K per identity)
LOSSES = {
    "drsl": (lambda: DRSLoss(lambda_sort=1.0), lambda b, k: b * (k - 1) * b),  # D6: anchors' positives x batch
    "sn": (lambda: SupportNeighborLoss(k=5), lambda b, k: b * b),  # S1-S4: pairwise only
}


@pytest.fixture(params=sorted(LOSSES))
def loss_case(request):
    make, bound = LOSSES[request.param]
    return request.param, make, bound


def test_permutation_invariance(loss_case):
    _, make, _ = loss_case
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 3 + [3] + [4] * 4 + [5] + [6] * 2)
    f = features(len(y), 8, 4).requires_grad_()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    value = make()(f, y)
    (g,) = torch.autograd.grad(value, f)
    fp = f.detach()[perm].requires_grad_()
    value_p = make()(fp, y[perm])
    (gp,) = torch.autograd.grad(value_p, fp)
    assert value_p.item() == pytest.approx(value.item(), rel=1e-12)
    torch.testing.assert_close(gp, g[perm], rtol=1e-9, atol=1e-12)


def test_all_singletons_give_a_connected_zero(loss_case):
    _, make, _ = loss_case
    f = features(12, 4, 8).requires_grad_()
    loss = make()
    value = loss(f, torch.arange(12))
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    assert loss.last_stats["skipped"] == 12.0 and loss.last_stats["no_positives"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(loss_case, dtype):
    _, make, _ = loss_case
    y = pk_labels(6, 4)
    f32 = features(24, 16, 9, torch.float32)
    low = f32.to(dtype).requires_grad_()
    value = make()(low, y)  # SN's alpha = 50: a plain exp would overflow fp16
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    # the same (rounded) inputs in float32 give the same loss: nothing ran in low precision
    assert value.item() == pytest.approx(make()(low.detach().float(), y).item(), rel=1e-6)
    assert value.item() == pytest.approx(make()(f32, y).item(), rel=5e-2)
    value.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()


def test_autocast_is_disabled_inside(loss_case):
    _, make, _ = loss_case
    y = pk_labels(6, 4)
    f = features(24, 64, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = make()(f, y)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(make()(f, y).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coincident_features_give_finite_gradients(loss_case, dtype):
    # Small integers with copied rows: distances are exactly 0 on the diagonal and between the
    # copies (also after SN's normalisation, the same arithmetic on the same row), where an
    # unclamped sqrt has an infinite derivative (0 * inf = NaN in the backward).
    _, make, _ = loss_case
    y = pk_labels(4, 4)
    f = torch.randint(-3, 4, (16, 4), generator=torch.Generator().manual_seed(11)).to(dtype)
    f[f.abs().sum(1) == 0] = 1  # no zero rows (SN normalises)
    f[1] = f[0]
    f[2] = f[0]
    f.requires_grad_()
    make()(f, y).backward()
    assert torch.isfinite(f.grad).all()


def test_bad_shapes_are_one_line_errors(loss_case):
    _, make, _ = loss_case
    with pytest.raises(ValueError, match=r"2-D.*got shape \(16, 4, 1\)"):
        make()(torch.randn(16, 4, 1), pk_labels(4, 4))
    with pytest.raises(ValueError, match="16 feature rows but 12 targets"):
        make()(torch.randn(16, 4), pk_labels(3, 4))


def test_recorder_catches_a_cube():
    x = torch.randn(16, 4, requires_grad=True)
    with LargestTensor() as rec:
        (x[:, None, None, 0] * x[None, :, None, 1] * x[None, None, :, 2]).sum().backward()
    assert rec.numel == 16**3


def test_no_cubic_intermediate(loss_case):
    # B = 512, D = 64, P x K = 128 x 4; a B x B x B tensor would be 170x DRSL's bound
    _, make, bound = loss_case
    b, k = 512, 4
    f = features(b, 64, 12, torch.float32).requires_grad_()
    with LargestTensor() as rec:
        value = make()(f, pk_labels(b // k, k))
        forward_calls = rec.calls
        value.backward()
    assert rec.calls > forward_calls  # the backward ops were recorded too
    assert torch.isfinite(f.grad).all()
    assert rec.numel <= bound(b, k) < b**3 / 8
