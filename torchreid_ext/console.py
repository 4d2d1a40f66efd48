"""The one wrapper every command line runs in (train, compare, extract, evaluate, export, visualize).

:func:`run_command` does what a command needs around its work:

* a console handler for the package logger (the library itself installs none);
* the plug-in modules named in ``$TORCHREID_EXT_PLUGINS`` (comma separated; ``$TORCHREID_EXT_LOSSES``,
  the earlier name, too), imported first, so that the losses, engines, models and datasets they
  register exist in this process (and in each run ``scripts/compare.py`` starts);
* errors as exit statuses: a :class:`~torchreid_ext.errors.UserError` is one line on stderr
  (``error: <message>``) and status 2; an :class:`~torchreid_ext.errors.ExportCheckError` status 1;
  Ctrl-C is ``interrupted`` and status 130 (each command's writers leave no partial file);
  ``TORCHREID_EXT_TRACEBACK=1`` re-raises instead, for the traceback;
* the command's own status otherwise: 0 on success.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

from .errors import CommandError, ConfigError

__all__ = ["TRACEBACK_ENV", "PLUGINS_ENV", "import_plugins", "run_command", "error_line"]

TRACEBACK_ENV = "TORCHREID_EXT_TRACEBACK"
PLUGINS_ENV = "TORCHREID_EXT_PLUGINS"
_PLUGINS_ENV_ALIASES = (PLUGINS_ENV, "TORCHREID_EXT_LOSSES")


def import_plugins() -> None:
    """Import the modules named in ``$TORCHREID_EXT_PLUGINS`` (comma separated); a module that
    cannot be imported is a :class:`~torchreid_ext.errors.ConfigError` naming it."""
    for env in _PLUGINS_ENV_ALIASES:
        for module in (m.strip() for m in os.environ.get(env, "").split(",")):
            if not module:
                continue
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"{env} names module '{module}', which cannot be imported: {exc}") from exc


# the longest message an error line shows; the rest is cut (messages summarise long lists themselves)
MAX_ERROR_CHARS = 2000


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message is joined; beyond
    :data:`MAX_ERROR_CHARS` characters it is cut, saying how much was left out)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) > MAX_ERROR_CHARS:
        line = f"{line[:MAX_ERROR_CHARS]} ... [{len(line) - MAX_ERROR_CHARS} more characters]"
    return "error: " + line


def run_command(body: Callable[[], Optional[int]]) -> int:
    """Run ``body`` (a command's work; returns its status or None for 0) and return the exit status."""
    from .log import install_console_handler

    install_console_handler()
    try:
        import_plugins()
        status = body()
    except CommandError as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        hint = f" (set {TRACEBACK_ENV}=1 for the traceback)" if exc.exit_status == 2 else ""
        print(error_line(exc) + hint, file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)
