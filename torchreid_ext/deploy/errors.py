"""Errors of the deployment tools (extraction, saved-feature evaluation, export).

Bad input raises :class:`DeployInputError` (or one of the package's existing errors:
``FileNotFoundError``, ``CheckpointError``, ``UnreadableImageError``, ``ConfigError``) before any
long work; an exported file that does not reproduce PyTorch raises :class:`ExportCheckError`.
"""
from __future__ import annotations

import os
import os.path as osp

from ..errors import DeployInputError, ExportCheckError, FeatureFileError, InputNotFound, MissingDependencyError

__all__ = ["DeployInputError", "FeatureFileError", "ExportCheckError", "MissingDependencyError", "check_output_path",
           "require"]


def check_output_path(path: str, what: str = "output") -> str:
    """``path`` made absolute; its folder must exist and ``path`` must not be a folder."""
    if not path:
        raise DeployInputError(f"no {what} path given")
    full = osp.abspath(osp.expanduser(path))
    folder = osp.dirname(full)
    if not osp.isdir(folder):
        raise InputNotFound(f"{what} '{path}': folder '{folder}' does not exist (create it first)")
    if osp.isdir(full):
        raise DeployInputError(f"{what} '{path}' is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise DeployInputError(f"{what} '{path}': folder '{folder}' is not writable")
    return full


def require(*modules: str, extra: str = "deploy") -> None:
    """Import ``modules`` or raise :class:`MissingDependencyError` naming the missing ones."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"this step needs {', '.join(missing)}: pip install 'torchreid-ext[{extra}]' "
            f"(or pip install {' '.join(missing)})")
