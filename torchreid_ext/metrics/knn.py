"""Each item's k smallest distances (and its largest), folded in tile by tile.

Re-ranking (:mod:`torchreid_ext.metrics.rerank`) needs, for every one of N items, its k nearest
items and its largest distance, where the N x N distances exist only a tile at a time.
:class:`RunningTopK` keeps, per item, the k smallest values seen so far; a new tile costs two cheap
passes (the maximum, and the minimum of each run of ``_GROUP`` consecutive values), after which only
the runs that reach below the item's current k-th smallest are read again: after an item's first
tiles a handful per tile, so the cost per element is far below a per-tile ``topk``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["RunningTopK", "group_min"]

_GROUP = 32  # values per run whose minimum is compared with an item's current k-th smallest


def group_min(d: torch.Tensor, reduce_dim: int, g: int) -> torch.Tensor:
    """Minimum of each run of ``g`` consecutive values along ``reduce_dim`` (the last run may be
    shorter): ``items x runs`` for ``reduce_dim`` 1, ``runs x items`` for 0. Views, no copy of ``d``."""
    w = d.shape[reduce_dim]
    full = w // g * g
    parts = []
    if reduce_dim == 1:
        if full:
            parts.append(d[:, :full].reshape(d.shape[0], full // g, g).amin(2))
        if full < w:
            parts.append(d[:, full:].amin(1, keepdim=True))
        return torch.cat(parts, 1)
    if full:
        parts.append(d[:full].reshape(full // g, g, d.shape[1]).amin(1))
    if full < w:
        parts.append(d[full:].amin(0, keepdim=True))
    return torch.cat(parts, 0)


class RunningTopK:
    """For each item: the ``k`` smallest ``|D|`` seen so far (unordered), their columns, and the
    largest ``|D|``.

    A tile is folded in with a few passes over it: its maximum, and the minimum of each run of
    ``_GROUP`` values; only runs whose minimum lies below the item's current k-th smallest are read
    again (after an item's first tiles a handful per tile). Signed values are compared (``d <= |d|``,
    so no candidate is missed) and ``|d|`` taken of the few read back, so tiles are never copied.
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device):
        self.k = k
        self.vals = torch.full((n, k), math.inf, dtype=dtype, device=device)
        self.idx = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.tau = torch.full((n,), math.inf, dtype=dtype, device=device)  # current k-th smallest
        self.amax = torch.full((n,), -math.inf, dtype=dtype, device=device)

    def update(self, d: torch.Tensor, reduce_dim: int, ent0: int, col0: int) -> None:
        """Fold in a tile of distances: ``reduce_dim`` 1: its rows are items ``ent0 ...`` and its
        columns columns ``col0 ...``; 0: the other way round."""
        n, w = d.shape[1 - reduce_dim], d.shape[reduce_dim]
        sl = slice(ent0, ent0 + n)
        dev = d.device
        tau = self.tau[sl]
        if not bool(torch.isfinite(tau).all()):  # some item has seen fewer than k values: full top-k
            a = d.abs()
            self.amax[sl] = torch.maximum(self.amax[sl], a.amax(dim=reduce_dim))
            rows = a if reduce_dim == 1 else a.t()
            v, i = torch.topk(rows, min(self.k, w), dim=1, largest=False, sorted=False)
            self._merge(torch.arange(ent0, ent0 + n, device=dev), v, i + col0)
            return
        gmin = group_min(d, reduce_dim, _GROUP)
        top = torch.maximum(d.amax(dim=reduce_dim), gmin.amin(dim=reduce_dim).neg())  # max |d|
        self.amax[sl] = torch.maximum(self.amax[sl], top)
        if reduce_dim == 1:
            item, run = (gmin < tau.unsqueeze(1)).nonzero(as_tuple=True)
        else:
            run, item = (gmin < tau.unsqueeze(0)).nonzero(as_tuple=True)
        if item.numel() == 0:
            return
        runs = w // _GROUP
        found = []
        full = run < runs
        if bool(full.any()):  # runs of _GROUP values, read back through a (runs, _GROUP) view
            fi, fr = item[full], run[full]
            if reduce_dim == 1:
                vals = d[:, :runs * _GROUP].reshape(n, runs, _GROUP)[fi, fr, :]
            else:
                vals = d[:runs * _GROUP].reshape(runs, _GROUP, n)[fr, :, fi]
            found.append((fi, fr * _GROUP, vals.abs_()))
        if not bool(full.all()):  # the short last run
            ti = item[~full]
            vals = d[ti, runs * _GROUP:] if reduce_dim == 1 else d[runs * _GROUP:, ti].t()
            found.append((ti, torch.full_like(ti, runs * _GROUP), vals.abs()))
        ents, cols, values = [], [], []
        for fi, first, vals in found:
            r, c = (vals < tau[fi].unsqueeze(1)).nonzero(as_tuple=True)
            ents.append(fi[r])
            cols.append(first[r] + c)
            values.append(vals[r, c])
        ent, col, vals = torch.cat(ents), torch.cat(cols), torch.cat(values)
        if ent.numel() == 0:
            return
        if reduce_dim == 0 or len(found) > 1:  # group by item
            order = torch.argsort(ent, stable=True)
            ent, col, vals = ent[order], col[order], vals[order]
        items, counts = torch.unique_consecutive(ent, return_counts=True)
        width = int(counts.max())
        slot = torch.arange(items.numel(), device=dev).repeat_interleave(counts)
        at = torch.arange(ent.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[slot]
        pv = torch.full((items.numel(), width), math.inf, dtype=d.dtype, device=dev)
        pi = torch.full((items.numel(), width), -1, dtype=torch.int64, device=dev)
        pv[slot, at] = vals
        pi[slot, at] = col + col0
        self._merge(items + ent0, pv, pi)

    def _merge(self, items: torch.Tensor, v: torch.Tensor, i: torch.Tensor) -> None:
        cv = torch.cat([self.vals[items], v], 1)
        ci = torch.cat([self.idx[items], i], 1)
        nv, p = torch.topk(cv, self.k, dim=1, largest=False, sorted=False)
        self.vals[items] = nv
        self.idx[items] = ci.gather(1, p)
        self.tau[items] = nv.amax(1)

    def ranked(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``N x k`` columns of each item, nearest first, and their values."""
        vals, order = torch.sort(self.vals, dim=1, stable=True)
        return self.idx.gather(1, order), vals
