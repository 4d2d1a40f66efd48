"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) exactly as Torchreid's ``re_ranking``, sparse.

Torchreid's ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`` on the N = Q + G items:

* ``M = D ** 2`` over the concatenation ``D = [[qq, qg], [qg^T, gg]]`` (its inputs are Torchreid's
  squared Euclidean distances, so M is squared once more) and ``O[i, j] = M[j, i] / max_k M[k, i]``;
* ``R(i, n)``: the n items nearest to i by ``O[i, :]``, i itself first;
  ``K(i) = {j in R(i, k1 + 1) : i in R(j, k1 + 1)}``; ``H(j)`` likewise with ``round(k1 / 2)``
  (numpy's rounding); the expansion ``E(i)`` is ``K(i)`` plus each ``H(j)``, ``j in K(i)``, that has
  more than 2/3 of its items in ``K(i)``;
* ``V[i, j] = exp(-O[i, j]) / sum_{j' in E(i)} exp(-O[i, j'])`` on ``E(i)``, 0 elsewhere; with
  ``k2 > 1`` each row is replaced by the mean of the rows of ``R(i, k2)`` (local query expansion);
* ``J[i, g] = 1 - m / (2 - m)`` with ``m = sum_j min(V[i, j], V[g, j])`` (Jaccard distance);
* result ``[q, g] = (1 - lambda) J[q, g] + lambda O[q, g]``.

Here no ``N x N`` matrix exists. One pass over ``tile x tile`` blocks of ``D`` keeps each item's
``k1 + 1`` nearest (a running top-k: after an item's first block only values below its current k-th
smallest are merged) and the maxima ``O`` is normalised by; ``V`` is sparse (``N x |E|``, ``|E| = O(k1)``);
query expansion and the Jaccard sums are sparse joins; the results are produced a block of query
rows at a time. From features (:func:`reranked_distance_blocks`) ``D`` is computed tile by tile and
its symmetry halves the work; from matrices (:func:`re_ranking`) the three inputs are read tile by
tile. Values match Torchreid's to float32 rounding (it sums in float32 in another order).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..options import is_int, is_number
from .distance import (
    ArrayLike,
    as_real_matrix,
    auto_chunk_rows,
    check_chunk_size,
    distance_block,
    prepare_features,
    torch_threads,
)
from .knn import RunningTopK
from .knn_index import KNNOptions, build_index

__all__ = ["check_rerank_args", "re_ranking", "reranked_distance_blocks", "reranked_distance_matrix"]

_TILE = {"cpu": 2048, "other": 8192}  # side of the distance tiles of the neighbour pass
_ROWS = 4096  # item rows per block of the index work (k-reciprocal sets, expansion)
_PAIR_BUDGET = 1 << 22  # Jaccard join: (query entry, gallery entry) pairs per block
_GATHER_BUDGET = 1 << 15  # feature pairs per chunk when gathering distances of index pairs
_MAX_SAMPLE = 1024  # approximate neighbours: items each item's largest distance is taken over (plus its neighbours)


def check_rerank_args(k1, k2, lambda_value, num_items: Optional[int] = None,
                      names: Tuple[str, str, str] = ("k1", "k2", "lambda_value")) -> None:
    """Raise ``ValueError`` naming the bad value; ``names`` are the caller's names for them."""
    n1, n2, nl = names
    if not is_int(k1) or k1 < 1:
        raise ValueError(f"{n1} = {k1!r} must be an integer >= 1")
    if not is_int(k2) or k2 < 1 or k2 > k1:
        raise ValueError(f"{n2} = {k2!r} must be an integer in [1, {n1} = {k1}]")
    if not is_number(lambda_value) \
            or not (0.0 <= float(lambda_value) <= 1.0):
        raise ValueError(f"{nl} = {lambda_value!r} must be a number in [0, 1]")
    if num_items is not None and num_items < k1 + 1:
        raise ValueError(f"re-ranking with {n1} = {k1} needs at least {n1} + 1 = {k1 + 1} query + gallery "
                         f"items, got {num_items}")


def _sq32(d: torch.Tensor) -> torch.Tensor:
    """Torchreid's ``np.power(d, 2).astype(np.float32)``: squared in the input precision."""
    return (d * d).float()


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` for each (s, n)."""
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    return (torch.arange(total, device=starts.device)
            + (starts - offsets).repeat_interleave(lengths, output_size=total))


# ----------------------------------------------------------------------------------------------
# distance sources


def _pair_values(source, rank: torch.Tensor, near: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``|D|`` of O's pairs (i, j): from the neighbour pass where j is among i's nearest (the same
    products), else computed by the source."""
    out = torch.empty(i.numel(), dtype=near.dtype, device=near.device)
    missing = []
    step = max(1, (1 << 22) // rank.shape[1])
    for s in range(0, i.numel(), step):
        ii, jj = i[s:s + step], j[s:s + step]
        hit = rank[ii] == jj.unsqueeze(1)
        found = hit.any(1)
        out[s:s + step] = near[ii].gather(1, hit.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
        missing.append((~found).nonzero().squeeze(1) + s)
    missing = torch.cat(missing)
    if missing.numel():
        out[missing] = source.pair_values(i[missing], j[missing]).abs().to(out.dtype)
    return out


class _FeatureSource:
    """Distances computed from features (Torchreid's formulas, :mod:`torchreid_ext.metrics.distance`)."""

    def __init__(self, q, g, qn, gn):
        self.num_q, self.num_g = q.shape[0], g.shape[0]
        self.x = torch.cat([q, g])
        self.xn = None if qn is None else torch.cat([qn, gn])
        self.dtype, self.device = self.x.dtype, self.x.device

    def work(self) -> int:
        n = self.x.shape[0]
        return n * n

    matmul_threads: Optional[int] = None  # torch threads for the distance products (set by _reranked)

    def _d(self, a, b, c, e):
        xn = self.xn
        with torch_threads(self.matmul_threads):
            return distance_block(self.x[a:b], self.x[c:e], None if xn is None else xn[a:b],
                                  None if xn is None else xn[c:e])

    def neighbours(self, top: RunningTopK, tile: int, bar) -> None:
        n = self.x.shape[0]
        starts = range(0, n, tile)
        # D is symmetric: tiles on and above the diagonal serve both sides; diagonal tiles first, so
        # that each item's first (full top-k) tile is read along its rows
        pairs = [(a, a) for a in starts] + [(a, c) for a in starts for c in starts if c > a]
        for a, c in pairs:
            b, e = min(a + tile, n), min(c + tile, n)
            d = self._d(a, b, c, e)  # ranked by |D|: Torchreid ranks by D ** 2
            top.update(d, 1, a, c)
            if c != a:
                top.update(d, 0, c, a)
            bar.update(d.numel() * (1 if c == a else 2))

    def approximate_neighbours(self, k: int, knn: KNNOptions, bar) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the exact pass gives (each item's ``k`` nearest, nearest first, their ``|D|``, and its
        largest ``|D|``) from the ``knn`` backend's index of the N items. The largest distance is taken
        over the item's neighbours and a fixed sample of ``_MAX_SAMPLE`` items (seeded), not all N."""
        n = self.x.shape[0]
        index = build_index(self.x, knn, "euclidean" if self.xn is not None else "cosine")
        with torch_threads(self.matmul_threads):
            _, rank = index.search(self.x, k)
        if bool((rank < 0).any()):
            raise ConfigError(f"knn.backend = '{knn.backend}' found fewer than k1 + 1 = {k} neighbours for some "
                              "items; search more of the index (knn.ivf_nprobe)")
        rank = rank.to(self.device)
        me = torch.arange(n, device=self.device)
        missing = ~(rank == me.unsqueeze(1)).any(1)  # an approximate search may miss the item itself
        rank[missing, -1] = me[missing]
        near = self.pair_values(me.repeat_interleave(k), rank.reshape(-1)).abs_().view(n, k)
        near, order = torch.sort(near, dim=1, stable=True)
        rank = rank.gather(1, order)
        bar.update(n * k)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:_MAX_SAMPLE].to(self.device)
        xs, xns = self.x[sample], None if self.xn is None else self.xn[sample]
        amax = near[:, -1].clone()
        rows = max(1, (1 << 22) // sample.numel())
        for a in range(0, n, rows):
            b = min(a + rows, n)
            with torch_threads(self.matmul_threads):
                d = distance_block(self.x[a:b], xs, None if self.xn is None else self.xn[a:b], xns)
            amax[a:b] = torch.maximum(amax[a:b], d.abs_().amax(1))
        return rank, near, amax

    def pair_values(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``D[i, j]`` for index pairs."""
        out = torch.empty(i.numel(), dtype=self.dtype, device=self.device)
        for s in range(0, i.numel(), _GATHER_BUDGET):
            ii, jj = i[s:s + _GATHER_BUDGET], j[s:s + _GATHER_BUDGET]
            dot = (self.x[ii] * self.x[jj]).sum(1)
            out[s:s + _GATHER_BUDGET] = (1 - dot) if self.xn is None else self.xn[ii] + self.xn[jj] - 2 * dot
        return out

    def query_rows(self, a: int, b: int) -> torch.Tensor:
        q = self.num_q
        return self._d(a, b, q, q + self.num_g)


class _MatrixSource:
    """Distances read from Torchreid's three matrices; ``D[j, i]`` is what row i of ``O`` uses."""

    def __init__(self, qg, qq, gg):
        self.qg, self.qq, self.gg = qg, qq, gg
        self.num_q, self.num_g = qg.shape
        self.dtype, self.device = qg.dtype, qg.device

    def work(self) -> int:
        n = self.num_q + self.num_g
        return n * n

    def _tile(self, r0, r1, c0, c1):
        """(tile, reduce_dim) of ``D[r0:r1, c0:c1]``, whose columns are the items (rows of O)."""
        q = self.num_q
        if c0 < q:
            return (self.qq[r0:r1, c0:c1], 0) if r0 < q else (self.qg[c0:c1, r0 - q:r1 - q], 1)
        return (self.qg[r0:r1, c0 - q:c1 - q], 0) if r0 < q else (self.gg[r0 - q:r1 - q, c0 - q:c1 - q], 0)

    def neighbours(self, top: RunningTopK, tile: int, bar) -> None:
        q, n = self.num_q, self.num_q + self.num_g
        bounds = [(s, min(s + tile, q)) for s in range(0, q, tile)]
        bounds += [(s, min(s + tile, n)) for s in range(q, n, tile)]
        for c0, c1 in bounds:  # the items: columns of D (rows of O)
            for r0, r1 in bounds:
                t, dim = self._tile(r0, r1, c0, c1)
                top.update(t, dim, c0, r0)
                bar.update(t.numel())

    def pair_values(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``D[j, i]`` for index pairs (O's orientation: row i of O is column i of D)."""
        q = self.num_q
        out = torch.empty(i.numel(), dtype=self.dtype, device=self.device)
        iq, jq = i < q, j < q
        for mask, mat, r, c in ((iq & jq, self.qq, j, i), (iq & ~jq, self.qg, i, j - q),
                                (~iq & jq, self.qg, j, i - q), (~iq & ~jq, self.gg, j - q, i - q)):
            sel = mask.nonzero().squeeze(1)
            out[sel] = mat[r[sel], c[sel]]
        return out

    def query_rows(self, a: int, b: int) -> torch.Tensor:
        return self.qg[a:b]


# ----------------------------------------------------------------------------------------------
# sparse steps


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """``mask[i, a]``: i is among the ``k`` nearest of its ``a``-th nearest (a < k)."""
    n = rank.shape[0]
    rk = rank[:, :k]
    out = torch.empty((n, k), dtype=torch.bool, device=rank.device)
    for a in range(0, n, _ROWS):
        b = min(a + _ROWS, n)
        me = torch.arange(a, b, device=rank.device).view(-1, 1, 1)
        out[a:b] = (rk[rk[a:b]] == me).any(2)
    return out


def _expansion_sets(rank: torch.Tensor, k1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every ``(i, j in E(i))``, sorted by row then column."""
    n, k = rank.shape
    half = int(np.around(k1 / 2.0)) + 1
    kmask = _reciprocal(rank, k)
    hmask = _reciprocal(rank, half)
    h = torch.where(hmask, rank[:, :half], n)  # H(j), n = no item
    hsize = hmask.sum(1).double()
    rows, cols = [], []
    for a in range(0, n, _ROWS):
        b = min(a + _ROWS, n)
        ri, km = rank[a:b], kmask[a:b]
        kset = torch.where(km, ri, -1).sort(1).values  # K(i), sorted; -1: no item
        hc = h[ri].view(b - a, k * half)  # H of each of i's neighbours
        at = torch.searchsorted(kset, hc).clamp_(max=k - 1)
        common = (kset.gather(1, at) == hc).view(b - a, k, half).sum(2)  # |H(j) & K(i)|
        hc = hc.view(b - a, k, half)
        accept = km & (common.double() > (2.0 / 3) * hsize[ri])  # Torchreid's test, in float64
        cand = torch.cat([torch.where(km, ri, n), torch.where(accept.unsqueeze(2), hc, n).flatten(1)], 1)
        cand = cand.sort(1).values
        keep = cand < n
        keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        r, p = keep.nonzero(as_tuple=True)
        rows.append(r + a)
        cols.append(cand[r, p])
    return torch.cat(rows), torch.cat(cols)


def _csr(rows: torch.Tensor, n: int) -> torch.Tensor:
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return ptr


def _local_query_expansion(ptr, cols, vals, rank, k2: int):
    """Row i := mean of the rows ``rank[i, :k2]`` (CSR in, CSR out: ptr, cols, vals)."""
    n = rank.shape[0]
    dev = cols.device
    nnz = ptr[1:] - ptr[:-1]
    src = rank[:, :k2]
    per_row = nnz[src].sum(1)
    out_rows, out_cols, out_vals = [], [], []
    a = 0
    cum = torch.cumsum(per_row, 0)
    while a < n:
        base = int(cum[a - 1]) if a else 0
        b = max(a + 1, int(torch.searchsorted(cum, base + _PAIR_BUDGET, right=True)))
        s = src[a:b].reshape(-1)
        lens = nnz[s]
        idx = _ranges(ptr[s], lens)
        local = torch.arange(b - a, device=dev).repeat_interleave(k2).repeat_interleave(lens, output_size=idx.numel())
        key = local * n + cols[idx]
        key, order = torch.sort(key, stable=True)  # stable: sums in k2 order, as numpy's mean
        uniq, inv = torch.unique_consecutive(key, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=vals.dtype, device=dev).index_add_(0, inv, vals[idx][order])
        out_rows.append(uniq // n + a)
        out_cols.append(uniq % n)
        out_vals.append(summed / k2)
        a = b
    rows = torch.cat(out_rows)
    return _csr(rows, n), torch.cat(out_cols), torch.cat(out_vals)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc="re-ranking", unit="dist", unit_scale=True,
                        dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _SparseReRanking:
    """Steps 1-5 of the module docstring for one problem; :meth:`block` gives rows of the result."""

    def __init__(self, source, k1: int, k2: int, lambda_value: float, bar, knn: Optional[KNNOptions] = None):
        nq, ng = source.num_q, source.num_g
        n = nq + ng
        dev = source.device
        self.source, self.lambda_value, self.bar = source, lambda_value, bar
        if knn is None or knn.backend == "exact":
            top = RunningTopK(n, k1 + 1, source.dtype, dev)
            source.neighbours(top, _TILE["cpu" if dev.type == "cpu" else "other"], bar)
            rank, near = top.ranked()
            amax = top.amax
            del top
        else:  # the knn backend's neighbours (and a sampled largest distance)
            rank, near, amax = source.approximate_neighbours(k1 + 1, knn, bar)
        if not bool(torch.isfinite(amax).all()):
            raise ValueError("re-ranking input distances contain non-finite values (inf or NaN)")
        self.scale = _sq32(amax)  # Torchreid's normaliser: max of the squared distances of each column
        del amax

        er, ec = _expansion_sets(rank, k1)
        weight = torch.exp(-(_sq32(_pair_values(source, rank, near, er, ec)) / self.scale[er]))
        del near
        total = torch.zeros(n, dtype=torch.float32, device=dev).index_add_(0, er, weight)
        ptr, cols, vals = _csr(er, n), ec, weight / total[er]
        del er, weight
        if k2 != 1:
            ptr, cols, vals = _local_query_expansion(ptr, cols, vals, rank, k2)
        del rank

        # gallery rows of V by column (j -> gallery items g with V[g, j] > 0), query rows by row
        gstart = int(ptr[nq])
        g_rows = torch.arange(ng, device=dev).repeat_interleave(ptr[nq + 1:] - ptr[nq:-1])
        order = torch.argsort(cols[gstart:], stable=True)
        self.g_items, self.g_vals = g_rows[order], vals[gstart:][order]
        self.g_ptr = _csr(cols[gstart:], n)
        self.q_ptr, self.q_cols, self.q_vals = ptr[: nq + 1], cols[:gstart], vals[:gstart]
        self.q_rows = torch.arange(nq, device=dev).repeat_interleave(ptr[1:nq + 1] - ptr[:nq])
        self.q_lens = (self.g_ptr[1:] - self.g_ptr[:-1])[self.q_cols]  # gallery entries each query entry meets
        per_query = torch.zeros(nq, dtype=torch.int64, device=dev).index_add_(0, self.q_rows, self.q_lens)
        self.pairs_cum = torch.cumsum(per_query, 0)

    def bounds(self, max_rows: int) -> Iterator[Tuple[int, int]]:
        """Query row ranges of at most ``max_rows`` rows and about ``_PAIR_BUDGET`` join pairs."""
        cum, nq = self.pairs_cum, self.source.num_q
        ends = []
        a = 0
        while a < nq:
            base = int(cum[a - 1]) if a else 0
            b = min(a + max_rows, max(a + 1, int(torch.searchsorted(cum, base + _PAIR_BUDGET, right=True))))
            ends.append((a, b))
            a = b
        return iter(ends)

    def block(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the re-ranked distances (float32): the Jaccard join, then the mix with O."""
        ng, dev = self.source.num_g, self.source.device
        e0, e1 = int(self.q_ptr[a]), int(self.q_ptr[b])
        lens = self.q_lens[e0:e1]
        idx = _ranges(self.g_ptr[self.q_cols[e0:e1]], lens)
        mins = torch.minimum(self.q_vals[e0:e1].repeat_interleave(lens, output_size=idx.numel()), self.g_vals[idx])
        target = (self.q_rows[e0:e1] - a).repeat_interleave(lens, output_size=idx.numel()) * ng + self.g_items[idx]
        m = torch.zeros((b - a) * ng, dtype=torch.float32, device=dev).index_add_(0, target, mins).view(b - a, ng)
        del idx, mins, target
        # Torchreid's float32 operations, in place: 1 - m / (2 - m), then (1 - lambda) J + lambda O
        jaccard = m.div_(torch.rsub(m, 2)).neg_().add_(1).mul_(1 - self.lambda_value)
        original = _sq32(self.source.query_rows(a, b)).div_(self.scale[a:b].unsqueeze(1))
        self.bar.update((b - a) * ng)
        return jaccard.add_(original.mul_(self.lambda_value))


def _reranked(source, k1: int, k2: int, lambda_value: float, rows: Optional[int], progress: bool,
              num_threads: Optional[int], knn: Optional[KNNOptions] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(first query row, float32 block of re-ranked query x gallery distances)``.

    On CPU the index work runs with ``num_threads`` torch threads (default 1: its many short ops
    each wait for every thread, measured 50x slower with 2 threads on a busy 2-core machine); the
    distance products keep torch's setting.
    """
    cpu = source.device.type == "cpu"
    source.matmul_threads = torch.get_num_threads() if cpu else None
    index_threads = (num_threads or 1) if cpu else None
    approximate = knn is not None and knn.backend != "exact"
    n = source.num_q + source.num_g
    bar = _Progress((n * (k1 + 1) if approximate else source.work()) + source.num_q * source.num_g, progress)
    try:
        with torch.no_grad(), torch_threads(index_threads):
            state = _SparseReRanking(source, k1, k2, lambda_value, bar, knn)
            bounds = list(state.bounds(rows or auto_chunk_rows(source.num_g, source.device)))
        for a, b in bounds:
            with torch.no_grad(), torch_threads(index_threads):
                block = state.block(a, b)
            yield a, block
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# public API


def _as_matrix(x, name: str, shape: Tuple[int, int]) -> torch.Tensor:
    t = as_real_matrix(x, name, "rows x columns").detach()
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (from q_g_dist), got {tuple(t.shape)}")
    return t


@torch.no_grad()
def re_ranking(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, num_threads: Optional[int] = None):
    """Torchreid's ``utils.re_ranking``: the ``Q x G`` re-ranked distances from its three distance
    matrices (see the module docstring), float32, as a numpy array for numpy input, else a tensor on
    the inputs' device. Memory beyond the inputs and the result: a few ``2048 x 2048`` tiles and the
    sparse ``V`` (no ``(Q + G)^2`` concatenation). ``num_threads``: torch threads on CPU (default 1)."""
    qg = as_real_matrix(q_g_dist, "q_g_dist", "num_query x num_gallery").detach()
    nq, ng = qg.shape
    check_rerank_args(k1, k2, lambda_value, nq + ng)
    qq = _as_matrix(q_q_dist, "q_q_dist", (nq, nq))
    gg = _as_matrix(g_g_dist, "g_g_dist", (ng, ng))
    if len({qg.device, qq.device, gg.device}) > 1:
        raise ValueError(f"the distance matrices must be on one device, got {qg.device}, {qq.device}, {gg.device}")
    dtype = torch.promote_types(torch.promote_types(qg.dtype, qq.dtype), gg.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    qg, qq, gg = qg.to(dtype), qq.to(dtype), gg.to(dtype)
    out = torch.empty((nq, ng), dtype=torch.float32, device=qg.device)
    for a, block in _reranked(_MatrixSource(qg, qq, gg), k1, k2, float(lambda_value), None, False, num_threads):
        out[a:a + block.shape[0]] = block
    return out.numpy() if isinstance(q_g_dist, np.ndarray) else out


def reranked_distance_blocks(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean",
    normalize: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_size: Optional[int] = None,
    progress: bool = False,
    num_threads: Optional[int] = None,
    knn: Optional[KNNOptions] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(first query row, block)`` of the re-ranked ``Q x G`` distances that Torchreid's engine
    computes with ``test.rerank True`` (``compute_distance_matrix`` for qg, qq and gg, then
    ``re_ranking``), from features, on their device. Blocks have at most ``chunk_size`` query rows
    (None: automatic); neither a ``Q x G`` nor an ``N x N`` matrix is held. Inputs are checked at the
    call. On CPU the distance products use torch's thread setting, the rest ``num_threads`` threads
    (default 1).

    ``knn`` (:class:`~torchreid_ext.metrics.knn_index.KNNOptions`): where its backend is not ``exact``,
    each item's ``k1 + 1`` nearest come from that k-NN index of the N items instead of the exact blocked
    pass over all ``N x N`` distances, and the largest distance each item is normalised by is taken over
    its neighbours and a fixed sample of items (``_MAX_SAMPLE``), not over all N; the rest is unchanged.
    Approximate, and much faster for large N (the exact pass grows with N^2); ``exact`` or None: the
    exact pass, as Torchreid."""
    q, g, qn, gn = prepare_features(qf, gf, metric, normalize)
    check_rerank_args(k1, k2, lambda_value, q.shape[0] + g.shape[0])
    if chunk_size is not None:
        chunk_size = check_chunk_size(chunk_size)
    return _reranked(_FeatureSource(q, g, qn, gn), k1, k2, float(lambda_value), chunk_size, progress, num_threads,
                     knn)


@torch.no_grad()
def reranked_distance_matrix(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean",
    normalize: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    knn: Optional[KNNOptions] = None,
) -> np.ndarray:
    """The full re-ranked ``Q x G`` matrix of :func:`reranked_distance_blocks` (float32 numpy; for rank
    lists; evaluation should stream the blocks instead)."""
    blocks = reranked_distance_blocks(qf, gf, metric, normalize, k1, k2, lambda_value, knn=knn)
    return np.concatenate([block.cpu().numpy() for _, block in blocks])
