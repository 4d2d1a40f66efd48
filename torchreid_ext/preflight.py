"""Checks a run passes before it loads data, builds its model or writes anything.

Each check raises one clear error (a ConfigError, KeyError, FileNotFoundError or
DatasetError/DatasetNotFound) that names the bad value and what is allowed:

* names Torchreid must know: model, samplers, optimizer, LR scheduler;
* ``model.load_weights`` is a checkpoint that loads safely; torchrun-only rules (:func:`check_torchrun`);
* ``msgr.stages`` name modules of the model, resolved on a model built on the ``meta``
  device (no memory, no weights);
* training and evaluation batches fit in memory, activations included, measured on that model
  (:mod:`torchreid_ext.memory`);
* the save dir and its ``model/`` folder are writable folders (:func:`savedir.check_writable`);
* every dataset is present, and Market-1501-style split folders are non-empty, with parseable
  file names and enough training identities for the sampler (:mod:`torchreid_ext.data.checks`).

Checks on the loaded lists (valid queries per target, image decoding) follow in
:func:`torchreid_ext.builders.build_datamanager`; the save-dir lock and the resume rules in
the run sequence (:mod:`torchreid_ext.savedir`).
"""
from __future__ import annotations

import logging
import os.path as osp

import torch

from .adapter import torchreid
from .config import IDENTITY_SAMPLERS, ConfigError
from .checkpoint import load_checkpoint, state_dict_of
from .errors import CheckpointError, InputNotFound
from .files import missing_file_reason
from .data.loaders import check_distributed_sampler
from .data.checks import DatasetError, check_dataset_present, check_train_identities, scan_image_folders
from .data.image_list import ImageListSpec, register_config_datasets, scan_image_list
from .memory import check_memory, meta_model
from .models import available_models
from .savedir import check_writable
from .torchrun import env_local_rank, env_world_size

__all__ = ["preflight", "check_names", "check_torchrun", "check_weights_file", "check_msgr_stages",
           "check_memory_need", "check_datasets"]

logger = logging.getLogger(__name__)


def check_names(cfg) -> None:
    """model.name, sampler.train_sampler(_t), train.optim and train.lr_scheduler are known."""
    tr = torchreid()
    names = available_models()
    if cfg.model.name not in names:
        raise ConfigError(f"model.name = '{cfg.model.name}' is unknown. Available models: {', '.join(names)}")
    samplers = list(tr.sampler.AVAI_SAMPLERS)
    for key in ("train_sampler", "train_sampler_t"):
        if cfg.sampler[key] not in samplers:
            raise ConfigError(f"sampler.{key} = '{cfg.sampler[key]}' is unknown; choose one of {samplers}")
    optims = list(tr.submodule("optim.optimizer").AVAI_OPTIMS)
    if cfg.train.optim not in optims:
        raise ConfigError(f"train.optim = '{cfg.train.optim}' is unknown; choose one of {optims}")
    scheds = list(tr.submodule("optim.lr_scheduler").AVAI_SCH)
    if cfg.train.lr_scheduler not in scheds:
        raise ConfigError(f"train.lr_scheduler = '{cfg.train.lr_scheduler}' is unknown; choose one of {scheds}")


def check_torchrun(cfg) -> None:
    """What cannot work under torchrun with more than one process (a ConfigError)."""
    if env_world_size() == 1:
        return
    check_distributed_sampler(cfg.sampler.train_sampler)
    if cfg.train.sync_bn and not (cfg.use_gpu and torch.cuda.is_available()):
        raise ConfigError("train.sync_bn = True under torchrun needs GPUs (torch's SyncBatchNorm synchronises "
                          "CUDA tensors only); set train.sync_bn False on the CPU")


def check_msgr_stages(cfg) -> None:
    """With ``msgr.enabled``: every name in ``msgr.stages`` is a submodule of the model."""
    if not cfg.msgr.enabled:
        return
    from .msgr import stage_modules

    model = meta_model(cfg)
    if model is None:  # the engine resolves the stages again later
        logger.debug("msgr.stages not checked up front: %s cannot be built on the meta device", cfg.model.name)
        return
    try:
        stage_modules(model, list(cfg.msgr.stages))
    except ValueError as exc:
        raise ConfigError(f"msgr.stages = {list(cfg.msgr.stages)}: {exc}") from None


def check_memory_need(cfg) -> None:
    """Training at ``train.batch_size`` and evaluating at ``test.batch_size``, at ``data.height`` x
    ``data.width``, fit in the memory of the device the run uses (:func:`torchreid_ext.memory.check_memory`:
    parameters and activations, measured on the meta device)."""
    # under torchrun each process trains on its own GPU (LOCAL_RANK) with train.batch_size images
    gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", env_local_rank() % torch.cuda.device_count()) if gpu else torch.device("cpu")
    size = f"{cfg.data.height}x{cfg.data.width}"
    steps = [] if cfg.test.evaluate else [
        (cfg.train.batch_size, True, f"training '{cfg.model.name}' at {size} with train.batch_size = "
                                     f"{cfg.train.batch_size}", "data.height / data.width or train.batch_size")]
    steps.append((cfg.test.batch_size, False, f"evaluating '{cfg.model.name}' at {size} with test.batch_size = "
                                              f"{cfg.test.batch_size}", "data.height / data.width or test.batch_size"))
    built = {}

    def model():
        if "model" not in built:
            built["model"] = meta_model(cfg)
        return built["model"]

    for batch, train, what, lower in steps:
        check_memory(model, batch=batch, height=cfg.data.height, width=cfg.data.width, train=train, device=device,
                     what=what, lower=lower, half_precision=train and cfg.train.amp != "none")


def _scan(name: str, root: str):
    """The identities per split of dataset ``name``, for the datasets whose lists can be read
    without Torchreid (folder and list datasets, Market-1501-style folders); else None."""
    spec = getattr(torchreid().image_datasets()[name], "spec", None)
    if isinstance(spec, ImageListSpec):
        return scan_image_list(spec, root)
    return scan_image_folders(name, root)


def check_datasets(cfg) -> None:
    """Every source and target is present; split folders and lists parse; sources have a training
    split; enough training identities."""
    register_config_datasets(cfg)
    names = list(dict.fromkeys(list(cfg.data.sources) + list(cfg.data.targets)))
    for name in names:
        check_dataset_present(name, cfg.data.root)
    scans = {name: _scan(name, cfg.data.root) for name in names}
    for name in cfg.data.sources:
        if scans[name] is not None and not scans[name].train_pids and not cfg.data.combineall:
            raise DatasetError(f"data.sources names '{name}', which has no training split (a test-only "
                               "protocol); use it in data.targets, or train on all of it with data.combineall True")
    sources = [scans[name] for name in cfg.data.sources]
    if sources and all(scan is not None for scan in sources):
        need, why = 2, " (re-ID learns to tell identities apart)"
        if cfg.sampler.train_sampler in IDENTITY_SAMPLERS:
            p = cfg.train.batch_size // max(cfg.sampler.num_instances, 1)
            if p >= need:
                need = p
                why = (f" for RandomIdentitySampler: train.batch_size / sampler.num_instances = "
                       f"{cfg.train.batch_size} / {cfg.sampler.num_instances} = {p} identities per batch")
        check_train_identities(sources, need, why, combineall=cfg.data.combineall)


def check_weights_file(path: str) -> None:
    """``model.load_weights`` (when set) is a checkpoint that loads safely and holds tensors: read
    in full here, so that a bad file is refused before anything is written."""
    if not path:
        return
    if not osp.isfile(path):
        raise InputNotFound(f"model.load_weights = '{path}' {missing_file_reason(path)}")
    state = state_dict_of(load_checkpoint(path), path)
    if not any(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"model.load_weights = '{path}' holds no tensors; "
                              "expected a state dict or a checkpoint with 'state_dict'")


def preflight(cfg) -> None:
    """All checks that need no data loading and write nothing (see the module docstring)."""
    check_names(cfg)
    check_weights_file(cfg.model.load_weights)
    check_torchrun(cfg)
    check_msgr_stages(cfg)
    check_memory_need(cfg)
    check_writable(cfg.data.save_dir)
    check_datasets(cfg)
