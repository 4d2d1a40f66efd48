"""Put torchreid_ext's models and datasets into Torchreid's own registries.

Called once by ``import torchreid_ext``; calling it again is harmless. It also swaps
the image reader of Torchreid's ``ImageDataset`` for one that raises on an unreadable
file instead of retrying it forever, and Torchreid's ``load_checkpoint`` (behind its
``load_pretrained_weights``, ``resume_from_checkpoint`` and ``FeatureExtractor``) for
:func:`torchreid_ext.checkpoint.load_checkpoint`, so that no weights file is unpickled with
code-running globals, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, and Torchreid's own
numpy-scalar checkpoints load under weights-only loading. Torchreid's model modules read their
ImageNet weights themselves (``model_zoo.load_url``, i.e. torch.hub's cache, read with
``weights_only=False``; OSNet's ``torch.load``): in each of them the names ``torch``, ``torch.hub``,
``torch.utils.model_zoo`` and their loading functions are rebound to views whose loaders are
:func:`~torchreid_ext.checkpoint.torch_load` and
:func:`~torchreid_ext.checkpoint.load_state_dict_from_url`, whatever the model family. Torchreid's
``register_image_dataset`` raises on a duplicate name, so a name already bound to our
class (or to a re-imported copy of it) is left alone or rebound, and a name bound to
somebody else's class is an error.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Dict

import torch
import torch.hub
import torch.utils.model_zoo

from .adapter import torchreid
from .checkpoint import load_checkpoint, load_state_dict_from_url, torch_load
from .data import datasets
from .data.catalog import DATASETS, add_to_torchreid
from .data.checks import read_image
from .models import MODELS

__all__ = ["register"]


class _SafeView(ModuleType):
    """``module`` with some attributes replaced (the loaders); every other attribute is the module's."""

    def __init__(self, module: ModuleType, replaced: Dict[str, Any]):
        super().__init__(module.__name__, module.__doc__)
        self.__dict__["_wrapped"] = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_wrapped"], name)


def _safe_views() -> Dict[int, Any]:
    """id(what a Torchreid module may hold) -> the object it gets instead: torch, torch.hub,
    torch.utils, torch.utils.model_zoo and their loading functions, reading through the safe loader."""
    zoo = _SafeView(torch.utils.model_zoo, {"load_url": load_state_dict_from_url})
    hub = _SafeView(torch.hub, {"load_state_dict_from_url": load_state_dict_from_url})
    utils = _SafeView(torch.utils, {"model_zoo": zoo})
    safe_torch = _SafeView(torch, {"load": torch_load, "hub": hub, "utils": utils})
    pairs = [(torch, safe_torch), (torch.hub, hub), (torch.utils, utils), (torch.utils.model_zoo, zoo),
             (torch.load, torch_load), (torch.hub.load_state_dict_from_url, load_state_dict_from_url),
             (torch.utils.model_zoo.load_url, load_state_dict_from_url)]
    return {id(original): safe for original, safe in pairs}


def route_weight_reads(modules) -> int:
    """Rebind, in each of ``modules``, every global that is torch, torch.hub, torch.utils(.model_zoo)
    or one of their weight loaders to its safe view; return how many names were rebound."""
    views = _safe_views()
    count = 0
    for module in modules:
        for name, value in list(vars(module).items()):
            safe = views.get(id(value))
            if safe is not None:
                setattr(module, name, safe)
                count += 1
    return count


def register() -> None:
    tr = torchreid()
    # Torchreid's ImageDataset retries an unreadable image forever; ours names the file.
    tr.dataset_base.read_image = read_image
    # Torchreid's loaders look load_checkpoint up in torchtools at call time: one swap covers them
    tr.torchtools.load_checkpoint = load_checkpoint
    tr.utils.load_checkpoint = load_checkpoint
    # Torchreid's models read ImageNet weights from torch.hub's cache (or OSNet's) with torch.load
    route_weight_reads(tr.model_modules())

    factory = tr.model_factory()
    for name, fn in MODELS.items():
        factory[name] = fn

    for name, cls in datasets().items():
        DATASETS.register(name, cls)
    for name, cls in DATASETS.items():  # ours and any a user registered
        add_to_torchreid(name, cls)
