"""Checkpoints: weights-only loading with a numpy allowlist, atomic saves, RNG state."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

from torchreid_ext.adapter import torchreid
from torchreid_ext.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    resume_from_checkpoint,
    save_checkpoint,
)


def small_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    tr = torchreid()
    opt = tr.optim.build_optimizer(model, optim="adam", lr=0.01)
    sched = tr.optim.build_lr_scheduler(opt, lr_scheduler="multi_step", stepsize=[2, 4])
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_torchreid_checkpoint_with_numpy_scalar_loads(tmp_path):
    """Torchreid's own save_checkpoint pickles rank1 as a numpy scalar."""
    model, opt, sched = small_setup()
    state = {"state_dict": model.state_dict(), "epoch": 3, "rank1": np.float32(0.625),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    torchreid().utils.save_checkpoint(state, str(tmp_path))
    ckpt = load_checkpoint(str(tmp_path / "model.pth.tar-3"))
    assert float(ckpt["rank1"]) == 0.625
    model2, opt2, sched2 = small_setup()
    for p in model2.parameters():
        p.data.zero_()
    epoch = resume_from_checkpoint(str(tmp_path / "model.pth.tar-3"), model2, opt2, sched2)
    assert epoch == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch


def test_file_needing_other_globals_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*run code"):
        load_checkpoint(str(path))


def test_saved_values_are_plain(tmp_path):
    path = save_checkpoint({"rank1": np.float64(0.5), "arr": np.arange(3), "nested": [np.int64(2)]},
                           str(tmp_path / "c.pth"))
    # loads without any allowlist at all
    ckpt = torch.load(path, weights_only=True)
    assert type(ckpt["rank1"]) is float and type(ckpt["nested"][0]) is int
    assert torch.equal(ckpt["arr"], torch.arange(3))


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth.tar-1")
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def dying_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["model.pth.tar-1"]  # no temp file left


def test_truncated_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "model.pth.tar-1")
    save_checkpoint({"w": torch.ones(1000)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError,
                       match=r"is a zip archive that is not a readable PyTorch checkpoint \(truncated or damaged\?\)"):
        load_checkpoint(path)


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = save_checkpoint({"rng": capture_rng_state()}, str(tmp_path / "rng.pth"))
    want = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert got == want


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for e in (1, 10, 2):
        (tmp_path / f"model.pth.tar-{e}").write_bytes(b"")
    (tmp_path / "model.pth.tar-11.tmp-123").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("model.pth.tar-10")


# ---------------------------------------------------------------- every weights path is safe


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _RunsCode(str(marker))}, str(path))
    return str(path), marker


def test_load_weights_never_runs_code_even_when_torch_is_told_to(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes torch.load unpickle anything unless the call
    says weights_only=True; every weights path must say so."""
    from torchreid_ext.checkpoint import load_pretrained_weights

    path, marker = _evil_checkpoint(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="posix.system|os.system|nt.system"):
        load_pretrained_weights(model, path)
    with pytest.raises(CheckpointError):
        resume_from_checkpoint(path, model)
    assert not marker.exists()


def test_cli_load_weights_and_resume_refuse_a_code_running_file(tiny, tmp_path):
    """End to end, in a fresh process with the unsafe environment variable set."""
    import subprocess
    import sys

    from conftest import REPO

    path, marker = _evil_checkpoint(tmp_path)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    for opts in ({"test.evaluate": True, "model.load_weights": path}, {"model.resume": path}):
        save = tmp_path / f"run-{len(opts)}"
        proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "main.py"),
                               *tiny(save_dir=str(save), **opts)], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Refusing to load" in proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists()


def test_upstream_torchreid_checkpoint_loads_as_pretrained_weights(tmp_path):
    """Torchreid's save_checkpoint pickles numpy scalars; load_weights reads it through the
    allowlist and copies every tensor that fits (a classifier of another size is skipped)."""
    from torchreid_ext.checkpoint import load_pretrained_weights

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    torchreid().utils.save_checkpoint({"state_dict": src.state_dict(), "epoch": 2, "rank1": np.float64(0.5)},
                                      str(tmp_path))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 7))
    report = load_pretrained_weights(dst, str(tmp_path / "model.pth.tar-2"))
    assert report["loaded"] == ["0.weight", "0.bias"] and report["skipped"] == ["1.weight", "1.bias"]
    assert torch.equal(dst[0].weight, src[0].weight)
    with pytest.raises(CheckpointError, match=r"Sequential.*'1.weight'"):
        load_pretrained_weights(dst, str(tmp_path / "model.pth.tar-2"), strict=True, ignore=())
    with pytest.raises(CheckpointError, match=r"no tensor matches.*first mismatching key"):
        load_pretrained_weights(torch.nn.Conv2d(1, 1, 1), str(tmp_path / "model.pth.tar-2"))


def test_non_utf8_string_in_the_pickle_is_a_checkpoint_error(tmp_path):
    import zipfile

    good = tmp_path / "good.pth"
    torch.save({"state_dict": {}, "name": "ZZZZZZZZ"}, str(good))
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"ZZZZZZZZ" in data
                data = data.replace(b"ZZZZZZZZ", b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc")
            dst.writestr(info, data)
    with pytest.raises(CheckpointError, match=r"is a zip archive that is not a readable PyTorch checkpoint.*utf-8"):
        load_checkpoint(str(bad))


# ---------------------------------------------------------------- a full disk


def _full_disk_writer(error):
    """A torch.save that writes part of the file, then fails as torch does on a full disk."""

    def save(obj, f):
        f.write(b"PK partial")
        raise error

    return save


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),  # ENOSPC from the file's write
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch's zip writer
])
def test_full_disk_says_so_and_names_the_file(tmp_path, monkeypatch, error):
    import errno

    from torchreid_ext.checkpoint import DiskFullError

    path = str(tmp_path / "model.pth.tar-2")
    save_checkpoint({"epoch": 1}, str(tmp_path / "model.pth.tar-1"))
    monkeypatch.setattr(torch, "save", _full_disk_writer(error))
    with pytest.raises(DiskFullError, match=r"no space left on device: could not write '.*model\.pth\.tar-2'") as info:
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert info.value.__cause__ is error  # the original error stays in the traceback
    assert sorted(os.listdir(tmp_path)) == ["model.pth.tar-1"]  # no partial or temp file
    assert load_checkpoint(str(tmp_path / "model.pth.tar-1"))["epoch"] == 1


def _runtime_error_with_context(code):
    """What torch raises when a Python file's write fails mid-save: its RuntimeError, with the
    OSError as context (seen on a full tmpfs)."""

    def save(obj, f):
        try:
            raise OSError(code, os.strerror(code))
        except OSError:  # implicitly chained (__context__, not __cause__), as torch raises it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: B904

    return save


def test_torch_runtime_error_over_enospc_is_a_full_disk_and_over_eio_is_not(tmp_path, monkeypatch):
    import errno

    from torchreid_ext.checkpoint import DiskFullError

    monkeypatch.setattr(torch, "save", _runtime_error_with_context(errno.ENOSPC))
    with pytest.raises(DiskFullError, match="no space left on device"):
        save_checkpoint({"epoch": 1}, str(tmp_path / "c.pth"))
    monkeypatch.setattr(torch, "save", _runtime_error_with_context(errno.EIO))
    with pytest.raises(RuntimeError, match="unexpected pos") as info:
        save_checkpoint({"epoch": 1}, str(tmp_path / "c.pth"))
    assert not isinstance(info.value, DiskFullError)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [
    OSError(5, "Input/output error"),
    RuntimeError("something else went wrong"),
])
def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch, error):
    monkeypatch.setattr(torch, "save", _full_disk_writer(error))
    with pytest.raises(type(error)) as info:
        save_checkpoint({"epoch": 1}, str(tmp_path / "c.pth"))
    assert info.value is error
    assert os.listdir(tmp_path) == []
