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

import functools
import logging
import os.path as osp
from typing import Callable, Optional

import torch

from .adapter import torchreid
from .checkpoint import load_checkpoint, state_dict_of
from .config import IDENTITY_SAMPLERS, ConfigError
from .data.checks import DatasetError, check_dataset_present, check_train_identities, scan_image_folders
from .data.image_list import ImageListSpec, register_dataset_files, scan_image_list
from .data.loaders import check_distributed_sampler
from .errors import CheckpointError, InputNotFound
from .files import missing_file_reason
from .memory import check_memory, meta_model
from .models import available_models
from .run_options import RunOptions
from .savedir import check_writable
from .torchrun import env_local_rank, env_world_size

__all__ = ["preflight", "check_names", "check_torchrun", "check_weights_file", "check_msgr_stages",
           "check_memory_need", "check_datasets"]

logger = logging.getLogger(__name__)


def check_names(options: RunOptions) -> None:
    """model.name, sampler.train_sampler(_t), train.optim and train.lr_scheduler are known."""
    tr = torchreid()
    names = available_models()
    if options.model.name not in names:
        raise ConfigError(f"model.name = '{options.model.name}' is unknown; choose one of {names}")
    samplers = list(tr.sampler.AVAI_SAMPLERS)
    for key in ("train_sampler", "train_sampler_t"):
        if options.datamanager_args[key] not in samplers:
            raise ConfigError(f"sampler.{key} = '{options.datamanager_args[key]}' is unknown; choose one of {samplers}")
    optims = list(tr.submodule("optim.optimizer").AVAI_OPTIMS)
    if options.optimizer_args["optim"] not in optims:
        raise ConfigError(f"train.optim = '{options.optimizer_args['optim']}' is unknown; choose one of {optims}")
    scheds = list(tr.submodule("optim.lr_scheduler").AVAI_SCH)
    scheduler = options.scheduler_args["lr_scheduler"]
    if scheduler not in scheds:
        raise ConfigError(f"train.lr_scheduler = '{scheduler}' is unknown; choose one of {scheds}")


def check_torchrun(options: RunOptions) -> None:
    """What cannot work under torchrun with more than one process (a ConfigError)."""
    if env_world_size() == 1:
        return
    check_distributed_sampler(options.datamanager_args["train_sampler"])
    if options.engine.sync_bn and not options.use_gpu:
        raise ConfigError("train.sync_bn = True under torchrun needs GPUs (torch's SyncBatchNorm synchronises "
                          "CUDA tensors only); set train.sync_bn False on the CPU")


def _meta_model_once(options: RunOptions) -> Callable[[], Optional[torch.nn.Module]]:
    """The run's model on the meta device, built on the first call only (the checks share it)."""
    return functools.cache(lambda: meta_model(options.model))


def check_msgr_stages(options: RunOptions, model: Optional[Callable[[], Optional[torch.nn.Module]]] = None) -> None:
    """With ``msgr.enabled``: every name in ``msgr.stages`` is a submodule of the model (``model``:
    a callable giving it on the meta device, default built here)."""
    if not options.msgr.enabled:
        return
    from .msgr import stage_modules

    model = (model or _meta_model_once(options))()
    if model is None:  # the engine resolves the stages again later
        logger.debug("msgr.stages not checked up front: %s cannot be built on the meta device", options.model.name)
        return
    try:
        stage_modules(model, list(options.msgr.stages))
    except ValueError as exc:
        raise ConfigError(f"msgr.stages = {list(options.msgr.stages)}: {exc}") from None


def check_memory_need(options: RunOptions, model: Optional[Callable[[], Optional[torch.nn.Module]]] = None) -> None:
    """Training at ``train.batch_size`` and evaluating at ``test.batch_size``, at ``data.height`` x
    ``data.width``, fit in the memory of the device the run uses (:func:`torchreid_ext.memory.check_memory`:
    parameters and activations, measured on the meta device)."""
    # under torchrun each process trains on its own GPU (LOCAL_RANK) with train.batch_size images
    gpu = options.use_gpu
    device = torch.device("cuda", env_local_rank() % torch.cuda.device_count()) if gpu else torch.device("cpu")
    data, name = options.datamanager_args, options.model.name
    height, width = data["height"], data["width"]
    train_batch, test_batch = data["batch_size_train"], data["batch_size_test"]
    size = f"{height}x{width}"
    steps = [] if options.evaluate_only else [
        (train_batch, True, f"training '{name}' at {size} with train.batch_size = {train_batch}",
         "data.height / data.width or train.batch_size")]
    steps.append((test_batch, False, f"evaluating '{name}' at {size} with test.batch_size = {test_batch}",
                  "data.height / data.width or test.batch_size"))
    model = model or _meta_model_once(options)  # built once, and only if a step is measured
    for batch, train, what, lower in steps:
        check_memory(model, batch=batch, height=height, width=width, train=train, device=device,
                     what=what, lower=lower, half_precision=train and options.engine.amp != "none")


def _scan(name: str, root: str):
    """The identities per split of dataset ``name``, for the datasets whose lists can be read
    without Torchreid (folder and list datasets, Market-1501-style folders); else None."""
    spec = getattr(torchreid().image_datasets()[name], "spec", None)
    if isinstance(spec, ImageListSpec):
        return scan_image_list(spec, root)
    return scan_image_folders(name, root)


def check_datasets(options: RunOptions) -> None:
    """Every source and target is present; split folders and lists parse; sources have a training
    split; enough training identities."""
    register_dataset_files(options.data.custom_datasets)
    data = options.datamanager_args
    root, sources, combineall = data["root"], list(data["sources"]), data["combineall"]
    names = list(dict.fromkeys(sources + list(data["targets"])))
    for name in names:
        check_dataset_present(name, root, key="data.sources" if name in sources else "data.targets")
    scans = {name: _scan(name, root) for name in names}
    for name in sources:
        if scans[name] is not None and not scans[name].train_pids and not combineall:
            raise DatasetError(f"data.sources names '{name}', which has no training split (a test-only "
                               "protocol); use it in data.targets, or train on all of it with data.combineall True")
    found = [scans[name] for name in sources]
    if found and all(scan is not None for scan in found):
        need, why = 2, " (re-ID learns to tell identities apart)"
        if data["train_sampler"] in IDENTITY_SAMPLERS:
            batch, k = data["batch_size_train"], data["num_instances"]
            p = batch // max(k, 1)
            if p >= need:
                need = p
                why = (f" for RandomIdentitySampler: train.batch_size / sampler.num_instances = "
                       f"{batch} / {k} = {p} identities per batch")
        check_train_identities(found, need, why, combineall=combineall)


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


def preflight(options: RunOptions) -> None:
    """All checks that need no data loading and write nothing (see the module docstring)."""
    check_names(options)
    check_weights_file(options.model.load_weights)
    check_torchrun(options)
    model = _meta_model_once(options)  # one meta-device build for both checks
    check_msgr_stages(options, model)
    check_memory_need(options, model)
    check_writable(options.save_dir)
    check_datasets(options)
