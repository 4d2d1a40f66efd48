"""Query x gallery distances, whole or in chunks of query rows (docs/methods.md E2).

The two metrics rank the gallery exactly as Torchreid's ``compute_distance_matrix`` does:

* ``euclidean``: the *squared* Euclidean distance ``|q|^2 + |g|^2 - 2 q.g`` (Torchreid's
  ``euclidean_squared_distance``; same ranking as the Euclidean distance, and the values
  Torchreid's re-ranking expects);
* ``cosine``: ``1 - cos(q, g)``.

``normalize=True`` L2-normalises both feature sets first, as Torchreid's engine does for
``test.normalize_feature``.

:func:`iter_distance_chunks` is what :func:`torchreid_ext.metrics.evaluate_features` uses: it never
holds more than ``chunk_size`` query rows of the matrix. :func:`compute_distance_matrix` builds the
full matrix. Features with inf or NaN values are rejected up front (they would give NaN distances).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from ..options import is_int

__all__ = [
    "METRICS",
    "auto_chunk_rows",
    "compute_distance_matrix",
    "iter_distance_chunks",
    # the shared steps of the metrics modules (rank, re-ranking, AQE, verification, k-NN)
    "as_real_matrix",
    "as_features",
    "prepare_features",
    "distance_block",
    "distance_blocks",
    "check_chunk_size",
    "torch_threads",
]

ArrayLike = Union[np.ndarray, torch.Tensor]

METRICS = ("euclidean", "cosine")

# Elements of one query-rows x gallery block: bounds the evaluator's temporaries
# (about 16 bytes per element on the dense path) while keeping per-chunk overhead small.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 26}


def auto_chunk_rows(num_gallery: int, device: torch.device) -> int:
    """Default number of query rows per chunk for a gallery of ``num_gallery`` items."""
    budget = _CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    return max(1, budget // max(1, int(num_gallery)))


def as_real_matrix(x: ArrayLike, name: str, axes: str) -> torch.Tensor:
    """A 2-D, non-empty tensor of real numbers from a numpy array (no copy where possible) or a
    tensor; ``axes`` names the two dimensions in the error message."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if not x.dtype.isnative:  # e.g. big-endian data from a file: torch needs native order
            x = x.astype(x.dtype.newbyteorder("="))
        if any(s < 0 for s in x.strides):
            x = np.ascontiguousarray(x)
        with warnings.catch_warnings():  # read-only arrays (e.g. memory maps) are fine: never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({axes}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def as_features(x: ArrayLike, name: str) -> torch.Tensor:
    """Features ``x`` as a finite floating-point ``num_samples x feature_dim`` tensor (float32 for
    integers, and for half precision on the CPU)."""
    x = as_real_matrix(x, name, "num_samples x feature_dim")
    if not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)):
        x = x.float()  # integer features, or half precision where CPU matmul is slow
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):  # sum: one cheap pass
        # inf or NaN features would only show up as NaN distances
        r, c = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains non-finite values (first {float(x[r, c])} at item {r}, dimension {c})")
    return x


@torch.no_grad()
def prepare_features(
    qf: ArrayLike, gf: ArrayLike, metric: str, normalize: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check inputs; return (q, g, |q|^2, |g|^2) ready for row blocks (norms only for euclidean)."""
    if metric not in METRICS:
        raise ValueError(f"metric = {metric!r} is unknown; choose one of {list(METRICS)}")
    q = as_features(qf, "qf")
    g = as_features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"qf and gf must have the same feature dimension, got {q.shape[1]} and {g.shape[1]}"
        )
    if q.device != g.device:
        raise ValueError(f"qf and gf must be on the same device, got {q.device} and {g.device}")
    if q.dtype != g.dtype:
        dtype = torch.promote_types(q.dtype, g.dtype)
        q, g = q.to(dtype), g.to(dtype)
    if normalize or metric == "cosine":
        q = F.normalize(q, p=2, dim=1)
        g = F.normalize(g, p=2, dim=1)
    if metric == "euclidean":
        return q, g, q.pow(2).sum(dim=1), g.pow(2).sum(dim=1)
    return q, g, None, None


def distance_block(q: torch.Tensor, g: torch.Tensor, qn: Optional[torch.Tensor], gn: Optional[torch.Tensor]
                   ) -> torch.Tensor:
    """Distances of prepared rows ``q`` to ``g`` (:func:`prepare_features`): squared Euclidean with
    the squared norms ``qn`` / ``gn``, else 1 - cosine."""
    if qn is not None:  # squared euclidean, Torchreid's formula: |q|^2 + |g|^2, then addmm(-2 q g^T)
        out = qn.unsqueeze(1) + gn.unsqueeze(0)
        return out.addmm_(q, g.t(), beta=1, alpha=-2)
    return torch.mm(q, g.t()).neg_().add_(1)  # 1 - cos


@torch.no_grad()
def compute_distance_matrix(
    qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean", normalize: bool = False
) -> torch.Tensor:
    """The full ``Q x G`` distance matrix on the features' device (E2; needs ``Q * G`` floats).

    Use it where the whole matrix is needed (re-ranking, visualisation); for plain evaluation
    :func:`torchreid_ext.metrics.evaluate_features` works chunk by chunk instead.
    """
    q, g, qn, gn = prepare_features(qf, gf, metric, normalize)
    return distance_block(q, g, qn, gn)


def iter_distance_chunks(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean",
    normalize: bool = False,
    chunk_size: Optional[int] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(first_query_row, distances of chunk_size query rows x G)`` blocks in query order.

    Only one block exists at a time, so memory is ``chunk_size * G`` floats plus the features.
    ``chunk_size=None`` picks :func:`auto_chunk_rows`. Inputs are checked at the call, not lazily.
    """
    prepared = prepare_features(qf, gf, metric, normalize)
    rows = (auto_chunk_rows(prepared[1].shape[0], prepared[0].device) if chunk_size is None
            else check_chunk_size(chunk_size))
    return distance_blocks(*prepared, rows)


@torch.no_grad()
def distance_blocks(q, g, qn, gn, rows: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first row, block)`` of :func:`distance_block` for ``rows`` query rows at a time."""
    for start in range(0, q.shape[0], rows):
        stop = min(start + rows, q.shape[0])
        yield start, distance_block(q[start:stop], g, None if qn is None else qn[start:stop], gn)


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as an int, a ValueError unless it is a positive integer."""
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after (None: unchanged)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
