"""BaseMetricLoss, the extension point (losses/base.py): per-anchor terms from ``compute_losses``, the
injected distance, each term reduced by the injected reducer and weighted; checked on a toy loss
against a float64 loop, and on DRSL and SN with custom reducers."""
import pytest
import torch

from loss_batches import features, unequal_labels
from torchreid_ext.losses import (
    AnchorLosses,
    BaseMetricLoss,
    CosineDistance,
    DRSLoss,
    EuclideanDistance,
    SupportNeighborLoss,
)


class PullPush(BaseMetricLoss):
    """Toy: per anchor, 'pull' = mean distance to its positives, 'push' = mean hinge(margin - d) over
    its negatives, weighted by ``push_weight``."""

    def __init__(self, margin=1.0, push_weight=0.5, **parts):
        super().__init__(**parts)
        self.margin, self.push_weight = margin, push_weight

    def compute_losses(self, f, targets):
        same = targets[:, None] == targets[None, :]
        pos = same & ~torch.eye(len(targets), dtype=torch.bool)
        anchors = pos.any(1)
        d = self.distance(f)[anchors]
        pos, neg = pos[anchors], ~same[anchors]
        pull = (d * pos).sum(1) / pos.sum(1)
        push = ((self.margin - d).clamp_min(0) * neg).sum(1) / neg.sum(1).clamp_min(1)
        return AnchorLosses({"pull": pull, "push": push}, {"anchors": float(anchors.sum())},
                            weights={"push": self.push_weight})


def toy_loop(f, y, pair, margin=1.0, push_weight=0.5):
    """PullPush per anchor, pair by pair: [(pull, push)] for the anchors with a positive."""
    y = y.tolist()
    out = []
    for a in range(len(y)):
        pos = [j for j in range(len(y)) if j != a and y[j] == y[a]]
        neg = [j for j in range(len(y)) if y[j] != y[a]]
        if not pos:
            continue
        pull = sum(pair(f[a], f[p]) for p in pos) / len(pos)
        push = sum(max(margin - pair(f[a], f[n]).item(), 0.0) for n in neg) / max(len(neg), 1)
        out.append((pull.item(), push))
    return out


PAIRS = {
    "euclidean": (EuclideanDistance, lambda u, v: torch.sqrt(((u - v) ** 2).sum())),
    "cosine": (CosineDistance, lambda u, v: 1 - torch.dot(u, v) / (u.norm() * v.norm())),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_toy_loss_terms_reduced_and_weighted_like_the_loop(name):
    module, pair = PAIRS[name]
    y = unequal_labels(0)
    f = features(len(y), 5, 0)
    rows = toy_loop(f, y, pair)
    pulls, pushes = [r[0] for r in rows], [r[1] for r in rows]
    loss = PullPush(distance=module())
    assert loss(f, y).item() == pytest.approx(sum(pulls) / len(rows) + 0.5 * sum(pushes) / len(rows), rel=1e-12)
    assert loss.last_stats == {"anchors": float(len(rows))}
    hardest = PullPush(distance=module(), reducer=lambda per_anchor: per_anchor.max())
    assert hardest(f, y).item() == pytest.approx(max(pulls) + 0.5 * max(pushes), rel=1e-12)


@pytest.mark.parametrize("make", [lambda **r: DRSLoss(**r), lambda **r: SupportNeighborLoss(k=5, **r)],
                         ids=["drsl", "sn"])
def test_sum_reducer_scales_loss_and_gradient_by_the_anchors_used(make):
    y = unequal_labels(1)  # two singletons: 16 anchors used out of 18
    f = features(len(y), 6, 1).requires_grad_()
    mean_loss, sum_loss = make(), make(reducer=torch.sum)
    value, total = mean_loss(f, y), sum_loss(f, y)
    (g_mean,) = torch.autograd.grad(value, f)
    (g_sum,) = torch.autograd.grad(total, f)
    assert mean_loss.last_stats["skipped"] == 2.0
    assert total.item() == pytest.approx(16 * value.item(), rel=1e-12)
    torch.testing.assert_close(g_sum, 16 * g_mean, rtol=1e-10, atol=1e-12)
    assert sum_loss.last_stats == mean_loss.last_stats  # the diagnostics do not depend on the reducer


def test_reducer_sees_each_term_per_anchor():
    seen = []

    def recording(per_anchor):
        seen.append(per_anchor.detach().clone())
        return per_anchor.mean()

    y = unequal_labels(2)
    f = features(len(y), 6, 2)
    loss = DRSLoss(reducer=recording)
    value = loss(f, y)
    assert [s.shape for s in seen] == [(16,), (16,)]  # retrieval and sort, one value per anchor used
    assert seen[0].mean().item() == pytest.approx(loss.last_stats["loss_R"], rel=1e-12)
    assert seen[1].mean().item() == pytest.approx(loss.last_stats["loss_S"], rel=1e-12, abs=1e-15)
    assert value.item() == pytest.approx(seen[0].mean().item() + 1.0 * seen[1].mean().item(), rel=1e-12)


def test_no_anchor_gives_a_connected_zero_without_calling_the_reducer():
    def refuse(per_anchor):
        raise AssertionError("the reducer was called")

    f = features(6, 3, 3).requires_grad_()
    value = PullPush(reducer=refuse)(f, torch.arange(6))
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_a_reducer_must_return_a_scalar():
    y = unequal_labels(0)
    with pytest.raises(ValueError, match=r"reducer returned shape \(16,\) for term 'pull'; a reducer must return a"):
        PullPush(reducer=lambda per_anchor: per_anchor * 2)(features(len(y), 4, 0), y)
