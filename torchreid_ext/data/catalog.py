"""The datasets torchreid_ext adds to Torchreid, by name.

:data:`DATASETS` holds every one (SynthReID, the real-data protocols of :mod:`.real`, and any
folder / list dataset a user registers); :func:`register_dataset` adds one here and to
Torchreid's own dataset registry, where ``ImageDataManager`` finds it. Torchreid's
``register_image_dataset`` raises on any duplicate name, so a name already bound there to the
same class (or a re-imported copy of it) is left alone or rebound, and a name bound to somebody
else's class is an error.
"""
from __future__ import annotations

from ..adapter import torchreid
from ..registry import Registry, same_object

__all__ = ["DATASETS", "register_dataset", "add_to_torchreid"]

DATASETS: Registry = Registry("dataset")


def add_to_torchreid(name: str, cls: type) -> None:
    """Bind ``name`` to ``cls`` in Torchreid's image-dataset registry (see the module docstring)."""
    tr = torchreid()
    registry = tr.image_datasets()
    current = registry.get(name)
    if current is None:
        tr.data.register_image_dataset(name, cls)
    elif not same_object(current, cls):
        raise ValueError(
            f"Torchreid already has a dataset named '{name}' ({current.__module__}.{current.__qualname__}); "
            "torchreid_ext cannot register its own under that name")
    elif current is not cls:  # a re-imported torchreid_ext: point at the live class
        registry[name] = cls


def register_dataset(name: str, cls: type) -> type:
    """Register dataset class ``cls`` as ``name`` here and in Torchreid."""
    DATASETS.register(name, cls)
    add_to_torchreid(name, cls)
    return cls
