"""Every installed console command exits 0 on success and 2 on bad input (one line on stderr)."""
import importlib.metadata
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO, tiny_opts

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMANDS = ("torchreid-ext", "torchreid-ext-compare", "torchreid-ext-extract", "torchreid-ext-evaluate",
            "torchreid-ext-export", "torchreid-ext-visualize", "torchreid-ext-search")


def command(name, *argv, cwd=None):
    exe = osp.join(osp.dirname(sys.executable), name)
    assert osp.isfile(exe), f"{name} is installed with the package (pip install -e .)"
    return subprocess.run([exe, *map(str, argv)], capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=cwd,
                          timeout=600)


def entry_point(name):
    """The function the installed command ``name`` runs (its executable passes the returned status to
    ``sys.exit``), from the installed package's metadata: called in this process, it saves a Python
    start and a torch import per call."""
    assert osp.isfile(osp.join(osp.dirname(sys.executable), name)), f"{name} is installed with the package"
    found = importlib.metadata.entry_points()
    scripts = found.select(group="console_scripts") if hasattr(found, "select") else found["console_scripts"]
    (ep,) = [e for e in scripts if e.name == name]
    return ep.load()


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A 1-epoch run by the installed ``torchreid-ext`` (the train command's success case)."""
    folder = tmp_path_factory.mktemp("entry")
    save = folder / "run"
    proc = command("torchreid-ext", *tiny_opts(data_root, str(save), **{"train.max_epoch": 1}))
    return folder, save, proc


def test_train_exits_0_after_a_successful_run(trained):
    _, save, proc = trained
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "synthreid_small" not in proc.stderr  # no results dict printed as an exit message
    assert osp.isfile(save / "model" / "model.pth.tar-1")


def test_every_other_command_exits_0_on_success(trained, data_root):
    folder, save, _ = trained
    weights = save / "model" / "model.pth.tar-1"
    opts = tiny_opts(data_root, str(save))

    def extract(split):
        return ["--weights", weights, "--dataset", "synthreid_small", "--split", split, "--out", folder / f"{split}.h5",
                *opts]

    proc = command("torchreid-ext-extract", *extract("query"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the executable ran above: the gallery's features through the same entry point, in this process
    assert entry_point("torchreid-ext-extract")([str(x) for x in extract("gallery")]) == 0
    runs = {
        "torchreid-ext-evaluate": ["--query", folder / "query.h5", "--gallery", folder / "gallery.h5", "--no-write"],
        "torchreid-ext-export": ["--weights", weights, "--format", "torchscript", "--out", folder / "m.pt", *opts],
        "torchreid-ext-compare": [save, "--out", folder / "cmp"],
        "torchreid-ext-visualize": ["--config", osp.join(REPO, "configs", "quickstart.yaml"), "--weights", weights,
                                    "--out", folder / "ranks", "--num-queries", "2",
                                    "--topk", "3", "--opts", *opts],
    }
    for name, argv in runs.items():
        proc = command(name, *argv)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    assert osp.isfile(folder / "m.pt") and osp.isfile(folder / "cmp" / "results.md")
    assert len(os.listdir(folder / "ranks")) == 2


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_exits_2_on_bad_input_with_one_line(name, tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    argv = {
        "torchreid-ext": ["--config", missing],
        "torchreid-ext-compare": [missing, "--out", tmp_path / "cmp"],
        "torchreid-ext-extract": ["--config", missing, "--images", tmp_path, "--out", tmp_path / "f.h5"],
        "torchreid-ext-evaluate": ["--query", tmp_path / "q.h5", "--gallery", tmp_path / "g.h5"],
        "torchreid-ext-export": ["--config", missing, "--format", "onnx", "--out", tmp_path / "m.onnx"],
        "torchreid-ext-visualize": ["--config", missing],
        "torchreid-ext-search": ["--config", missing, "--query", tmp_path, "--gallery", tmp_path,
                                 "--out", tmp_path / "out"],
    }[name]
    if name == "torchreid-ext-search":  # the one command the success test above does not start: its executable
        proc = command(name, *argv)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    else:  # its executable ran above: the entry point's function, in this process
        capsys.readouterr()
        status = entry_point(name)([str(x) for x in argv])
        out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "does not exist" in lines[0] and "Traceback" not in out + err
    assert sorted(os.listdir(tmp_path)) == []
