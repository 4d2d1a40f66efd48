"""Engines and their registry: ``train.engine`` selects ours in any Torchreid project.

``train.engine`` names a registered engine (:data:`ENGINES`; empty: ``msgr`` with
``msgr.enabled``, else ``metric``, :func:`engine_name`). An engine class provides
``from_options(options, datamanager, model, optimizer, scheduler, **common)``, where ``options``
are the run's options (:class:`~torchreid_ext.run_options.RunOptions`: ``options.msgr``, ...)
and ``common`` the base engine's arguments (:func:`torchreid_ext.builders.build_run_engine`);
register one with :func:`register_engine` (e.g. from a module named in
``$TORCHREID_EXT_PLUGINS``) and select it with ``train.engine <name>``. Without a config,
:class:`ImageDRSLEngine` / :class:`ImageSNEngine` take the constructor arguments of Torchreid's
``ImageTripletEngine``. Wrapping the model in DDP / SyncBatchNorm is the caller's (``cli.run``).
"""
from __future__ import annotations

from .base import ReIDEngine
from .metric import ImageDRSLEngine, ImageMetricEngine, ImageSNEngine
from .msgr import MSGREngine
from .registry import ENGINES, register_engine

__all__ = ["ReIDEngine", "ImageMetricEngine", "ImageDRSLEngine", "ImageSNEngine", "MSGREngine", "ENGINES",
           "register_engine", "engine_name"]


def engine_name(engine: str, msgr_enabled: bool) -> str:
    """The engine a run uses: ``train.engine`` (``engine``), or by default ``msgr`` / ``metric``
    by ``msgr.enabled``."""
    return engine or ("msgr" if msgr_enabled else "metric")


register_engine("metric", ImageMetricEngine)
register_engine("msgr", MSGREngine)
