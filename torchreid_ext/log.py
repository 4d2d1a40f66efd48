"""The ``torchreid_ext`` logger and a run's log file.

Library output goes through :mod:`logging`. The console handler (:class:`ConsoleHandler`)
writes the bare message to the *current* ``sys.stdout`` (so Torchreid-style console output, the
run log below and pytest's capture all see it), at INFO level. The command lines install it
(:func:`install_console_handler`); ``import torchreid_ext`` does not. An engine installs it too
(:func:`show_output`) when nothing would show the package logger's lines, as in a plain
Torchreid script that never configures logging: Torchreid's engines print there, and ours show
the same. Users silence or redirect it the usual way::

    logging.getLogger("torchreid_ext").setLevel(logging.WARNING)      # quiet
    logging.getLogger("torchreid_ext").handlers.clear()               # own handlers instead

:class:`RunLog` copies everything a run writes to stdout and stderr (our logger's lines and
Torchreid's own prints alike) to its ``train.log-*`` / ``test.log-*`` file.
Output written before the file is opened is kept in memory and written first, so the run's
checks can finish before anything lands in the save dir. The file is the run's complete
record: the package logger's INFO lines reach it even while the console is silenced or
redirected (the logger's level then applies to its handlers for the duration of the run).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import os.path as osp
import sys
from typing import Iterator, Optional, TextIO

__all__ = ["ConsoleHandler", "PACKAGE_LOGGER", "install_console_handler", "show_output", "RunLog", "without_prints"]

PACKAGE_LOGGER = "torchreid_ext"


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler bound to whatever ``sys.stdout`` is at each record, not at creation."""

    def __init__(self) -> None:
        self.pinned: Optional[TextIO] = None  # set by without_prints: the stdout of before its block
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return self.pinned or sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignored
        pass


def install_console_handler() -> logging.Logger:
    """Give the package logger its console handler once (idempotent); return the logger."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def show_output() -> None:
    """Install the console handler if no handler would show the package logger's records: none on
    it or above it (root). A configured ``logging`` (``basicConfig``, the commands' handler, the
    user's own on ``torchreid_ext``) is left alone, so no line is shown twice."""
    if not logging.getLogger(PACKAGE_LOGGER).hasHandlers():
        install_console_handler()


class _Tee:
    """A text stream that writes to ``stream`` and to the run log's sink."""

    def __init__(self, stream: TextIO, log: "RunLog"):
        self.stream = stream
        self.log = log

    def write(self, msg: str) -> int:
        self.stream.write(msg)
        self.log.record(msg)
        return len(msg)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _RecordHandler(logging.Handler):
    """The run log's handler: the package logger's records the console did not show."""

    def __init__(self, log: "RunLog", below: float):
        super().__init__(logging.INFO)
        self.log, self.below = log, below
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.below:  # else the console handler wrote it to the tee
            self.log.record(self.format(record) + "\n")


class RunLog:
    """Context manager: stdout and stderr also go to a log file, from the moment the block
    starts (``open`` names the file; earlier output is written to it first), and so do the
    package logger's INFO records that a silenced or redirected console does not show.

        with RunLog() as log:
            ...checks...            # printed, and kept in memory
            log.open(path)          # now in the file too (appending)
            log.record("error: ...\\n")   # the file only

    ``enabled=False`` (torchrun ranks other than 0) discards stdout instead.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.path: Optional[str] = None
        self._file: Optional[TextIO] = None
        self._pending: Optional[io.StringIO] = io.StringIO()
        self._saved = None
        self._devnull: Optional[TextIO] = None
        self._levels = None
        self._handler: Optional[_RecordHandler] = None

    def _capture_records(self) -> None:
        """Let INFO records through the package logger for the file; move a higher level the
        user set onto its handlers, so the console (and their handlers) stay as quiet."""
        pkg = logging.getLogger(PACKAGE_LOGGER)
        user = pkg.getEffectiveLevel()
        self._levels = (pkg.level, [(h, h.level) for h in pkg.handlers])
        if user > logging.INFO:
            pkg.setLevel(logging.INFO)
            for h in pkg.handlers:
                h.setLevel(max(h.level, user))
        consoles = [h.level for h in pkg.handlers if isinstance(h, ConsoleHandler)]
        self._handler = _RecordHandler(self, below=max(consoles) if consoles else float("inf"))
        pkg.addHandler(self._handler)

    def _release_records(self) -> None:
        pkg = logging.getLogger(PACKAGE_LOGGER)
        pkg.removeHandler(self._handler)
        level, handlers = self._levels
        pkg.setLevel(level)
        for h, lvl in handlers:
            h.setLevel(lvl)

    def __enter__(self) -> "RunLog":
        self._saved = sys.stdout, sys.stderr
        if self.enabled:
            sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
            self._capture_records()
        else:
            self._devnull = open(os.devnull, "w")
            sys.stdout = self._devnull
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved
        if self._handler is not None:
            self._release_records()
            self._handler = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._devnull is not None:
            self._devnull.close()
        self._pending = None

    def open(self, path: str) -> str:
        """Start writing to ``path`` (appending; its folder is created), earlier output first."""
        if not self.enabled or self._file is not None:
            return path
        os.makedirs(osp.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self.path = path
        if self._pending is not None:
            self._file.write(self._pending.getvalue())
            self._pending = None
        return path

    def record(self, msg: str) -> None:
        """Write ``msg`` to the log only (kept in memory until :meth:`open`)."""
        if self._file is not None:
            self._file.write(msg)
        elif self._pending is not None:
            self._pending.write(msg)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()


@contextlib.contextmanager
def without_prints() -> Iterator[None]:
    """Drop what the block prints (Torchreid's dataset statistics, split creation), but not the
    package logger's console lines (a damaged split file's warning): those still reach the stdout
    of before the block."""
    consoles = [h for h in logging.getLogger(PACKAGE_LOGGER).handlers if isinstance(h, ConsoleHandler)]
    saved = [h.pinned for h in consoles]
    for h in consoles:
        h.pinned = sys.stdout
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for h, pinned in zip(consoles, saved):
            h.pinned = pinned
