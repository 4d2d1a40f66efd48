"""The adapter resolves both Torchreid layouts; registration works against either."""
import glob
import importlib
import os.path as osp
import re
import sys
import textwrap

import pytest

import torchreid_ext
from torchreid_ext import adapter, plugin
from torchreid_ext.adapter import TorchreidNotFound, resolve, torchreid

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

FAKE_MODULES = {
    "models/__init__.py": "__model_factory = {'fake_net': object}\n",
    "data/__init__.py": "from {pkg}.data.datasets import register_image_dataset\n",
    "data/datasets/__init__.py": textwrap.dedent(
        """
        __image_datasets = {'fakeset': object}
        def register_image_dataset(name, dataset):
            if name in __image_datasets:
                raise ValueError('The given name already exists')
            __image_datasets[name] = dataset
        """
    ),
    "data/datasets/dataset.py": "def read_image(path):\n    raise AssertionError('not patched')\n",
    "data/sampler.py": "AVAI_SAMPLERS = ['RandomSampler']\n",
    "engine/__init__.py": "",
    "losses/__init__.py": "",
    "metrics/__init__.py": "",
    "optim/__init__.py": "",
    "utils/__init__.py": "",
    "utils/torchtools.py": "def load_checkpoint(fpath):\n    raise AssertionError('not patched')\n",
}


def make_fake(tmp_path, top, prefix):
    """Write a Torchreid-like package tree: ``prefix`` is 'top' or 'top.reid'."""
    base = tmp_path.joinpath(*prefix.split("."))
    for rel, text in FAKE_MODULES.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{pkg}", prefix))
    for d in [tmp_path / top] + [p for p in base.rglob("*") if p.is_dir()] + [base]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.split(".")[0] in ("fakeupstream", "fakepypi"):
            del sys.modules[name]


def test_real_torchreid_resolves_to_pypi_layout():
    tr = torchreid()
    assert tr.prefix == "torchreid.reid" and tr.layout == "pypi"
    assert "osnet_x1_0" in tr.model_factory()
    assert "market1501" in tr.image_datasets()


def test_upstream_layout(fake_path):
    make_fake(fake_path, "fakeupstream", "fakeupstream")
    api = resolve("fakeupstream")
    assert api.prefix == "fakeupstream" and api.layout == "upstream"
    assert api.model_factory() == {"fake_net": object}
    assert api.models.__name__ == "fakeupstream.models"


def test_pypi_layout(fake_path):
    make_fake(fake_path, "fakepypi", "fakepypi.reid")
    api = resolve("fakepypi")
    assert api.prefix == "fakepypi.reid" and api.layout == "pypi"
    assert api.datasets.__name__ == "fakepypi.reid.data.datasets"


def test_missing_torchreid_is_a_clear_error():
    with pytest.raises(TorchreidNotFound, match="pip install torchreid"):
        resolve("surely_not_a_package_xyz")


@pytest.mark.parametrize("top, prefix", [("fakeupstream", "fakeupstream"), ("fakepypi", "fakepypi.reid")])
def test_register_into_either_layout_twice(fake_path, monkeypatch, top, prefix):
    make_fake(fake_path, top, prefix)
    api = resolve(top)
    monkeypatch.setattr(adapter, "_API", api)
    plugin.register()
    plugin.register()  # harmless: the fake registry raises on duplicates like Torchreid's
    assert set(torchreid_ext.models.MODELS) <= set(api.model_factory())
    assert api.image_datasets()["synthreid"] is torchreid_ext.data.SyntheticReID
    assert api.dataset_base.read_image is torchreid_ext.data.checks.read_image
    assert api.torchtools.load_checkpoint is torchreid_ext.checkpoint.load_checkpoint


def test_dataset_name_taken_by_another_class_is_an_error(fake_path, monkeypatch):
    make_fake(fake_path, "fakeupstream", "fakeupstream")
    api = resolve("fakeupstream")
    api.image_datasets()["synthreid"] = dict  # somebody else's dataset
    monkeypatch.setattr(adapter, "_API", api)
    with pytest.raises(ValueError, match="already has a dataset named 'synthreid'"):
        plugin.register()


def test_reimport_registers_again_harmlessly():
    importlib.reload(torchreid_ext)
    tr = torchreid()
    assert tr.image_datasets()["synthreid"].__name__ == "SyntheticReID"
    assert tr.models.build_model  # factory untouched otherwise


def _sources():
    for pattern in ("torchreid_ext/**/*.py", "scripts/*.py", "benchmarks/*.py", "tests/*.py"):
        yield from glob.glob(osp.join(ROOT, pattern), recursive=True)


def test_only_the_adapter_imports_torchreid_layout():
    layout_import = re.compile(r"^\s*(from|import)\s+torchreid(\.reid)?(\.|\s|$)", re.M)
    offenders = [
        osp.relpath(p, ROOT) for p in _sources()
        if not p.endswith(osp.join("torchreid_ext", "adapter.py")) and layout_import.search(open(p).read())
    ]
    assert offenders == []


def test_no_hard_coded_cuda_calls():
    offenders = []
    for p in _sources():
        if "/tests/" in p:
            continue
        for i, line in enumerate(open(p), 1):
            if ".cuda()" in line and not line.strip().startswith("#"):
                offenders.append(f"{osp.relpath(p, ROOT)}:{i}")
    assert offenders == []
