"""Evaluate saved query / gallery features: the engine's evaluation, without the model.

The test options come from the config saved in the query file (the one the features were
extracted with) plus ``KEY VALUE`` overrides (``test.dist_metric``, ``test.normalize_feature``,
``test.rerank`` ..., ``test.ranks``); the metrics are computed by
:func:`torchreid_ext.metrics.evaluate_test_features` with
:meth:`~torchreid_ext.metrics.EvaluationOptions.from_config`, the function the engine's
evaluation calls, so features extracted from a trained run give the engine's numbers.

``metrics.json`` goes to ``out_dir`` (default: the query file's folder). A ``metrics.json`` there
that this tool did not write (a training run's record) is never overwritten.
"""
from __future__ import annotations

import json
import logging
import os.path as osp
from typing import Any, Dict, Optional, Sequence

import numpy as np
import yaml

from ..config import CN, ConfigError, get_default_config, merge_dict, merge_from_list
from ..data.checks import check_queries
from ..errors import InputNotFound
from ..files import METRICS_FILE, check_output_path, missing_folder_reason, write_json_atomic
from ..metrics.evaluation import format_results  # noqa: F401  (re-exported: deploy.format_results)
from .errors import DeployInputError, FeatureFileError
from .model import model_device
from .saved_features import FeatureSet, load_features

__all__ = ["METRICS_FILE", "config_of", "evaluate_saved", "evaluate_files", "format_results"]

logger = logging.getLogger(__name__)

KIND = "saved_features_evaluation"  # marks a metrics.json written here (safe to overwrite)


def config_of(fs: FeatureSet, opts: Sequence[str] = ()) -> CN:
    """The config saved with ``fs`` (defaults if none) with ``KEY VALUE`` overrides applied."""
    cfg = get_default_config()
    if fs.config:
        try:
            data = yaml.safe_load(fs.config) or {}
        except yaml.YAMLError as exc:
            raise FeatureFileError(f"features file '{fs.path}': its config is not valid YAML ({exc})") from exc
        merge_dict(cfg, data, where=f" in the config saved in '{fs.path}'")
    merge_from_list(cfg, list(opts))
    return cfg


def _check_pair(query: FeatureSet, gallery: FeatureSet) -> None:
    """Both labelled, non-empty and finite, extracted by the same model, weights, size and flip
    setting, with at least one valid query."""
    if query.path and gallery.path and osp.realpath(query.path) == osp.realpath(gallery.path):  # a link too
        shown = f"'{query.path}'" + ("" if query.path == gallery.path else f" (also as '{gallery.path}')")
        logger.warning("the same file %s is given as query and gallery: every query finds itself in the "
                       "gallery, from the same camera, so only other images of its identity count", shown)
    for role, fs in (("query", query), ("gallery", gallery)):
        if not fs.has_labels:
            raise FeatureFileError(
                f"{role} features '{fs.path}' have no pids / camids ({fs.meta.get('source', 'unknown source')}); "
                "evaluation needs features of a dataset split (scripts/extract.py --dataset NAME --split ...)")
        if fs.features.shape[0] == 0:
            raise FeatureFileError(f"{role} features '{fs.path}' hold no rows (0 images); extract a non-empty split")
        finite = np.isfinite(fs.features).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise FeatureFileError(
                f"{role} features '{fs.path}' hold non-finite values (NaN or inf) in {int((~finite).sum())} of "
                f"{len(finite)} rows, the first row {row} ('{fs.paths[row]}'); the model that extracted them "
                "diverged or the file is damaged")
    if query.features.shape[1] != gallery.features.shape[1]:
        raise FeatureFileError(f"query features are {query.features.shape[1]}-d, gallery features "
                               f"{gallery.features.shape[1]}-d: they come from different models")
    if query.model_name != gallery.model_name:
        raise FeatureFileError(f"query features come from model '{query.model_name}', gallery features from "
                               f"'{gallery.model_name}'; extract both with the same model")
    qw, gw = query.meta.get("weights_sha256", ""), gallery.meta.get("weights_sha256", "")
    if qw != gw:
        qf, gf = query.meta.get("weights", ""), gallery.meta.get("weights", "")
        if qf == gf:
            raise FeatureFileError(f"the weights file '{qf}' changed between the query and the gallery extraction "
                                   f"(sha256 {qw[:12]}... vs {gw[:12]}...); extract both again with the same weights")
        raise FeatureFileError(f"query features were extracted with weights '{qf}', gallery features with '{gf}'; "
                               "extract both with the same weights")
    for key in ("flip", "height", "width"):
        if query.meta.get(key) != gallery.meta.get(key):
            logger.warning("query and gallery features differ in %s (%s vs %s)", key, query.meta.get(key),
                           gallery.meta.get(key))


def evaluate_saved(query: FeatureSet, gallery: FeatureSet, cfg: Optional[CN] = None,
                   progress: bool = False) -> Dict[str, Any]:
    """Metrics of saved features with ``cfg``'s test options (default: the query's saved config),
    as the engine's evaluation returns them (``rank1``, ``rank<r>``, ``mAP``, ``mINP``, ``cmc`` ...)."""
    from ..metrics import EvaluationOptions, evaluate_test_features, results_dict

    _check_pair(query, gallery)
    cfg = config_of(query) if cfg is None else cfg
    try:
        options = EvaluationOptions.from_config(cfg, progress=progress)
        options.check_sizes(query.features.shape[0], gallery.features.shape[0])
    except ValueError as exc:
        raise ConfigError(f"test options: {exc}") from exc
    check_queries("", list(zip(query.paths, query.pids, query.camids)),
                  list(zip(gallery.paths, gallery.pids, gallery.camids)),
                  what=f"query features '{query.path}' with gallery features '{gallery.path}'")
    device = model_device(cfg)
    import torch

    result = evaluate_test_features(
        torch.from_numpy(query.features).to(device), torch.from_numpy(gallery.features).to(device),
        query.pids, gallery.pids, query.camids, gallery.camids, options)
    return results_dict(result, list(options.ranks))


def _metrics_path(out_dir: str) -> str:
    """``<out_dir>/metrics.json``, checked writable (before any evaluation) and not another tool's."""
    if not osp.isdir(out_dir):
        raise InputNotFound(f"output folder '{out_dir}' {missing_folder_reason(out_dir)}")
    path = check_output_path(osp.join(out_dir, METRICS_FILE), "metrics file")
    if osp.exists(path):
        try:
            with open(path) as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != KIND:
            raise DeployInputError(f"'{path}' exists and was not written by the saved-features evaluation (a "
                                   "training run's record?); it is left alone: choose another output folder")
    return path


def evaluate_files(query: str, gallery: str, opts: Sequence[str] = (), out_dir: Optional[str] = None,
                   write: bool = True, progress: bool = False) -> Dict[str, Any]:
    """Evaluate two feature files (``scripts/extract.py`` output) with the query file's config and
    ``opts`` overrides; write ``<out_dir>/metrics.json`` (default: the query file's folder) unless
    ``write`` is False. Returns ``{"results", "ranks", "options", "metrics_file", ...}``."""
    from ..metrics import EvaluationOptions

    q, g = load_features(query), load_features(gallery)
    cfg = config_of(q, opts)
    path = _metrics_path(osp.abspath(out_dir or osp.dirname(q.path))) if write else ""
    res = evaluate_saved(q, g, cfg, progress=progress)
    options = EvaluationOptions.from_config(cfg)
    record = {
        "kind": KIND, "query": q.path, "gallery": g.path, "model": q.model_name,
        "weights": q.meta.get("weights", ""), "overrides": list(opts), "ranks": list(options.ranks),
        "options": options.as_dict(), "num_query": int(q.features.shape[0]),
        "num_gallery": int(g.features.shape[0]), "results": res, "metrics_file": path,
    }
    replaced = bool(path) and osp.exists(path)
    if write:
        write_json_atomic(record, path)
        logger.info("Wrote '%s'%s", path, " (replaced the previous one)" if replaced else "")
    return {**record, "replaced": replaced}
