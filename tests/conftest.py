"""Shared fixtures: a generated data root and tiny run configurations."""
import os
import socket

import pytest

import torchreid_ext  # noqa: F401  (registers synthreid / synthreid_small)
from torchreid_ext.log import install_console_handler

install_console_handler()  # the tests read the library's log lines as a command line's user does

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the machine's cores: one torch thread each (OpenMP threads of two processes
    # waiting for each other on 2 cores are many times slower), and the same for their subprocesses
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real re-ID data (CUHK03 pair 1, VIPeR, CUHK01, Torchreid model-zoo weights): CI has it next to the
# checkout; elsewhere the tests that need it skip. TORCHREID_EXT_REAL_DATA points elsewhere.
REAL_DATA = os.environ.get("TORCHREID_EXT_REAL_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
MSMT17_WEIGHTS = os.path.join(REAL_DATA, "weights", "osnet_x0_25_msmt17.pth")


@pytest.fixture(scope="session", autouse=True)
def split_cache(tmp_path_factory):
    """Split files of the real-data protocols go to a per-session cache, not the user's."""
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("TORCHREID_EXT_CACHE")
    os.environ["TORCHREID_EXT_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("TORCHREID_EXT_CACHE", None)
    else:
        os.environ["TORCHREID_EXT_CACHE"] = old


@pytest.fixture(scope="session")
def real_data():
    """The real-data root, or skip the test with the reason."""
    if not os.path.isdir(os.path.join(REAL_DATA, "cuhk03_pair1")):
        pytest.skip(f"real re-ID data not found at '{REAL_DATA}' (set TORCHREID_EXT_REAL_DATA)")
    return REAL_DATA


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


def model_for(cfg, num_classes):
    """The model a (validated) config names, built as a run builds it."""
    from torchreid_ext.builders import build_run_model
    from torchreid_ext.run_options import RunOptions

    return build_run_model(RunOptions(cfg).model, num_classes, use_gpu=cfg.use_gpu)


def tiny_setup(root, save_dir, **base):
    """``make(**overrides) -> (cfg, datamanager)`` for tiny runs (``base`` overrides first);
    the datamanager is built on the first call and shared."""
    from torchreid_ext import builders, cli
    from torchreid_ext.run_options import RunOptions

    cache = {}

    def make(**overrides):
        cfg, _ = cli.load_run_config(tiny_opts(root, save_dir, **{**base, **overrides}))
        if "dm" not in cache:
            cache["dm"] = builders.build_datamanager(RunOptions(cfg))
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


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG whose header declares ``width`` x ``height`` pixels with no pixel data: a
    decompression bomb's signature in 65 bytes (issue 31)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
