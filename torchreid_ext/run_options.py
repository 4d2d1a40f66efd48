"""A run's config, read once: the options each component owns, and Torchreid's arguments.

:class:`RunOptions` is where a training run reads its validated, frozen config, and the only
place it does: the checks (:mod:`torchreid_ext.preflight`), the builders
(:mod:`torchreid_ext.builders`) and the engine take these options, never the config. Each
component's options come from its own class's ``from_config`` (each built once per run); upstream
Torchreid's keys become the keyword arguments of Torchreid's ``ImageDataManager``,
``build_optimizer``, ``build_lr_scheduler`` and ``Engine.run``, through upstream's helpers of the
same names (:func:`imagedata_kwargs`, :func:`optimizer_kwargs`, :func:`lr_scheduler_kwargs`,
:func:`engine_run_kwargs`), which a Torchreid script may call on a config too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .data.checks import DataOptions
from .distributed import DistOptions
from .engines.options import EngineOptions
from .losses import LossOptions
from .metrics.evaluation import EvaluationOptions
from .models.options import ModelOptions
from .msgr.options import MSGROptions

__all__ = ["RunOptions", "imagedata_kwargs", "optimizer_kwargs", "lr_scheduler_kwargs", "engine_run_kwargs"]


@dataclass(frozen=True, init=False)
class RunOptions:
    """Everything a training run reads from its config ``cfg`` (validated by
    :func:`torchreid_ext.config.validate_config`): ``use_gpu`` (``cfg.use_gpu`` when a GPU is
    present, unless given), ``seed`` (``train.seed``), ``resume`` (``model.resume``), each
    component's options and Torchreid's arguments. Read-only."""

    use_gpu: bool
    seed: int
    resume: str  # model.resume: a checkpoint, "auto" or ""
    data: DataOptions
    model: ModelOptions
    loss: LossOptions
    engine: EngineOptions
    msgr: MSGROptions
    dist: DistOptions
    evaluation: EvaluationOptions
    datamanager_args: Dict[str, Any]  # Torchreid's ImageDataManager(**datamanager_args)
    optimizer_args: Dict[str, Any]  # Torchreid's build_optimizer(model, **optimizer_args)
    scheduler_args: Dict[str, Any]  # Torchreid's build_lr_scheduler(optimizer, **scheduler_args)
    run_args: Dict[str, Any]  # Engine.run(**run_args), start_epoch = train.start_epoch

    def __init__(self, cfg, *, use_gpu: Optional[bool] = None) -> None:
        gpu = bool(cfg.use_gpu and torch.cuda.is_available()) if use_gpu is None else bool(use_gpu)
        read = dict(
            use_gpu=gpu,
            seed=cfg.train.seed,
            resume=cfg.model.resume,
            datamanager_args={**imagedata_kwargs(cfg), "use_gpu": gpu},
            optimizer_args=optimizer_kwargs(cfg),
            scheduler_args=lr_scheduler_kwargs(cfg),
            run_args=engine_run_kwargs(cfg),
            model=ModelOptions.from_config(cfg),
            loss=LossOptions.from_config(cfg),
            evaluation=EvaluationOptions.from_config(cfg),  # test.rerank_k1, test.flip, test.aqe, ...
            data=DataOptions.from_config(cfg),
            engine=EngineOptions.from_config(cfg),
            msgr=MSGROptions.from_config(cfg),
            dist=DistOptions.from_config(cfg),
        )
        for name, value in read.items():
            object.__setattr__(self, name, value)

    @property
    def save_dir(self) -> str:
        return self.run_args["save_dir"]

    @property
    def evaluate_only(self) -> bool:
        """``test.evaluate``: evaluate, train nothing."""
        return bool(self.run_args["test_only"])

    @property
    def max_epoch(self) -> int:
        return self.run_args["max_epoch"]


# ---------------------------------------------------------------------------
# cfg -> Torchreid keyword arguments (upstream's helpers of the same names)
# ---------------------------------------------------------------------------
def imagedata_kwargs(cfg) -> dict:
    """Arguments of Torchreid 1.4.0's ``ImageDataManager``."""
    return dict(
        root=cfg.data.root, sources=list(cfg.data.sources), targets=list(cfg.data.targets),
        height=cfg.data.height, width=cfg.data.width, transforms=list(cfg.data.transforms),
        k_tfm=cfg.data.k_tfm, norm_mean=list(cfg.data.norm_mean), norm_std=list(cfg.data.norm_std),
        use_gpu=cfg.use_gpu, split_id=cfg.data.split_id, combineall=cfg.data.combineall,
        load_train_targets=cfg.data.load_train_targets, batch_size_train=cfg.train.batch_size,
        batch_size_test=cfg.test.batch_size, workers=cfg.data.workers,
        num_instances=cfg.sampler.num_instances, num_cams=cfg.sampler.num_cams,
        num_datasets=cfg.sampler.num_datasets, train_sampler=cfg.sampler.train_sampler,
        train_sampler_t=cfg.sampler.train_sampler_t, cuhk03_labeled=cfg.cuhk03.labeled_images,
        cuhk03_classic_split=cfg.cuhk03.classic_split,
        market1501_500k=cfg.market1501.use_500k_distractors,
    )


def optimizer_kwargs(cfg) -> dict:
    """Arguments of Torchreid's ``build_optimizer`` (after the model)."""
    return dict(
        optim=cfg.train.optim, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        momentum=cfg.sgd.momentum, sgd_dampening=cfg.sgd.dampening, sgd_nesterov=cfg.sgd.nesterov,
        rmsprop_alpha=cfg.rmsprop.alpha, adam_beta1=cfg.adam.beta1, adam_beta2=cfg.adam.beta2,
        staged_lr=cfg.train.staged_lr, new_layers=list(cfg.train.new_layers),
        base_lr_mult=cfg.train.base_lr_mult,
    )


def lr_scheduler_kwargs(cfg) -> dict:
    """Arguments of Torchreid's ``build_lr_scheduler`` (after the optimizer)."""
    return dict(
        lr_scheduler=cfg.train.lr_scheduler, stepsize=list(cfg.train.stepsize),
        gamma=cfg.train.gamma, max_epoch=cfg.train.max_epoch,
    )


def engine_run_kwargs(cfg, start_epoch: Optional[int] = None) -> dict:
    """Arguments of ``Engine.run`` (Torchreid's and ours)."""
    return dict(
        save_dir=cfg.data.save_dir, max_epoch=cfg.train.max_epoch,
        start_epoch=cfg.train.start_epoch if start_epoch is None else start_epoch,
        fixbase_epoch=cfg.train.fixbase_epoch, open_layers=list(cfg.train.open_layers),
        start_eval=cfg.test.start_eval, eval_freq=cfg.test.eval_freq, test_only=cfg.test.evaluate,
        print_freq=cfg.train.print_freq, dist_metric=cfg.test.dist_metric,
        normalize_feature=cfg.test.normalize_feature, visrank=cfg.test.visrank,
        visrank_topk=cfg.test.visrank_topk, use_metric_cuhk03=cfg.cuhk03.use_metric_cuhk03,
        ranks=list(cfg.test.ranks), rerank=cfg.test.rerank,
    )
