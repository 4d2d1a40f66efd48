"""Put torchreid_ext's models and datasets into Torchreid's own registries.

Called once by ``import torchreid_ext``; calling it again is harmless. It also swaps
the image reader of Torchreid's ``ImageDataset`` for one that raises on an unreadable
file instead of retrying it forever, and Torchreid's ``load_checkpoint`` (behind its
``load_pretrained_weights``, ``resume_from_checkpoint`` and ``FeatureExtractor``) for
:func:`torchreid_ext.checkpoint.load_checkpoint`, so that no weights file is unpickled with
code-running globals, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, and Torchreid's own
numpy-scalar checkpoints load under weights-only loading. Torchreid's
``register_image_dataset`` raises on a duplicate name, so a name already bound to our
class (or to a re-imported copy of it) is left alone or rebound, and a name bound to
somebody else's class is an error.
"""
from __future__ import annotations

from .adapter import torchreid
from .checkpoint import load_checkpoint
from .data import datasets
from .data.catalog import DATASETS, add_to_torchreid
from .data.checks import read_image
from .models import MODELS

__all__ = ["register"]


def register() -> None:
    tr = torchreid()
    # Torchreid's ImageDataset retries an unreadable image forever; ours names the file.
    tr.dataset_base.read_image = read_image
    # Torchreid's loaders look load_checkpoint up in torchtools at call time: one swap covers them
    tr.torchtools.load_checkpoint = load_checkpoint
    tr.utils.load_checkpoint = load_checkpoint

    factory = tr.model_factory()
    for name, fn in MODELS.items():
        factory[name] = fn

    for name, cls in datasets().items():
        DATASETS.register(name, cls)
    for name, cls in DATASETS.items():  # ours and any a user registered
        add_to_torchreid(name, cls)
