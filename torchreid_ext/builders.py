"""Options -> objects: the data manager, model, optimizer, scheduler and engine of a run.

Each builder takes the run's options (:class:`~torchreid_ext.run_options.RunOptions`, the
config read once) or the component's own options, never the config; ``cli.py`` (the command
line), ``experiments/`` and the deployment tools all build through here, so a run, a rank list
and an exported model are built the same way. :func:`build_engine` is the one builder that takes
a config: Torchreid scripts call it with theirs.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Dict, Optional

import torch

from .adapter import torchreid
from .data.checks import IMAGE_CHECKS, check_images, check_queries, set_max_image_side
from .data.image_list import register_dataset_files
from .engines import ENGINES, engine_name
from .errors import ConfigError, PretrainedWeightsUnavailable
from .losses import build_loss_terms
from .models import ModelOptions, build_model_from_options
from .run_options import RunOptions

__all__ = [
    "PretrainedWeightsUnavailable",
    "build_datamanager",
    "build_run_model",
    "build_optimizer",
    "build_scheduler",
    "build_run_engine",
    "build_engine",
    "model_complexity",
    "run_record",
]

logger = logging.getLogger(__name__)


def build_datamanager(options: RunOptions, image_check: Optional[str] = None):
    """Torchreid's ``ImageDataManager`` for ``options``, checked: each target has a valid query,
    and every image opens. ``image_check`` (default ``data.image_check``): ``decode_test``
    also decodes the query and gallery images fully, ``decode_all`` the training images too,
    ``header`` neither; an evaluation-only run (``test.evaluate``) reads headers only by
    default, since a failure there loses no training."""
    register_dataset_files(options.data.custom_datasets)
    set_max_image_side(options.data.max_image_side)  # for our checks and Torchreid's loaders alike
    dm = torchreid().data.ImageDataManager(**options.datamanager_args)
    mode = image_check or ("header" if options.evaluate_only else options.data.image_check)
    train = [item[0] for item in dm.train_loader.dataset.train]
    test = []
    for name, sets in dm.test_dataset.items():
        check_queries(name, sets["query"], sets["gallery"])
        try:  # re-ranking's k1 / AQE's k against this target's size, before any training
            options.evaluation.check_sizes(len(sets["query"]), len(sets["gallery"]))
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


def build_run_model(options: ModelOptions, num_classes: int, use_gpu: bool = True) -> torch.nn.Module:
    """``options.name`` with its factory's options; offline ImageNet weights are a clear error."""
    try:
        return build_model_from_options(options, num_classes, use_gpu=use_gpu)
    except OSError as exc:
        if not options.pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for '{options.name}' could not be downloaded ({exc}). "
            f"This machine may be offline: {_weights_hint(options.name)}, "
            "or train from scratch with `model.pretrained False`."
        ) from exc


def build_optimizer(options: RunOptions, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Torchreid's ``build_optimizer`` with ``train`` / ``adam`` / ``sgd`` ... (``options.optimizer_args``)."""
    return torchreid().optim.build_optimizer(model, **options.optimizer_args)


def build_scheduler(options: RunOptions, optimizer: torch.optim.Optimizer):
    """Torchreid's ``build_lr_scheduler`` with ``train``'s schedule (``options.scheduler_args``)."""
    return torchreid().optim.build_lr_scheduler(optimizer, **options.scheduler_args)


def build_run_engine(options: RunOptions, datamanager, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler=None, run_info: Optional[Dict[str, Any]] = None):
    """The engine ``train.engine`` names (by default ``msgr`` with ``msgr.enabled``, else ``metric``),
    built by its class's ``from_options`` with the base engines' arguments and the loss terms of
    ``loss.name`` (docs/methods.md D5, S4)."""
    engine_cls = ENGINES.get(engine_name(options.engine.engine, options.msgr.enabled), key="train.engine")
    weight_x, metric_losses = build_loss_terms(options.loss)
    common = dict(
        use_gpu=options.use_gpu,
        weight_x=weight_x,
        label_smooth=options.loss.label_smooth,
        metric_losses=metric_losses,
        evaluator=options.evaluation.evaluator,
        checkpoint_freq=options.engine.checkpoint_freq,
        run_info=run_info,
        amp=options.engine.amp,
        channels_last=options.engine.channels_last,
        seed=options.seed,
        gather_features=options.dist.gather_features,
        evaluation_options=options.evaluation,
    )
    return engine_cls.from_options(options, datamanager, model, optimizer, scheduler, **common)


def build_engine(cfg, datamanager, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None):
    """The engine a config asks for, in one line of a Torchreid script:
    ``engine = torchreid_ext.build_engine(cfg, datamanager, model, optimizer, scheduler)``."""
    return build_run_engine(RunOptions(cfg), datamanager, model, optimizer, scheduler)


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


def run_record(options: RunOptions, config_path: str = "", world_size: int = 1,
               stats: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, Any]:
    """What ``metrics.json`` records about a run besides its results (the engine's ``run_info``)."""
    data = options.datamanager_args
    return {
        "config": _display_path(config_path) if config_path else "",
        "max_epoch": options.max_epoch,
        "model": options.model.name,
        "loss": options.loss.name,
        "msgr": options.msgr.as_config(),
        "sources": list(data["sources"]),
        "targets": list(data["targets"]),
        "seed": options.seed,
        "input_size": [data["height"], data["width"]],
        "world_size": world_size,
        "amp": options.engine.amp,
        **(stats or {}),
    }
