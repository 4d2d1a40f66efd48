"""The injectable distances (losses/distances.py) against pair-by-pair float64 loops, gradcheck, and
their config key ``loss.<name>.distance``."""
import pytest
import torch

from loss_batches import features
from torchreid_ext.config import ConfigError, load_config
from torchreid_ext.losses import DISTANCES, CosineDistance, DRSLoss, EuclideanDistance, SupportNeighborLoss, build_loss


def loop(f, pair):
    return torch.stack([torch.stack([pair(f[i], f[j]) for j in range(len(f))]) for i in range(len(f))])


def euclidean(u, v):
    return torch.sqrt(((u - v) ** 2).sum())


def cosine(u, v):
    return 1 - torch.dot(u, v) / (u.norm() * v.norm())


@pytest.mark.parametrize("module, pair", [(EuclideanDistance(), euclidean), (CosineDistance(), cosine)])
def test_matches_pair_by_pair_loop(module, pair):
    f = features(9, 5, 0)
    expected = loop(f, pair)
    off = ~torch.eye(9, dtype=torch.bool)  # the diagonal is clamped (sqrt's slope at 0), so not compared
    torch.testing.assert_close(module(f)[off], expected[off], rtol=1e-12, atol=1e-12)
    assert module(f).diagonal().abs().max() < 1e-5


def test_cosine_ignores_the_norms():
    f = features(6, 4, 1)
    scaled = f * torch.tensor([0.5, 2.0, 3.0, 1.0, 7.0, 0.1], dtype=torch.float64)[:, None]
    torch.testing.assert_close(CosineDistance()(scaled), CosineDistance()(f), rtol=0, atol=1e-14)
    d = CosineDistance()(f)
    assert d.min() >= 0 and d.max() <= 2


@pytest.mark.parametrize("module", [EuclideanDistance(), CosineDistance()])
def test_gradcheck(module):
    f = features(5, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: module(x)[~torch.eye(5, dtype=torch.bool)], (f,))


def test_config_key_picks_the_distance_and_refuses_an_unknown_name():
    assert DISTANCES.names() == ["cosine", "euclidean"]
    cfg = load_config(None, ["loss.drsl.distance", "cosine", "loss.sn.distance", "cosine"])
    assert isinstance(build_loss("drsl", cfg.loss.drsl).distance, CosineDistance)
    assert isinstance(build_loss("sn", cfg.loss.sn).distance, CosineDistance)
    default = load_config(None, [])
    assert isinstance(build_loss("drsl", default.loss.drsl).distance, EuclideanDistance)
    with pytest.raises(ConfigError, match=r"^loss\.sn\.distance = 'manhattan' is unknown; "
                                          r"choose one of \['cosine', 'euclidean'\]$"):
        load_config(None, ["loss.sn.distance", "manhattan"])  # checked whichever loss is selected


def test_losses_use_the_distance_they_are_given():
    # a distance that records its input: DRSL gives it the raw features, SN the L2-normalised ones (S1)
    seen = []

    class Recording(EuclideanDistance):
        def forward(self, f):
            seen.append(f.detach().clone())
            return super().forward(f)

    f = features(12, 4, 3)
    y = torch.arange(6).repeat_interleave(2)
    DRSLoss(distance=Recording())(f, y)
    SupportNeighborLoss(k=3, distance=Recording())(f, y)
    assert torch.equal(seen[0], f)
    torch.testing.assert_close(seen[1], f / f.norm(dim=1, keepdim=True), rtol=0, atol=1e-15)
