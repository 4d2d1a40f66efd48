"""Config -> objects: the data manager, model, optimizer, scheduler and engine of a run.

The one place that turns a yacs config into the objects a run needs; ``cli.py`` (the
command line), ``experiments/`` and the deployment tools all build through it, so a run,
a rank list and an exported model are built the same way.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Dict, Optional

import torch

from .adapter import torchreid
from .config import imagedata_kwargs, lr_scheduler_kwargs, optimizer_kwargs
from .data.checks import check_images
from .engines import build_engine
from .models import build_model_from_config

__all__ = [
    "PretrainedWeightsUnavailable",
    "build_datamanager",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_engine",
    "model_complexity",
]

logger = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for (``model.pretrained``) but cannot be obtained."""


def build_datamanager(cfg):
    """Torchreid's ``ImageDataManager`` for ``cfg``; every image is checked to be readable."""
    dm = torchreid().data.ImageDataManager(**imagedata_kwargs(cfg))
    ds = dm.train_loader.dataset
    paths = [item[0] for item in ds.train]
    for name, loaders in dm.test_dataset.items():
        paths += [item[0] for item in loaders["query"]] + [item[0] for item in loaders["gallery"]]
    n = check_images(paths)
    logger.info("Checked %d image files: all readable", n)
    return dm


def _weights_hint(name: str) -> str:
    tr = torchreid()
    hub = osp.join(torch.hub.get_dir(), "checkpoints")
    try:
        urls = tr.submodule("models.resnet").model_urls
    except (ImportError, AttributeError):
        urls = {}
    base = name.replace("_fc512", "")
    if base in urls:
        return f"put the file at '{osp.join(hub, osp.basename(urls[base]))}'"
    if name.startswith("osnet"):
        home = os.path.expanduser(os.getenv("TORCH_HOME", osp.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")))
        return f"put the file at '{osp.join(home, 'checkpoints', name + '_imagenet.pth')}'"
    return f"put the file in '{hub}'"


def build_model(cfg, num_classes: int) -> torch.nn.Module:
    """``cfg.model.name`` with its options; offline ImageNet weights are a clear error."""
    try:
        return build_model_from_config(cfg, num_classes)
    except OSError as exc:
        if not cfg.model.pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for '{cfg.model.name}' could not be downloaded ({exc}). "
            f"This machine may be offline: {_weights_hint(cfg.model.name)}, "
            "or train from scratch with `model.pretrained False`."
        ) from exc


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Torchreid's ``build_optimizer`` with ``cfg.train`` / ``cfg.adam`` / ``cfg.sgd`` ..."""
    return torchreid().optim.build_optimizer(model, **optimizer_kwargs(cfg))


def build_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Torchreid's ``build_lr_scheduler`` with ``cfg.train``'s schedule."""
    return torchreid().optim.build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))


def model_complexity(model: torch.nn.Module, height: int, width: int) -> Dict[str, Optional[float]]:
    """Params (classifier excluded) and MACs, for the run record."""
    from .models.complexity import count_macs, count_params

    return {"params": count_params(model), "macs": count_macs(model, height, width)}
