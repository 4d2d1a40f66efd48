"""Errors of the deployment tools (extraction, saved-feature evaluation, export).

Bad input raises :class:`DeployInputError` (or one of the package's existing errors:
``FileNotFoundError``, ``CheckpointError``, ``UnreadableImageError``, ``ConfigError``) before any
long work; an exported file that does not reproduce PyTorch raises :class:`ExportCheckError`.
"""
from __future__ import annotations

from ..errors import DeployInputError, ExportCheckError, FeatureFileError, MissingDependencyError
from ..files import check_output_path

__all__ = ["DeployInputError", "FeatureFileError", "ExportCheckError", "MissingDependencyError", "check_output_path",
           "require"]


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
