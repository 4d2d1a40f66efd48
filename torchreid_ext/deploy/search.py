"""Find the people of query images in a gallery of unlabelled crops (``torchreid-ext-search``).

* Query: image files and folders (searched recursively). Gallery: a folder of crops (recursively)
  or a features file written by ``scripts/extract.py``, which must come from the same model, input
  size, flip setting and weights (:func:`~torchreid_ext.deploy.saved_features.check_extraction`).
* Distances as the evaluation computes them (:mod:`torchreid_ext.metrics.evaluation`): AQE
  (``test.aqe``), normalisation (``test.normalize_feature``), ``test.dist_metric`` and, with
  ``test.rerank``, k-reciprocal re-ranking; without re-ranking the k nearest come from the k-NN
  index of ``knn.backend`` (:mod:`torchreid_ext.metrics.knn_index`). A query's own file is never
  one of its matches.
* A decision per match: ``same`` when its distance is at most the threshold, else ``different``;
  ``not decided`` without a threshold. The threshold is given, or read from a labelled run's
  ``metrics.json`` at a false-positive rate
  (:func:`torchreid_ext.metrics.verification.threshold_from_metrics`), whose distances must be of
  the same kind (:func:`check_calibration`). Thresholds apply to distances before re-ranking, as
  the evaluator measures them: with ``test.rerank`` matches are ranked by the re-ranked distance
  and decided by the plain one.
* Outputs in ``out_dir``, written together at the end: ``matches.csv`` and ``matches.json`` (a row
  per query and rank: query, rank, gallery, distance, decision, and with re-ranking
  ``distance_before_rerank``) and the report pages (:mod:`~torchreid_ext.deploy.report`).
* Features of a gallery folder are cached (:mod:`~torchreid_ext.deploy.feature_cache`): a second
  search extracts only the files added or changed since.

Every input is checked before the model is built; bad input is a one-line
:class:`~torchreid_ext.errors.UserError` and nothing is written.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import os.path as osp
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.checks import check_images
from ..errors import ConfigError, InputNotFound
from ..files import atomic_output, missing_file_reason, missing_folder_reason, probe_writable
from ..options import is_int, is_number
from .errors import DeployInputError, FeatureFileError
from .extract import eval_model, image_features
from .feature_cache import CacheEntry, GalleryCache, default_cache_dir, file_stats
from .images import IMAGE_EXTENSIONS, ImageSet, image_files
from .model import file_sha256, model_device, resolve_weights
from .report import GENERATOR, QueryRow, page_name, render_pages
from .saved_features import FeatureSet, check_extraction, load_features

__all__ = ["DECISIONS", "MATCHES_CSV", "MATCHES_JSON", "Match", "SearchResult", "TopK", "check_calibration", "decide",
           "decision_threshold", "query_images", "top_matches", "search"]

logger = logging.getLogger(__name__)

DECISIONS = ("same", "different", "not decided")
MATCHES_CSV, MATCHES_JSON = "matches.csv", "matches.json"
KIND = "search"  # marks a matches.json written here


class Match(NamedTuple):
    """One row of the results: the query's ``rank``-th nearest gallery image."""

    query: str
    rank: int
    gallery: str
    distance: float
    decision: str


@dataclass
class SearchResult:
    """What :func:`search` found and wrote."""

    matches: List[Match]
    threshold: Optional[float]
    num_query: int
    num_gallery: int
    files: List[str] = field(default_factory=list)  # written, matches.csv first
    extracted: List[str] = field(default_factory=list)  # gallery files extracted in this search
    changed: List[str] = field(default_factory=list)  # of which changed since the cached extraction
    cached: int = 0  # gallery files whose features came from the cache


def decide(distance: float, threshold: Optional[float]) -> str:
    """``same`` for a distance at most ``threshold``, ``different`` above it, ``not decided`` without one."""
    if threshold is None:
        return "not decided"
    return "same" if distance <= threshold else "different"


def decision_threshold(threshold: Optional[float] = None, calibration: Optional[str] = None,
                       fpr: Optional[float] = None, target: Optional[str] = None, model_name: str = "",
                       options=None) -> Optional[float]:
    """The distance threshold: ``threshold`` itself, or the one at false-positive rate ``fpr``
    (default 0.01) in the verification metrics of ``calibration`` (a metrics.json, read once), or None.
    With ``options`` (the search's evaluation options) and ``model_name``, a calibration of another
    kind of distance is refused (:func:`check_calibration`)."""
    if threshold is not None and calibration:
        raise DeployInputError("give a threshold or a calibration file, not both")
    if calibration is None and (fpr is not None or target is not None):
        raise DeployInputError("fpr and the calibration target go with a calibration file (metrics.json)")
    if threshold is not None:
        if not is_number(threshold) or not math.isfinite(threshold) or threshold < 0:
            raise DeployInputError(f"threshold = {threshold!r} must be a finite distance >= 0")
        return float(threshold)
    if calibration is None:
        return None
    from ..metrics.verification import load_record, threshold_at, verification_block

    record = load_record(calibration)
    block = verification_block(record, calibration, target)
    limit = float(threshold_at(block, 0.01 if fpr is None else fpr, calibration))
    if options is not None:
        check_calibration(calibration, record, block, model_name, options)
    return limit


# the options that make a distance what it is (the verification block records them with its thresholds)
_DISTANCE_KEYS = ("dist_metric", "normalize_feature", "flip", "aqe")


def check_calibration(calibration: str, record: Any, block: Dict[str, Any], model_name: str, options) -> None:
    """Refuse a calibration file whose thresholds are distances of another kind than this search's:
    another model (where the file records it), metric, normalisation, flip or AQE setting. ``record``
    is the file's content, ``block`` its verification block (:func:`decision_threshold` reads them)."""
    recorded_model = record.get("model") if isinstance(record, dict) else None
    if recorded_model and recorded_model != model_name:
        raise DeployInputError(f"calibration file '{calibration}' was measured with model '{recorded_model}', "
                               f"not model.name = '{model_name}': its thresholds are another model's distances")
    kind = block.get("distance") or {}
    for key in _DISTANCE_KEYS:
        if key in kind and kind[key] != getattr(options, key):
            raise DeployInputError(
                f"calibration file '{calibration}' holds thresholds of distances with {options.describe(key)} = "
                f"{kind[key]}, this search uses {getattr(options, key)}: set {options.describe(key)} {kind[key]} "
                "(a threshold applies to one kind of distance only)")


def query_images(paths: Sequence[str], max_side: int) -> ImageSet:
    """The query images: each path an image file or a folder of them (recursive), in the given
    order, each file once; headers checked and each side at most ``max_side`` pixels."""
    if not paths:
        raise DeployInputError("no query given: name one or more images or folders")
    out: List[str] = []
    seen = set()
    for path in paths:
        if osp.isdir(path):
            found = image_files(path)
        elif osp.isfile(path):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                raise DeployInputError(f"query '{path}' is not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)})")
            found = [osp.abspath(path)]
        else:
            raise InputNotFound(f"query '{path}' {missing_file_reason(path)}" + _key_hint(path))
        out += [p for p in found if not (p in seen or seen.add(p))]
    check_images(out, max_side=max_side)
    return ImageSet(out, None, None, "query")


def _key_hint(path: str) -> str:
    """A hint for a config override swallowed by ``--query`` (``--query a.jpg test.flip True``)."""
    from ..config import flat_keys, get_default_config

    if path in flat_keys(get_default_config()):
        return f" ('{path}' is a config key: put KEY VALUE overrides after an option other than --query)"
    return ""


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class TopK(NamedTuple):
    """Each query's k nearest gallery items, nearest first (``Q x k`` arrays)."""

    distances: np.ndarray  # float32: the distances ranked by (re-ranked with test.rerank)
    indices: np.ndarray  # int64 gallery indices
    plain: np.ndarray  # float32: the same pairs' distances before re-ranking (what thresholds apply to)


@torch.no_grad()
def top_matches(qf: np.ndarray, gf: np.ndarray, k: int, options, knn_options=None,
                exclude: Optional[Sequence[int]] = None) -> TopK:
    """Each query's k nearest gallery items under the evaluation ``options`` (AQE, normalisation,
    ``dist_metric``, re-ranking); ``exclude[q]`` (a gallery index, or -1) is never returned (the
    query's own file). The neighbours come from the index of ``knn_options`` (default
    ``options.knn``, the ``knn`` section; re-ranking's neighbour step too)."""
    from ..metrics.distance import compute_distance_matrix
    from ..metrics.evaluation import ranking_features
    from ..metrics.rerank import reranked_distance_matrix

    knn_options = options.knn if knn_options is None else knn_options
    exclude = np.full(len(qf), -1) if exclude is None else np.asarray(exclude)
    q, g = ranking_features(qf, gf, options)
    if options.rerank:
        dist = reranked_distance_matrix(q, g, options.dist_metric, k1=options.rerank_k1, k2=options.rerank_k2,
                                        lambda_value=options.rerank_lambda, knn=knn_options).astype(np.float64)
        dist[np.flatnonzero(exclude >= 0), exclude[exclude >= 0]] = np.inf
        idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
        plain = np.stack([compute_distance_matrix(q[i:i + 1], g[torch.from_numpy(idx[i]).to(g.device)],
                                                  options.dist_metric)[0].cpu().numpy() for i in range(len(idx))])
        return TopK(np.take_along_axis(dist, idx, 1).astype(np.float32), idx, plain.astype(np.float32))
    from ..metrics.knn_index import build_index

    want = min(k + int((exclude >= 0).any()), g.shape[0])
    dist, idx = _index_search(build_index(g, knn_options, metric=options.dist_metric), q, want)
    keep = (idx >= 0) & (idx != exclude[:, None])
    short = np.flatnonzero(keep.sum(1) < k)
    if len(short):  # an approximate index found fewer than k items for these queries: search them exactly
        logger.info("The %s index found fewer than %d matches for %d queries; those are searched exactly",
                    knn_options.backend, k, len(short))
        exact = build_index(g, replace(knn_options, backend="exact"), metric=options.dist_metric)
        dist[short], idx[short] = _index_search(exact, q[torch.from_numpy(short).to(q.device)], want)
        keep[short] = idx[short] != exclude[short, None]
    out_d = np.empty((len(qf), k), dtype=np.float32)
    out_i = np.empty((len(qf), k), dtype=np.int64)
    for r in range(len(qf)):
        out_d[r], out_i[r] = dist[r][keep[r]][:k], idx[r][keep[r]][:k]
    return TopK(out_d, out_i, out_d)


def _index_search(index, q: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    dist, idx = index.search(q, k)
    return _as_numpy(dist).astype(np.float32), _as_numpy(idx).astype(np.int64)


def _check_out_dir(out_dir: str) -> str:
    """``out_dir`` made absolute; it is a writable folder, or can be created (its parent is one)."""
    if not out_dir:
        raise DeployInputError("no output folder given")
    full = osp.abspath(osp.expanduser(out_dir))
    folder = full if osp.isdir(full) else osp.dirname(full)
    if osp.exists(full) and not osp.isdir(full):
        raise DeployInputError(f"output folder '{out_dir}' is a file; give a folder")
    if not osp.isdir(folder):
        raise InputNotFound(f"output folder '{out_dir}': '{folder}' {missing_folder_reason(folder)}")
    problem = probe_writable(folder)
    if problem:
        raise DeployInputError(f"output folder '{out_dir}': cannot write in '{folder}' ({problem})")
    return full


def _check_k(k: Any, num_gallery: Optional[int] = None, self_in_gallery: bool = False) -> None:
    """k is an integer >= 1 and, given the gallery's size, at most that (less the query itself)."""
    if not is_int(k) or k < 1:
        raise DeployInputError(f"k = {k!r} must be an integer >= 1 (matches shown per query)")
    if num_gallery is None:
        return
    limit = num_gallery - int(self_in_gallery)
    if k > limit:
        other = " other than the query itself" if self_in_gallery else ""
        raise DeployInputError(f"k = {k} is larger than the gallery: it holds {limit} image(s){other}; "
                               f"choose k <= {limit}")


class _Gallery:
    """A gallery folder (with its cache) or a features file: paths, and features once extracted."""

    def __init__(self, cfg, source: str, weights: str, cache_dir: Optional[str]):
        self.source = osp.abspath(source)
        self.features: Optional[np.ndarray] = None
        self.cache: Optional[GalleryCache] = None
        self.entry: Optional[CacheEntry] = None
        self.todo: List[str] = []  # files to extract
        self.changed: List[str] = []  # of which changed since the cached extraction
        self.removed = 0  # cached files gone from the folder
        flip = bool(cfg.test.get("flip", False))
        if osp.isfile(source):
            if source.lower().endswith(IMAGE_EXTENSIONS):
                raise DeployInputError(f"gallery '{source}' is an image; give a folder of crops or a features file "
                                       "written by scripts/extract.py")
            fs = load_features(source)
            check_extraction(fs, cfg.model.name, cfg.data.height, cfg.data.width, flip, weights,
                             file_sha256(weights))
            _check_finite(fs)
            self.paths, self.features = list(fs.paths), fs.features
            return
        if not osp.isdir(source):
            raise InputNotFound(f"gallery '{source}' {missing_folder_reason(source)} (give a folder of crops "
                                "or a features file written by scripts/extract.py)")
        self.paths = image_files(source)
        self.sizes, self.mtimes = file_stats(self.paths)
        if cache_dir is not None and not weights:
            logger.warning("No weights file: the gallery cache is not used (it is keyed by the weights "
                           "file's content)")
        elif cache_dir is not None:
            self.cache = GalleryCache(cache_dir, {
                "model": cfg.model.name, "weights_sha256": file_sha256(weights), "height": int(cfg.data.height),
                "width": int(cfg.data.width), "flip": flip, "norm_mean": [float(v) for v in cfg.data.norm_mean],
                "norm_std": [float(v) for v in cfg.data.norm_std], "amp": str(cfg.train.amp),
                "gallery": self.source})
            self.entry = self.cache.load()
        self.rows = np.full(len(self.paths), -1, dtype=np.int64)  # each file's row in the cache entry, or -1
        if self.cache is not None:
            plan = self.cache.plan(self.entry, self.paths, self.sizes, self.mtimes)
            self.rows, self.changed, self.removed = plan.rows, plan.changed, plan.removed
        self.todo = [self.paths[i] for i in np.flatnonzero(self.rows < 0)]
        check_images(self.todo, max_side=cfg.data.max_image_side)  # the files to extract, before any extraction

    def extract(self, cfg, model, device, progress: bool) -> None:
        """Features of every file: from the cache where unchanged, extracted otherwise; the cache updated."""
        if self.features is not None:
            return
        where = f"Gallery '{self.source}': {len(self.paths)} images"
        if self.cache is None:
            logger.info("%s, extracting all (no cache)", where)
        elif not self.todo:
            logger.info("%s, all from the cache (%s): nothing to extract", where, self.cache.path)
        elif self.entry is None:
            logger.info("%s, none in the cache yet: extracting all (cache '%s')", where, self.cache.path)
        else:
            parts = [f"{len(self.paths) - len(self.todo)} from the cache"]
            if self.changed:
                shown = ", ".join(osp.relpath(p, self.source) for p in self.changed[:5])
                more = f" and {len(self.changed) - 5} more" if len(self.changed) > 5 else ""
                parts.append(f"{len(self.changed)} changed since the cached extraction, extracted again: "
                             f"{shown}{more}")
            new = len(self.todo) - len(self.changed)
            if new:
                parts.append(f"{new} new, extracted")
            if self.removed:
                parts.append(f"{self.removed} gone from the folder, dropped")
            logger.info("%s; %s", where, "; ".join(parts))
        new_feats = (image_features(cfg, model, ImageSet(self.todo, None, None, "gallery"), device, progress,
                                    desc="gallery features") if self.todo else None)
        reuse = np.flatnonzero(self.rows >= 0)
        dim = new_feats.shape[1] if new_feats is not None else self.entry.features.shape[1]
        feats = np.empty((len(self.paths), dim), dtype=np.float32)
        if new_feats is not None:
            feats[self.rows < 0] = new_feats
        if len(reuse):
            feats[reuse] = self.entry.features[self.rows[reuse]]
        self.features = feats
        if self.cache is not None and (self.todo or self.removed):
            try:
                self.cache.save(CacheEntry(self.paths, self.sizes, self.mtimes, feats))
            except OSError as exc:  # the results do not depend on it
                logger.warning("Could not update the gallery cache '%s': %s", self.cache.path, exc)


def _check_finite(fs: FeatureSet) -> None:
    finite = np.isfinite(fs.features).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise FeatureFileError(f"gallery features '{fs.path}' hold non-finite values (NaN or inf) in "
                               f"{int((~finite).sum())} rows, the first '{fs.paths[row]}'")


PLAIN_COLUMN = "distance_before_rerank"  # a column of the outputs with test.rerank


def _rows(matches: Sequence[Match], plain: Optional[Sequence[float]]) -> List[Dict[str, Any]]:
    """The output rows: the :class:`Match` fields, and with re-ranking the distance decided on."""
    rows = [m._asdict() for m in matches]
    if plain is not None:
        for row, d in zip(rows, plain):
            row[PLAIN_COLUMN] = d
    return rows


def _csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow([repr(v) if isinstance(v, float) else v for v in row.values()])
    return buf.getvalue()


def _stale_pages(out_dir: str, pages: int) -> List[str]:
    """Report pages of an earlier search beyond the ``pages`` written now (ours only: they carry the generator mark)."""
    stale = []
    page = pages + 1
    while osp.isfile(osp.join(out_dir, page_name(page))):
        path = osp.join(out_dir, page_name(page))
        with open(path, encoding="utf-8", errors="replace") as f:
            if f'content="{GENERATOR}"' in f.read(4096):
                stale.append(path)
        page += 1
    return stale


def _write_outputs(out_dir: str, texts: Dict[str, str]) -> List[str]:
    """Write every ``{name: text}`` into ``out_dir`` together: all to temporary files first, then renamed."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [osp.join(out_dir, name) for name in texts]
    with contextlib.ExitStack() as stack:
        for path, text in zip(paths, texts.values()):
            tmp = stack.enter_context(atomic_output(path))
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
    return paths


def search(
    cfg,
    queries: Sequence[str],
    gallery: str,
    out_dir: str,
    *,
    weights: str = "",
    k: int = 10,
    threshold: Optional[float] = None,
    calibration: Optional[str] = None,
    fpr: Optional[float] = None,
    calibration_target: Optional[str] = None,
    cache_dir: Optional[str] = "",
    per_page: int = 20,
    progress: bool = True,
) -> SearchResult:
    """Search ``gallery`` (a folder of crops or a features file) for each of ``queries`` (images or
    folders) and write the results into ``out_dir`` (see the module docstring).

    ``weights``: a checkpoint of ours or a Torchreid model-zoo file (default: ``model.load_weights``,
    else the newest in ``<data.save_dir>/model``). ``threshold`` or ``calibration`` (with ``fpr``,
    default 0.01, and ``calibration_target`` for a run with several test sets) gives the decisions.
    ``cache_dir``: the gallery cache's folder ('' for the default, None for no cache).
    ``per_page``: queries per report page.
    """
    from ..metrics.evaluation import EvaluationOptions

    _check_k(k)
    if not is_int(per_page) or per_page < 1:
        raise DeployInputError(f"per_page = {per_page!r} must be an integer >= 1 (queries per report page)")
    out_dir = _check_out_dir(out_dir)
    options = EvaluationOptions.from_config(cfg)  # with the knn section (options.knn)
    limit = decision_threshold(threshold, calibration, fpr, calibration_target, cfg.model.name, options)
    weights = resolve_weights(cfg, weights)
    query_set = query_images(queries, cfg.data.max_image_side)
    source = _Gallery(cfg, gallery, weights, None if cache_dir is None else (cache_dir or default_cache_dir()))
    position = {osp.realpath(p): i for i, p in enumerate(source.paths)}
    exclude = np.array([position.get(osp.realpath(p), -1) for p in query_set.paths], dtype=np.int64)
    _check_k(k, len(source.paths), bool((exclude >= 0).any()))
    try:
        options.check_sizes(len(query_set.paths), len(source.paths))
    except ValueError as exc:
        raise ConfigError(f"test options: {exc}") from exc

    device = model_device(cfg)
    model, weights = eval_model(cfg, weights, device)
    logger.info("Searching %d gallery images for %d queries with '%s' (%s)", len(source.paths),
                len(query_set.paths), cfg.model.name, weights or "no weights")
    qf = image_features(cfg, model, query_set, device, progress, desc="query features")
    source.extract(cfg, model, device, progress)
    top = top_matches(qf, source.features, k, options, exclude=exclude)

    matches = [Match(q, r + 1, source.paths[int(top.indices[i, r])], float(top.distances[i, r]),
                     decide(float(top.plain[i, r]), limit))
               for i, q in enumerate(query_set.paths) for r in range(k)]
    rows = _rows(matches, [float(d) for d in top.plain.ravel()] if options.rerank else None)
    info = (f"model {cfg.model.name}, weights {weights or 'none'}; gallery {source.source} "
            f"({len(source.paths)} images); " + (f"threshold {limit:.6g}" if limit is not None else "no threshold")
            + (f" (from {osp.abspath(calibration)} at FPR {0.01 if fpr is None else fpr})" if calibration else ""))
    if options.rerank:
        info += "; distances re-ranked, decisions on the distances before re-ranking"
    pages = render_pages([QueryRow(q, [(m.gallery, m.distance, m.decision) for m in matches[i * k:(i + 1) * k]])
                          for i, q in enumerate(query_set.paths)], per_page, info=info)
    record = {
        "kind": KIND, "model": cfg.model.name, "weights": weights, "gallery": source.source,
        "num_query": len(query_set.paths), "num_gallery": len(source.paths), "k": k,
        "threshold": limit, "calibration": osp.abspath(calibration) if calibration else None,
        "fpr": (0.01 if fpr is None else fpr) if calibration else None,
        "options": asdict(options),  # the knn section included
        "matches": rows,
    }
    stale = _stale_pages(out_dir, len(pages))
    files = _write_outputs(out_dir, {MATCHES_CSV: _csv_text(rows), MATCHES_JSON: json.dumps(record, indent=1),
                                     **dict(pages)})
    for path in stale:
        os.remove(path)
    logger.info("Wrote %s, %s and %d report page(s) (%s) to '%s'", MATCHES_CSV, MATCHES_JSON, len(pages),
                page_name(1), out_dir)
    cached = 0 if source.cache is None else len(source.paths) - len(source.todo)
    return SearchResult(matches, limit, len(query_set.paths), len(source.paths), files, extracted=source.todo,
                        changed=source.changed, cached=cached)
