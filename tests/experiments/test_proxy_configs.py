"""configs/synthreid/: the proxy benchmark rows share one recipe and differ only where they say."""
import glob
import os.path as osp

import pytest

from conftest import REPO
from torchreid_ext.config import flat_keys, load_config

ROWS = {  # file -> what the row is
    "ce": "softmax", "ce_triplet": "triplet", "ce_drsl": "drsl", "sn": "sn",
    "ce_msgr_exact": "softmax", "ce_msgr_fast": "softmax", "ce_msgr_exact_lazy4": "softmax",
}
STUDY = {  # DRSL study file -> the one key it changes from ce_drsl.yaml, and its value
    "tau_rel_0.02": ("loss.drsl.tau_rel", 0.02), "tau_rel_0.1": ("loss.drsl.tau_rel", 0.1),
    "tau_rel_0.2": ("loss.drsl.tau_rel", 0.2), "lambda_sort_0": ("loss.drsl.lambda_sort", 0.0),
    "weight_0.5": ("loss.drsl.weight", 0.5), "weight_2": ("loss.drsl.weight", 2.0),
    "no_label_smooth": ("loss.softmax.label_smooth", False), "drsl_alone": ("loss.drsl.weight_x", 0.0),
}
# what a row may change: the loss, MSGR, and where it saves
ROW_KEYS = ("loss.", "msgr.", "data.save_dir")


def path(name):
    return osp.join(REPO, "configs", "synthreid", f"{name}.yaml")


def flat(cfg):
    out = {}
    for key in flat_keys(cfg):
        node = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def differing(a, b):
    fa, fb = flat(a), flat(b)
    return {k for k in fa if fa[k] != fb[k]}


def test_the_folder_holds_exactly_the_rows_and_the_study():
    found = {osp.relpath(p, osp.join(REPO, "configs", "synthreid"))[:-5]
             for p in glob.glob(osp.join(REPO, "configs", "synthreid", "**", "*.yaml"), recursive=True)}
    expected = set(ROWS) | {f"drsl_study/{n}" for n in STUDY} | {"drsl_study/ce_no_label_smooth",
                                                                "base/proxy_osnet"}
    assert found == expected


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rows_share_backbone_schedule_and_sampler(name):
    cfg, base = load_config(path(name)), load_config(path("base/proxy_osnet"))
    assert cfg.loss.name == ROWS[name]
    assert cfg.model.name == "osnet_x0_25" and not cfg.model.pretrained
    assert list(cfg.data.sources) == list(cfg.data.targets) == ["synthreid"]
    assert (cfg.data.height, cfg.data.width, cfg.train.max_epoch) == (64, 32, 40)
    assert cfg.sampler.train_sampler == "RandomIdentitySampler"  # ranking losses need positives
    assert cfg.data.save_dir == f"log/synthreid/{name}"
    changed = differing(cfg, base)
    assert all(k.startswith(ROW_KEYS) for k in changed), sorted(changed)


def test_msgr_rows():
    exact, fast, lazy = (load_config(path(n)) for n in ("ce_msgr_exact", "ce_msgr_fast", "ce_msgr_exact_lazy4"))
    assert exact.msgr.enabled and list(exact.msgr.stages) == ["conv2", "conv3"]
    assert (exact.msgr.mode, exact.msgr.q, list(exact.msgr.eps), exact.msgr.interval) == ("exact", 2.0, [0.01], 1)
    assert differing(fast, exact) == {"msgr.mode", "data.save_dir"} and fast.msgr.mode == "fast"
    assert differing(lazy, exact) == {"msgr.interval", "data.save_dir"} and lazy.msgr.interval == 4
    for name in ("ce", "ce_triplet", "ce_drsl", "sn"):
        assert not load_config(path(name)).msgr.enabled


def test_loss_rows():
    ce, tri, drsl, sn = (load_config(path(n)) for n in ("ce", "ce_triplet", "ce_drsl", "sn"))
    assert ce.loss.softmax.label_smooth
    assert (tri.loss.triplet.weight_x, tri.loss.triplet.weight_t) == (1.0, 1.0)
    assert (drsl.loss.drsl.weight_x, drsl.loss.drsl.weight, drsl.loss.drsl.tau_rel,
            drsl.loss.drsl.lambda_sort) == (1.0, 1.0, 0.05, 1.0)
    assert sn.loss.sn.weight_x == 0.0  # SN alone, as its authors train it


@pytest.mark.parametrize("name", sorted(STUDY))
def test_drsl_study_varies_one_knob(name):
    cfg, row = load_config(path(f"drsl_study/{name}")), load_config(path("ce_drsl"))
    key, value = STUDY[name]
    assert differing(cfg, row) == {key, "data.save_dir"}
    assert flat(cfg)[key] == value
    assert cfg.data.save_dir == f"log/synthreid/drsl_study/{name}"


def test_drsl_study_reference_is_ce_without_label_smoothing():
    cfg = load_config(path("drsl_study/ce_no_label_smooth"))
    assert differing(cfg, load_config(path("ce"))) == {"loss.softmax.label_smooth", "data.save_dir"}
    assert cfg.loss.name == "softmax" and not cfg.loss.softmax.label_smooth
