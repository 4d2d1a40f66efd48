"""Shared fixtures: a generated data root and tiny run configurations."""
import os
import socket

import pytest

import torchreid_ext  # noqa: F401  (registers synthreid / synthreid_small)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root shared by the session; datasets are generated on first use."""
    return str(tmp_path_factory.mktemp("reid-data"))


def tiny_opts(root, save_dir, **overrides):
    """KEY VALUE overrides for a seconds-long run on synthreid_small at 64x32."""
    opts = {
        "model.name": "osnet_x0_25",
        "model.pretrained": "False",
        "data.root": root,
        "data.sources": "[synthreid_small]",
        "data.targets": "[synthreid_small]",
        "data.height": "64",
        "data.width": "32",
        "data.workers": "0",
        "data.save_dir": save_dir,
        "sampler.train_sampler": "RandomIdentitySampler",
        "sampler.num_instances": "4",
        "train.batch_size": "16",
        "train.max_epoch": "2",
        "train.lr": "0.003",
        "train.stepsize": "[10]",
        "train.print_freq": "1000",
        "test.batch_size": "64",
    }
    opts.update({k: str(v) for k, v in overrides.items()})
    return [x for kv in opts.items() for x in kv]


def tiny_setup(root, save_dir, **base):
    """``make(**overrides) -> (cfg, datamanager)`` for tiny runs (``base`` overrides first);
    the datamanager is built on the first call and shared."""
    from torchreid_ext import cli

    cache = {}

    def make(**overrides):
        cfg, _ = cli.load_run_config(tiny_opts(root, save_dir, **{**base, **overrides}))
        if "dm" not in cache:
            cache["dm"] = cli.build_datamanager(cfg)
        return cfg, cache["dm"]

    return make


@pytest.fixture
def tiny(data_root, tmp_path):
    """``tiny(**overrides)`` -> argv overrides for a run saving under tmp_path/log."""

    def make(save_dir=None, **overrides):
        return tiny_opts(data_root, save_dir or str(tmp_path / "log"), **overrides)

    return make


def free_port() -> int:
    """A TCP port free on localhost now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
