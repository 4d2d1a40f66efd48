"""Datasets torchreid_ext registers into Torchreid's dataset registry, and their checks.

``SyntheticReID`` / ``SyntheticReIDSmall`` subclass Torchreid's Market1501; they are made on
first access (:func:`dataset_classes`), so importing this package does not import Torchreid.
"""
from typing import Dict

from .synthetic import SynthSpec, dataset_classes, ensure_generated, generate  # noqa: F401

__all__ = ["SynthSpec", "dataset_classes", "ensure_generated", "generate", "datasets",
           "SyntheticReID", "SyntheticReIDSmall"]


def datasets() -> Dict[str, type]:
    """Name -> class of every dataset torchreid_ext registers."""
    return dict(dataset_classes())


def __getattr__(name: str):
    if name in ("SyntheticReID", "SyntheticReIDSmall"):
        from . import synthetic

        return getattr(synthetic, name)
    if name == "DATASETS":  # the former module-level dict
        return datasets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
