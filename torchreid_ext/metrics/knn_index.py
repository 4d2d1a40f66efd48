"""k nearest gallery items of query features: exact (blocked matmul) or through faiss (the ``knn`` section).

:func:`build_index` indexes a gallery once; :meth:`KNNIndex.search` gives each query's ``k`` nearest
items, nearest first, with their distances in the evaluator's units (docs/methods.md E2): ``euclidean``
is Torchreid's *squared* Euclidean distance, ``cosine`` is ``1 - cos``. Backends (``knn.backend``):

* ``exact`` (default): blocks of query rows x gallery tiles, each a matmul and a ``topk`` merged into
  a running top k (:mod:`torchreid_ext.metrics.distance`'s formulas); never more than about 4M
  distances at once, whatever the gallery size;
* ``faiss-flat``: faiss's exhaustive search (exact up to float rounding and the order of ties);
* ``faiss-ivf``: an inverted file of ``knn.ivf_nlist`` k-means cells (0: about sqrt(N)), of which
  ``knn.ivf_nprobe`` are searched per query (approximate; k-means trains on at most 64 items per cell);
* ``faiss-hnsw``: a graph (``knn.hnsw_m`` links per node, built with ``knn.hnsw_ef_construction``,
  searched with ``knn.hnsw_ef_search``; approximate).

faiss is an optional dependency (``pip install -e '.[faiss]'``); choosing a faiss backend without it
is a one-line :class:`~torchreid_ext.errors.MissingDependencyError` when the options are made, i.e.
when a config is loaded, before any long work. faiss searches on the CPU in float32 (cosine: inner
products of L2-normalised vectors). Where an approximate index finds fewer than ``k`` items for a query
(an IVF search whose probed cells hold fewer), the missing places hold index -1 and distance inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import MissingDependencyError
from ..options import ConfigOptions, is_int
from .distance import METRICS, ArrayLike, as_features, distance_block

__all__ = ["BACKENDS", "KNNIndex", "KNNOptions", "build_index", "faiss_available"]

BACKENDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
FAISS_EXTRA = "pip install -e '.[faiss]'"
_TILE_ELEMENTS = 1 << 22  # distances per (query rows x gallery tile) block of the exact search
_QUERY_ROWS = 1024  # query rows per block of the exact search (a matmul needs rows to be fast)
_TRAIN_PER_CELL = 64  # faiss-ivf: k-means trains on at most this many items per cell


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _at_least(n: int, what: str) -> Callable[[Any], Optional[str]]:
    def check(x: Any) -> Optional[str]:
        return None if is_int(x) and x >= n else f"is not valid; {what} (an integer >= {n})"
    return check


@dataclass(frozen=True)
class KNNOptions(ConfigOptions):
    """The ``knn`` section: which k-NN backend search and re-ranking's neighbour step use, and the
    approximate backends' parameters (see the module docstring)."""

    SECTION: ClassVar[str] = "knn"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"backend": BACKENDS}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {
        "ivf_nlist": _at_least(0, "give the number of IVF cells, or 0 for about sqrt(gallery size)"),
        "ivf_nprobe": _at_least(1, "give the IVF cells searched per query"),
        "hnsw_m": _at_least(2, "give the HNSW links per node"),
        "hnsw_ef_search": _at_least(1, "give the HNSW search queue length"),
        "hnsw_ef_construction": _at_least(1, "give the HNSW build queue length"),
    }

    backend: str = "exact"  # exact | faiss-flat | faiss-ivf | faiss-hnsw
    ivf_nlist: int = 0  # k-means cells; 0: about sqrt(N), at most N / 39 (faiss's training minimum)
    ivf_nprobe: int = 16  # cells searched per query
    hnsw_m: int = 32  # links per node
    hnsw_ef_search: int = 64  # search queue length (at least k is used)
    hnsw_ef_construction: int = 64  # build queue length

    def check(self) -> None:
        """A faiss backend needs faiss installed (named with the extra that installs it)."""
        if self.backend.startswith("faiss") and not faiss_available():
            raise MissingDependencyError(f"{self.describe('backend')} = '{self.backend}' needs faiss, which is not "
                                         f"installed; install it with: {FAISS_EXTRA}")


class KNNIndex:
    """A gallery indexed for k-NN search (:func:`build_index`); :meth:`search` is the one operation."""

    def __init__(self, size: int, dim: int, metric: str, backend: str):
        self.size, self.dim, self.metric, self.backend = size, dim, metric, backend

    def search(self, query: ArrayLike, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(distances, indices)``, both ``num_query x k``, nearest first: float32 distances in the
        evaluator's units for the index's metric, int64 gallery indices; on the gallery's device
        (exact) or the CPU (faiss)."""
        q = as_features(query, "query")
        if q.shape[1] != self.dim:
            raise ValueError(f"query features are {q.shape[1]}-d, the indexed gallery {self.dim}-d")
        if not is_int(k) or not 1 <= k <= self.size:
            raise ValueError(f"k = {k!r} must be an integer in [1, {self.size}] (the gallery size)")
        return self._search(q, int(k))

    def _search(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _ExactIndex(KNNIndex):
    """Blocked matmul + ``topk`` with the evaluator's formulas; ties ordered by gallery index."""

    def __init__(self, g: torch.Tensor, metric: str):
        super().__init__(g.shape[0], g.shape[1], metric, "exact")
        self.g = F.normalize(g, p=2, dim=1) if metric == "cosine" else g
        self.gn = self.g.pow(2).sum(1) if metric == "euclidean" else None

    @torch.no_grad()
    def _search(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g, gn = self.g, self.gn
        q = q.to(device=g.device, dtype=torch.promote_types(q.dtype, g.dtype))
        g = g.to(q.dtype)
        if self.metric == "cosine":
            q = F.normalize(q, p=2, dim=1)
        qn = q.pow(2).sum(1) if gn is not None else None
        rows = max(1, min(q.shape[0], _QUERY_ROWS, _TILE_ELEMENTS // k))  # a large k: fewer rows at a time
        cols = max(k, _TILE_ELEMENTS // rows)
        out_d = torch.empty((q.shape[0], k), dtype=q.dtype, device=q.device)
        out_i = torch.empty((q.shape[0], k), dtype=torch.int64, device=q.device)
        for a in range(0, q.shape[0], rows):
            b = min(a + rows, q.shape[0])
            best_d = best_i = None
            for c in range(0, self.size, cols):
                e = min(c + cols, self.size)
                d = distance_block(q[a:b], g[c:e], None if qn is None else qn[a:b], None if gn is None else gn[c:e])
                v, i = torch.topk(d, min(k, e - c), dim=1, largest=False, sorted=False)
                i += c
                if best_d is not None:
                    v, i = torch.cat([best_d, v], 1), torch.cat([best_i, i], 1)
                    if v.shape[1] > k:
                        v, p = torch.topk(v, k, dim=1, largest=False, sorted=False)
                        i = i.gather(1, p)
                best_d, best_i = v, i
            out_d[a:b], out_i[a:b] = _ordered(best_d, best_i)
        return out_d.float(), out_i


def _ordered(d: torch.Tensor, i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row by distance, ties by index."""
    by_index = torch.argsort(i, dim=1)
    d, i = d.gather(1, by_index), i.gather(1, by_index)
    by_distance = torch.argsort(d, dim=1, stable=True)
    return d.gather(1, by_distance), i.gather(1, by_distance)


class _FaissIndex(KNNIndex):
    """A faiss index on the CPU (float32); cosine as inner products of normalised vectors."""

    def __init__(self, g: torch.Tensor, metric: str, options: KNNOptions):
        import faiss

        super().__init__(g.shape[0], g.shape[1], metric, options.backend)
        x = self._numpy(g)
        n, dim = x.shape
        faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        self.options = options
        if options.backend == "faiss-flat":
            index = faiss.IndexFlat(dim, faiss_metric)
        elif options.backend == "faiss-ivf":
            nlist = options.ivf_nlist or max(1, int(round(math.sqrt(n))))
            nlist = max(1, min(nlist, n // 39 or 1, n))  # faiss wants >= 39 training points per cell
            index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, faiss_metric), dim, nlist, faiss_metric)
            index.cp.max_points_per_centroid = _TRAIN_PER_CELL  # k-means on a sample (faiss: 256 per cell)
            index.train(x)
            index.nprobe = min(options.ivf_nprobe, nlist)
        else:
            index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss_metric)
            index.hnsw.efConstruction = options.hnsw_ef_construction
        index.add(x)
        self.index = index

    def _numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().to("cpu", torch.float32)
        if self.metric == "cosine":
            x = F.normalize(x, p=2, dim=1)
        return np.ascontiguousarray(x.numpy())

    def _search(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "faiss-hnsw":
            self.index.hnsw.efSearch = max(self.options.hnsw_ef_search, k)
        d, i = self.index.search(self._numpy(q), k)
        d, i = torch.from_numpy(d), torch.from_numpy(i)
        if self.metric == "cosine":
            d = 1 - d
        d[i < 0] = math.inf  # fewer than k found (an IVF search): no item there
        return d, i


def build_index(gallery: ArrayLike, options: Optional[KNNOptions] = None, metric: str = "euclidean") -> KNNIndex:
    """Index ``gallery`` (``N x D`` features) for k-NN search with ``options.backend`` (default exact)
    under ``metric`` (``euclidean``: squared, as Torchreid; ``cosine``: ``1 - cos``)."""
    options = options or KNNOptions()
    if metric not in METRICS:
        raise ValueError(f"metric = {metric!r} is not valid; choose one of {list(METRICS)}")
    g = as_features(gallery, "gallery")
    if options.backend == "exact":
        return _ExactIndex(g, metric)
    options.check()  # faiss installed (options made before it was uninstalled, or by replace())
    return _FaissIndex(g, metric, options)
