"""The loss registry: a loss registered from outside the package is selectable by ``loss.name``
in ``cli.main``, ``build_engine`` and ``scripts/compare.py`` and trains with its term in the loss
summary; the registration rules; what the registry says about the built-in losses; the
base class and what a builder must return."""
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from conftest import REPO, model_for
from torchreid_ext import build_engine, cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.builders import build_datamanager
from torchreid_ext.config import ConfigError, get_default_config, load_config, validate_config
from torchreid_ext.console import PLUGINS_ENV
from torchreid_ext.losses import (
    BaseMetricLoss,
    DRSLoss,
    EuclideanDistance,
    MeanReducer,
    SupportNeighborLoss,
    get_loss,
    loss_names,
    register_loss,
    unregister_loss,
)
from torchreid_ext.models import build_model
from torchreid_ext.run_options import RunOptions

SEEN = []  # every section the toy builder received


class CentreSpread(BaseMetricLoss):
    """Toy metric loss: scale x mean squared distance of each feature to its identity's batch mean."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def compute(self, features, targets):
        ids, idx = targets.unique(return_inverse=True)
        centres = torch.zeros(len(ids), features.size(1), dtype=features.dtype).index_add_(0, idx, features)
        centres = centres / torch.bincount(idx).unsqueeze(1).to(features.dtype)
        spread = (features - centres[idx]).pow(2).sum(1).mean()
        return self.scale * spread, {"n_ids": len(ids), "scale": self.scale}


def build_toy(section):
    SEEN.append(section.clone())
    if not section.scale > 0:
        raise ValueError(f"toy: scale must be > 0, got {section.scale}")
    return CentreSpread(section.scale)


@pytest.fixture
def toy():
    spec = register_loss("toy", build_toy, {"scale": 1.0, "weight_x": 0.5})
    SEEN.clear()
    yield spec
    unregister_loss("toy")


def scalars(save_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(save_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_registered_loss_trains_one_epoch_through_cli_main(toy, tiny, tmp_path):
    """Issue 18 acceptance: loss.name of a loss registered here, one of its keys overridden."""
    cfg = get_default_config()
    assert dict(cfg.loss.toy) == {"scale": 1.0, "weight": 1.0, "weight_x": 0.5, "weight_t": 0.0}
    save = str(tmp_path / "run")
    results = cli.train(tiny(save_dir=save, **{"loss.name": "toy", "loss.toy.scale": 0.25,
                                              "train.max_epoch": 1, "train.print_freq": 1}))
    assert 0.0 <= results["synthreid_small"]["mAP"] <= 1.0
    assert SEEN and all(s.scale == 0.25 for s in SEEN)  # the override reached the builder
    tags = scalars(save)
    assert {"Train/loss_toy", "Train/loss_x", "Train/toy/n_ids", "Train/toy/scale"} <= set(tags)
    assert "Train/loss_t" not in tags  # weight_t 0: no triplet term
    assert set(tags["Train/toy/n_ids"]) == {4.0}  # 16 images = 4 identities x 4 (RandomIdentitySampler)
    assert set(tags["Train/toy/scale"]) == {0.25}
    # the total is weight_x * CE + weight * toy (running means are linear in the terms)
    for total, ce, term in zip(tags["Train/loss"], tags["Train/loss_x"], tags["Train/loss_toy"]):
        assert total == pytest.approx(0.5 * ce + term, rel=1e-4)
    log = open(glob.glob(osp.join(save, "train.log-*"))[0]).read()
    assert "loss_toy" in log and "toy/n_ids" in log


def test_registered_loss_through_build_engine(toy, data_root, tmp_path):
    cfg = load_config(None, tiny_opts_list(data_root, tmp_path, **{"loss.name": "toy", "loss.toy.weight_t": 0.5}))
    cfg.use_gpu = False
    dm = build_datamanager(RunOptions(cfg))
    model = model_for(cfg, dm.num_train_pids)
    engine = build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert engine.weight_x == 0.5
    assert {n: (w, type(m).__name__) for n, (w, m) in engine.metric_losses.items()} == {
        "toy": (1.0, "CentreSpread"), "triplet": (0.5, "TripletLoss")}
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert {"loss_x", "loss_toy", "loss_t", "toy/n_ids", "acc"} <= set(summary)
    expected = 0.5 * summary["loss_x"] + summary["loss_toy"] + 0.5 * summary["loss_t"]
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)


def tiny_opts_list(data_root, tmp_path, **overrides):
    from conftest import tiny_opts

    return tiny_opts(data_root, str(tmp_path / "run"), **overrides)


PLUGIN = '''
import torch
from torchreid_ext.losses import BaseMetricLoss, register_loss


class NormLoss(BaseMetricLoss):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def compute(self, features, targets):
        norms = features.norm(dim=1)
        return (norms - self.target).pow(2).mean(), {"mean_norm": norms.mean().item()}


register_loss("plugin_norm", lambda s: NormLoss(s.target), {"target": 1.0}, needs_positives=False)
'''


def test_registered_loss_in_scripts_compare(data_root, tmp_path, monkeypatch, capsys):
    """compare.py runs each config in a scripts/main.py subprocess: a loss registered by a module
    named in TORCHREID_EXT_LOSSES exists there too."""
    (tmp_path / "toy_loss_plugin.py").write_text(PLUGIN)
    config = tmp_path / "norm.yaml"
    config.write_text("model:\n  name: osnet_x0_25\nloss:\n  name: plugin_norm\n  plugin_norm:\n    target: 2.0\n")
    opts = tiny_opts_list(data_root, tmp_path, **{"train.max_epoch": 1, "train.print_freq": 1})
    pairs = dict(zip(opts[0::2], opts[1::2]))
    del pairs["data.save_dir"], pairs["model.name"]  # the harness sets the save dir, the config the model
    env = dict(os.environ, TORCHREID_EXT_LOSSES="toy_loss_plugin", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, osp.join(REPO, "scripts", "compare.py"), str(config), "--out", str(out),
                           "--opts", *[x for kv in pairs.items() for x in kv]],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = glob.glob(str(out / "**" / "train.log-*"), recursive=True)
    assert len(logs) == 1
    text = open(logs[0]).read()
    assert "loss_plugin_norm" in text and "plugin_norm/mean_norm" in text
    assert "target: 2.0" in text  # the config's key reached the run
    # without the variable the name is unknown, and the error says which names exist (scripts/main.py's
    # main, in this process, which never imported the plugin module)
    assert "plugin_norm" not in loss_names()
    for name in ("TORCHREID_EXT_LOSSES", PLUGINS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["--config", str(config)]) == 2
    assert "Unknown config key 'loss.plugin_norm'" in capsys.readouterr().err


def test_plugin_modules_are_loaded_by_the_command_lines_not_by_import(tmp_path, monkeypatch, capsys):
    env = dict(os.environ, TORCHREID_EXT_LOSSES="no_such_loss_module_xyz")
    imported = subprocess.run([sys.executable, "-c", "import torchreid_ext"], capture_output=True, text=True,
                              env=env, cwd=REPO)
    assert imported.returncode == 0 and imported.stderr == ""  # importing does only registration
    # the command line (scripts/main.py's main, in this process) imports it, and says so in one line
    monkeypatch.setenv("TORCHREID_EXT_LOSSES", "no_such_loss_module_xyz")
    capsys.readouterr()
    assert cli.main(["--config", osp.join(REPO, "configs", "quickstart.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "TORCHREID_EXT_LOSSES names module 'no_such_loss_module_xyz', which cannot be imported" in err


def test_registration_rules(toy):
    with pytest.raises(ValueError, match=r"'toy' is already registered"):
        register_loss("toy", lambda s: CentreSpread(1.0))
    register_loss("toy", build_toy, {"scale": 1.0, "weight_x": 0.5})  # the same builder again: harmless
    for name in ("drsl", "softmax"):
        with pytest.raises(ValueError, match=rf"'{name}' is (already registered|built in)"):
            register_loss(name, build_toy)
    with pytest.raises(ValueError, match=r"identifier other than 'name'"):
        register_loss("name", build_toy)
    with pytest.raises(ValueError, match=r"identifier"):
        register_loss("my.loss", build_toy)
    with pytest.raises(TypeError, match=r"default obj = .*must be bool, int, float, str"):
        register_loss("bad_default", build_toy, {"obj": object()})
    with pytest.raises(TypeError, match="callable"):
        register_loss("not_callable", 3)
    with pytest.raises(ValueError, match="built in"):
        unregister_loss("triplet")
    assert loss_names()[:4] == ["softmax", "triplet", "drsl", "sn"] and "toy" in loss_names()


def test_loss_registered_after_the_config_was_built_is_named():
    cfg = get_default_config()
    register_loss("late", build_toy)
    try:
        cfg.loss.name = "late"
        with pytest.raises(ConfigError, match=r"'late' was registered after this config was built.*register_loss"):
            validate_config(cfg)
        assert "late" in get_default_config().loss  # a config built now has its section
    finally:
        unregister_loss("late")


def test_registered_needs_and_min_batch_size_reach_validate_config():
    register_loss("no_pairs", build_toy, {"scale": 1.0, "group": 8}, needs_positives=False,
                  min_batch_size=lambda s: (2 * s.group, f"no_pairs needs 2 x loss.no_pairs.group = {s.group}"))
    try:
        # no positives needed: RandomSampler is fine
        load_config(None, ["loss.name", "no_pairs", "sampler.train_sampler", "RandomSampler"])
        with pytest.raises(ConfigError, match=r"train\.batch_size = 32 is too small: no_pairs needs 2 x "
                                              r"loss\.no_pairs\.group = 20, i\.e\. a batch of at least 40 images"):
            load_config(None, ["loss.name", "no_pairs", "loss.no_pairs.group", "20"])
        # its weight_t adds Torchreid's triplet term, which does need positives
        with pytest.raises(ConfigError, match=r"ranking term\(s\) \['triplet'\]"):
            load_config(None, ["loss.name", "no_pairs", "loss.no_pairs.weight_t", "1"])
    finally:
        unregister_loss("no_pairs")


def test_every_section_is_checked_by_its_constructor_whichever_loss_is_selected(toy):
    with pytest.raises(ConfigError, match=r"loss\.toy: toy: scale must be > 0, got -1\.0"):
        load_config(None, ["loss.toy.scale", "-1"])  # loss.name softmax
    with pytest.raises(ConfigError, match=r"loss\.sn: Support Neighbor loss: squeeze='far'; choose one of"):
        load_config(None, ["loss.sn.squeeze", "far"])
    with pytest.raises(ConfigError, match=r"loss\.drsl\.weight_t = -0\.5 must be >= 0"):
        load_config(None, ["loss.drsl.weight_t", "-0.5"])


def test_builtin_entries():
    softmax, triplet, drsl, sn = (get_loss(n) for n in ("softmax", "triplet", "drsl", "sn"))
    assert not softmax.needs_features and not softmax.needs_positives and softmax.weight_keys == ()
    for spec in (triplet, drsl, sn):
        assert spec.needs_features and spec.needs_positives
    assert triplet.weight_keys == ("weight_t", "weight_x") and triplet.summary_key == "loss_t"
    assert dict(triplet.defaults) == {"margin": 0.3, "weight_t": 1.0, "weight_x": 0.0}  # upstream's section
    assert drsl.weight_keys == ("weight", "weight_x", "weight_t") and drsl.summary_key == "loss_drsl"
    assert dict(drsl.defaults) == {"tau_rel": 0.05, "lambda_sort": 1.0, "distance": "euclidean", "weight": 1.0,
                                   "weight_x": 1.0, "weight_t": 0.0}
    assert dict(sn.defaults) == {"alpha": 50.0, "k": 10, "weight_squeeze": 0.1, "squeeze": "spread",
                                 "distance": "euclidean", "weight": 1.0, "weight_x": 0.0, "weight_t": 0.0}
    cfg = get_default_config()
    assert sn.min_batch_size(cfg.loss.sn)[0] == 12
    assert drsl.weights(cfg.loss.drsl) == (1.0, {"drsl": 1.0, "triplet": 0.0})
    assert triplet.weights(cfg.loss.triplet) == (0.0, {"triplet": 1.0})
    assert softmax.weights(cfg.loss.softmax) == (1.0, {})


@pytest.mark.parametrize("name", ["osnet_x0_25", "msfl_resnet50"])
def test_models_return_features_for_a_registered_loss(toy, name):
    """Torchreid's models and ours: training mode gives (logits, features) for a loss with a
    builder, logits only for softmax."""
    x = torch.randn(2, 3, 64, 32)
    for loss, with_features in (("toy", True), ("softmax", False)):
        model = build_model(name, num_classes=3, loss=loss, pretrained=False, use_gpu=False).train()
        out = model(x)
        assert isinstance(out, tuple) == with_features, (name, loss)
        if with_features:
            assert out[0].shape == (2, 3) and out[1].dim() == 2


def test_our_losses_share_the_base_class_and_a_builder_must_return_a_module():
    for loss in (DRSLoss(), SupportNeighborLoss(k=2)):
        assert isinstance(loss, BaseMetricLoss)
        assert isinstance(loss.distance, EuclideanDistance) and isinstance(loss.reducer, MeanReducer)
    assert not isinstance(torchreid().losses.TripletLoss(), BaseMetricLoss)  # a plain module: allowed too
    register_loss("not_a_module", lambda section: (lambda features, targets: features.sum()))
    try:
        cfg = get_default_config()
        with pytest.raises(TypeError, match=r"builder of loss 'not_a_module' returned function, not an nn\.Module"):
            validate_config(cfg)  # every builder runs here, before any work
    finally:
        unregister_loss("not_a_module")


def test_base_class_with_compute_overridden():
    toy = CentreSpread(2.0)
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0], [5.0, 7.0]], requires_grad=True)
    value = toy(f, torch.tensor([0, 0, 1, 1]))
    assert value.item() == pytest.approx(2.0 * 1.0)  # every point is 1 from its identity's mean
    assert toy.last_stats == {"n_ids": 2.0, "scale": 2.0}
    assert all(type(v) is float for v in toy.last_stats.values())
    with pytest.raises(NotImplementedError, match="must implement compute"):
        BaseMetricLoss()(f, torch.zeros(4, dtype=torch.long))
