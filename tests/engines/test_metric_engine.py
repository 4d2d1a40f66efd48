"""ImageMetricEngine (engines/metric.py): weight checks, the loss summary, and the Torchreid-style
engines ImageDRSLEngine / ImageSNEngine driven the way an upstream Torchreid script drives
``ImageTripletEngine``: Torchreid's own builders, upstream's constructor and ``run`` arguments."""
import json
import os.path as osp

import pytest
import torch

from torchreid_ext.adapter import torchreid
from torchreid_ext.engines import ImageDRSLEngine, ImageMetricEngine, ImageSNEngine
from torchreid_ext.losses import DRSLoss, SupportNeighborLoss


@pytest.fixture(scope="module")
def upstream(data_root):
    """Torchreid's own data manager, model and optimizer builders, as in Torchreid's README."""
    tr = torchreid()
    dm = tr.data.ImageDataManager(
        root=data_root, sources="synthreid_small", targets="synthreid_small", height=64, width=32,
        batch_size_train=16, batch_size_test=64, workers=0, transforms=["random_flip"],
        train_sampler="RandomIdentitySampler", num_instances=4,
    )

    def make(seed=0):
        torch.manual_seed(seed)
        model = tr.models.build_model("osnet_x0_25", num_classes=dm.num_train_pids, loss="triplet",
                                      pretrained=False)
        optimizer = tr.optim.build_optimizer(model, optim="adam", lr=0.003)
        scheduler = tr.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
        return model, optimizer, scheduler

    return dm, make


def scalars(save_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(save_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_drsl_engine_in_torchreid_run_loop(upstream, tmp_path):
    """The one-line change in an upstream script: ImageTripletEngine -> ImageDRSLEngine."""
    dm, make = upstream
    model, optimizer, scheduler = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ImageDRSLEngine(dm, model, optimizer=optimizer, weight_drsl=1.0, weight_x=1.0, scheduler=scheduler,
                             label_smooth=True)
    assert engine.weight_x == 1.0 and list(engine.metric_losses) == ["drsl"]
    drsl = engine.metric_losses["drsl"][1]
    assert isinstance(drsl, DRSLoss) and (drsl.tau_rel, drsl.lambda_sort) == (0.05, 1.0)  # the config defaults
    save = str(tmp_path / "run")
    # upstream README: engine.run(save_dir=..., max_epoch=60, eval_freq=10, print_freq=10, test_only=False)
    results = engine.run(save_dir=save, max_epoch=1, eval_freq=-1, print_freq=10, test_only=False)
    assert 0.0 <= results["synthreid_small"]["mAP"] <= 1.0
    tags = scalars(save)
    assert {"Train/loss", "Train/loss_x", "Train/loss_drsl", "Train/drsl/ap", "Train/drsl/skipped"} <= set(tags)
    assert all(v > 0 for v in tags["Train/loss_drsl"])
    assert set(tags["Train/drsl/skipped"]) == {0.0}  # P x K batches: every anchor has positives
    for total, ce, term in zip(tags["Train/loss"], tags["Train/loss_x"], tags["Train/loss_drsl"]):
        assert total == pytest.approx(ce + term, rel=1e-4)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed
    metrics = json.load(open(osp.join(save, "metrics.json")))
    assert metrics["evaluations"][-1]["epoch"] == 1


def test_drsl_term_alone_moves_the_embedding(upstream):
    """weight_x 0: only the DRSL term trains; the backbone's gradient comes from it."""
    dm, make = upstream
    model, optimizer, _ = make()
    engine = ImageDRSLEngine(dm, model, optimizer, 1.0, 0.0, None, False, True, 0.1, 0.5)  # positional
    drsl = engine.metric_losses["drsl"][1]
    assert (drsl.tau_rel, drsl.lambda_sort) == (0.1, 0.5) and engine.weight_x == 0.0
    model.train()
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert "loss_x" not in summary and summary["loss"] == pytest.approx(summary["loss_drsl"])
    assert model.classifier.weight.grad is None or not model.classifier.weight.grad.abs().sum() > 0
    assert model.conv1.conv.weight.grad.abs().sum() > 0


def test_sn_engine_positional_like_upstream(upstream):
    dm, make = upstream
    model, optimizer, scheduler = make()
    engine = ImageSNEngine(dm, model, optimizer, 1.0, 0.0, scheduler, False, True, 30.0, 5)
    sn = engine.metric_losses["sn"][1]
    assert isinstance(sn, SupportNeighborLoss) and (sn.alpha, sn.k, sn.weight_squeeze, sn.squeeze) == (
        30.0, 5, 0.1, "spread")
    model.train()
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert {"loss", "loss_sn", "sn/sep", "sn/squeeze"} <= set(summary) and "loss_x" not in summary
    assert summary["loss"] == pytest.approx(summary["loss_sn"])
    # the defaults are those of the config's loss.sn section
    sn = ImageSNEngine(dm, model, optimizer).metric_losses["sn"][1]
    assert (sn.alpha, sn.k) == (50.0, 10)


def test_negative_or_all_zero_weights_are_refused(upstream):
    """One check (losses.registry.check_loss_weights) for the engine's arguments; a negative
    metric-loss weight used to be dropped silently with the zero ones."""
    dm, make = upstream
    model, optimizer, _ = make()
    with pytest.raises(ValueError, match=r"metric_losses\['drsl'\] weight = -1\.0 must be >= 0"):
        ImageMetricEngine(dm, model, optimizer, weight_x=1.0, metric_losses={"drsl": (-1.0, DRSLoss())})
    with pytest.raises(ValueError, match=r"weight_x = -0\.5 must be >= 0"):
        ImageMetricEngine(dm, model, optimizer, weight_x=-0.5)
    with pytest.raises(ValueError, match=r"no loss term has a positive weight \(weight_x = 0\.0, "
                                         r"metric_losses\['drsl'\] weight = 0\.0\)"):
        ImageMetricEngine(dm, model, optimizer, weight_x=0.0, metric_losses={"drsl": (0.0, DRSLoss())})
    with pytest.raises(ValueError, match=r"DRSL: tau_rel must be > 0"):
        ImageDRSLEngine(dm, model, optimizer, tau_rel=-1.0)
    # a weight of 0 turns a term off
    engine = ImageMetricEngine(dm, model, optimizer, weight_x=1.0, metric_losses={"drsl": (0.0, DRSLoss())})
    assert engine.metric_losses == {}
