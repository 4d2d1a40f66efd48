"""ReIDEngine's run, checkpoints and resume: the last checkpoint is written before the final
evaluation, rolling checkpoints are pruned after a resume, the LR schedule and the RNG streams
survive a resume, output goes through logging, and a full disk says so."""
import errno
import json
import logging
import os
import os.path as osp
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_opts
from torchreid_ext import cli
from torchreid_ext.adapter import TorchreidAPI, torchreid
from torchreid_ext.checkpoint import DiskFullError, load_checkpoint
from torchreid_ext.engines import base
from torchreid_ext.engines.base import ReIDEngine


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tests train through the CLI; on a shared 2-core machine two OpenMP threads spin
    against other processes (measured: 0.7 s per tiny batch with one thread, 12-19 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Stands for a kill between two epochs."""


def stop_before_epoch(monkeypatch, epoch):
    """Make ReIDEngine.train raise when it reaches ``epoch`` (0-based): the checkpoints of the
    epochs before it are on disk, as after a kill."""
    train = ReIDEngine.train

    def stopping(self, *args, **kwargs):
        if self.epoch == epoch:
            raise Interrupted(f"stopped before epoch {epoch + 1}")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ReIDEngine, "train", stopping)


def checkpoints(save_dir):
    return sorted(os.listdir(osp.join(save_dir, "model")))


def evaluated_epochs(save_dir):
    with open(osp.join(save_dir, "metrics.json")) as f:
        return [e["epoch"] for e in json.load(f)["evaluations"]]


# ---------------------------------------------------------------- the final evaluation


def test_failed_final_evaluation_keeps_the_trained_checkpoint_and_resume_only_evaluates(tiny, tmp_path,
                                                                                       monkeypatch):
    save = str(tmp_path / "run")
    trained = {}

    def failing_test(self, **options):
        trained.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        raise RuntimeError("the evaluator crashed")

    with monkeypatch.context() as m:
        m.setattr(ReIDEngine, "test", failing_test)
        with pytest.raises(RuntimeError, match="the evaluator crashed"):
            cli.train(tiny(save_dir=save, **{"train.max_epoch": 1}))
    assert checkpoints(save) == ["model.pth.tar-1"]
    ckpt = load_checkpoint(osp.join(save, "model", "model.pth.tar-1"))
    assert ckpt["epoch"] == 1 and ckpt["max_epoch"] == 1 and ckpt["history"] == []
    assert trained and ckpt["state_dict"].keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(ckpt["state_dict"][key], value), key

    def no_training(self, *args, **kwargs):
        raise AssertionError("a resumed run whose training had finished must not train")

    with monkeypatch.context() as m:
        m.setattr(ReIDEngine, "train", no_training)
        results = cli.train(tiny(save_dir=save, **{"train.max_epoch": 1, "model.resume": "auto"}))
    assert checkpoints(save) == ["model.pth.tar-1"]
    ckpt = load_checkpoint(osp.join(save, "model", "model.pth.tar-1"))
    for key, value in trained.items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    # the checkpoint now records its evaluation, like an uninterrupted run's
    assert ckpt["rank1"] == pytest.approx(results["synthreid_small"]["rank1"])
    assert [e["epoch"] for e in ckpt["history"]] == [1]
    assert evaluated_epochs(save) == [1]


# ---------------------------------------------------------------- resume: pruning and the LR schedule

MILESTONES = {"train.lr_scheduler": "multi_step", "train.stepsize": "[2, 4]", "train.gamma": 0.1,
              "train.lr": 0.003, "train.max_epoch": 4, "train.checkpoint_freq": 1}


@pytest.fixture(scope="module")
def resumed_runs(data_root, tmp_path_factory):
    """An uninterrupted 4-epoch run and one stopped after epoch 3 and resumed, with a checkpoint
    every epoch and LR milestones at 2 and 4 (the resumed epoch 4 ends at the second)."""
    top = tmp_path_factory.mktemp("resume")
    straight, resumed = str(top / "straight"), str(top / "resumed")
    cli.train(tiny_opts(data_root, straight, **MILESTONES))
    with pytest.MonkeyPatch.context() as m:
        stop_before_epoch(m, 3)
        with pytest.raises(Interrupted):
            cli.train(tiny_opts(data_root, resumed, **MILESTONES))
    interrupted = checkpoints(resumed)
    at_resume = load_checkpoint(osp.join(resumed, "model", interrupted[-1]))
    cli.train(tiny_opts(data_root, resumed, **MILESTONES, **{"model.resume": "auto"}))
    return SimpleNamespace(straight=straight, resumed=resumed, interrupted=interrupted, at_resume=at_resume)


def test_resume_prunes_the_rolling_checkpoint_it_started_from(resumed_runs):
    assert resumed_runs.interrupted == ["model.pth.tar-3"]  # rolling: 1 and 2 were pruned
    assert checkpoints(resumed_runs.straight) == ["model.pth.tar-4"]
    assert checkpoints(resumed_runs.resumed) == ["model.pth.tar-4"]
    assert evaluated_epochs(resumed_runs.resumed) == [4]


def lrs(ckpt):
    return [g["lr"] for g in ckpt["optimizer"]["param_groups"]]


def test_resume_across_an_lr_milestone_continues_the_schedule(resumed_runs):
    """The resume after epoch 3 must restore the scheduler: its step after epoch 4 reaches the
    milestone, so last_epoch and the LR after it tell a fresh scheduler from a restored one."""
    at_resume = resumed_runs.at_resume
    assert at_resume["scheduler"]["last_epoch"] == 3 and lrs(at_resume) == pytest.approx([0.003 * 0.1])
    got = load_checkpoint(osp.join(resumed_runs.resumed, "model", "model.pth.tar-4"))
    want = load_checkpoint(osp.join(resumed_runs.straight, "model", "model.pth.tar-4"))
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == 4
    assert lrs(got) == lrs(want) == pytest.approx([0.003 * 0.1 ** 2])  # both milestones passed


# ---------------------------------------------------------------- unit engine (no images)


class UnitEngine(ReIDEngine):
    """A ReIDEngine training a linear layer on 8 random vectors (2 batches), no test sets."""

    def forward_backward(self, data):
        x, y = data
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.backward_and_step(loss)
        return {"loss": loss.item()}


def unit_engine(seed=None):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2])
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    dm = SimpleNamespace(train_loader=loader, test_loader={}, sources=[])
    return UnitEngine(dm, model, opt, sched, use_gpu=False, seed=seed)


def test_resume_keeps_an_evaluated_checkpoint_and_prunes_a_rolling_one(tmp_path, monkeypatch):
    save = str(tmp_path / "run")
    with monkeypatch.context() as m:
        stop_before_epoch(m, 3)
        with pytest.raises(Interrupted):
            unit_engine().run(save_dir=save, max_epoch=5, eval_freq=2)
    assert checkpoints(save) == ["model.pth.tar-2", "model.pth.tar-3"]  # 2 evaluated, 3 rolling
    engine = unit_engine()
    engine.run(save_dir=save, max_epoch=5, eval_freq=2, start_epoch=engine.resume(osp.join(save, "model",
                                                                                         "model.pth.tar-3")))
    assert checkpoints(save) == ["model.pth.tar-2", "model.pth.tar-4", "model.pth.tar-5"]
    engine = unit_engine()
    engine.run(save_dir=save, max_epoch=7, start_epoch=engine.resume(osp.join(save, "model", "model.pth.tar-5")))
    # a longer run continuing a finished one keeps that one's last checkpoint (6 was rolling)
    assert checkpoints(save) == ["model.pth.tar-2", "model.pth.tar-4", "model.pth.tar-5", "model.pth.tar-7"]


def test_a_rolling_checkpoint_of_another_save_dir_is_never_removed(tmp_path, monkeypatch):
    source, elsewhere = str(tmp_path / "source"), str(tmp_path / "elsewhere")
    with monkeypatch.context() as m:
        stop_before_epoch(m, 2)
        with pytest.raises(Interrupted):
            unit_engine().run(save_dir=source, max_epoch=4)
    assert checkpoints(source) == ["model.pth.tar-2"]  # rolling: epoch 1's was pruned
    engine = unit_engine()
    start = engine.resume(osp.join(source, "model", "model.pth.tar-2"))
    engine.run(save_dir=elsewhere, max_epoch=4, start_epoch=start)
    assert checkpoints(source) == ["model.pth.tar-2"]
    assert checkpoints(elsewhere) == ["model.pth.tar-4"]


def draws():
    return random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()


def test_rng_state_is_restored_for_an_unseeded_engine(tmp_path):
    """seed=None (the Python API's default): nothing reseeds at epoch start, so the RNG streams
    a resumed run continues with are the checkpoint's own."""
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    engine = unit_engine(seed=None)
    engine.save_model(0, 0.0, str(tmp_path), keep=False)
    engine.start_epoch_streams(1)
    want = draws()
    draws()  # the run goes on: the streams move past the checkpoint
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    other = unit_engine(seed=None)
    assert other.resume(str(tmp_path / "model" / "model.pth.tar-1")) == 1
    other.start_epoch_streams(1)
    assert draws() == want


def test_engine_output_goes_through_logging(tmp_path, capsys):
    engine = unit_engine()
    engine.save_model(0, 0.0, str(tmp_path))
    path = str(tmp_path / "model" / "model.pth.tar-1")
    engine.resume(path)
    out = capsys.readouterr().out
    assert f'Checkpoint saved to "{path}"' in out and f"Resumed from '{path}'" in out
    package = logging.getLogger("torchreid_ext")
    level = package.level
    package.setLevel(logging.WARNING)
    try:
        engine.save_model(0, 0.0, str(tmp_path))
        engine.resume(path)
    finally:
        package.setLevel(level)
    assert capsys.readouterr().out == ""


def test_no_torchreid_handle_is_held_at_import():
    held = [name for name, value in vars(base).items() if isinstance(value, TorchreidAPI)]
    assert held == [] and not hasattr(base, "_tr")  # fetched where used, through the adapter
    assert issubclass(ReIDEngine, torchreid().engine.Engine)


def test_start_epoch_past_max_epoch_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"start_epoch = 5 is past max_epoch = 3.*already finished at epoch 5"):
        unit_engine().run(save_dir=str(tmp_path / "run"), max_epoch=3, start_epoch=5)
    assert not osp.exists(tmp_path / "run")


# ---------------------------------------------------------------- a full disk


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
])
def test_full_disk_is_named_and_the_rolling_checkpoint_survives(tmp_path, monkeypatch, error):
    engine = unit_engine()
    engine.save_model(0, 0.0, str(tmp_path), keep=False)
    first = str(tmp_path / "model" / "model.pth.tar-1")
    before = open(first, "rb").read()

    def full(obj, f):
        f.write(b"PK partial")
        raise error

    monkeypatch.setattr(torch, "save", full)
    target = str(tmp_path / "model" / "model.pth.tar-2")
    with pytest.raises(DiskFullError, match=rf"no space left on device: could not write '{re.escape(target)}'") as info:
        engine.save_model(1, 0.0, str(tmp_path), keep=False)
    assert info.value.errno == errno.ENOSPC
    assert checkpoints(str(tmp_path)) == ["model.pth.tar-1"]  # no partial file, no temp file
    assert open(first, "rb").read() == before

