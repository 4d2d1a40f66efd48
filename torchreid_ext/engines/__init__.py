"""Engines and ``build_engine``: one line selects ours in any Torchreid project.

    engine = torchreid_ext.build_engine(cfg, datamanager, model, optimizer, scheduler)

``cfg.loss.name`` picks the loss terms from the loss registry (softmax, triplet, drsl, sn,
or one added with :func:`torchreid_ext.losses.register_loss`; docs/methods.md D5, S4)
and ``cfg.msgr.enabled`` wraps them in the MSGR engine (docs/methods.md G). Without a config,
:class:`ImageDRSLEngine` / :class:`ImageSNEngine` take the constructor arguments of
Torchreid's ``ImageTripletEngine``. ``train.amp``,
``train.channels_last``, ``train.seed`` (per-epoch reseeding) and ``dist.gather_features``
are passed on; wrapping the model in DDP / SyncBatchNorm is the caller's (``cli.run``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..losses import build_loss_terms
from ..metrics import EvaluationOptions
from .base import ReIDEngine
from .metric import ImageDRSLEngine, ImageMetricEngine, ImageSNEngine

__all__ = ["ReIDEngine", "ImageMetricEngine", "ImageDRSLEngine", "ImageSNEngine", "build_engine",
           "NotAvailableYet"]


class NotAvailableYet(NotImplementedError):
    """A configured feature is planned but not built in this version."""


def build_engine(cfg, datamanager, model, optimizer, scheduler=None, run_info: Optional[Dict[str, Any]] = None):
    """The engine ``cfg`` asks for, with its loss terms built from ``cfg.loss`` (registry)."""
    weight_x, metric_losses = build_loss_terms(cfg)
    kwargs = dict(
        use_gpu=cfg.use_gpu,
        weight_x=weight_x,
        label_smooth=cfg.loss.softmax.label_smooth,
        metric_losses=metric_losses,
        evaluator=cfg.test.evaluator,
        checkpoint_freq=cfg.train.checkpoint_freq,
        run_info=run_info,
        amp=cfg.train.amp,
        channels_last=cfg.train.channels_last,
        seed=cfg.train.seed,
        gather_features=cfg.dist.gather_features,
    )
    if cfg.msgr.enabled:
        try:
            from .msgr import MSGREngine
        except ImportError as exc:
            raise NotAvailableYet(
                "msgr.enabled = True, but the MSGR engine is not available yet in this "
                "version of torchreid_ext; set msgr.enabled False"
            ) from exc
        engine = MSGREngine.from_config(cfg, datamanager, model, optimizer, scheduler, **kwargs)
    else:
        engine = ImageMetricEngine(datamanager, model, optimizer, scheduler, **kwargs)
    engine.evaluation_options = EvaluationOptions.from_config(cfg)  # test.rerank_k1, test.flip, test.aqe, ...
    return engine
