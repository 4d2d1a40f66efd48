"""DRSL and Support Neighbor losses on CUDA against the CPU (docs/methods.md D, S): value, feature
gradient and diagnostics in float32 on the device vs float64 on the CPU (P x K batches and
unequal identity counts with singletons), and half-precision inputs computed in float32.

``pytest -m cuda``; without CUDA these tests skip (``TORCHREID_EXT_TEST_DEVICE=cpu``: run on the CPU).
"""
import pytest
import torch

from cuda_env import DEVICE, MARKS, strict_fp32
from torchreid_ext.losses import DRSLoss, SupportNeighborLoss

pytestmark = MARKS

LOSSES = {
    "drsl": lambda: DRSLoss(tau_rel=0.05, lambda_sort=1.0),
    "sn_spread": lambda: SupportNeighborLoss(alpha=50.0, k=10, weight_squeeze=0.1, squeeze="spread"),
    "sn_nearest": lambda: SupportNeighborLoss(alpha=50.0, k=6, weight_squeeze=0.1, squeeze="nearest"),
}


@pytest.fixture(autouse=True)
def no_tf32():
    with strict_fp32():
        yield


def batch(kind, dim=64, seed=0):
    """Clustered float64 features (identity centres + noise) and labels; 'unequal' has
    identities of 1..6 images (the singletons' anchors have no positive)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "pk":
        labels = torch.arange(8).repeat_interleave(4)
    else:
        labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 3 + [3] + [4] * 5 + [5] + [6] * 4 + [7] * 2)
        labels = labels[torch.randperm(len(labels), generator=g)]
    centres = torch.randn(int(labels.max()) + 1, dim, generator=g, dtype=torch.float64)
    feats = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return feats, labels


def value_and_grad(loss, f, y):
    f = f.detach().clone().requires_grad_()
    out = loss(f, y)
    (g,) = torch.autograd.grad(out, f)
    return out, g, dict(loss.last_stats)


@pytest.mark.parametrize("kind", ["pk", "unequal"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_on_device_matches_cpu_float64(name, kind):
    f, y = batch(kind)
    ref, g_ref, stats_ref = value_and_grad(LOSSES[name](), f, y)
    out, g, stats = value_and_grad(LOSSES[name](), f.float().to(DEVICE), y.to(DEVICE))
    assert out.device.type == DEVICE.type and out.dtype == torch.float32 and g.dtype == torch.float32
    assert ref.item() > 0 and out.item() == pytest.approx(ref.item(), rel=1e-4)
    g = g.double().cpu()
    assert g_ref.norm() > 0 and float((g - g_ref).norm() / g_ref.norm()) < 1e-3
    assert set(stats) == set(stats_ref)
    assert stats["skipped"] == stats_ref["skipped"] and stats["no_positives"] == stats_ref["no_positives"]
    if kind == "unequal":
        assert stats["skipped"] == 2  # the two singletons
    for key, v in stats_ref.items():
        assert stats[key] == pytest.approx(v, rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(name, dtype):
    """D6 / S: a half-precision embedding (autocast) gives the float32 loss of the same values."""
    f, y = batch("pk", seed=1)
    f_half = f.to(dtype).to(DEVICE)
    ref, g_ref, _ = value_and_grad(LOSSES[name](), f_half.float(), y.to(DEVICE))
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, g, _ = value_and_grad(LOSSES[name](), f_half, y.to(DEVICE))
    assert out.dtype == torch.float32 and g.dtype == dtype
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    # the gradient: the float32 one rounded to the input's precision (2 ** -8 relative for bf16)
    assert float((g.float() - g_ref).norm() / g_ref.norm()) < 1e-2
