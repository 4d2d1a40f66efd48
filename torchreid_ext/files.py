"""Files written safely: whole or not at all, with clear errors, and no litter from killed runs.

* :func:`atomic_output`: write to ``.<name>.tmp-<pid>`` beside the target, then rename it into
  place; any failure (or Ctrl-C) removes the temporary file and leaves the target as it was. A
  full disk is a :class:`~torchreid_ext.errors.DiskFullError` naming the file.
* :func:`remove_stale_temps`: temporary files of processes that no longer run (a killed run)
  are removed the next time a file is written there.
* :func:`probe_writable`: a folder is writable when a file can really be created and removed
  there (``os.access`` says yes for root on a read-only mount, or in ``/proc``).
* :func:`check_output_path`: an output file's folder exists, is a folder and is writable; what is
  at the path now is nothing or a regular file (never a device, a FIFO or a symbolic link), not
  an input of the same command, and, unless forced, a file of the kind the command writes.
* Only a regular file is ever replaced: :func:`atomic_output` refuses anything else at the path.
* :func:`write_json_atomic`: a JSON record written that way; :data:`METRICS_FILE` and
  :data:`TEST_METRICS_FILE` name the records a run writes into its save dir (and an evaluation of
  saved features into its folder), which the other commands read.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import os.path as osp
import re
import shutil
import stat
import tempfile
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple

from .errors import DeployInputError, DiskFullError, InputNotFound, OutputPathError

__all__ = ["TEMP_SUFFIX", "pid_alive", "temp_path", "remove_stale_temps", "probe_writable", "nearest_existing",
           "missing_folder_reason", "missing_file_reason", "check_output_path", "atomic_output", "disk_full_errno",
           "not_a_regular_file", "OutputKind", "write_json_atomic", "METRICS_FILE", "TEST_METRICS_FILE",
           "read_text", "file_lock"]

logger = logging.getLogger(__name__)

TEMP_SUFFIX = re.compile(r"\.tmp-(\d+)$")  # <file>.tmp-<pid>: a temporary file of process <pid>
METRICS_FILE = "metrics.json"  # a run's record: run info and every evaluation's results
TEST_METRICS_FILE = "metrics-test.json"  # an evaluation-only run's (test.evaluate), beside the training run's
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def temp_path(path: str) -> str:
    """The temporary name this process writes ``path`` under (hidden, beside it)."""
    return osp.join(osp.dirname(osp.abspath(path)), f".{osp.basename(path)}.tmp-{os.getpid()}")


def remove_stale_temps(folder: str, stem: Optional[str] = None) -> List[str]:
    """Remove ``*.tmp-<pid>`` files of processes that are not running from ``folder`` (only those
    of file ``stem`` when given); return their paths. Files of live processes stay."""
    removed = []
    if not osp.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = TEMP_SUFFIX.search(name)
        if not m or (stem is not None and name[:m.start()] not in (stem, "." + stem)):
            continue
        path = osp.join(folder, name)
        if osp.isfile(path) and not pid_alive(int(m.group(1))):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("Removed %d temporary file(s) left by killed runs: %s", len(removed),
                    ", ".join(osp.basename(p) for p in removed))
    return removed


def nearest_existing(path: str) -> str:
    """``path`` made absolute if it exists, else the nearest folder (or file) above it that does."""
    path = osp.abspath(path)
    while not osp.exists(path):
        parent = osp.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def missing_folder_reason(folder: str) -> str:
    """Why ``folder`` cannot be used: it is a file, an ancestor is a file, or it does not exist."""
    full = osp.abspath(folder)
    parent = nearest_existing(full)
    if osp.exists(parent) and not osp.isdir(parent):
        return "is a file, not a folder" if parent == full else f"cannot exist: '{parent}' is a file, not a folder"
    return "does not exist (create it first)"


def missing_file_reason(path: str) -> str:
    """Why ``path`` is not a readable file: it is a folder, an ancestor is a file, or it does not
    exist."""
    if osp.isdir(path):
        return "is a folder, not a file"
    parent = nearest_existing(osp.dirname(osp.abspath(path)))
    if osp.exists(parent) and not osp.isdir(parent):
        return f"cannot exist: '{parent}' is a file, not a folder"
    return "does not exist"


def probe_writable(folder: str) -> Optional[str]:
    """None if a file can be created and removed in ``folder``, else why not (the OS error)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.remove(probe)
    except OSError as exc:
        return f"a file can be created but not removed ({exc.strerror or exc})"
    return None


def not_a_regular_file(path: str) -> Optional[str]:
    """What is at ``path`` when it exists and is not a regular file ('a symbolic link to ...', 'a FIFO',
    'a character device' ...), else None. A symbolic link is never followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to '{os.readlink(path)}')"
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_replacing(path: str, what: str = "output") -> None:
    """OutputPathError unless ``path`` is absent or a regular file (the only thing an output replaces)."""
    found = not_a_regular_file(path)
    if found:
        raise OutputPathError(f"{what} '{path}' is {found}; only a regular file is ever replaced: "
                              "give the path of a new or regular file")


# (what the command writes, e.g. "an HDF5 features file"; whether an existing file is one)
OutputKind = Tuple[str, Callable[[str], bool]]


def check_output_path(path: str, what: str = "output", inputs: Optional[Mapping[str, str]] = None,
                      kind: Optional[OutputKind] = None, force: bool = False) -> str:
    """``path`` made absolute, after checking that its folder exists and is writable (a file is
    really created and removed there), that ``path`` is not a folder, a device, a FIFO or a symbolic
    link, that it is none of ``inputs`` (``{option: path}`` of the same command, compared by real
    path) and, unless ``force``, that an existing file there is of ``kind``."""
    if not path:
        raise DeployInputError(f"no {what} path given")
    full = osp.abspath(osp.expanduser(path))
    folder = osp.dirname(full)
    if not osp.isdir(folder):
        raise InputNotFound(f"{what} '{path}': folder '{folder}' {missing_folder_reason(folder)}")
    if osp.isdir(full) and not osp.islink(full):
        raise DeployInputError(f"{what} '{path}' is a folder; give a file name")
    _refuse_replacing(full, what)
    for option, given in (inputs or {}).items():
        if given and osp.exists(given) and osp.realpath(given) == osp.realpath(full):
            raise OutputPathError(f"{what} '{path}' is also this command's {option} '{given}' (an input); "
                                  "writing it would destroy the input: give another output path")
    if kind is not None and osp.exists(full) and not force:
        description, is_kind = kind
        if not is_kind(full):
            raise OutputPathError(f"{what} '{path}' exists and is not {description}; it is left alone: "
                                  "give another path, or --force to replace it")
    problem = probe_writable(folder)
    if problem:
        raise DeployInputError(f"{what} '{path}': cannot write in folder '{folder}' ({problem})")
    return full


def disk_full_errno(exc: Optional[BaseException]) -> Optional[int]:
    """ENOSPC / EDQUOT if ``exc`` says the disk or quota is full, else None.

    torch's zip writer turns a failed write into ``RuntimeError: ... unexpected pos N vs M``
    (the OSError, when it is a Python file's, is the RuntimeError's context). That message
    means the bytes did not reach the file: taken as a full disk unless an OSError with
    another errno (EIO ...) is in the chain."""
    seen = set()
    runtime_pos = False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno if exc.errno in _FULL_ERRNOS else None
        if isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):
            runtime_pos = True
        exc = exc.__cause__ or exc.__context__
    return errno.ENOSPC if runtime_pos else None


def _free_space(directory: str) -> str:
    """Free space of ``directory``'s file system, for messages."""
    try:
        free = float(shutil.disk_usage(directory).free)
    except OSError:
        return "unknown"
    if free < 1024:
        return f"{free:.0f} B"
    for unit in ("KiB", "MiB"):
        free /= 1024
        if free < 1024:
            return f"{free:.1f} {unit}"
    return f"{free / 1024:.1f} GiB"


@contextlib.contextmanager
def atomic_output(path: str, durable: bool = False) -> Iterator[str]:
    """``with atomic_output(path) as tmp:`` write ``tmp``; on leaving the block it is renamed to
    ``path`` (fsync'ed first with ``durable``). Stale temporary files of ``path`` are removed
    first; on any failure the temporary file goes and ``path`` is unchanged. Only a regular file is
    replaced: a device, a FIFO or a symbolic link at ``path`` is an :class:`OutputPathError`."""
    directory = osp.dirname(osp.abspath(path))
    _refuse_replacing(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(directory, osp.basename(path))
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        _refuse_replacing(path)  # what is there may have changed while the file was written
        os.replace(tmp, path)
    except BaseException as exc:
        if osp.exists(tmp):
            os.remove(tmp)
        code = disk_full_errno(exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if code is None:
            raise
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded (no space left on device)"
        previous = "left unchanged" if osp.exists(path) else "not written"
        raise DiskFullError(
            code, f"{what}: could not write '{path}' ({_free_space(directory)} free there); the file was "
                  f"{previous} and earlier files are untouched. Free some space or write elsewhere"
        ) from exc
    if durable:  # make the rename itself durable
        try:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def write_json_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path``, whole or not at all (:func:`atomic_output`)."""
    data = json.dumps(obj, indent=2, sort_keys=False).encode()
    with atomic_output(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def read_text(path: str, what: str, error: type) -> str:
    """The text of ``path``, decoded as UTF-8 (a leading byte-order mark, as Excel writes, is
    dropped). Bytes that are not UTF-8 raise ``error`` (a UserError class) naming ``what``
    ``'path'``, the line and the byte."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                    "save it as UTF-8") from None


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, left in place) for the block:
    processes that build the same file take turns. Released when the block ends or the process
    dies."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
