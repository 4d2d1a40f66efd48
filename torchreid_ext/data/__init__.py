"""Datasets torchreid_ext registers into Torchreid's dataset registry, and their checks.

* SynthReID (``synthreid``, ``synthreid_small``): generated on first use (:mod:`.synthetic`);
* real-data protocols (``cuhk03_pair1``, ``viper_full``, ``cuhk01_full``, ``viper_10split``,
  ``cuhk01_10split``; :mod:`.real`);
* any folder of crops or list of images (:mod:`.image_list`).

Classes that subclass Torchreid's are made on first access, so importing this package does not
import Torchreid.
"""
from typing import Dict

from .image_list import ImageListSpec, load_spec_file, register_image_dataset  # noqa: F401
from .synthetic import SynthSpec, dataset_classes, ensure_generated, generate  # noqa: F401

__all__ = ["SynthSpec", "ImageListSpec", "dataset_classes", "ensure_generated", "generate", "datasets",
           "load_spec_file", "register_image_dataset", "SyntheticReID", "SyntheticReIDSmall"]


def datasets() -> Dict[str, type]:
    """Name -> class of every dataset torchreid_ext ships."""
    from .image_list import spec_class
    from .real import REAL_SPECS, split_classes

    found = dict(dataset_classes())
    found.update({spec.name: spec_class(spec) for spec in REAL_SPECS})
    found.update(split_classes())
    return found


def __getattr__(name: str):
    if name in ("SyntheticReID", "SyntheticReIDSmall"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
