"""Engines and ``build_engine``: one line selects ours in any Torchreid project.

    engine = torchreid_ext.build_engine(cfg, datamanager, model, optimizer, scheduler)

``cfg.loss.name`` picks the loss terms (softmax, triplet, drsl, sn; METHOD.md D5, S4)
and ``cfg.msgr.enabled`` wraps them in the MSGR engine (METHOD.md G). ``train.amp``,
``train.channels_last``, ``train.seed`` (per-epoch reseeding) and ``dist.gather_features``
are passed on; wrapping the model in DDP / SyncBatchNorm is the caller's (``cli.run``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .base import ReIDEngine
from .metric import ImageMetricEngine

__all__ = ["ReIDEngine", "ImageMetricEngine", "build_engine", "loss_weights", "NotAvailableYet"]


class NotAvailableYet(NotImplementedError):
    """A configured feature is planned but not built in this version."""


def loss_weights(cfg) -> Tuple[float, Dict[str, float]]:
    """(weight of cross-entropy, {metric loss name: weight}) for ``cfg.loss.name``."""
    name = cfg.loss.name
    if name == "softmax":
        return 1.0, {}
    if name == "triplet":
        return cfg.loss.triplet.weight_x, {"triplet": cfg.loss.triplet.weight_t}
    if name in ("drsl", "sn"):
        sec = cfg.loss[name]
        return sec.weight_x, {name: sec.weight, "triplet": sec.weight_t}
    raise ValueError(f"loss.name = {name!r}; choose one of ['softmax', 'triplet', 'drsl', 'sn']")


def build_engine(cfg, datamanager, model, optimizer, scheduler=None, run_info: Optional[Dict[str, Any]] = None):
    """The engine ``cfg`` asks for, with its losses built from ``cfg.loss``."""
    weight_x, weights = loss_weights(cfg)
    metric_losses = {}
    if any(w > 0 for w in weights.values()):
        from ..losses import build_metric_loss

        metric_losses = {n: (w, build_metric_loss(n, cfg)) for n, w in weights.items() if w > 0}
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
        return MSGREngine.from_config(cfg, datamanager, model, optimizer, scheduler, **kwargs)
    return ImageMetricEngine(datamanager, model, optimizer, scheduler, **kwargs)
