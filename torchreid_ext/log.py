"""The ``torchreid_ext`` logger: library output goes through :mod:`logging`.

``import torchreid_ext`` gives the package logger one console handler that writes the bare
message to the *current* ``sys.stdout`` (so Torchreid-style console output, the CLI's log
file tee and pytest's capture all see it), at INFO level. Users silence or redirect it the
usual way::

    logging.getLogger("torchreid_ext").setLevel(logging.WARNING)      # quiet
    logging.getLogger("torchreid_ext").handlers.clear()               # own handlers instead
"""
from __future__ import annotations

import logging
import sys

__all__ = ["ConsoleHandler", "PACKAGE_LOGGER", "install_console_handler"]

PACKAGE_LOGGER = "torchreid_ext"


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler bound to whatever ``sys.stdout`` is at each record, not at creation."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

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
