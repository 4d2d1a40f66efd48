"""MSFL-ResNet50 and its ablation variants (docs/methods.md M1-M8), complexity counters, configs."""
import glob
import os
import os.path as osp
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import torchreid_ext
from conftest import REPO  # noqa: E402
from torchreid_ext.adapter import torchreid
from torchreid_ext.config import load_config
from torchreid_ext.losses import get_loss
from torchreid_ext.models import MODEL_OPTIONS, ModelOptions, build_model, build_model_from_options
from torchreid_ext.models.complexity import count_macs, count_params
from torchreid_ext.models.msfl import BackboneWeightsError, MSFLNet, msfl_resnet50_csip

# (registered name, options, head input dim): every Table I / IV switch that changes the graph.
VARIANTS = {
    "baseline": ("resnet50_bnfc512", {}, 2048),
    "direct_c45": ("resnet50_bnfc512", {"direct_fuse": "c45"}, 1024 + 2048),
    "direct_c2345": ("resnet50_bnfc512", {"direct_fuse": "c2345"}, 256 + 512 + 1024 + 2048),
    "csip": ("msfl_resnet50_csip", {}, 4 * 512),
    "no_lateral": ("msfl_resnet50_csip", {"lateral": False}, 4 * 512),
    "no_topdown": ("msfl_resnet50_csip", {"topdown": False}, 4 * 512),
    "msfl": ("msfl_resnet50", {}, 4 * 512),
    "msfl_k3": ("msfl_resnet50", {"topdown_kernel": 3}, 4 * 512),
    "msfl_p45_c256": ("msfl_resnet50", {"fuse_levels": [4, 5], "lateral_channels": 256}, 2 * 256),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine, 2 spinning threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(key, num_classes=10, loss="softmax", pretrained=False, **extra):
    name, opts, _ = VARIANTS[key]
    torch.manual_seed(0)
    return build_model(name, num_classes, loss=loss, pretrained=pretrained, use_gpu=False, **{**opts, **extra})


def up2(x):
    """Nearest x2 upsampling written independently of F.interpolate."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def stage_outputs(model, x):
    """C2..C5 from forward hooks on layer1..layer4 (M8), plus the model's output."""
    caps = {}
    hooks = [model.get_submodule(f"layer{i - 1}").register_forward_hook(
        lambda m, inp, out, i=i: caps.__setitem__(i, out)) for i in (2, 3, 4, 5)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return caps, out


# ------------------------------------------------------------------ shapes and wiring

@pytest.mark.parametrize("key", list(VARIANTS))
def test_eval_shapes_at_three_sizes(key):
    model = make(key, embedding_dim=256 if key == "msfl_p45_c256" else 512).eval()
    dim = model.feature_dim
    assert model.head[0].num_features == VARIANTS[key][2]  # documented head input dims
    with torch.no_grad():
        for b, h, w in ((2, 256, 128), (1, 250, 120), (2, 64, 32)):
            out = model(torch.randn(b, 3, h, w))
            assert out.dim() == 2 and out.shape == (b, dim)


def test_msfl_modules_match_m2_m3():
    model = make("msfl")
    assert sorted(model.neck.lateral) == ["p2", "p3", "p4", "p5"] and sorted(model.neck.topdown) == ["p2", "p3", "p4"]
    assert {k: len(v) for k, v in model.neck.msff.items()} == {"p2": 3, "p3": 2, "p4": 1}
    for block in model.neck.msff.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            assert block.conv1.in_channels == 512 and block.conv3.out_channels == 512
    assert model.neck.topdown["p3"][0].kernel_size == (1, 1)
    assert make("msfl_k3").neck.topdown["p3"][0].kernel_size == (3, 3)
    assert sorted(make("no_lateral").neck.lateral) == ["p5"]  # only P5's entry projection
    assert len(make("no_topdown").neck.topdown) == 0
    p45 = make("msfl_p45_c256")
    assert sorted(p45.neck.lateral) == ["p4", "p5"] and sorted(p45.neck.msff) == ["p4"]


@pytest.mark.parametrize("key", ["csip", "no_lateral", "no_topdown", "msfl", "direct_c45", "baseline"])
def test_embedding_equals_reference_formula(key):
    """f = head(concat GAP(P_i)) with P_i from M2/M3 written out (64x32: exact halvings)."""
    model = make(key).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        c, out = stage_outputs(model, x)
        if key == "baseline":
            maps = [c[5]]
        elif key == "direct_c45":
            maps = [c[4], c[5]]
        else:
            lat = {i: model.neck.lateral[f"p{i}"](c[i]) for i in (2, 3, 4, 5) if f"p{i}" in model.neck.lateral}
            p = {5: lat[5]}
            for i in (4, 3, 2):
                if key == "no_topdown":
                    p[i] = lat[i]
                elif key == "no_lateral":
                    p[i] = model.neck.topdown[f"p{i}"](up2(p[i + 1]))
                else:
                    p[i] = lat[i] + model.neck.topdown[f"p{i}"](up2(p[i + 1]))
            if key == "msfl":
                p = {i: model.neck.msff[f"p{i}"](p[i]) if f"p{i}" in model.neck.msff else p[i] for i in p}
            maps = [p[i] for i in (2, 3, 4, 5)]
        expected = model.head(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_topdown_merge_uses_lateral_size_for_odd_inputs():
    """250x120 gives C3 32x15 but C4 16x8: the top-down map must be resized to 32x15 (M2)."""
    model = make("csip").eval()
    sizes = {}
    for i in (2, 3, 4):
        model.neck.topdown[f"p{i}"].register_forward_hook(lambda m, inp, out, i=i: sizes.__setitem__(i, out.shape[-2:]))
    with torch.no_grad():
        c, _ = stage_outputs(model, torch.randn(1, 3, 250, 120))
    assert c[3].shape[-2:] == (32, 15) and c[4].shape[-2:] == (16, 8)
    assert all(sizes[i] == c[i].shape[-2:] for i in (2, 3, 4))


def test_stage_hooks_expose_and_replace_c2_to_c5():
    """M8: one forward gives C2..C5 through hooks; a hook's returned tensor is used downstream."""
    model = make("msfl").eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        c, ref = stage_outputs(model, x)
        assert {i: tuple(c[i].shape[1:]) for i in c} == {
            2: (256, 16, 8), 3: (512, 8, 4), 4: (1024, 4, 2), 5: (2048, 2, 1)}
        out, stages = model(x, return_stages=True)  # hook-free access, same pass
        torch.testing.assert_close(out, ref)
        assert list(stages) == ["layer1", "layer2", "layer3", "layer4"]
        assert all(torch.equal(stages[f"layer{i - 1}"], c[i]) for i in c)
        h = model.get_submodule("layer2").register_forward_hook(lambda m, inp, out: out * 0)
        changed, stages = model(x, return_stages=True)
        h.remove()
        assert not torch.allclose(changed, ref) and not stages["layer2"].any()
        torch.testing.assert_close(model(x), ref)  # deterministic in eval mode
        assert torch.equal(model(x), model(x))


def test_train_outputs_per_loss_and_bad_options():
    x = torch.randn(4, 3, 64, 32)
    model = make("csip", num_classes=7).train()
    for loss in ("softmax", "triplet", "drsl", "sn"):
        model.return_features = get_loss(loss).needs_features  # what the factory's loss argument sets
        with torch.no_grad():
            out = model(x)
        if loss == "softmax":
            assert out.shape == (4, 7)
        else:
            assert out[0].shape == (4, 7) and out[1].shape == (4, 512)
    with pytest.raises(ValueError,
                       match=r"loss = 'arcface' is unknown; choose one of \['softmax', 'triplet', 'drsl', 'sn'\]"):
        make("msfl", loss="arcface")
    with pytest.raises(ValueError, match="no pyramid"):
        make("csip", lateral=False, topdown=False)
    with pytest.raises(ValueError, match="fuse_levels"):
        make("msfl", fuse_levels=[1, 2])
    with pytest.raises(ValueError, match="direct_fuse"):
        make("baseline", direct_fuse="c3")
    with pytest.raises(TypeError):  # the csip variant has no MSFF blocks to configure
        msfl_resnet50_csip(10, pretrained=False, msff_blocks=[1, 1, 1, 1])
    assert "model.msfl.msff_blocks" not in MODEL_OPTIONS["msfl_resnet50_csip"]
    assert "model.msfl.direct_fuse" not in MODEL_OPTIONS["msfl_resnet50"]


@pytest.mark.parametrize("key", ["direct_c2345", "no_lateral", "no_topdown", "msfl", "msfl_p45_c256"])
def test_every_parameter_gets_a_gradient(key):
    model = make(key, num_classes=2, loss="triplet").train()
    x, pids = torch.randn(4, 3, 64, 32), torch.arange(2).repeat_interleave(2)
    logits, feats = model(x)
    loss = F.cross_entropy(logits, pids) + 0.1 * feats.norm(dim=1).mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


# ------------------------------------------------------------------ ImageNet weights (M7)

@pytest.fixture(scope="module")
def tv_state(tmp_path_factory):
    torch.manual_seed(1)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "r50.pth"
    torch.save(state, path)
    return state, str(path)


def _assert_backbone_equals(model, state):
    own = model.state_dict()
    keys = [k for k in state if not k.startswith("fc.")]
    assert len(keys) == 318
    for k in keys:
        assert torch.equal(own[k], state[k]), k


@pytest.mark.parametrize("key", ["baseline", "csip", "msfl"])
def test_local_backbone_weights_load_exactly(key, tv_state, capsys):
    state, path = tv_state
    name, opts, _ = VARIANTS[key]
    torch.manual_seed(0)
    model = build_model(name, 10, pretrained=True, use_gpu=False, backbone_weights=path, **opts)
    _assert_backbone_equals(model, state)
    out = capsys.readouterr().out
    assert "318 tensors" in out and "ignored fc.bias, fc.weight" in out


def test_wrapped_state_dict_with_module_prefix(tv_state, tmp_path):
    state, _ = tv_state
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    _assert_backbone_equals(make("msfl", pretrained=True, backbone_weights=str(path)), state)


def test_missing_backbone_key_is_named(tv_state, tmp_path):
    state, _ = tv_state
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "layer3.2.bn2.running_var"}, path)
    with pytest.raises(BackboneWeightsError, match=r"layer3\.2\.bn2\.running_var"):
        make("msfl", pretrained=True, backbone_weights=str(path))
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        make("msfl", pretrained=True, backbone_weights=str(tmp_path / "nope.pth"))


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def no_network(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return calls, osp.join(str(tmp_path / "torch"), "hub", "checkpoints", "resnet50-0676ba61.pth")


def test_offline_download_fails_fast_naming_the_path(monkeypatch, tmp_path):
    calls, cached = _offline(monkeypatch, tmp_path)
    with pytest.raises(BackboneWeightsError) as err:
        make("msfl", pretrained=True)
    msg = str(err.value)
    assert calls and cached in msg and "model.backbone_weights <path>" in msg and "model.pretrained False" in msg
    assert isinstance(err.value, RuntimeError)


def test_hub_cache_file_is_used_by_the_download_path(monkeypatch, tmp_path, tv_state):
    state, path = tv_state
    calls, cached = _offline(monkeypatch, tmp_path)
    os.makedirs(osp.dirname(cached))
    os.symlink(path, cached)
    _assert_backbone_equals(make("baseline", pretrained=True), state)
    assert calls == []


# ------------------------------------------------------------------ complexity (M5)

def _bottleneck_params(inp, planes, downsample):
    out = 4 * planes
    n = inp * planes + 9 * planes * planes + planes * out + 2 * (planes + planes + out)
    return n + (inp * out + 2 * out if downsample else 0)


def _resnet50_backbone_params():
    n = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + BN
    inp = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        n += _bottleneck_params(inp, planes, True) + (blocks - 1) * _bottleneck_params(4 * planes, planes, False)
        inp = 4 * planes
    return n


def test_param_counts_derived_from_the_architecture():
    backbone = _resnet50_backbone_params()
    assert backbone == 23_508_032
    head = 2 * 2048 + 2048 * 512 + 512  # BN1d(2048) + Linear(2048 -> 512); classifier excluded
    base = count_params(make("baseline"))
    assert base == backbone + head == 24_561_216 and round(base / 1e6, 2) == 24.56
    lateral = sum(c * 512 + 2 * 512 for c in (256, 512, 1024, 2048))
    for kernel, total_m in ((1, 29.0), (3, 35.3)):  # docs/methods.md M5
        topdown = 3 * (512 * 512 * kernel * kernel + 2 * 512)
        msff = 6 * _bottleneck_params(512, 128, False)
        n = count_params(make("msfl", topdown_kernel=kernel))
        assert n == backbone + lateral + topdown + msff + head
        assert round(n / 1e6, 1) == total_m


def test_macs_match_table_ii_and_method():
    assert round(count_macs(make("baseline"), 256, 128) / 1e9, 2) == 2.67  # Table II: 2.6 G
    assert round(count_macs(make("msfl"), 256, 128) / 1e9, 2) == 5.91  # Table II: 5.9 G (M5, k = 1)


def test_count_macs_reference_and_mode_restore():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=2),
        nn.Flatten(), nn.Linear(8 * 4 * 2, 10),
    )
    net.train()
    net[1].eval()
    expected = 8 * 4 * 2 * 3 * 9 + 8 * 4 * 2 * 4 + 10 * 64
    assert count_macs(net, 4, 2) == expected
    assert net.training and not net[1].training and net[2].training
    assert count_params(net) == sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------ Torchreid integration

class _DataManager:
    def __init__(self, batch, num_pids):
        self.train_loader = [batch]
        self.test_loader = {}
        self.num_train_pids = num_pids
        self.sources = ["stand_in"]
        self.targets = ["stand_in"]


@pytest.mark.parametrize("engine_name,loss", [("ImageSoftmaxEngine", "softmax"), ("ImageTripletEngine", "triplet")])
def test_one_step_in_torchreid_engines(engine_name, loss):
    tr = torchreid()
    model = make("msfl", num_classes=2, loss=loss).train()
    batch = {"img": torch.randn(8, 3, 64, 32), "pid": torch.arange(2).repeat_interleave(4),
             "camid": torch.zeros(8, dtype=torch.long)}
    opt = tr.optim.build_optimizer(model, optim="adam", lr=1e-3)
    engine = getattr(tr.engine, engine_name)(_DataManager(batch, 2), model, opt, use_gpu=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = engine.forward_backward(batch)
    expected = {"loss", "acc"} if loss == "softmax" else {"loss_t", "loss_x", "acc"}
    assert set(summary) == expected and all(v == v for v in summary.values())
    changed = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("neck.") else "")
               for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"layer1", "layer4", "neck.lateral", "neck.topdown", "neck.msff", "head", "classifier"} <= changed


def test_registered_in_torchreid_factory():
    assert torchreid_ext.__version__
    model = torchreid().models.build_model(
        "msfl_resnet50", num_classes=10, loss="softmax", pretrained=False, use_gpu=False)
    assert isinstance(model, MSFLNet) and len(model.neck.msff) == 3


CONFIGS = sorted(glob.glob(osp.join(REPO, "configs", "ablation", "*.yaml"))) + [
    osp.join(REPO, "configs", "msfl_market.yaml")]
# file -> (model name, a check of the switch it sets)
CONFIG_EXPECT = {
    "r50_baseline": ("resnet50_bnfc512", lambda m: m.head_in_features == 2048),
    "csip": ("msfl_resnet50_csip", lambda m: len(m.neck.msff) == 0 and len(m.neck.topdown) == 3),
    "msff": ("msfl_resnet50", lambda m: len(m.neck.msff) == 3),
    "msfl_market": ("msfl_resnet50", lambda m: len(m.neck.msff) == 3),
    "no_lateral": ("msfl_resnet50_csip", lambda m: sorted(m.neck.lateral) == ["p5"]),
    "no_topdown": ("msfl_resnet50_csip", lambda m: len(m.neck.topdown) == 0 and len(m.neck.lateral) == 4),
    "direct_fuse_c45": ("resnet50_bnfc512", lambda m: m.head_in_features == 3072),
    "direct_fuse_c2345": ("resnet50_bnfc512", lambda m: m.head_in_features == 3840),
    "topdown_k3": ("msfl_resnet50", lambda m: m.neck.topdown["p2"][0].kernel_size == (3, 3)),
}


def test_config_set_is_complete():
    assert sorted(osp.basename(p)[:-5] for p in CONFIGS) == sorted(CONFIG_EXPECT)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: osp.basename(p))
def test_configs_load_and_build(path):
    cfg = load_config(path)
    assert cfg.model.pretrained and cfg.data.transforms == ["random_flip", "random_crop"]
    train = (cfg.train.optim, cfg.train.lr, cfg.train.lr_scheduler, list(cfg.train.stepsize), cfg.train.max_epoch)
    assert train == ("adam", 3.5e-4, "multi_step", [40, 70], 120) and cfg.train.batch_size == 64
    assert cfg.sampler.train_sampler == "RandomIdentitySampler" and cfg.sampler.num_instances == 4
    assert cfg.loss.name == "softmax" and not cfg.loss.softmax.label_smooth
    assert cfg.data.sources == ["market1501"] and (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.test.eval_freq == 10 and cfg.data.save_dir.startswith("log/")
    assert "Market-1501" in open(path).readline()
    cfg.model.pretrained = False
    name, check = CONFIG_EXPECT[osp.basename(path)[:-5]]
    assert cfg.model.name == name
    model = build_model_from_options(ModelOptions.from_config(cfg), 5)
    assert check(model)
