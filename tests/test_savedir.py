"""savedir.py: the save-dir lock, writability, stale temporary files and the resume rules."""
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import time

import pytest
import torch

from readonly import read_only
from torchreid_ext.checkpoint import save_checkpoint
from torchreid_ext.config import ConfigError
from torchreid_ext.savedir import (
    LOCK_NAME,
    SaveDirError,
    SaveDirLock,
    check_writable,
    checkpoint_epoch,
    pid_alive,
    remove_stale_temp_files,
    resolve_resume,
)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_pid_alive(sleeper):
    assert pid_alive(os.getpid()) and pid_alive(sleeper.pid)
    assert not pid_alive(dead_pid()) and not pid_alive(0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 60
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline  # exited, not reaped yet
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)
    zombie.wait()


def test_lock_is_exclusive_and_released(tmp_path):
    save = str(tmp_path / "run")
    first = SaveDirLock(save).acquire()
    assert first.created and json.load(open(osp.join(save, LOCK_NAME)))["pid"] == os.getpid()
    with pytest.raises(SaveDirError, match=rf"in use by another run \(pid {os.getpid()} on host "
                                           rf"'{socket.gethostname()}'"):
        SaveDirLock(save).acquire()
    first.release()
    assert os.listdir(save) == []
    with SaveDirLock(save) as second:
        assert not second.created and second.taken_over is None
    assert os.listdir(save) == []


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    pid = dead_pid()
    (save / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = SaveDirLock(str(save)).acquire()
    assert lock.taken_over["pid"] == pid
    assert json.load(open(save / LOCK_NAME))["pid"] == os.getpid()
    lock.release()


HOLDER_WITH_A_CHILD = """
import os, sys, time
from torchreid_ext.savedir import SaveDirLock
SaveDirLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # stands for a DataLoader worker: outlives its parent for a while
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_run_is_free_while_its_forked_child_lives(tmp_path):
    """A run SIGKILLed with a DataLoader worker still alive: the worker must not keep the save
    dir locked against the run that resumes it (CI saw the resume refused with exit 2)."""
    save = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_WITH_A_CHILD, save], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        assert pid_alive(child)
        lock = SaveDirLock(save).acquire()
        assert lock.taken_over["pid"] == holder.pid
        lock.release()
    finally:
        os.kill(child, 9)


def test_lock_file_of_a_live_run_refuses_even_without_its_flock(tmp_path, sleeper):
    """A file system that ignores flock: the recorded pid, alive on this host, still wins."""
    save = tmp_path / "run"
    save.mkdir()
    (save / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    with pytest.raises(SaveDirError, match=rf"pid {sleeper.pid}"):
        SaveDirLock(str(save)).acquire()


def test_release_removes_only_a_folder_it_created(tmp_path):
    lock = SaveDirLock(str(tmp_path / "new" / "run")).acquire()
    lock.release(remove_created=True)
    assert os.listdir(tmp_path / "new") == []
    (tmp_path / "old").mkdir()
    lock = SaveDirLock(str(tmp_path / "old")).acquire()
    lock.release(remove_created=True)
    assert (tmp_path / "old").is_dir()


def test_stale_temp_files_of_dead_processes_only_are_removed(tmp_path, sleeper):
    model = tmp_path / "model"
    model.mkdir()
    dead, live = dead_pid(), sleeper.pid
    files = {
        model / f"model.pth.tar-3.tmp-{dead}": False,
        model / f"model.pth.tar-4.tmp-{live}": True,
        tmp_path / f"metrics.json.tmp-{dead}": False,
        model / "model.pth.tar-2": True,
        model / "notes.tmp-x": True,
    }
    for path in files:
        path.write_text("x")
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p, keep in files.items() if not keep)
    assert {p: p.exists() for p in files} == files


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "a" / "b"))  # creatable
    assert os.listdir(tmp_path) == []  # checked, nothing made
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveDirError, match=r"data.save_dir = '.*file' is a file, not a folder"):
        check_writable(str(tmp_path / "file"))
    with pytest.raises(SaveDirError, match=r"cannot be created: '.*file' is a file"):
        check_writable(str(tmp_path / "file" / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").write_text("x")
    with pytest.raises(SaveDirError, match=r"model folder = '.*run/model' is a file"):
        check_writable(str(tmp_path / "run"))
    ro = tmp_path / "ro"
    (ro / "model").mkdir(parents=True)
    with read_only(ro / "model"):
        with pytest.raises(SaveDirError, match=r"model folder = '.*ro/model' is not writable"):
            check_writable(str(ro))
    with read_only(ro):
        with pytest.raises(SaveDirError, match=r"data.save_dir = '.*ro' is not writable"):
            check_writable(str(ro))
        with pytest.raises(SaveDirError, match=r"'.*ro/new' cannot be created: '.*ro' is not writable"):
            check_writable(str(ro / "new"))


def test_resume_rules(tmp_path):
    save = str(tmp_path / "run")
    model = tmp_path / "run" / "model"
    assert resolve_resume(save, "auto", False, 5) == ""  # nothing to resume: a fresh run
    model.mkdir(parents=True)
    for epoch in (1, 3):
        save_checkpoint({"epoch": epoch, "state_dict": {"w": torch.zeros(1)}}, str(model / f"model.pth.tar-{epoch}"))
    last = str(model / "model.pth.tar-3")
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*model\.resume auto"):
        resolve_resume(save, "", False, 5)
    assert resolve_resume(save, "auto", False, 5) == last  # continue
    assert resolve_resume(save, "auto", False, 3) == last  # finished: re-evaluates
    with pytest.raises(SaveDirError, match=r"already finished at epoch 3 .*train\.max_epoch = 1.*"
                                           r"`test\.evaluate True`"):
        resolve_resume(save, "auto", False, 1)
    assert resolve_resume(save, "auto", True, 1) == last  # evaluation only: any epoch
    assert resolve_resume(save, "", True, 1) == ""
    with pytest.raises(FileNotFoundError, match="model.resume = '/nope' does not exist"):
        resolve_resume(save, "/nope", False, 5)
    odd = str(tmp_path / "weights.pth")
    save_checkpoint({"epoch": 7, "state_dict": {}}, odd)
    assert checkpoint_epoch(odd) == 7 and checkpoint_epoch(last) == 3
    with pytest.raises(SaveDirError, match=r"already finished at epoch 7"):
        resolve_resume(save, odd, False, 5)
