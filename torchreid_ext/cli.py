"""``scripts/main.py``: upstream Torchreid's command line, running torchreid_ext's engines.

    python scripts/main.py --config configs/quickstart.yaml [KEY VALUE ...]

Same arguments as upstream (``--config-file`` too, ``--root``, ``-s``, ``-t``,
``--transforms``, trailing overrides). This module parses them and runs the sequence:

1. the config is read, validated (:mod:`torchreid_ext.config`) and frozen, then read once into
   the options of each component (:class:`~torchreid_ext.run_options.RunOptions`; nothing below
   takes the config), and every check that needs no data runs (:func:`torchreid_ext.preflight.preflight`);
2. the save dir is locked for this run, stale temporary files of killed runs are removed and
   the checkpoint to resume from is chosen (:mod:`torchreid_ext.savedir`);
3. the data manager is built and its lists checked (:func:`torchreid_ext.builders.build_datamanager`);
4. the model (with ``model.load_weights``), optimizer, scheduler and engine are built and the
   checkpoint resumed, so that weights or a checkpoint that do not fit leave nothing behind;
5. only then is the log file (``train.log-*`` / ``test.log-*``) opened, with everything printed
   so far, and the engine trains and evaluates. An error from here on is written to the log
   file too.

Bad input is one line on stderr and exit status 2, with nothing written to the save dir
(:mod:`torchreid_ext.console`); success is exit status 0.

Under ``torchrun --nproc_per_node N scripts/main.py ...`` every process joins the job
(``dist.backend``), wraps the model in DistributedDataParallel (SyncBatchNorm first with
``train.sync_bn``; channels-last with ``train.channels_last``; :mod:`torchreid_ext.distributed`)
and trains on its own share of the data (:mod:`torchreid_ext.data.loaders`):
``train.batch_size`` is PER RANK (global batch = N x batch_size; scale the learning rate
yourself if you want linear scaling). Only rank 0 locks the save dir, prints, writes the log,
TensorBoard, checkpoints and metrics, and evaluates.
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import platform
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import distributed
from .adapter import torchreid
from .builders import (  # noqa: F401  (build_datamanager / build_run_model: also cli's public names)
    build_datamanager,
    build_optimizer,
    build_run_engine,
    build_run_model,
    build_scheduler,
    model_complexity,
    run_record,
)
from .checkpoint import load_model_weights
from .config import get_default_config, merge_from_file, merge_from_list, validate_config
from .console import error_line, run_command
from .data.loaders import distribute_train_loader
from .errors import UserError
from .log import RunLog
from .memory import allocation_failures
from .preflight import preflight
from .run_options import RunOptions
from .savedir import SaveDirLock, remove_stale_temp_files, resolve_resume

__all__ = ["build_parser", "load_run_config", "set_determinism", "run", "train", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train / evaluate a re-ID model with Torchreid and torchreid_ext",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", "--config-file", dest="config", default="", help="YAML config file")
    p.add_argument("-s", "--sources", nargs="+", help="source datasets (space separated)")
    p.add_argument("-t", "--targets", nargs="+", help="target datasets (space separated)")
    p.add_argument("--transforms", nargs="+", help="data augmentation")
    p.add_argument("--root", default="", help="path to data root")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=None, help="KEY VALUE config overrides")
    return p


def load_run_config(argv: Optional[Sequence[str]] = None):
    """``(cfg, args)``: defaults, then ``--config``, the upstream options, the overrides; validated,
    then frozen: nothing changes the config after this."""
    args = build_parser().parse_args(argv)
    cfg = get_default_config()
    if args.config:
        merge_from_file(cfg, args.config)
    if args.root:
        cfg.data.root = args.root
    if args.sources:
        cfg.data.sources = args.sources
    if args.targets:
        cfg.data.targets = args.targets
    if args.transforms:
        cfg.data.transforms = args.transforms
    merge_from_list(cfg, args.opts or [])
    validate_config(cfg)
    cfg.freeze()
    return cfg, args


def set_determinism(seed: int, deterministic: bool, use_gpu: bool) -> None:
    """Seed Torchreid's RNGs (``train.seed``); deterministic kernels with ``train.deterministic``."""
    torchreid().utils.set_random_seed(seed)
    deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = bool(use_gpu and not deterministic)


def run(cfg, config_path: str = "") -> Dict[str, Any]:
    """Freeze ``cfg`` (a validated config, e.g. from :func:`load_run_config`) and read it once
    (:class:`~torchreid_ext.run_options.RunOptions`); then check, build everything it describes,
    resume if asked, train and evaluate (on every rank of a torchrun job); returns the last
    evaluation's results per target."""
    cfg.freeze()
    options = RunOptions(cfg)
    preflight(options)
    info = distributed.init_distributed(options.dist.backend, options.use_gpu)
    try:
        results = _run(options, str(cfg), config_path, info)
    except BaseException:
        distributed.cleanup_distributed(wait=False)
        raise
    distributed.cleanup_distributed()
    return results


def _run(options: RunOptions, config_text: str, config_path: str, info: "distributed.DistInfo") -> Dict[str, Any]:
    save_dir, main_rank = options.save_dir, info.rank == 0
    log_name = ("test.log" if options.evaluate_only else "train.log") + time.strftime("-%Y-%m-%d-%H-%M-%S")
    data, name = options.datamanager_args, options.model.name
    lock = SaveDirLock(save_dir)
    with RunLog(enabled=main_rank) as log:
        if main_rank:
            lock.acquire()
        try:
            resume = resolve_resume(save_dir, options.resume, options.evaluate_only, options.max_epoch)
            if main_rank:
                remove_stale_temp_files(save_dir)
            set_determinism(options.seed, options.engine.deterministic, options.use_gpu)
            logger.info("Show configuration\n%s\n", config_text)
            logger.info("torch %s, torchreid layout '%s', python %s, device %s, threads %d, processes %d "
                        "(batch size %d per process)", torch.__version__, torchreid().layout,
                        platform.python_version(), "cuda" if options.use_gpu else "cpu", torch.get_num_threads(),
                        info.world_size, data["batch_size_train"])
            with distributed.main_first():  # rank 0 generates a synthetic dataset first
                datamanager = build_datamanager(options)
            lower = "data.height / data.width, train.batch_size or test.batch_size"
            # weights that do not fit, a checkpoint that does not resume: refused before the log opens
            with allocation_failures(f"building '{name}'", lower):
                engine, start_epoch = _build(options, config_path, info, datamanager, resume)
            log.open(osp.join(save_dir, log_name))
            try:
                with allocation_failures(f"the run of '{name}' at {data['height']}x{data['width']}", lower):
                    return engine.run(**{**options.run_args, "start_epoch": start_epoch})
            except BaseException as exc:
                log.record(_error_report(exc))
                raise
        finally:
            lock.release(remove_created=log.path is None)


def _build(options: RunOptions, config_path: str, info: "distributed.DistInfo", datamanager, resume: str):
    """``(engine, start epoch)``: the model (with ``model.load_weights``), optimizer, scheduler and
    engine, resumed from ``resume`` when given."""
    data, model_options = options.datamanager_args, options.model
    if info.world_size > 1:
        distribute_train_loader(datamanager, data["train_sampler"], data["num_instances"], options.seed)
    logger.info("Building model: %s", model_options.name)
    model = build_run_model(model_options, datamanager.num_train_pids, use_gpu=options.use_gpu)
    stats = model_complexity(model, data["height"], data["width"])
    if stats["params"] is not None:
        logger.info("Model complexity: params=%s (classifier excluded), MACs=%s at %dx%d",
                    f"{stats['params']:,}", f"{stats['macs']:,}", data["height"], data["width"])
    if model_options.load_weights:
        load_model_weights(model, model_options.load_weights, model_name=model_options.name)
    model = distributed.prepare_model(model, info.device, sync_bn=options.engine.sync_bn,
                                      channels_last=options.engine.channels_last)
    optimizer = build_optimizer(options, model)
    scheduler = build_scheduler(options, optimizer)
    model = distributed.wrap_ddp(model, info, find_unused_parameters=options.run_args["fixbase_epoch"] > 0)
    run_info = run_record(options, config_path, info.world_size, stats)
    engine = build_run_engine(options, datamanager, model, optimizer, scheduler, run_info=run_info)
    start_epoch = engine.resume(resume) if resume else options.run_args["start_epoch"]
    logger.info("Building %s-engine%s for image-reid", options.loss.name, " with MSGR" if options.msgr.enabled else "")
    return engine, start_epoch


def _error_report(exc: BaseException) -> str:
    """What a failed run's log file records: the one-line error for bad input, else the traceback."""
    if isinstance(exc, UserError):
        return error_line(exc) + "\n"
    if isinstance(exc, KeyboardInterrupt):
        return "error: interrupted (KeyboardInterrupt)\n"
    if isinstance(exc, SystemExit):
        return f"error: exited with status {exc.code}\n"
    return "error: the run failed\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line's work, for Python callers: parse ``argv``, check, train and evaluate;
    returns the last evaluation's results per target, raises on error."""
    cfg, args = load_run_config(argv)
    return run(cfg, args.config)


def main(argv: Optional[List[str]] = None) -> int:
    """``scripts/main.py`` / ``torchreid-ext``: exit status 0 on success, 2 on bad input."""

    def body() -> None:
        train(argv)

    return run_command(body)
