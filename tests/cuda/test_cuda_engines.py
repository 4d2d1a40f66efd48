"""One training step of every engine on CUDA (softmax, triplet, drsl, sn, MSGR exact and fast) in
fp32, bf16, fp16 with a GradScaler, channels-last and bf16 + channels-last, built with the public
builders on synthreid_small; pinned-memory loading; evaluation after a step on the GPU.

``pytest -m cuda``; without CUDA these tests skip (``TORCHREID_EXT_TEST_DEVICE=cpu``: run on the CPU).
"""
import math

import pytest
import torch

from conftest import model_for, tiny_setup
from cuda_env import DEVICE, FORCED_CPU, MARKS, ON_GPU
from torchreid_ext import build_engine
from torchreid_ext.builders import build_optimizer
from torchreid_ext.run_options import RunOptions

pytestmark = MARKS

ENGINES = {
    "softmax": {"loss.name": "softmax"},
    "triplet": {"loss.name": "triplet"},
    "drsl": {"loss.name": "drsl"},
    "sn": {"loss.name": "sn"},
    "msgr_exact": {"loss.name": "softmax", "msgr.enabled": True, "msgr.mode": "exact",
                   "msgr.stages": "[conv2, conv3]"},
    "msgr_fast": {"loss.name": "softmax", "msgr.enabled": True, "msgr.mode": "fast",
                  "msgr.stages": "[conv2, conv3]"},
}
# precision / memory-format variants: (train.amp, train.channels_last)
VARIANTS = {
    "fp32": ("none", False),
    "bf16": ("bf16", False),
    "fp16_grad_scaler": ("fp16", False),
    "channels_last": ("none", True),
    "bf16_channels_last": ("bf16", True),
}
AUTOCAST = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """``make(**overrides) -> (cfg, datamanager)`` on DEVICE; the datamanager is built once."""
    return tiny_setup(data_root, str(tmp_path_factory.mktemp("cuda-engines") / "log"), use_gpu=ON_GPU)


def config(setup, engine, amp, channels_last, **extra):
    over = {**ENGINES[engine], "train.channels_last": channels_last, **extra}
    if amp == "fp16" and FORCED_CPU:
        # the config refuses fp16 without CUDA; the CPU development run sets it after the checks
        cfg, dm = setup(**over)
        cfg = cfg.clone()  # a frozen config: a changed copy
        cfg.defrost()
        cfg.train.amp = "fp16"
        return cfg, dm
    return setup(**over, **{"train.amp": amp})


def engine_for(cfg, dm):
    torch.manual_seed(0)
    model = model_for(cfg, dm.num_train_pids).to(DEVICE)
    return build_engine(cfg, dm, model, build_optimizer(RunOptions(cfg), model)), model


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def first_conv_records(model):
    """(output dtype, input is channels-last) of the model's first conv, per forward."""
    seen = []
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, i, o: seen.append(
        (o.dtype, i[0].is_contiguous(memory_format=torch.channels_last))))
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_one_training_step(setup, engine, variant):
    amp, channels_last = VARIANTS[variant]
    cfg, dm = config(setup, engine, amp, channels_last)
    eng, model = engine_for(cfg, dm)
    assert eng.device.type == DEVICE.type
    assert eng.autocast_dtype == (None if amp == "none" else AUTOCAST[amp])
    assert (eng.grad_scaler is not None) == (amp == "fp16")
    if channels_last:
        assert model.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    records = first_conv_records(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = endless(dm.train_loader)
    # fp16: GradScaler skips a step whose gradients overflow and halves its scale (from 2 ** 16;
    # a fresh network's first gradients often overflow): a skipped step changes nothing
    scale = eng.grad_scaler.get_scale() if amp == "fp16" else None
    for attempt in range(16 if amp == "fp16" else 1):  # noqa: B007  (read after the loop)
        summary = eng.forward_backward(next(batches))
        assert math.isfinite(summary["loss"]), summary
        changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
        if changed:
            break
        # (an overflowing fp16 step may log a non-finite MSGR R: its stage gradients overflowed)
        if amp == "fp16":
            assert eng.grad_scaler.get_scale() == scale / 2, "a skipped fp16 step must halve the loss scale"
            scale /= 2
    assert changed, f"no parameter changed after {attempt + 1} step(s)"
    assert all(math.isfinite(v) for v in summary.values()), summary  # the step that was applied
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} parameters changed"
    for k, p in model.named_parameters():
        assert p.device.type == DEVICE.type and p.dtype == torch.float32, k
        assert torch.isfinite(p).all(), k
    if engine.startswith("msgr"):
        assert summary["msgr/R"] > 0 and summary["msgr/applied"] == 1.0
    # fast MSGR's forwards run in float32 under AMP (the finite difference needs it)
    expected = torch.float32 if engine == "msgr_fast" else AUTOCAST[amp]
    assert {dtype for dtype, _ in records} == {expected}
    assert all(cl == channels_last for _, cl in records)
    if amp == "fp16":  # the step that applied kept the scale (growth comes after 2000 good steps)
        assert eng.grad_scaler.get_scale() == scale


def test_pinned_memory_loading(setup):
    """On a GPU Torchreid's loaders pin their batches; the engine's non-blocking copy lands on
    the device with the same values."""
    cfg, dm = setup(**ENGINES["softmax"])
    eng, _ = engine_for(cfg, dm)
    assert dm.train_loader.pin_memory == ON_GPU
    data = next(iter(dm.train_loader))
    if ON_GPU:
        assert data["img"].is_pinned()
    imgs, pids = eng.train_inputs(data)
    assert imgs.device.type == DEVICE.type and pids.device.type == DEVICE.type
    torch.testing.assert_close(imgs.cpu(), data["img"], rtol=0, atol=0)
    assert torch.equal(pids.cpu(), data["pid"])


@pytest.mark.parametrize("engine, variant", [("msgr_exact", "bf16_channels_last"), ("drsl", "fp32")])
def test_evaluation_after_a_step(setup, engine, variant):
    """Feature extraction and the fast evaluator on the device after a training step."""
    amp, channels_last = VARIANTS[variant]
    cfg, dm = config(setup, engine, amp, channels_last)
    eng, _ = engine_for(cfg, dm)
    eng.forward_backward(next(iter(dm.train_loader)))
    rank1 = eng.test()
    res = eng.last_results["synthreid_small"]
    assert 0.0 <= rank1 <= 1.0 and 0.0 <= res["mAP"] <= 1.0
    assert all(math.isfinite(float(v)) for v in (res["rank1"], res["mAP"], res["mINP"]))
