"""The config stops at the edge: ``cli.run`` freezes it, reads it once into ``RunOptions``, and
nothing changes it; each component's options are read by their own class, once per run."""
import dataclasses

import pytest
import torch

from conftest import tiny_opts
from torchreid_ext import cli
from torchreid_ext.config import flat_keys, load_config
from torchreid_ext.data.checks import DataOptions
from torchreid_ext.distributed import DistOptions
from torchreid_ext.engines.options import EngineOptions
from torchreid_ext.losses import LossOptions
from torchreid_ext.metrics import EvaluationOptions
from torchreid_ext.models import ModelOptions
from torchreid_ext.msgr import MSGROptions
from torchreid_ext.options import config_value
from torchreid_ext.run_options import RunOptions, engine_run_kwargs, imagedata_kwargs


def snapshot(cfg):
    """Every key's value, lists copied (yacs' freeze leaves lists mutable)."""
    return {key: (list(v) if isinstance(v, (list, tuple)) else v)
            for key in flat_keys(cfg) for v in [config_value(cfg, key)]}


def test_a_run_freezes_its_config_and_changes_no_key(data_root, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_opts(data_root, str(tmp_path / "run"), **{"train.max_epoch": "1"}))
    before = snapshot(cfg)
    assert not cfg.is_frozen()
    calls = []
    read = EvaluationOptions.from_config.__func__
    monkeypatch.setattr(EvaluationOptions, "from_config",
                        classmethod(lambda cls, c, **kw: calls.append(1) or read(cls, c, **kw)))
    results = cli.run(cfg)
    assert 0.0 <= results["synthreid_small"]["rank1"] <= 1.0
    assert cfg.is_frozen()
    assert snapshot(cfg) == before  # use_gpu included: the run resolves it in its options, not in the config
    assert len(calls) == 1  # the evaluation's options: read once per run
    with pytest.raises(AttributeError, match="immutable"):
        cfg.use_gpu = False


def test_load_run_config_returns_a_frozen_config(data_root, tmp_path):
    cfg, _ = cli.load_run_config(tiny_opts(data_root, str(tmp_path / "run")))
    assert cfg.is_frozen()
    with pytest.raises(AttributeError, match="immutable"):
        cfg.train.max_epoch = 3


def test_each_component_reads_its_own_options(data_root, tmp_path):
    cfg = load_config(None, tiny_opts(data_root, str(tmp_path / "run"), **{
        "loss.name": "drsl", "loss.drsl.lambda_sort": "0.5", "msgr.enabled": "True",
        "msgr.stages": "[conv2]", "test.rerank": "True", "model.name": "msfl_resnet50", "use_gpu": "True"}))
    options = RunOptions(cfg)
    assert options.use_gpu == torch.cuda.is_available()  # use_gpu: when a GPU is present
    assert not RunOptions(cfg, use_gpu=False).use_gpu
    assert options.data == DataOptions.from_config(cfg) and options.engine == EngineOptions.from_config(cfg)
    assert options.msgr == MSGROptions.from_config(cfg) and options.msgr.stages == ("conv2",)
    assert options.dist == DistOptions.from_config(cfg) and options.evaluation.rerank
    assert options.model == ModelOptions.from_config(cfg)
    assert options.model.factory_options["lateral_channels"] == cfg.model.msfl.lateral_channels
    assert options.model.factory_options["backbone_weights"] == ""
    assert options.loss.name == "drsl" and options.loss.sections["drsl"].lambda_sort == 0.5
    assert options.loss.sections["drsl"].is_frozen()  # a copy the loss's builder reads, not the config
    assert options.datamanager_args == {**imagedata_kwargs(cfg), "use_gpu": options.use_gpu}
    assert options.run_args == engine_run_kwargs(cfg) and options.save_dir == cfg.data.save_dir
    assert (options.seed, options.max_epoch, options.evaluate_only) == (1, 2, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 2
    cfg.loss.drsl.lambda_sort = 0.25  # the options hold copies
    assert options.loss.sections["drsl"].lambda_sort == 0.5


def test_loss_options_copy_every_section(data_root, tmp_path):
    cfg = load_config(None, tiny_opts(data_root, str(tmp_path / "run")))
    loss = LossOptions.from_config(cfg)
    assert set(loss.sections) >= {"softmax", "triplet", "drsl", "sn"} and loss.name == "softmax"
    assert loss.label_smooth == cfg.loss.softmax.label_smooth


def test_errors_of_user_input_at_run_time_are_user_errors():
    """Values a user set (config keys) that only fail once the run has data or a device: one line,
    exit status 2 (a ConfigError, still a ValueError for Python callers)."""
    from torchreid_ext.config import ConfigError
    from torchreid_ext.data.sampler import DistributedIdentitySampler
    from torchreid_ext.distributed import init_distributed
    from torchreid_ext.errors import UserError

    opts = EvaluationOptions(aqe=True, aqe_k=30, rerank=True, rerank_k1=20)
    with pytest.raises(ConfigError, match=r"test\.rerank_k1 = 20 needs at least"):
        opts.check_sizes(10, 5)
    with pytest.raises(ConfigError, match=r"test\.aqe_k = 30 exceeds the number of query \+ gallery features"):
        EvaluationOptions(aqe=True, aqe_k=30).check_sizes(10, 5)
    items = [(f"{i}.jpg", i // 4, 0) for i in range(8)]  # 2 identities
    with pytest.raises(ConfigError, match="2 identities, fewer than P x world size = 2 x 2 = 4"):
        DistributedIdentitySampler(items, batch_size=8, num_instances=4, num_replicas=2, rank=0)
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    if not torch.cuda.is_available():
        import os
        from unittest import mock

        with mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}):
            with pytest.raises(ConfigError, match="dist.backend = 'nccl' needs GPUs"):
                init_distributed("nccl", use_gpu=False)
