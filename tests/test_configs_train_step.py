"""Every repo config (base files excluded) loads, builds its model and takes one training step.

Tiny overrides: synthreid_small at 64x32, no ImageNet weights, batch 8 (PK 2 x 4). One data
manager and one batch serve every case. Under these overrides the per-dataset leaves of a
method become the same run (only the save dir and the dataset keys differ), so each distinct
effective config trains once and its equals reuse the result.
"""
import glob
import math
import os.path as osp

import pytest
import torch

from conftest import REPO
from torchreid_ext import build_engine
from torchreid_ext.builders import build_datamanager, build_optimizer, build_run_model, build_scheduler
from torchreid_ext.config import get_default_config, load_config
from torchreid_ext.run_options import RunOptions

CONFIGS = sorted(  # base/ folders (at any depth) hold mix-ins, not runs
    p for p in glob.glob(osp.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if "base" not in osp.relpath(p, REPO).split(osp.sep)[:-1]
)


def tiny_step_opts(root):
    return [
        "model.pretrained", "False", "data.root", root,
        "data.sources", "[synthreid_small]", "data.targets", "[synthreid_small]",
        "data.height", "64", "data.width", "32", "data.workers", "0",
        "train.batch_size", "8", "sampler.train_sampler", "RandomIdentitySampler",
        "sampler.num_instances", "4", "test.batch_size", "32",
        "loss.sn.k", "5",  # SN needs batch - 1 >= k + 1 (docs/methods.md S4)
    ]


def test_config_glob_sees_every_dataset():
    names = {osp.relpath(p, REPO) for p in CONFIGS}
    for ds in ("dukemtmcreid", "msmt17", "cuhk03"):
        assert {f"configs/{ds}/{m}.yaml" for m in ("osnet_x1_0_softmax", "osnet_x1_0_drsl", "r50_baseline",
                                                   "csip", "msff", "msff_msgr", "resnet50_drsl",
                                                   "sn_resnet50")} <= names
    assert "configs/osnet_x1_0_softmax_market.yaml" in names
    assert {"configs/synthreid/ce.yaml", "configs/synthreid/ce_msgr_exact_lazy4.yaml",
            "configs/synthreid/drsl_study/drsl_alone.yaml"} <= names  # the proxy benchmark and DRSL study
    assert not any("/base/" in n for n in names)


@pytest.fixture(scope="module")
def shared(data_root):
    cfg = load_config(None, tiny_step_opts(data_root))
    cfg.use_gpu = False
    dm = build_datamanager(RunOptions(cfg))
    batch = next(iter(dm.train_loader))
    return dm, batch


def signature(cfg):
    """The config with what the tiny overrides make irrelevant (save dir, CUHK03 split) reset."""
    cfg = cfg.clone()
    cfg.data.save_dir = ""
    cfg.cuhk03 = get_default_config().cuhk03
    return cfg.dump()


STEPS = {}  # signature -> (loss, whether the stem changed)


def one_step(cfg, dm, batch):
    torch.manual_seed(0)
    options = RunOptions(cfg)
    model = build_run_model(options.model, dm.num_train_pids, use_gpu=options.use_gpu)
    optimizer = build_optimizer(options, model)
    scheduler = build_scheduler(options, optimizer)
    engine = build_engine(cfg, dm, model, optimizer, scheduler)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    summary = engine.forward_backward(batch)
    first = next(iter(before))  # the stem: the gradient reached the whole backbone
    return summary["loss"], not torch.equal(dict(model.named_parameters())[first], before[first])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: osp.relpath(p, osp.join(REPO, "configs")))
def test_config_builds_and_trains_one_step(path, shared, data_root):
    dm, batch = shared
    cfg = load_config(path, tiny_step_opts(data_root))
    cfg.use_gpu = False
    key = signature(cfg)
    if key not in STEPS:
        STEPS[key] = one_step(cfg, dm, batch)
    loss, stem_changed = STEPS[key]
    assert math.isfinite(loss) and stem_changed, (loss, stem_changed)
