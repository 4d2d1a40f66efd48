"""Fast rank evaluation: CMC, mAP and mINP with Torchreid's protocol (docs/methods.md E1-E5).

Protocol (as Torchreid's ``evaluate_rank``):

* E1: for each query, gallery items with the same pid AND the same camera are junk and removed;
  pid 0 distractors stay, as negatives.
* E2: the rest of the gallery is ranked by ascending distance; a query with no positive left is
  skipped and counted (``RankResult.num_skipped_queries``).
* E3: CMC@k = fraction of valid queries whose first positive is in the top k;
  AP = (1/|G+|) sum_g (#positives at or above g) / rank(g); INP = |G+| / rank(hardest positive).

How (E4): every metric depends only on the ranks of the positives among the valid gallery, so rows
are never fully sorted (only the items ranked at or before the hardest positive matter). Per block
of query rows we gather each query's few same-pid items (positives and junk), sort only those, and
for every positive p_i (the i-th smallest positive distance) count the gallery items at or below it:

* sparse path: one comparison pass keeps the items at or below the row's hardest positive (for a
  trained model a small fraction of the row: most negatives rank after the last positive). On CPU
  (numpy, always this path) each row's near items are sorted and the row's positives looked up in
  them. numpy's SIMD sort beat every sort-free variant we measured (searchsorted of the items into
  the positives + bincount: 2.5x slower at the MSMT17 shape); even with random distances, where 92%
  of the items are near, the Market shape takes 0.33 s (Torchreid's Cython: 1.4 s). Elsewhere
  (torch) the near items of a block are merged with the positives in one sort of packed int64
  (row, value, kind) keys for float32, or two stable sorts for float64, and a threshold's position
  in the merge gives its count;
* dense path (torch, blocks where too many items are near, e.g. an untrained model):
  ``searchsorted`` of every item against the row's sorted positives gives its bucket (#positives
  below it), and a ``bincount`` of the buckets plus a cumulative sum give the counts.

Then

    rank(p_i) = i + #{negatives n : d(n) <= p_i}
              = i + #{all items <= p_i} - #{positives <= p_i} - #{junk <= p_i}.

Everything runs on the distance matrix's device (CPU or GPU) with plain torch ops, except the
CPU sparse path, which uses numpy because its comparison / compress / sort are several times
faster than torch's on CPU.

Tie rule (pessimistic): a negative at exactly the same distance as a positive ranks ahead of it,
i.e. rank(p_i) = i + #{negatives n : d(n) <= p_i}. Ties among positives change no metric; junk is
removed. Why: ties can then only lower the scores, never reward a degenerate model (with all distances
equal every positive ranks after every negative, instead of first), and the result is deterministic,
whereas Torchreid's ``np.argsort`` orders ties in an implementation-defined way. On tie-free input the
results equal Torchreid's. NaN distances are rejected with an error.

``use_metric_cuhk03=True`` (CUHK03 classic, Torchreid's ``eval_cuhk03``): CMC comes from sampling one
gallery item per identity, 10 times per query, and AP from the full list (mINP too). We draw the
samples from ``np.random`` in exactly Torchreid's order (valid queries in order; per query 10 repeats;
per repeat the gallery identities in order of their nearest kept item; for each a uniform index into
that identity's kept items sorted by distance), with one broadcast ``np.random.randint`` call per
chunk, which consumes the legacy global generator exactly as Torchreid's ``np.random.choice`` calls do.
So with the same ``np.random`` state before the call the CMC equals Torchreid's on tie-free input,
and the global generator ends in the same state. E4's shortcut does not cover this CMC (it depends on
every identity's nearest item and on a random item of each), so this path sorts each row of the block;
CUHK03 galleries are small (5,332 items) and its automatic blocks are 8x smaller.

Why one module of ~590 lines: the sparse, dense and CUHK03 paths share the per-block gathering of
positives and junk and the rank formula above; split apart they would each need that machinery.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..options import is_int
from .distance import (
    ArrayLike,
    as_real_matrix,
    auto_chunk_rows,
    check_chunk_size,
    distance_blocks,
    prepare_features,
    torch_threads,
)
from .knn_index import KNNOptions

__all__ = ["RankResult", "evaluate_features", "evaluate_rank", "as_labels", "check_max_rank"]

LabelLike = Union[np.ndarray, torch.Tensor, Sequence[int]]

# Sparse path while the items at or below each row's hardest positive are at most this fraction of
# the block; otherwise the dense path. Measured on the Market shape (CPU, one thread): the numpy
# per-row sort beats the dense path at any fraction (0.29 s vs 1.18 s at 84%); the torch merges
# cross over at ~45% (float32, packed keys) and ~7% (float64, two stable sorts).
_SPARSE_MAX_FRACTION = {"numpy": 1.0, "packed": 0.4, "sorted": 0.06}
_PACKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # values that fit 32-bit keys
_NUMPY_SCAN = True  # CPU: sparse path in numpy (faster); tests switch it off to cover the torch one
_CUHK03_REPEATS = 10  # Torchreid's eval_cuhk03: num_repeats
_MATMUL_MIN_ROWS = 256  # evaluate_features: query rows per distance block, at least (automatic blocks)
_CUHK03_ROW_DIVISOR = 8  # its sorted path holds several int64 rows x gallery tensors: smaller auto chunks


@dataclass(frozen=True, eq=False)
class RankResult:
    """Metrics of one evaluation (E3); fractions in [0, 1], like Torchreid's ``evaluate_rank``."""

    cmc: np.ndarray  # float64, length max_rank; cmc[k - 1] = CMC@k
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int  # queries with no positive left after removing junk (E2)
    extras: dict = field(default_factory=dict, compare=False, repr=False)
    # same-person verification over the cross-camera pairs (E6; metrics.verification), where computed
    verification: Optional["VerificationResult"] = field(default=None, compare=False, repr=False)  # noqa: F821

    def rank(self, k: int) -> float:
        """CMC@k (1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"k must be in [1, {len(self.cmc)}], got {k}")
        return float(self.cmc[k - 1])


# ----------------------------------------------------------------------------------------------
# input checks


def _as_distmat(distmat: ArrayLike) -> torch.Tensor:
    return as_real_matrix(distmat, "distmat", "num_query x num_gallery").detach()


def as_labels(x: LabelLike, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Identity or camera labels ``x`` as an int64 tensor of ``length`` on ``device``."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
        t = x.detach()
    else:
        a = np.asarray(x)
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        t = torch.from_numpy(a.astype(np.int64, copy=False))
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} has length {t.shape[0]}, expected {length} (from the distance matrix / features)")
    return t.to(device=device, dtype=torch.int64)


def _check_threads(num_threads: Optional[int]) -> None:
    if num_threads is not None and (
        not is_int(num_threads) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")


def check_max_rank(max_rank: int) -> int:
    """``max_rank`` as an int, a ValueError unless it is an integer >= 1."""
    if not is_int(max_rank) or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    return int(max_rank)


# ----------------------------------------------------------------------------------------------
# the evaluator


class _RankAccumulator:
    """Labels prepared once on the device; ``add`` folds in one block of query rows (E1-E4)."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids, num_q, num_g, device, max_rank, cuhk03):
        self.num_q, self.num_g = num_q, num_g
        self.device = device
        self.max_rank = check_max_rank(max_rank)
        self.cuhk03 = bool(cuhk03)
        self.q_pids = as_labels(q_pids, "q_pids", num_q, device)
        g_pids_t = as_labels(g_pids, "g_pids", num_g, device)
        self.q_camids = as_labels(q_camids, "q_camids", num_q, device)
        self.g_camids = as_labels(g_camids, "g_camids", num_g, device)

        # Gallery identities as 0..P-1; each query's identity index (-1: not in the gallery).
        uniq, self.g_gid, counts = torch.unique(g_pids_t, sorted=True, return_inverse=True, return_counts=True)
        self.num_gids = uniq.numel()
        pos = torch.searchsorted(uniq, self.q_pids).clamp(max=uniq.numel() - 1)
        self.q_gid = torch.where(uniq[pos] == self.q_pids, pos, torch.full_like(pos, -1))
        # Table of each identity's gallery items (padded): row gid -> gallery indices.
        by_gid = torch.argsort(self.g_gid, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        used = self.q_gid[self.q_gid >= 0]
        width = int(counts[used].max()) if used.numel() else 0
        col = torch.arange(width, device=device)
        self.table_valid = col.unsqueeze(0) < counts.unsqueeze(1)
        self.table = by_gid[(starts.unsqueeze(1) + col).clamp(max=num_g - 1)]

        self.first_hist = torch.zeros(self.max_rank + 2, dtype=torch.int64, device=device)
        self.cuhk03_cmc = torch.zeros(self.max_rank, dtype=torch.float64, device=device)
        self.ap_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.inp_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.num_valid = 0
        self.num_skipped = 0
        self.sparse_chunks = 0
        self.dense_chunks = 0
        self.near_items = 0  # sparse path: items at or below their row's hardest positive (diagnostics)

    # -- one block -----------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, start: int, dist: torch.Tensor) -> None:
        if not dist.is_floating_point():
            dist = dist.double()
        elif dist.device.type == "cpu" and dist.dtype in (torch.float16, torch.bfloat16):
            dist = dist.float()
        if not dist.is_contiguous():
            dist = dist.contiguous()
        if torch.isnan(dist.amax()):  # amax propagates NaN; one cheap reduction
            bad = torch.isnan(dist).nonzero()[0].tolist()
            raise ValueError(f"distmat contains non-finite values: NaN (first at query {start + bad[0]}, "
                             f"gallery {bad[1]}); non-finite features give NaN distances")
        n = dist.shape[0]
        stop = start + n
        q_gid = self.q_gid[start:stop]
        has_gid = q_gid >= 0
        gid = q_gid.clamp(min=0)

        # E1: the query's same-pid gallery items: positives (other cameras) and junk (same camera).
        idx = self.table[gid]  # n x W gallery indices
        same_pid = self.table_valid[gid] & has_gid.unsqueeze(1)
        same_cam = self.g_camids[idx] == self.q_camids[start:stop].unsqueeze(1)
        is_pos = same_pid & ~same_cam
        is_junk = same_pid & same_cam
        num_pos = is_pos.sum(1)
        num_junk = is_junk.sum(1)
        valid = num_pos > 0
        n_valid = int(valid.sum())
        self.num_valid += n_valid
        self.num_skipped += n - n_valid
        if n_valid == 0:
            return

        sd = dist.gather(1, idx)
        inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
        m = int(num_pos.max())
        pos_d = torch.where(is_pos, sd, inf).sort(1).values[:, :m].contiguous()  # n x m, +inf padded
        mj = max(int(num_junk.max()), 1)
        junk_d = torch.where(is_junk, sd, inf).sort(1).values[:, :mj].contiguous()

        # counts[q, i] = #{all gallery items g : d(q, g) <= pos_d[q, i]}  (E4)
        counts = self._count_at_or_below(dist, pos_d, num_pos, valid)

        pos_le = torch.searchsorted(pos_d, pos_d, right=True).clamp(max=num_pos.unsqueeze(1))
        junk_le = torch.searchsorted(junk_d, pos_d, right=True).clamp(max=num_junk.unsqueeze(1))
        i = torch.arange(1, m + 1, device=dist.device)
        ranks = i + (counts - pos_le - junk_le)  # pessimistic tie rule: tied negatives go first

        ranks, npos, i = ranks[valid], num_pos[valid], i.unsqueeze(0)
        in_row = i <= npos.unsqueeze(1)
        # padded columns (i > |G+|) hold meaningless ranks: mask them before dividing
        prec = torch.where(in_row, i / ranks.clamp(min=1).double(), 0.0)
        self.ap_sum += (prec.sum(1) / npos.double()).sum()
        hardest = ranks.gather(1, (npos - 1).unsqueeze(1)).squeeze(1)
        self.inp_sum += (npos.double() / hardest.double()).sum()
        if self.cuhk03:
            self.cuhk03_cmc += self._cuhk03_cmc(dist[valid], start + valid.nonzero().squeeze(1))
        else:
            first = ranks[:, 0].clamp(max=self.max_rank + 1)
            self.first_hist += torch.bincount(first, minlength=self.max_rank + 2)

    def _count_at_or_below(self, dist, pos_d, num_pos, valid) -> torch.Tensor:
        """For each row q and positive i: #{g : dist[q, g] <= pos_d[q, i]} (rows with i <= num_pos)."""
        n, g = dist.shape
        m = pos_d.shape[1]
        # hardest positive of each valid row; invalid rows select nothing
        hardest = pos_d.gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1))
        hardest = torch.where(valid.unsqueeze(1), hardest, torch.full_like(hardest, -float("inf")))
        if dist.device.type == "cpu" and _NUMPY_SCAN:
            kind = "numpy"
        else:
            kind = "packed" if pos_d.dtype in _PACKED_DTYPES else "sorted"
        limit = int(_SPARSE_MAX_FRACTION[kind] * n * g)
        if kind == "numpy":
            counts = _near_counts_numpy(dist.numpy(), hardest.numpy(), pos_d.numpy(), limit)
        else:
            near = _near_items(dist, hardest, limit)
            counts = None if near is None else _merge_counts(*near, pos_d)
        if counts is not None:
            self.sparse_chunks += 1
            self.near_items += int(counts.gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1))[valid].sum())
            return counts
        self.dense_chunks += 1
        bucket = torch.searchsorted(pos_d, dist, out_int32=True)  # #{positives < d}, in [0, m]
        offs = torch.arange(0, n * (m + 1), m + 1, device=dist.device, dtype=torch.int32).unsqueeze(1)
        hist = torch.bincount(bucket.add_(offs).view(-1), minlength=n * (m + 1)).view(n, m + 1)
        # d <= p_i  <=>  bucket(d) <= i - 1
        return hist[:, :m].cumsum(1)

    def _cuhk03_cmc(self, dist: torch.Tensor, qidx: torch.Tensor) -> torch.Tensor:
        """Sum over these valid queries of Torchreid's single-gallery-shot CMC (see module doc)."""
        n, g = dist.shape
        dev = dist.device
        q_gid = self.q_gid[qidx]
        same_pid = self.g_gid.unsqueeze(0) == q_gid.unsqueeze(1)
        junk = same_pid & (self.g_camids.unsqueeze(0) == self.q_camids[qidx].unsqueeze(1))
        # Total order of each row: distance, then negatives before same-pid items (the tie rule),
        # then gallery index.
        pre = torch.argsort(same_pid.to(torch.uint8), dim=1, stable=True)
        order = pre.gather(1, torch.argsort(dist.gather(1, pre), dim=1, stable=True))
        kept = ~junk.gather(1, order)
        spid = self.g_gid[order]  # identity at each sorted position
        position = torch.arange(g, device=dev).expand(n, g)
        num_ids = self.num_gids
        cnt = torch.zeros(n, num_ids, dtype=torch.int64, device=dev).scatter_add_(1, spid, kept.long())
        first = torch.full((n, num_ids), g, dtype=torch.int64, device=dev)
        first.scatter_reduce_(1, spid, torch.where(kept, position, g), reduce="amin")
        id_order = torch.argsort(first, dim=1, stable=True)  # identities by nearest kept item
        present = (cnt > 0).sum(1)
        width = int(present.max())
        id_order = id_order[:, :width]
        cnt_ord = cnt.gather(1, id_order)
        slot_used = torch.arange(width, device=dev).unsqueeze(0) < present.unsqueeze(1)

        # Torchreid's draws, in its order: query, repeat, identity.
        reps = _CUHK03_REPEATS
        used = slot_used.unsqueeze(1).expand(n, reps, width).cpu().numpy()
        highs = cnt_ord.unsqueeze(1).expand(n, reps, width).cpu().numpy()[used]
        draws = np.zeros((n, reps, width), dtype=np.int64)
        draws[used] = np.random.randint(0, highs)
        draws = torch.from_numpy(draws).to(dev)

        # Kept positions grouped by identity (ascending within each): the r-th item of identity p
        # sits at starts[p] + r.
        key = torch.where(kept, spid, num_ids) * g + position
        grouped = key.sort(1).values % g
        starts = cnt.cumsum(1) - cnt
        pick = starts.gather(1, id_order).unsqueeze(1) + draws  # n x reps x width
        chosen = grouped.gather(1, pick.view(n, -1)).view(n, reps, width)
        is_query_id = (id_order == q_gid.unsqueeze(1)).unsqueeze(1)
        pos_at = (chosen * is_query_id).sum(2, keepdim=True)
        before = ((chosen < pos_at) & slot_used.unsqueeze(1)).sum(2)  # n x reps
        k = torch.arange(1, self.max_rank + 1, device=dev)
        hit = ((before + 1).unsqueeze(2) <= k).double()  # n x reps x max_rank
        return hit.mean(1).sum(0)

    # -- totals --------------------------------------------------------------------------------
    def result(self) -> RankResult:
        if self.num_valid == 0:
            raise ValueError(
                f"no valid query: none of the {self.num_q} queries has a positive gallery item "
                "(same pid, different camera) after removing junk (same pid and camera)"
            )
        nv = self.num_valid
        if self.cuhk03:
            cmc = (self.cuhk03_cmc / nv).cpu().numpy()
        else:
            cmc = (self.first_hist[1 : self.max_rank + 1].cumsum(0).double() / nv).cpu().numpy()
        return RankResult(
            cmc=cmc.astype(np.float64),
            mAP=float(self.ap_sum) / nv,
            mINP=float(self.inp_sum) / nv,
            num_valid_queries=nv,
            num_skipped_queries=self.num_skipped,
            extras={
                "sparse_chunks": self.sparse_chunks,
                "dense_chunks": self.dense_chunks,
                "near_items": self.near_items,
            },
        )


def _near_counts_numpy(d: np.ndarray, hardest: np.ndarray, pos_d: np.ndarray, limit: int) -> Optional[torch.Tensor]:
    """CPU sparse path: counts[q, i] = #{g : d[q, g] <= pos_d[q, i]}, or None if more than ``limit`` items
    lie at or below their row's hardest positive.

    numpy's comparison, compress and sort are several times faster than torch's on CPU; each row's few
    near items are sorted and the row's positives looked up in them (side='right': ties count as <=).
    """
    near = d <= hardest
    per_row = np.count_nonzero(near, axis=1)
    if int(per_row.sum()) > limit:
        return None
    vals = np.compress(near.reshape(-1), d.reshape(-1))  # row-major: row q's items are contiguous
    ends = np.cumsum(per_row)
    counts = np.zeros(pos_d.shape, dtype=np.int64)
    for q in np.flatnonzero(per_row):
        seg = vals[ends[q] - per_row[q] : ends[q]]
        seg.sort()
        counts[q] = np.searchsorted(seg, pos_d[q], side="right")
    return torch.from_numpy(counts)


def _near_items(dist: torch.Tensor, hardest: torch.Tensor, limit: int):
    """(row, value) of the items with ``dist <= hardest`` of their row, or None if more than ``limit``."""
    g = dist.shape[1]
    near = dist <= hardest
    if int(torch.count_nonzero(near)) > limit:
        return None
    flat = near.view(-1).nonzero().squeeze(1)
    return flat // g, dist.view(-1)[flat]


def _merge_counts(rows: torch.Tensor, vals: torch.Tensor, pos_d: torch.Tensor) -> torch.Tensor:
    """counts[q, i] = #{k : rows[k] == q and vals[k] <= pos_d[q, i]}, by merging items and thresholds.

    Items and thresholds are ordered together by (row, value), an item before a threshold of equal
    value; a threshold's position in that order minus its row's start minus the thresholds before it
    in its row (i, as a row's thresholds are ascending) is the number of items <= it.
    """
    n, m = pos_d.shape
    dev = pos_d.device
    rows = rows.to(dev)
    per_row = torch.bincount(rows, minlength=n) + m
    row_start = torch.cumsum(per_row, 0) - per_row
    i = torch.arange(m, device=dev)
    if pos_d.dtype in _PACKED_DTYPES:
        slot = _merge_slots_packed(rows, vals.to(dev, torch.float32), pos_d.float())
    else:
        slot = _merge_slots_sorted(rows, vals.to(dev, pos_d.dtype), pos_d)
    return slot.view(n, m) - row_start.unsqueeze(1) - i


def _merge_slots_packed(rows: torch.Tensor, vals: torch.Tensor, pos_d: torch.Tensor) -> torch.Tensor:
    """float32: one sort of int64 keys (row << 33 | order-preserving bits of the value << 1 | is_threshold).

    Returns the sorted positions of the thresholds, which come out in (row, i) order.
    """
    n, m = pos_d.shape

    def key(r: torch.Tensor, v: torch.Tensor, flag: int) -> torch.Tensor:
        bits = (v + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (equal values, equal keys)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + (1 << 31)  # monotone in v, in [0, 2^32)
        return (r << 33) | (ordered << 1) | flag

    t_rows = torch.arange(n, device=pos_d.device).repeat_interleave(m)
    keys = torch.cat([key(rows, vals, 0), key(t_rows, pos_d.reshape(-1), 1)])
    keys = torch.sort(keys).values
    return torch.nonzero(keys & 1).squeeze(1)


def _merge_slots_sorted(rows: torch.Tensor, vals: torch.Tensor, pos_d: torch.Tensor) -> torch.Tensor:
    """Any dtype (float64): stable sort by value, then stable sort by row; items concatenated first."""
    n, m = pos_d.shape
    k = rows.numel()
    dev = pos_d.device
    all_rows = torch.cat([rows, torch.arange(n, device=dev).repeat_interleave(m)])
    all_vals = torch.cat([vals, pos_d.reshape(-1)])
    by_val = torch.argsort(all_vals, stable=True)
    order = by_val[torch.argsort(all_rows[by_val], stable=True)]
    slot = torch.empty(n * m, dtype=torch.int64, device=dev)
    is_t = order >= k
    slot[order[is_t] - k] = torch.arange(k + n * m, device=dev)[is_t]
    return slot


def _chunk_rows(chunk_size: Optional[int], num_g: int, device: torch.device, cuhk03: bool) -> int:
    """Query rows per block: ``chunk_size``, or automatic (smaller for the CUHK03 path)."""
    if chunk_size is not None:
        return check_chunk_size(chunk_size)
    rows = auto_chunk_rows(num_g, device)
    return max(1, rows // _CUHK03_ROW_DIVISOR) if cuhk03 else rows


@contextlib.contextmanager
def _cpu_threads(device: torch.device, num_threads: Optional[int]):
    """Run the ranking ops with ``num_threads`` torch threads on CPU (default 1), then restore.

    The per-block ops are short; with several intra-op threads each one waits for all threads, which
    on a shared or busy CPU costs far more than it gains (measured 7x slower with 2 threads on the
    2-core reference machine under load). The distance matmul is not affected.
    """
    _check_threads(num_threads)
    with torch_threads((num_threads or 1) if device.type == "cpu" else None):
        yield


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="query", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def evaluate_rank(
    distmat: ArrayLike,
    q_pids: LabelLike,
    g_pids: LabelLike,
    q_camids: LabelLike,
    g_camids: LabelLike,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    chunk_size: Optional[int] = None,
    progress: bool = False,
    num_threads: Optional[int] = None,
) -> RankResult:
    """CMC, mAP and mINP of a query x gallery distance matrix (E1-E4), like Torchreid's ``evaluate_rank``.

    ``distmat`` may be a numpy array or a torch tensor (any device; the work runs there). ``cmc`` has
    ``max_rank`` entries even when the gallery is shorter (then its tail is 1). ``chunk_size`` query
    rows are processed at a time (None: automatic), which bounds the temporary memory. On CPU the
    ranking uses ``num_threads`` torch threads (default 1; see ``_cpu_threads``). Ties (E4): a negative
    at exactly a positive's distance ranks ahead of it. NaN distances raise ``ValueError``.
    """
    d = _as_distmat(distmat)
    acc = _RankAccumulator(q_pids, g_pids, q_camids, g_camids, d.shape[0], d.shape[1], d.device, max_rank,
                           use_metric_cuhk03)
    rows = _chunk_rows(chunk_size, d.shape[1], d.device, use_metric_cuhk03)
    with _progress(d.shape[0], progress, "evaluate") as bar, _cpu_threads(d.device, num_threads):
        for start in range(0, d.shape[0], rows):
            acc.add(start, d[start : start + rows])
            bar.update(min(rows, d.shape[0] - start))
    return acc.result()


@torch.no_grad()
def evaluate_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: LabelLike,
    g_pids: LabelLike,
    q_camids: LabelLike,
    g_camids: LabelLike,
    metric: str = "euclidean",
    normalize: bool = False,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    chunk_size: Optional[int] = None,
    progress: bool = False,
    num_threads: Optional[int] = None,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    block_hook: Optional[Callable[[int, torch.Tensor], None]] = None,
    knn: Optional[KNNOptions] = None,
) -> RankResult:
    """Evaluate features directly, computing distances a block of query rows at a time (E2-E4).

    Same result as ``evaluate_rank(compute_distance_matrix(qf, gf, metric, normalize), ...)`` but the
    full Q x G matrix never exists: memory is the features plus ``chunk_size x G`` floats
    (``chunk_size=None``: distances for at least 256 query rows at a time, ranked in blocks of about
    4M elements on CPU, 64M on GPU, 8x fewer for CUHK03; 100 MB at the MSMT17 shape).
    ``metric`` is ``'euclidean'`` (squared, as Torchreid) or ``'cosine'``; ``normalize``
    L2-normalises features first. ``progress=True`` shows a tqdm bar with an ETA. Runs on ``qf``'s
    device; ``num_threads`` applies to the ranking ops only (the distance matmul uses torch's setting).

    ``rerank=True``: the distances are Torchreid's k-reciprocal re-ranking of these distances
    (``re_ranking(qg, qq, gg, k1, k2, lambda_value)``, as its engine with ``test.rerank``), computed
    sparsely by :func:`torchreid_ext.metrics.reranked_distance_blocks` and streamed in: no ``N x N`` or
    ``Q x G`` matrix is held; ``progress`` then covers the re-ranking. ``knn``
    (:class:`~torchreid_ext.metrics.knn_index.KNNOptions`): the k-NN backend of re-ranking's neighbour
    step (None or ``exact``: the exact pass; see :func:`~torchreid_ext.metrics.reranked_distance_blocks`).

    ``block_hook(first_query_row, block)``, if given, sees every block of distances before it is ranked
    (the plain distances, or the re-ranked ones with ``rerank``), so that other metrics can be read from
    the same values (the evaluator's verification metrics, :mod:`torchreid_ext.metrics.verification`).
    """
    check_max_rank(max_rank)
    _check_threads(num_threads)
    if rerank:
        return _evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, metric, normalize, max_rank,
                                  use_metric_cuhk03, chunk_size, progress, num_threads, k1, k2, lambda_value,
                                  block_hook, knn)
    q, g, qn, gn = prepare_features(qf, gf, metric, normalize)
    acc = _RankAccumulator(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0], q.device, max_rank,
                           use_metric_cuhk03)
    rows = _chunk_rows(chunk_size, g.shape[0], q.device, use_metric_cuhk03)
    # Automatic blocks: the matmul gets at least _MATMUL_MIN_ROWS query rows (skinny products are
    # slow: with 51-row blocks the MSMT17 shape took 1.35x as long as with 256), ranked `rows` at a time.
    mm_rows = rows if chunk_size is not None else rows * -(-_MATMUL_MIN_ROWS // rows)
    with _progress(q.shape[0], progress, "evaluate") as bar:
        for start, block in distance_blocks(q, g, qn, gn, mm_rows):
            if block_hook is not None:
                block_hook(start, block)
            with _cpu_threads(q.device, num_threads):
                for s in range(0, block.shape[0], rows):
                    acc.add(start + s, block[s : s + rows])
            bar.update(block.shape[0])
            del block
    return acc.result()


def _evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, metric, normalize, max_rank, cuhk03,
                       chunk_size, progress, num_threads, k1, k2, lambda_value, block_hook=None,
                       knn=None) -> RankResult:
    from .rerank import reranked_distance_blocks

    q = as_real_matrix(qf, "qf", "num_samples x feature_dim")  # shapes for the label checks; values: below
    g = as_real_matrix(gf, "gf", "num_samples x feature_dim")
    acc = _RankAccumulator(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0], q.device, max_rank, cuhk03)
    rows = _chunk_rows(chunk_size, g.shape[0], q.device, cuhk03)
    blocks = reranked_distance_blocks(q, g, metric, normalize, k1, k2, lambda_value, chunk_size=rows,
                                      progress=progress, num_threads=num_threads, knn=knn)
    for start, block in blocks:
        if block_hook is not None:
            block_hook(start, block)
        with _cpu_threads(q.device, num_threads):
            for s in range(0, block.shape[0], rows):
                acc.add(start + s, block[s : s + rows])
        del block
    return acc.result()
