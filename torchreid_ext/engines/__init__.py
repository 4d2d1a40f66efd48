"""Engines, their registry, and ``build_engine``: one line selects ours in any Torchreid project.

    engine = torchreid_ext.build_engine(cfg, datamanager, model, optimizer, scheduler)

``train.engine`` names a registered engine (:data:`ENGINES`; empty: ``msgr`` with
``msgr.enabled``, else ``metric``). An engine class provides
``from_config(cfg, datamanager, model, optimizer, scheduler, **common)``, where ``common`` are the
base engine's arguments read from the config (:func:`engine_arguments`); register one with
:func:`register_engine` (e.g. from a module named in ``$TORCHREID_EXT_PLUGINS``) and select it
with ``train.engine <name>``. ``cfg.loss.name`` picks the loss terms from the loss registry
(docs/methods.md D5, S4). Without a config, :class:`ImageDRSLEngine` / :class:`ImageSNEngine`
take the constructor arguments of Torchreid's ``ImageTripletEngine``. Wrapping the model in DDP /
SyncBatchNorm is the caller's (``cli.run``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..losses import build_loss_terms
from ..metrics import EvaluationOptions
from .base import ReIDEngine
from .metric import ImageDRSLEngine, ImageMetricEngine, ImageSNEngine
from .msgr import MSGREngine
from .registry import ENGINES, register_engine

__all__ = ["ReIDEngine", "ImageMetricEngine", "ImageDRSLEngine", "ImageSNEngine", "MSGREngine", "ENGINES",
           "register_engine", "engine_name", "engine_arguments", "build_engine"]


def engine_name(cfg) -> str:
    """The engine ``cfg`` selects: ``train.engine``, or by default ``msgr`` / ``metric``."""
    return cfg.train.engine or ("msgr" if cfg.msgr.enabled else "metric")


def engine_arguments(cfg, run_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The base engines' arguments that the config sets (loss terms from the loss registry)."""
    weight_x, metric_losses = build_loss_terms(cfg)
    return dict(
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
        evaluation_options=EvaluationOptions.from_config(cfg),  # test.rerank_k1, test.flip, test.aqe, ...
    )


def build_engine(cfg, datamanager, model, optimizer, scheduler=None, run_info: Optional[Dict[str, Any]] = None):
    """The engine ``cfg`` asks for (a registry lookup), built by its ``from_config``."""
    engine_cls = ENGINES.get(engine_name(cfg))
    return engine_cls.from_config(cfg, datamanager, model, optimizer, scheduler, **engine_arguments(cfg, run_info))


register_engine("metric", ImageMetricEngine)
register_engine("msgr", MSGREngine)
