"""Support Neighbor loss (docs/methods.md S1-S4) against a plain float64 loop implementation (Euclidean
and cosine distances), gradcheck, edge cases and bad input (the contract shared with DRSL:
test_loss_contract.py)."""

import pytest
import torch

from loss_batches import features, pk_labels, unequal_labels
from torchreid_ext.losses import CosineDistance, SupportNeighborLoss


def euclidean(u, v):
    return torch.sqrt(((u - v) ** 2).sum())


def ref_sn(f, y, alpha=50.0, k=10, w=0.1, squeeze="spread", distance=euclidean):
    """S1-S4 written out anchor by anchor, with plain exp/log (float64 torch scalars);
    ``distance(u, v)`` of two normalised features (Euclidean by default)."""
    y = y.tolist()
    b = len(y)
    fn = f / f.norm(dim=1, keepdim=True)

    def dist(i, j):
        return distance(fn[i], fn[j])

    terms, sizes, thresholds = [], [], []
    for a in range(b):
        pos = [j for j in range(b) if j != a and y[j] == y[a]]
        if not pos:
            continue
        neg = [j for j in range(b) if y[j] != y[a]]
        t = sorted(dist(a, j).item() for j in range(b) if j != a)[k]  # (k+1)-th smallest
        thresholds.append(t)
        s_pos = [p for p in pos if dist(a, p).item() < t]
        s_neg = [n for n in neg if dist(a, n).item() < t]
        nearest = min(pos, key=lambda p: dist(a, p).item())
        if not s_pos:
            s_pos = [nearest]
        num = sum(torch.exp(-alpha * dist(a, p)) for p in s_pos)
        den = num + sum((torch.exp(-alpha * dist(a, n)) for n in s_neg), torch.zeros((), dtype=f.dtype))
        sep = -torch.log(num / den)
        if squeeze == "nearest":
            sq = dist(a, nearest)
        elif len(s_pos) == 1:
            sq = dist(a, s_pos[0])
        else:
            ds = [dist(a, p) for p in s_pos]
            sq = max(ds, key=lambda v: v.item()) - min(ds, key=lambda v: v.item())
        terms.append(sep + w * sq)
        sizes.append((len(s_pos), len(s_neg)))
    mean_pos = sum(s for s, _ in sizes) / len(sizes)
    mean_neg = sum(s for _, s in sizes) / len(sizes)
    return sum(terms) / len(terms), mean_pos, mean_neg, sum(thresholds) / len(thresholds)


CASES = [("pk", 0), ("pk", 1), ("unequal", 2), ("unequal", 3)]


@pytest.mark.parametrize("kind,seed", CASES)
@pytest.mark.parametrize("squeeze", ["spread", "nearest"])
@pytest.mark.parametrize("alpha,k", [(50.0, 5), (8.0, 10)])
def test_matches_loop_reference(kind, seed, squeeze, alpha, k):
    y = pk_labels(5, 4) if kind == "pk" else unequal_labels(seed)
    f = features(len(y), 6, seed).requires_grad_()
    loss_fn = SupportNeighborLoss(alpha=alpha, k=k, weight_squeeze=0.3, squeeze=squeeze)
    loss = loss_fn(f, y)
    (grad,) = torch.autograd.grad(loss, f)
    f_ref = f.detach().clone().requires_grad_()
    ref, mean_pos, mean_neg, mean_t = ref_sn(f_ref, y, alpha, k, 0.3, squeeze)
    (grad_ref,) = torch.autograd.grad(ref, f_ref)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)
    assert loss_fn.last_stats["s_pos"] == pytest.approx(mean_pos)
    assert loss_fn.last_stats["s_neg"] == pytest.approx(mean_neg)
    assert loss_fn.last_stats["threshold"] == pytest.approx(mean_t, rel=1e-6)


@pytest.mark.parametrize("kind,seed", CASES)
@pytest.mark.parametrize("squeeze", ["spread", "nearest"])
def test_cosine_distance_matches_loop_reference(kind, seed, squeeze):
    y = pk_labels(5, 4) if kind == "pk" else unequal_labels(seed)
    f = features(len(y), 6, seed).requires_grad_()
    loss_fn = SupportNeighborLoss(alpha=20.0, k=5, weight_squeeze=0.3, squeeze=squeeze, distance=CosineDistance())
    loss = loss_fn(f, y)
    (grad,) = torch.autograd.grad(loss, f)
    f_ref = f.detach().clone().requires_grad_()
    ref, mean_pos, mean_neg, mean_t = ref_sn(f_ref, y, 20.0, 5, 0.3, squeeze, distance=lambda u, v: 1 - torch.dot(u, v))
    (grad_ref,) = torch.autograd.grad(ref, f_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)
    assert loss_fn.last_stats["threshold"] == pytest.approx(mean_t, rel=1e-6)
    assert (loss_fn.last_stats["s_pos"], loss_fn.last_stats["s_neg"]) == pytest.approx((mean_pos, mean_neg))
    # a different loss from the Euclidean one on the same batch
    euclid = SupportNeighborLoss(alpha=20.0, k=5, weight_squeeze=0.3, squeeze=squeeze)(f, y)
    assert abs(loss.item() - euclid.item()) > 1e-3


@pytest.mark.parametrize("squeeze", ["spread", "nearest"])
def test_gradcheck(squeeze):
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 2, 0])
    f = features(len(y), 5, 4).requires_grad_()
    k = 4
    # Precondition: no distance near t_a (sets and nearest/furthest fixed under the perturbation).
    fn = f.detach() / f.detach().norm(dim=1, keepdim=True)
    d = torch.cdist(fn, fn) + torch.diag(torch.full((len(y),), float("inf"), dtype=torch.float64))
    assert d.sort(dim=1).values[:, : len(y) - 1].diff(dim=1).min() > 1e-3
    loss = SupportNeighborLoss(alpha=10.0, k=k, weight_squeeze=0.5, squeeze=squeeze)
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (f,))


def test_empty_support_positive_falls_back_to_nearest_positive():
    # Anchor 0's only positive (index 1) lies opposite; the k nearest are negatives.
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, -0.1], [1.0, -0.2], [-1.0, 0.1]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    loss = SupportNeighborLoss(alpha=5.0, k=2)
    value = loss(f, y)
    assert value.item() == pytest.approx(ref_sn(f, y, 5.0, 2)[0].item(), rel=1e-9)
    assert loss.last_stats["s_pos"] == 1.0 and loss.last_stats["skipped"] == 5.0


def test_anchors_without_positive_are_skipped_and_counted():
    y = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 6, 6, 7, 8])  # 1, 3, 4, 7, 8 are singletons
    f = features(len(y), 5, 7)
    loss = SupportNeighborLoss(k=4)
    value = loss(f, y)
    assert loss.last_stats["skipped"] == 5.0 and loss.last_stats["no_positives"] == 0.0
    assert value.item() == pytest.approx(ref_sn(f, y, k=4)[0].item(), rel=1e-6)


def test_batch_too_small_for_k():
    with pytest.raises(ValueError, match=r"batch size 8 is too small for k=10: .*batch_size - 1 >= k \+ 1"):
        SupportNeighborLoss(k=10)(torch.randn(8, 4), pk_labels(2, 4))
    with pytest.raises(ValueError, match="batch size 11 is too small for k=10"):
        SupportNeighborLoss(k=10)(torch.randn(11, 4), torch.arange(11) // 2)
    SupportNeighborLoss(k=10)(torch.randn(12, 4), pk_labels(3, 4))  # B - 1 = k + 1: fine


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"squeeze='furthest'; choose one of \['spread', 'nearest'\]"):
        SupportNeighborLoss(squeeze="furthest")
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        SupportNeighborLoss(k=0)
    with pytest.raises(ValueError, match=r"2-D.*got shape \(16, 4, 1\)"):
        SupportNeighborLoss(k=3)(torch.randn(16, 4, 1), pk_labels(4, 4))
    with pytest.raises(ValueError, match="16 feature rows but 12 targets"):
        SupportNeighborLoss(k=3)(torch.randn(16, 4), pk_labels(3, 4))


def clustered_batch(p, k, d, inter, intra, seed):
    """P x K float32 features in clusters around a common direction: the support negatives weigh
    little against the positives, so the separation term is small (1e-4 .. 1e-8)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    centers = base / base.norm() + inter * torch.randn(p, d, generator=g, dtype=torch.float64) / d ** 0.5
    x = centers.repeat_interleave(k, 0) + intra * torch.randn(p * k, d, generator=g, dtype=torch.float64) / d ** 0.5
    return x.float(), pk_labels(p, k)


def float32_gradient_error(f32, y, **kwargs):
    """max |grad(float32) - grad(float64)| / max |grad(float64)|, the float64 run on the same input."""
    loss = SupportNeighborLoss(**kwargs)
    a, b = f32.clone().requires_grad_(), f32.double().requires_grad_()
    (ga,) = torch.autograd.grad(loss(a, y), a)
    (gb,) = torch.autograd.grad(loss(b, y), b)
    return ((ga.double() - gb).abs().max() / gb.abs().max()).item(), loss.last_stats["sep"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight_squeeze, intra, bound", [(0.1, 0.3, 3e-5), (0.0, 0.2, 2e-4)])
def test_float32_gradient_is_close_to_float64_on_clustered_batches(seed, weight_squeeze, intra, bound):
    # S2 as lse(S+ U S-) - lse(S+) subtracts two separately rounded logsumexps: measured here
    # 2.6e-4 / 3.2e-4 (defaults) and 1.3e-2 / 4.2e-2 (separation term alone); softplus(lse(S-) -
    # lse(S+)) gives 4.5e-6 / 2.8e-6 and 2.8e-5 / 2.2e-5 (the rest is the distances' rounding).
    f, y = clustered_batch(16, 4, 128, inter=0.4, intra=intra, seed=seed)
    err, sep = float32_gradient_error(f, y, weight_squeeze=weight_squeeze)
    assert 1e-7 < sep < 1e-3  # the regime where the subtraction cancels
    assert err < bound


def test_separation_term_of_a_clustered_batch_matches_the_loop_reference():
    # float64: the softplus form and the plain exp/log loop agree to rounding, even where the
    # separation term is tiny (relative 1e-9 of a 1e-8 loss)
    f, y = clustered_batch(16, 4, 128, inter=0.5, intra=0.2, seed=0)
    f = f.double()
    value = SupportNeighborLoss(weight_squeeze=0.0)(f, y)
    ref = ref_sn(f, y, w=0.0)[0]
    assert 0 < ref.item() < 1e-6
    assert value.item() == pytest.approx(ref.item(), rel=1e-9)


def test_empty_support_negatives_give_a_zero_separation_and_finite_gradients():
    # 4 identities x 8 tight instances, k = 5: every anchor's 5 nearest are positives, S- is empty
    f, y = clustered_batch(4, 8, 16, inter=2.0, intra=0.05, seed=3)
    f = f.double().requires_grad_()
    loss = SupportNeighborLoss(k=5, weight_squeeze=0.3)
    value = loss(f, y)
    assert loss.last_stats["s_neg"] == 0.0 and loss.last_stats["sep"] == 0.0
    f_ref = f.detach().clone().requires_grad_()
    ref = ref_sn(f_ref, y, k=5, w=0.3)[0]
    assert value.item() == pytest.approx(ref.item(), rel=1e-9)
    (grad,) = torch.autograd.grad(value, f)
    (grad_ref,) = torch.autograd.grad(ref, f_ref)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)
