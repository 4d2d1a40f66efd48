"""Config -> objects: the data manager, model, optimizer, scheduler and engine of a run.

The one place that turns a yacs config into the objects a run needs; ``cli.py`` (the
command line), ``experiments/`` and the deployment tools all build through it, so a run,
a rank list and an exported model are built the same way.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Dict, Optional

import torch

from .adapter import torchreid
from .config import imagedata_kwargs, lr_scheduler_kwargs, optimizer_kwargs
from .data.checks import IMAGE_CHECKS, check_images, check_queries, set_max_image_side
from .data.image_list import register_config_datasets
from .engines import build_engine
from .errors import ConfigError, PretrainedWeightsUnavailable
from .metrics.evaluation import EvaluationOptions
from .models import build_model_from_config

__all__ = [
    "PretrainedWeightsUnavailable",
    "build_datamanager",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_engine",
    "model_complexity",
    "run_record",
]

logger = logging.getLogger(__name__)


def build_datamanager(cfg, image_check: Optional[str] = None):
    """Torchreid's ``ImageDataManager`` for ``cfg``, checked: each target has a valid query,
    and every image opens. ``image_check`` (default ``data.image_check``): ``decode_test``
    also decodes the query and gallery images fully, ``decode_all`` the training images too,
    ``header`` neither; an evaluation-only run (``test.evaluate``) reads headers only by
    default, since a failure there loses no training."""
    register_config_datasets(cfg)
    set_max_image_side(cfg.data.max_image_side)  # for our checks and Torchreid's loaders alike
    dm = torchreid().data.ImageDataManager(**imagedata_kwargs(cfg))
    mode = image_check or ("header" if cfg.test.evaluate else cfg.data.image_check)
    train = [item[0] for item in dm.train_loader.dataset.train]
    test = []
    options = EvaluationOptions.from_config(cfg)
    for name, sets in dm.test_dataset.items():
        check_queries(name, sets["query"], sets["gallery"])
        try:  # re-ranking's k1 / AQE's k against this target's size, before any training
            options.check_sizes(len(sets["query"]), len(sets["gallery"]))
        except ValueError as exc:
            raise ConfigError(f"target dataset '{name}': {exc}") from None
        test += [item[0] for item in sets["query"]] + [item[0] for item in sets["gallery"]]
    n = check_images(train, decode=mode == "decode_all") + check_images(test, decode=mode != "header")
    what = IMAGE_CHECKS[mode]
    logger.info("Checked %d image files: all %s", n, what)
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


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when inside it (``configs/market/x.yaml``
    tells runs of different dataset folders apart), else absolute."""
    full = osp.abspath(path)
    rel = osp.relpath(full)
    return full if rel.startswith(os.pardir) else rel


def run_record(cfg, config_path: str = "", world_size: int = 1,
               stats: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, Any]:
    """What ``metrics.json`` records about a run besides its results (the engine's ``run_info``)."""
    return {
        "config": _display_path(config_path) if config_path else "",
        "max_epoch": cfg.train.max_epoch,
        "model": cfg.model.name,
        "loss": cfg.loss.name,
        "msgr": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.msgr.items()},
        "sources": list(cfg.data.sources),
        "targets": list(cfg.data.targets),
        "seed": cfg.train.seed,
        "input_size": [cfg.data.height, cfg.data.width],
        "world_size": world_size,
        "amp": cfg.train.amp,
        **(stats or {}),
    }
