"""torchreid_ext.msgr.batchnorm (docs/methods.md G4, G6): the fused BatchNorm double backward
against gradgradcheck and the native exact step; SyncBatchNorm refused for exact mode."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msgr_nets import STAGES, flat_grads, make
from torchreid_ext.msgr import (
    FusedBatchNormDoubleBackward,
    check_double_backward,
    find_sync_batchnorm,
    msgr_backward,
)


@pytest.mark.parametrize("shape, affine", [((4, 3, 5, 2), True), ((6, 3), True), ((4, 3, 3), False)])
def test_fused_batchnorm_double_backward_passes_gradgradcheck(shape, affine):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None

    def bn(*t):
        with FusedBatchNormDoubleBackward():
            return F.batch_norm(t[0], None, None, *(t[1:] if affine else (None, None)), training=True)

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


def test_fused_batchnorm_gives_the_native_exact_step():
    results = []
    for fused in (True, False):
        net, x, y = make(seed=8, bn=True, relu=True)
        net.zero_grad()
        # the closures run inside msgr_backward, before the loop moves on
        step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, [0.3, 0.1],  # noqa: B023
                             fused_bn=fused)
        results.append((flat_grads(net).clone(), step.penalty.penalty, dict(net.named_buffers())))
    (g1, r1, b1), (g2, r2, b2) = results
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r1, r2, rtol=1e-12, atol=0)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], rtol=1e-12, atol=0)


def test_sync_batchnorm_is_refused_for_exact_mode():
    net, _, _ = make(bn=True)
    check_double_backward(net)  # plain BatchNorm: fine
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert find_sync_batchnorm(nn.DataParallel(sync))[:2] == ["stem.1", "stage1.1"]
    with pytest.raises(ValueError, match=r"exact mode needs a double backward.*SyncBatchNorm.*has 3, e\.g\. 'stem\.1'"):
        check_double_backward(sync)
