"""train.amp (bf16 / fp16 + GradScaler), train.channels_last, and the scale-out config checks."""
import math

import pytest
import torch

from conftest import model_for, tiny_setup
from torchreid_ext import build_engine, cli
from torchreid_ext.config import ConfigError


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """``make(**overrides) -> (cfg, datamanager)``; the datamanager is built once."""
    return tiny_setup(data_root, str(tmp_path_factory.mktemp("amp") / "log"))


def engine_for(cfg, dm):
    torch.manual_seed(0)
    model = model_for(cfg, dm.num_train_pids).to("cuda" if cfg.use_gpu else "cpu")
    return build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.05)), model


def conv_output_dtypes(model):
    """Record the output dtype of the model's first conv on every forward."""
    seen = []
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


ENGINES = [("softmax", "none"), ("triplet", "none"), ("drsl", "none"), ("sn", "none"),
           ("softmax", "exact"), ("softmax", "fast")]


@pytest.mark.parametrize("loss, msgr", ENGINES)
def test_bf16_step_runs_for_every_engine(setup, loss, msgr, capsys):
    over = {"loss.name": loss, "train.amp": "bf16", "train.channels_last": True, "use_gpu": False}
    if msgr != "none":
        over.update({"msgr.enabled": True, "msgr.mode": msgr, "msgr.stages": "[conv2, conv3]"})
    cfg, dm = setup(**over)
    engine, model = engine_for(cfg, dm)
    assert engine.autocast_dtype == torch.bfloat16 and engine.grad_scaler is None
    assert model.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = conv_output_dtypes(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if msgr == "fast":  # the finite difference needs float32: said in the log, not silent
        assert set(dtypes) == {torch.float32}
        assert "MSGR fast: the forward passes run in float32" in capsys.readouterr().out
    else:
        assert set(dtypes) == {torch.bfloat16}


def test_grad_scaler_recipe_for_exact_msgr_matches_the_unscaled_step(setup):
    """G6: the scaled loss goes into autograd.grad and the stage gradients are divided by the
    scale; GradScaler.step unscales the parameter gradients. In float32 the step must equal
    the step without a scaler (a missing division would multiply R by 1024)."""
    cfg, dm = setup(**{"msgr.enabled": True, "msgr.mode": "exact", "msgr.stages": "[conv2, conv3]",
                       "msgr.eps": 0.1, "use_gpu": False})
    data = next(iter(dm.train_loader))
    params = []
    for scale in (None, 1024.0):
        engine, model = engine_for(cfg, dm)
        if scale is not None:
            engine.grad_scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        torch.manual_seed(1)
        summary = engine.forward_backward(data)
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
        assert summary["msgr/R"] > 0
    for k, v in params[0].items():
        assert torch.allclose(params[1][k], v, rtol=1e-4, atol=1e-6), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_fp16_msgr_step_on_gpu(setup, mode):
    cfg, dm = setup(**{"train.amp": "fp16", "msgr.enabled": True, "msgr.mode": mode,
                       "msgr.stages": "[conv2, conv3]", "use_gpu": True})
    engine, model = engine_for(cfg, dm)
    assert engine.grad_scaler is not None and engine.autocast_dtype == torch.float16
    for data, _ in zip(dm.train_loader, range(3)):
        summary = engine.forward_backward(data)
    assert math.isfinite(summary["loss"]) and summary["msgr/R"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("overrides, pattern", [
    ({"train.sync_bn": True, "msgr.enabled": True, "msgr.mode": "exact"},
     r"train\.sync_bn = True with msgr\.mode = 'exact'.*double backward"),
    ({"dist.gather_features": True, "loss.name": "softmax"}, r"dist\.gather_features = True has no effect"),
])
def test_scale_out_config_errors(tiny, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cli.load_run_config(tiny(**overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for CPU-only runs")
def test_fp16_on_cpu_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"train\.amp = 'fp16' needs a CUDA GPU.*bf16"):
        cli.load_run_config(tiny(**{"train.amp": "fp16"}))


@pytest.mark.parametrize("overrides, pattern", [
    ({"sampler.train_sampler": "RandomDomainSampler"}, r"RandomDomainSampler' has no distributed form"),
    ({"train.sync_bn": True, "use_gpu": False}, r"train\.sync_bn = True under torchrun needs GPUs"),
])
def test_torchrun_only_checks_fail_before_anything_is_written(tiny, tmp_path, monkeypatch, overrides, pattern):
    monkeypatch.setenv("WORLD_SIZE", "2")
    save = tmp_path / "run"
    cfg, _ = cli.load_run_config(tiny(save_dir=str(save), **overrides))
    with pytest.raises(ConfigError, match=pattern):
        cli.run(cfg)
    assert not save.exists()


def test_torchrun_fixbase_with_msgr_fast_is_refused_by_load_config(tiny, monkeypatch):
    """A cross-key rule of validate_config: load_config + build_engine users get it too."""
    from torchreid_ext.config import load_config

    opts = tiny(**{"train.fixbase_epoch": 1, "msgr.enabled": True, "msgr.mode": "fast"})
    load_config(None, opts)  # one process: allowed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train\.fixbase_epoch = 1 with msgr\.mode = 'fast' is not supported "
                                          r"under torchrun"):
        load_config(None, opts)
