"""A run's save dir (``data.save_dir``): one run at a time, writable, no stale leftovers, and
the rules for continuing what it holds.

* :class:`SaveDirLock`: ``<save_dir>/run.lock`` holds the pid and host of the run using the
  folder, under an exclusive ``flock`` that the kernel drops when that process dies (forked
  children such as DataLoader workers close their copy, so an orphaned worker of a killed run
  does not hold it). A second run refuses, naming the first one's pid; a lock file left by a
  killed run is taken over.
* :func:`check_writable`: the save dir and its ``model/`` folder can be created and written
  (not a file, not read-only), checked before any long work.
* :func:`remove_stale_temp_files`: a run killed while saving leaves ``<file>.tmp-<pid>``
  (the atomic writes of :mod:`torchreid_ext.checkpoint`); those of dead processes go.
* :func:`resolve_resume`: which checkpoint a run continues from, and which runs to refuse.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import os.path as osp
import socket
import time
from typing import Any, Dict, List, Optional

from .checkpoint import CHECKPOINT_NAME, check_checkpoint, latest_checkpoint, load_checkpoint
from .config import ConfigError
from .errors import InputNotFound, SaveDirError
from .files import missing_file_reason, nearest_existing, pid_alive, probe_writable, remove_stale_temps

__all__ = [
    "LOCK_NAME",
    "SaveDirError",
    "SaveDirLock",
    "pid_alive",
    "check_writable",
    "remove_stale_temp_files",
    "checkpoint_epoch",
    "resolve_resume",
]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

# fds of the locks this process holds. A forked child (a DataLoader worker) closes its copies:
# flock belongs to the open file, so a worker that outlives a killed run would otherwise keep
# the save dir locked against the run that resumes it.
_HELD_FDS: "set[int]" = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _hostname() -> str:
    return socket.gethostname()


class SaveDirLock:
    """Exclusive use of a save dir by one run (see the module docstring).

        with SaveDirLock(save_dir):   # SaveDirError if another run holds it
            ...train...

    :meth:`acquire` creates the folder if needed; ``created`` says whether it did, so a
    caller that gives up before writing anything can remove it again (:meth:`release`
    with ``remove_created=True``).
    """

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = osp.join(save_dir, LOCK_NAME)
        self.created = False
        self.taken_over: Optional[Dict[str, Any]] = None
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            info = json.loads(raw.decode() or "{}")
        except (UnicodeDecodeError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _refuse(self, holder: Dict[str, Any]) -> SaveDirError:
        who = f"pid {holder.get('pid', '?')} on host '{holder.get('host', '?')}'"
        since = f", since {holder['started']}" if holder.get("started") else ""
        return SaveDirError(
            f"data.save_dir = '{self.save_dir}' is in use by another run ({who}{since}); wait for it "
            f"to finish or choose another data.save_dir (if that process is gone, delete '{self.path}')"
        )

    def acquire(self) -> "SaveDirLock":
        if self._fd is not None:
            return self
        if not osp.isdir(self.save_dir):
            os.makedirs(self.save_dir, exist_ok=True)
            self.created = True
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = self._read(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(holder) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            previous = self._read(fd)
            mine = previous.get("pid") == os.getpid() and previous.get("host") == _hostname()
            if (previous.get("host") == _hostname() and not mine
                    and pid_alive(int(previous.get("pid", -1)))):
                # flock not enforced on this file system, but the recorded run is alive
                os.close(fd)
                raise self._refuse(previous)
            info = {"pid": os.getpid(), "host": _hostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd = fd
            _HELD_FDS.add(fd)
            if previous.get("pid") and not mine:
                self.taken_over = previous
                logger.info("Took over the lock in '%s' left by pid %s on host '%s' (no longer running)",
                            self.save_dir, previous.get("pid"), previous.get("host"))
            return self
        raise SaveDirError(f"could not lock data.save_dir = '{self.save_dir}': '{self.path}' keeps "
                           "being replaced by other runs")

    def release(self, remove_created: bool = False) -> None:
        """Drop the lock and its file; with ``remove_created``, also the save dir if this lock
        created it and it is empty again."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        except FileNotFoundError:
            pass
        finally:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)
            self._fd = None
        if remove_created and self.created:
            try:
                os.rmdir(self.save_dir)
            except OSError:
                pass

    def __enter__(self) -> "SaveDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(save_dir: str) -> None:
    """Raise SaveDirError unless ``save_dir`` and ``save_dir/model`` are (or can be made)
    writable folders; writes nothing."""
    for key, path in (("data.save_dir", save_dir), ("data.save_dir's model folder", osp.join(save_dir, "model"))):
        if osp.exists(path) and not osp.isdir(path):
            raise SaveDirError(f"{key} = '{path}' is a file, not a folder; choose another data.save_dir")
        existing = nearest_existing(path)
        if not osp.isdir(existing):
            raise SaveDirError(f"{key} = '{path}' cannot be created: '{existing}' is a file, not a folder")
        problem = probe_writable(existing)
        if problem:
            what = f"'{path}'" if existing == osp.abspath(path) else f"'{path}' cannot be created: '{existing}'"
            raise SaveDirError(f"{key} = {what} is not writable ({problem}); "
                               "choose another data.save_dir or fix its permissions")


def remove_stale_temp_files(save_dir: str) -> List[str]:
    """Remove ``*.tmp-<pid>`` files of processes that are not running from ``save_dir`` and
    ``save_dir/model``; return their paths. Files of live processes stay."""
    return [p for folder in (save_dir, osp.join(save_dir, "model")) for p in remove_stale_temps(folder)]


def checkpoint_epoch(path: str) -> int:
    """How many epochs the checkpoint at ``path`` finished (its name, else its ``epoch``); the file
    is read and its structure checked (:func:`~torchreid_ext.checkpoint.check_checkpoint`) either way,
    so that a damaged or crafted checkpoint is refused before any work."""
    ckpt = check_checkpoint(load_checkpoint(path), path, resume=True)
    m = CHECKPOINT_NAME.search(osp.basename(path))
    if m:
        return int(m.group(1))
    return int(ckpt.get("epoch", 0))


def resolve_resume(save_dir: str, resume: str, evaluate: bool, max_epoch: int) -> str:
    """The checkpoint a run continues from ('' for none), from ``model.resume`` ('' | 'auto' |
    a path); refuses a training run that would overwrite checkpoints or go back in epochs."""
    model_dir = osp.join(save_dir, "model")
    if resume == "auto":
        path = latest_checkpoint(model_dir) or ""
    elif resume and not osp.isfile(resume):
        raise InputNotFound(f"model.resume = '{resume}' {missing_file_reason(resume)}")
    else:
        path = resume
    if evaluate:
        if path:
            check_checkpoint(load_checkpoint(path), path, resume=True)
        return path
    existing = latest_checkpoint(model_dir)
    if existing and not path:
        raise ConfigError(
            f"data.save_dir = '{save_dir}' already holds checkpoints (e.g. '{existing}'); "
            "a new run would overwrite them. Continue it with `model.resume auto`, or choose "
            "another data.save_dir."
        )
    if path:
        done = checkpoint_epoch(path)
        if done > max_epoch:
            raise SaveDirError(
                f"model.resume = '{resume}': the run already finished at epoch {done} ('{path}'), past "
                f"train.max_epoch = {max_epoch}; to re-evaluate it, run with `test.evaluate True`; "
                f"to train further, set train.max_epoch above {done}"
            )
    return path
