"""Every error torchreid_ext raises on purpose, in one hierarchy (a leaf module: imports nothing).

:class:`UserError` is bad input: a value, file, dataset or environment the user can fix. Every
command line prints it as one line (``error: <message>``) and exits with status 2, before any
long work and with nothing written (:mod:`torchreid_ext.console`). Each subclass also derives from
the built-in exception a Python caller would expect (``ValueError``, ``FileNotFoundError``,
``KeyError`` ...), so ``except ValueError`` keeps working.

:class:`ExportCheckError` is not bad input: an exported file that does not reproduce PyTorch
(exit status 1).
"""
from __future__ import annotations

__all__ = [
    "CommandError",
    "UserError",
    "ConfigError",
    "SaveDirError",
    "InputNotFound",
    "DatasetError",
    "DatasetNotFound",
    "UnreadableImageError",
    "CheckpointError",
    "DiskFullError",
    "OutputPathError",
    "MemoryLimitError",
    "BackboneWeightsError",
    "PretrainedWeightsUnavailable",
    "DeployInputError",
    "FeatureFileError",
    "MissingDependencyError",
    "HarnessError",
    "TorchreidNotFound",
    "UnknownNameError",
    "ExportCheckError",
    "yaml_problem",
]


class CommandError(Exception):
    """An error a command line reports as one line, with :attr:`exit_status`."""

    exit_status = 1


class UserError(CommandError):
    """Bad input; the message names the bad value and what is allowed (exit status 2)."""

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


class SaveDirError(ConfigError):
    """The save dir cannot be used for this run (locked by another run, resume rules)."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what was asked for)."""


class DatasetError(UserError, ValueError):
    """A dataset is present but cannot be trained or evaluated on as it is."""


class DatasetNotFound(UserError, FileNotFoundError):
    """A dataset's folder is missing or incomplete under ``data.root``."""


class UnreadableImageError(UserError, OSError):
    """An image file cannot be opened or decoded."""


class CheckpointError(UserError, RuntimeError):
    """A weights / checkpoint file cannot be loaded safely or does not fit the model."""


class DiskFullError(UserError, OSError):
    """A file could not be written for lack of space (``errno`` ENOSPC or EDQUOT); the file it was
    to replace, if any, is unchanged and no temporary file is left."""


class OutputPathError(UserError, ValueError):
    """An output path that must not be written as asked: not a regular file (a device, a FIFO, a
    symbolic link), an input of the same command, or an existing file of another kind."""


class MemoryLimitError(UserError, MemoryError):
    """A step needs more memory than this machine (or its GPU) has; the message says what to lower."""


class BackboneWeightsError(UserError, RuntimeError):
    """ImageNet backbone weights for MSFL-ResNet50 cannot be obtained or do not fit."""


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights were asked for (``model.pretrained``) but cannot be obtained."""


class DeployInputError(UserError, ValueError):
    """An argument of extraction, evaluation or export is invalid."""


class FeatureFileError(DeployInputError):
    """A saved-features file is missing, not HDF5, or lacks what the step needs."""


class MissingDependencyError(UserError, ImportError):
    """An optional package the step needs (the ``deploy`` extra) is not installed."""


class HarnessError(UserError, ValueError):
    """Bad input to the comparison harness (``scripts/compare.py``)."""


class TorchreidNotFound(UserError, ImportError):
    """Neither supported Torchreid layout could be imported."""


class UnknownNameError(UserError, KeyError):
    """A name no registry entry has (model, loss, engine, dataset); the message lists the names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class ExportCheckError(CommandError, RuntimeError):
    """The exported file's outputs differ from PyTorch's by more than the tolerance (exit 1)."""


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: the problem and where (``line L, column C``)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = " (YAML indents with spaces, never tabs)" if r"\t" in problem else ""
    return f"{problem}{where}{hint}"
