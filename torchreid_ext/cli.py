"""``scripts/main.py``: upstream Torchreid's command line, running torchreid_ext's engines.

    python scripts/main.py --config configs/quickstart.yaml [KEY VALUE ...]

Same arguments as upstream (``--config-file`` too, ``--root``, ``-s``, ``-t``,
``--transforms``, trailing overrides). Everything that can be wrong with the input is
checked before the log file, the data loaders or the model are created.

Under ``torchrun --nproc_per_node N scripts/main.py ...`` every process joins the job
(``dist.backend``), wraps the model in DistributedDataParallel (SyncBatchNorm first with
``train.sync_bn``; channels-last with ``train.channels_last``) and trains on its own share of
the data: ``train.batch_size`` is PER RANK (global batch = N x batch_size; scale the learning
rate yourself if you want linear scaling), and the train sampler is replaced by its
distributed form (:class:`~torchreid_ext.data.sampler.DistributedIdentitySampler` for
``RandomIdentitySampler``, torch's ``DistributedSampler`` for ``RandomSampler`` /
``SequentialSampler``). Only rank 0 prints, writes the log, TensorBoard, checkpoints and
metrics, and evaluates.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import distributed
from .adapter import torchreid
from .checkpoint import latest_checkpoint, load_pretrained_weights
from .config import (
    ConfigError,
    engine_run_kwargs,
    get_default_config,
    merge_from_file,
    merge_from_list,
    validate_config,
)
from .builders import (
    PretrainedWeightsUnavailable,
    build_datamanager,
    build_engine,
    build_model,
    build_optimizer,
    build_scheduler,
    model_complexity,
)
from .data.checks import check_dataset_present
from .models import available_models

__all__ = ["build_parser", "load_run_config", "preflight", "build_datamanager", "build_model", "main"]


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
    return cfg, args


def resolve_resume(cfg) -> str:
    """The checkpoint to resume from ('' for none); 'auto' = newest in the save dir."""
    resume = cfg.model.resume
    model_dir = osp.join(cfg.data.save_dir, "model")
    if resume == "auto":
        return latest_checkpoint(model_dir) or ""
    if resume and not osp.isfile(resume):
        raise FileNotFoundError(f"model.resume = '{resume}' does not exist")
    return resume


def preflight(cfg) -> str:
    """All checks that need no data loading; returns the checkpoint to resume from."""
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
    for name in dict.fromkeys(list(cfg.data.sources) + list(cfg.data.targets)):
        check_dataset_present(name, cfg.data.root)
    if cfg.model.load_weights and not osp.isfile(cfg.model.load_weights):
        raise FileNotFoundError(f"model.load_weights = '{cfg.model.load_weights}' does not exist")
    preflight_distributed(cfg)
    resume = resolve_resume(cfg)
    existing = latest_checkpoint(osp.join(cfg.data.save_dir, "model"))
    if existing and not resume and not cfg.test.evaluate:
        raise ConfigError(
            f"data.save_dir = '{cfg.data.save_dir}' already holds checkpoints (e.g. '{existing}'); "
            "a new run would overwrite them. Continue it with `model.resume auto`, or choose "
            "another data.save_dir."
        )
    return resume


DDP_SAMPLERS = ("RandomIdentitySampler", "RandomSampler", "SequentialSampler")


def preflight_distributed(cfg) -> None:
    """What cannot work under torchrun with more than one process."""
    if distributed.env_world_size() == 1:
        return
    if cfg.sampler.train_sampler not in DDP_SAMPLERS:
        raise ConfigError(f"sampler.train_sampler = '{cfg.sampler.train_sampler}' has no distributed form; "
                          f"under torchrun choose one of {list(DDP_SAMPLERS)}")
    if cfg.train.sync_bn and not (cfg.use_gpu and torch.cuda.is_available()):
        raise ConfigError("train.sync_bn = True under torchrun needs GPUs (torch's SyncBatchNorm synchronises "
                          "CUDA tensors only); set train.sync_bn False on the CPU")


def distribute_train_loader(dm, cfg) -> None:
    """Replace ``dm.train_loader`` by one whose sampler gives this rank its share (DDP)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .data.sampler import DistributedIdentitySampler

    loader = dm.train_loader
    name = cfg.sampler.train_sampler
    if name == "RandomIdentitySampler":
        sampler = DistributedIdentitySampler(loader.dataset.train, cfg.train.batch_size,
                                             cfg.sampler.num_instances, seed=cfg.train.seed)
    elif name in DDP_SAMPLERS:
        sampler = DistributedSampler(loader.dataset, shuffle=name == "RandomSampler", seed=cfg.train.seed,
                                     drop_last=True)
    else:
        raise ConfigError(f"sampler.train_sampler = '{name}' has no distributed form; choose one of "
                          f"{list(DDP_SAMPLERS)}")
    dm.train_loader = DataLoader(loader.dataset, sampler=sampler, batch_size=loader.batch_size, shuffle=False,
                                 num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=True)


def prepare_model(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """SyncBatchNorm (``train.sync_bn``), device, channels-last; the same model, converted."""
    if cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: torch.nn.Module, cfg, info: "distributed.DistInfo") -> torch.nn.Module:
    """DistributedDataParallel with default settings (MSGR: never ``static_graph``, G6);
    ``find_unused_parameters`` while fixbase epochs freeze the base."""
    if info.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=cfg.train.fixbase_epoch > 0,
    )


class _Tee:
    def __init__(self, stream, path: str):
        self.stream = stream
        self.file = open(path, "a", buffering=1)

    def write(self, msg: str) -> int:
        self.stream.write(msg)
        self.file.write(msg)
        return len(msg)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when inside it (``configs/market/x.yaml``
    tells runs of different dataset folders apart), else absolute."""
    full = osp.abspath(path)
    rel = osp.relpath(full)
    return full if rel.startswith(os.pardir) else rel


@contextlib.contextmanager
def tee_output(path: str):
    """Copy stdout and stderr to ``path`` (appending) for the duration of the block."""
    os.makedirs(osp.dirname(path) or ".", exist_ok=True)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, path), _Tee(err, path)
    try:
        yield path
    finally:
        sys.stdout.file.close()
        sys.stdout, sys.stderr = out, err


def set_determinism(cfg) -> None:
    torchreid().utils.set_random_seed(cfg.train.seed)
    deterministic = bool(cfg.train.deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = bool(cfg.use_gpu and not deterministic)


def run(cfg, config_path: str = "") -> Dict[str, Any]:
    """Build everything ``cfg`` describes, resume if asked, train and evaluate (on every rank
    of a torchrun job; see the module docstring)."""
    resume = preflight(cfg)
    cfg.use_gpu = bool(cfg.use_gpu and torch.cuda.is_available())
    info = distributed.init_distributed(cfg.dist.backend, cfg.use_gpu)
    try:
        results = _run(cfg, config_path, resume, info)
    except BaseException:
        distributed.cleanup_distributed(wait=False)
        raise
    distributed.cleanup_distributed()
    return results


def _rank_output(save_dir: str, log_name: str, rank: int):
    """Rank 0: stdout and stderr teed to the log; other ranks: stdout discarded."""
    if rank == 0:
        return tee_output(osp.join(save_dir, log_name))
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


def _run(cfg, config_path: str, resume: str, info: "distributed.DistInfo") -> Dict[str, Any]:
    save_dir = cfg.data.save_dir
    log_name = ("test.log" if cfg.test.evaluate else "train.log") + time.strftime("-%Y-%m-%d-%H-%M-%S")
    with _rank_output(save_dir, log_name, info.rank):
        set_determinism(cfg)
        tr = torchreid()
        print(f"Show configuration\n{cfg}\n")
        print(f"torch {torch.__version__}, torchreid layout '{tr.prefix}', python {platform.python_version()}, "
              f"device {'cuda' if cfg.use_gpu else 'cpu'}, threads {torch.get_num_threads()}, "
              f"processes {info.world_size} (batch size {cfg.train.batch_size} per process)")
        with distributed.main_first():  # rank 0 generates a synthetic dataset first
            datamanager = build_datamanager(cfg)
        if info.world_size > 1:
            distribute_train_loader(datamanager, cfg)
        print(f"Building model: {cfg.model.name}")
        model = build_model(cfg, datamanager.num_train_pids)
        stats = model_complexity(model, cfg.data.height, cfg.data.width)
        if stats["params"] is not None:
            print(f"Model complexity: params={stats['params']:,} (classifier excluded), "
                  f"MACs={stats['macs']:,} at {cfg.data.height}x{cfg.data.width}")
        if cfg.model.load_weights:
            load_pretrained_weights(model, cfg.model.load_weights)
        model = prepare_model(model, cfg, info.device)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        model = wrap_ddp(model, cfg, info)
        run_info = {
            "config": _display_path(config_path) if config_path else "",
            "max_epoch": cfg.train.max_epoch,
            "model": cfg.model.name,
            "loss": cfg.loss.name,
            "msgr": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.msgr.items()},
            "sources": list(cfg.data.sources),
            "targets": list(cfg.data.targets),
            "seed": cfg.train.seed,
            "input_size": [cfg.data.height, cfg.data.width],
            "world_size": info.world_size,
            "amp": cfg.train.amp,
            **stats,
        }
        engine = build_engine(cfg, datamanager, model, optimizer, scheduler, run_info=run_info)
        start_epoch = cfg.train.start_epoch
        if resume:
            start_epoch = engine.resume(resume)
        print(f"Building {cfg.loss.name}-engine{' with MSGR' if cfg.msgr.enabled else ''} for image-reid")
        return engine.run(**engine_run_kwargs(cfg, start_epoch=start_epoch))


def _user_errors() -> tuple:
    """Exceptions that mean bad input: printed as one line, exit status 2."""
    from .checkpoint import CheckpointError
    from .data.checks import DatasetNotFound, UnreadableImageError
    from .engines import NotAvailableYet
    from .models.msfl import BackboneWeightsError

    return (ConfigError, KeyError, FileNotFoundError, PretrainedWeightsUnavailable, CheckpointError,
            DatasetNotFound, UnreadableImageError, NotAvailableYet, BackboneWeightsError)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    try:
        cfg, args = load_run_config(argv)
        return run(cfg, args.config)
    except _user_errors() as exc:
        if os.environ.get("TORCHREID_EXT_TRACEBACK"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg} (set TORCHREID_EXT_TRACEBACK=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2)
