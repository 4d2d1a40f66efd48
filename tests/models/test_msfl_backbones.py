"""MSFL on any backbone with stages (docs/methods.md M9): every registered variant, the ResNet50
family pinned to its earlier keys and outputs, OSNet model-zoo weights in the backbone, MSGR on
OSNet's stages, and the bad inputs (one line, exit 2, before training)."""
import hashlib
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from conftest import MSMT17_WEIGHTS
from torchreid_ext import cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.checkpoint import load_model_weights
from torchreid_ext.errors import BackboneWeightsError, ConfigError
from torchreid_ext.models import MODEL_OPTIONS, build_model
from torchreid_ext.models.backbones import OSNET_CHANNELS
from torchreid_ext.models.complexity import count_params
from torchreid_ext.models.msfl import VARIANTS, MSFLNet
from torchreid_ext.msgr import StageCapture, feature_gradient_penalty, msgr_backward

OSNET_NAMES = [n for n, (b, _) in VARIANTS.items() if b.startswith("osnet")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name, num_classes=7, loss="softmax", **options):
    torch.manual_seed(0)
    return build_model(name, num_classes, loss=loss, pretrained=False, use_gpu=False, **options)


def test_every_backbone_has_three_names():
    assert sorted(VARIANTS) == sorted(
        [f"{b}_bnfc512" for b in ["resnet50", *(f"osnet_{w}" for w in OSNET_CHANNELS)]]
        + [f"msfl_{b}{s}" for b in ["resnet50", *(f"osnet_{w}" for w in OSNET_CHANNELS)] for s in ("", "_csip")])
    assert len(OSNET_NAMES) == 12
    for name in OSNET_NAMES:  # the same config keys as the ResNet50 name of the same kind
        kind = VARIANTS[name][1]
        r50 = next(n for n, (b, k) in VARIANTS.items() if b == "resnet50" and k == kind)
        assert MODEL_OPTIONS[name] == MODEL_OPTIONS[r50]


@pytest.mark.parametrize("name", OSNET_NAMES)
def test_osnet_variant_shapes_in_train_and_eval(name):
    width = name.split("osnet_")[1][:5].rstrip("_")
    c = OSNET_CHANNELS[width]
    for loss, features in (("softmax", False), ("triplet", True)):
        model = make(name, loss=loss).train()
        out = model(torch.randn(4, 3, 64, 32))
        logits = out[0] if features else out
        assert logits.shape == (4, 7)
        if features:
            assert out[1].shape == (4, 512)
    model.eval()
    with torch.no_grad():
        f, stages = model(torch.randn(2, 3, 128, 64), return_stages=True)
    assert f.shape == (2, 512)
    # M9: conv2 at stride 8, conv3..conv5 at stride 16, widths c1, c2, c3, c3
    assert {k: tuple(v.shape[1:]) for k, v in stages.items()} == {
        "conv2": (c[1], 16, 8), "conv3": (c[2], 8, 4), "conv4": (c[3], 8, 4), "conv5": (c[3], 8, 4)}
    kind = VARIANTS[name][1]
    head_in = {"direct": c[3], "csip": 4 * c[3], "msfl": 4 * c[3]}[kind]  # neck width = C5's (M9)
    assert model.head[0].num_features == head_in


def test_osnet_backbone_is_torchreids_osnet():
    """Same tensors, same names, same stage outputs as Torchreid's own osnet_x0_25."""
    model = make("msfl_osnet_x0_25").eval()
    tr = torchreid().models.build_model("osnet_x0_25", num_classes=7, loss="softmax", pretrained=False,
                                        use_gpu=False).eval()
    ours = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in model.backbone_layers}
    theirs = {k: v for k, v in tr.state_dict().items() if not k.startswith(("fc.", "classifier."))}
    assert list(ours) == list(theirs)
    tr.load_state_dict(ours, strict=False)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        _, stages = model(x, return_stages=True)
        torch.testing.assert_close(stages["conv5"], tr.featuremaps(x), rtol=0, atol=0)


def test_csip_on_osnet_resizes_only_where_resolutions_differ():
    """M9: P4 and P3 take P5 / P4 at their own size (identity), P2 a true x2 upsampling."""
    model = make("msfl_osnet_x0_25_csip").eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        _, c = model(x, return_stages=True)
        n = model.neck
        lat = {i: n.lateral[f"p{i}"](c[s]) for i, s in zip((2, 3, 4, 5), ("conv2", "conv3", "conv4", "conv5"))}
        p5 = lat[5]
        p4 = lat[4] + n.topdown["p4"](p5)
        p3 = lat[3] + n.topdown["p3"](p4)
        p2 = lat[2] + n.topdown["p2"](p3.repeat_interleave(2, -2).repeat_interleave(2, -1))
        expected = model.head(torch.cat([p.mean((2, 3)) for p in (p2, p3, p4, p5)], 1))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


# The ResNet50 family before the backbones became parts (commit 2822b40), seed 0, 64x32 input
# of seed 1: state-dict keys and shapes (sha256 of 'key shape' lines) and the eval embedding.
PINNED = {
    "resnet50_bnfc512": (327, "fb8fcd99987e2f2c", 10785.588470, [17.076092, 11.596416, 35.792202]),
    "msfl_resnet50_csip": (369, "193413a4a47bf331", 58808.401715, [0.0, 89.776123, 0.0]),
    "msfl_resnet50": (477, "29c856c055485854", 137025.405102, [0.0, 0.0, 65.636963]),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_resnet50_family_keys_and_outputs_unchanged(name):
    count, digest, total, first = PINNED[name]
    model = make(name, num_classes=10).eval()
    state = model.state_dict()
    keys = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    assert len(state) == count and hashlib.sha256(keys.encode()).hexdigest()[:16] == digest
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "neck", "head", "classifier"]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        out = model(x).double()
    assert out.sum().item() == pytest.approx(total, rel=1e-5)
    assert out[0, :3].tolist() == pytest.approx(first, rel=1e-5, abs=1e-5)


def test_lateral_channels_default_per_backbone_and_parameter_counts():
    """ResNet50's neck is 512 wide (the paper's), OSNet's its C5 width; counts from the layers."""
    assert make("msfl_resnet50_csip").neck.out_channels == 4 * 512
    for w, c in OSNET_CHANNELS.items():
        assert make(f"msfl_osnet_{w}").neck.out_channels == 4 * c[3]
    wide = make("msfl_osnet_x0_25", lateral_channels=512)
    assert wide.neck.out_channels == 2048
    base, msfl = count_params(make("osnet_x0_25_bnfc512")), count_params(make("msfl_osnet_x0_25"))
    ch = 128
    lateral = sum(c * ch + 2 * ch for c in (64, 96, 128, 128))
    topdown = 3 * (ch * ch + 2 * ch)
    mid = ch // 4
    msff = 6 * (ch * mid + 9 * mid * mid + mid * ch + 2 * (mid + mid + ch))
    head_delta = (2 * 512 + 512 * 512) - (2 * 128 + 128 * 512)  # BN1d + Linear: 4 x 128 in vs 128 in
    assert msfl - base == lateral + topdown + msff + head_delta


# ------------------------------------------------------------------ weights

def _osnet_file(tmp_path):
    """Torchreid's model-zoo file where the real data is, else a Torchreid osnet_x0_25 state dict
    of the same layout (567 tensors: backbone, fc, a 1041-way classifier)."""
    if osp.isfile(MSMT17_WEIGHTS):
        return MSMT17_WEIGHTS
    torch.manual_seed(3)
    tr = torchreid().models.build_model("osnet_x0_25", num_classes=1041, loss="softmax", pretrained=False,
                                        use_gpu=False)
    path = str(tmp_path / "osnet_x0_25_zoo.pth")
    torch.save(tr.state_dict(), path)
    return path


def test_osnet_file_fills_the_backbone_and_nothing_else(tmp_path, caplog):
    path = _osnet_file(tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = make("msfl_osnet_x0_25", num_classes=1041)  # a classifier of the file's shape: still new
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO"):
        report = load_model_weights(model, path)
    backbone = model.backbone_keys()
    assert len(backbone) == 558 and sorted(report["loaded"]) == sorted(backbone)
    after = model.state_dict()
    for k, v in after.items():
        assert torch.equal(v, state[k] if k in backbone else before[k]), k
    line = caplog.text
    assert "backbone osnet_x0_25: all 558 tensors loaded" in line
    assert "ignored from the file: fc 7, classifier 2" in line
    assert "new, kept as built: neck 150, head 7, classifier 2" in line


@pytest.mark.skipif(not osp.isfile(MSMT17_WEIGHTS), reason=f"model-zoo weights not found at '{MSMT17_WEIGHTS}'")
def test_model_zoo_weights_give_torchreids_feature_maps():
    """Real MSMT17 file: every backbone key matched, and conv5 equals Torchreid's own model's."""
    model = make("osnet_x0_25_bnfc512").eval()
    load_model_weights(model, MSMT17_WEIGHTS)
    tr = torchreid().models.build_model("osnet_x0_25", num_classes=1041, loss="softmax", pretrained=False,
                                        use_gpu=False).eval()
    tr.load_state_dict(torch.load(MSMT17_WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        _, stages = model(x, return_stages=True)
        torch.testing.assert_close(stages["conv5"], tr.featuremaps(x), rtol=0, atol=0)


def test_own_checkpoint_loads_everything(tmp_path):
    trained = make("msfl_osnet_x0_25", num_classes=5)
    path = str(tmp_path / "mine.pth")
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    fresh = make("msfl_osnet_x0_25", num_classes=5)
    torch.nn.init.constant_(fresh.head[1].weight, 0.5)
    load_model_weights(fresh, path, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


def test_backbone_weights_option_takes_an_osnet_file(tmp_path):
    path = _osnet_file(tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("msfl_osnet_x0_25_csip", 7, pretrained=True, use_gpu=False, backbone_weights=path)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in model.backbone_keys())


def test_weights_of_another_backbone_are_refused(tmp_path):
    r50 = make("resnet50_bnfc512")
    r50_path = str(tmp_path / "r50.pth")
    torch.save({k: v for k, v in r50.state_dict().items() if k.split(".")[0] in r50.backbone_layers}, r50_path)
    with pytest.raises(BackboneWeightsError,
                       match=r"model 'msfl_osnet_x0_25' \(its osnet_x0_25 backbone: 0 of its 558 tensors found"):
        load_model_weights(make("msfl_osnet_x0_25"), r50_path)
    with pytest.raises(BackboneWeightsError,
                       match=r"model 'msfl_resnet50_csip' \(its resnet50 backbone: 0 of its \d+ tensors"):
        load_model_weights(make("msfl_resnet50_csip"), _osnet_file(tmp_path))
    x0_5 = torchreid().models.build_model("osnet_x0_5", num_classes=3, pretrained=False, use_gpu=False)
    half = str(tmp_path / "x0_5.pth")
    torch.save(x0_5.state_dict(), half)  # same names, other widths: only shape-free counters fit
    with pytest.raises(BackboneWeightsError, match="first missing 'conv1.conv.weight'"):
        load_model_weights(make("msfl_osnet_x0_25"), half)


# ------------------------------------------------------------------ MSGR on OSNet's stages

def test_exact_msgr_step_on_msfl_osnet_equals_the_penalised_objective():
    """One exact MSGR step on conv2 / conv3 (G2, G4): the parameter gradients equal those of
    L_mean + R written out with autograd (float64)."""
    model = make("msfl_osnet_x0_25", num_classes=3).double().train()
    torch.manual_seed(5)
    x, y = torch.randn(4, 3, 64, 32, dtype=torch.float64), torch.tensor([0, 0, 1, 2])
    stages, eps = ["conv2", "conv3"], [0.5, 0.2]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN statistics: same start
    model.zero_grad()
    step = msgr_backward(model, lambda: model(x), lambda out: F.cross_entropy(out, y), stages, eps)
    got = [p.grad.clone() for p in model.parameters()]
    assert set(step.penalty.stage_penalty) == set(stages) and all(v > 0 for v in step.penalty.stage_penalty.values())
    model.load_state_dict(state)
    model.zero_grad()
    with StageCapture(model, stages) as cap:
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(4 * loss, [cap.outputs[s] for s in stages], create_graph=True)
    penalty = sum(e * g.flatten(1).norm(dim=1).mean() for e, g in zip(eps, grads))
    assert penalty.detach().item() == pytest.approx(feature_gradient_penalty(
        4 * loss, cap.outputs, eps).penalty.detach().item(), rel=1e-9)
    (loss + penalty).backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------ bad input, from the command line

def _run(capsys, tiny, **overrides):
    code = cli.main(tiny(**overrides))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out + captured.err


def test_bad_inputs_are_one_line_before_training(capsys, tiny, tmp_path):
    r50 = make("resnet50_bnfc512")
    r50_path = str(tmp_path / "r50.pth")
    torch.save(r50.state_dict(), r50_path)
    osnet_path = _osnet_file(tmp_path)
    cases = [
        (dict(**{"model.name": "msfl_osnet_x0_25", "model.load_weights": r50_path}), r50_path),
        (dict(**{"model.name": "msfl_resnet50_csip", "model.load_weights": osnet_path}), osnet_path),
        (dict(**{"model.name": "msfl_osnet_x0_25", "msgr.enabled": "True", "msgr.stages": "[layer1,layer2]"}),
         "layer1"),
        (dict(**{"model.name": "msfl_osnet_x0_25", "model.msfl.lateral_channels": "0"}),
         "model.msfl.lateral_channels = 0"),
        (dict(**{"model.name": "msfl_osnet_x0_25_csip", "model.msfl.lateral_channels": "-8"}),
         "model.msfl.lateral_channels = -8"),
    ]
    for overrides, named in cases:
        code, err, everything = _run(capsys, tiny, **overrides)
        assert code == 2, (overrides, everything[-2000:])
        assert len(err) == 1 and err[0].startswith("error:") and named in err[0], err
        assert "Traceback" not in everything and "=> Start training" not in everything


def test_lateral_channels_check_in_the_config():
    from torchreid_ext.config import load_config

    with pytest.raises(ConfigError, match=r"model\.msfl\.lateral_channels = 0 must be an integer >= 1"):
        load_config(None, ["model.msfl.lateral_channels", "0"])
    assert load_config(None, ["model.msfl.lateral_channels", "64"]).model.msfl.lateral_channels == 64
    assert isinstance(make("msfl_osnet_x0_25", lateral_channels=64), MSFLNet)
