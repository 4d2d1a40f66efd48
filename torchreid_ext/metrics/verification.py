"""Verification metrics: is a (query, gallery) pair the same person? (docs/methods.md E6)

Pairs: every (query, gallery) pair from two different cameras (same-camera pairs are left out, as
E1 leaves them out of ranking); same pid = positive, different pid = negative (pid-0 distractors
included). Each pair is scored by ``-distance``. Reported, exactly:

* ``roc_auc``: P(d_pos < d_neg) + 1/2 P(d_pos = d_neg) over all positive x negative pairs (the area
  under the ROC, ties counted half, as scikit-learn's ``roc_auc_score``);
* for each target FPR t: the threshold D, the largest pair distance such that "distance <= D means
  same person" accepts at most ``t * num_negative`` negatives (FPR <= t), and the TPR there. With
  ``v`` the first negative that would break the limit (the (k + 1)-th smallest negative distance,
  k = the most negatives FPR <= t allows), D is the largest pair distance below ``v`` and TPR the
  fraction of positives below ``v``. Where no pair lies below ``v`` the threshold is the float just
  below ``v`` (TPR 0): it still keeps FPR <= t.

How, in bounded memory (never a second copy of the Q x G matrix): two passes over blocks of query
rows. The first gathers the positive distances (few: a query's own identity). The second reads the
negatives block by block: each is counted against the sorted positives (one ``searchsorted`` for those
between the smallest and the largest positive; the rest count 0 or all), and the smallest ``k + 1``
are kept by a running selection (about ``max(fprs) * num_negative`` values). From features
(:func:`verification_from_features`) each pass recomputes the same blocks with the same function, so
both passes see the same values.
"""
from __future__ import annotations

import json
import math
import os.path as osp
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DeployInputError, InputNotFound
from ..options import is_number
from .distance import (
    ArrayLike,
    as_real_matrix,
    auto_chunk_rows,
    check_chunk_size,
    distance_block,
    distance_blocks,
    prepare_features,
)
from .rank import LabelLike, as_labels

__all__ = ["FPRS", "VerificationPasses", "VerificationResult", "fpr_key", "load_record", "read_verification",
           "second_pass_from_features", "threshold_at", "threshold_from_metrics", "verification_block",
           "verification_from_features", "verification_line", "verification_metrics"]

FPRS = (1e-4, 1e-3, 1e-2)  # the false positive rates FastReID reports
_TABLE_BITS = 20  # about 2^20 bins over the positives' range (_BelowCounter)


def fpr_key(fpr: float) -> str:
    """How metrics.json names a target FPR: positional notation (``1e-4`` -> ``"0.0001"``)."""
    return np.format_float_positional(float(fpr), trim="-")


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """ROC of same-person vs different-person pairs across cameras (see the module docstring).

    ``at_fpr[t] = (tpr, threshold)``: thresholds are distances (accept a pair as the same person when
    its distance is <= threshold), in the units of the distances given.
    """

    roc_auc: float
    num_positive: int
    num_negative: int
    at_fpr: Dict[float, Tuple[float, float]]
    # what the distances were, where the caller knows it (the evaluator records its dist_metric, and the
    # feature steps before it, so that a threshold is applied to the same kind of distance)
    distance: Optional[Dict[str, Any]] = None

    def as_dict(self) -> dict:
        """As metrics.json records it: ``{"roc_auc", "num_positive", "num_negative",
        "at_fpr": {"0.0001": {"tpr", "threshold"}, ...}}`` (plain floats and ints), and ``"distance"``
        where known."""
        out = {
            "roc_auc": float(self.roc_auc),
            "num_positive": int(self.num_positive),
            "num_negative": int(self.num_negative),
            "at_fpr": {fpr_key(f): {"tpr": float(t), "threshold": float(d)} for f, (t, d) in self.at_fpr.items()},
        }
        if self.distance is not None:
            out["distance"] = dict(self.distance)
        return out

    def summary(self) -> str:
        """One log line (:func:`verification_line`)."""
        return verification_line(self.as_dict())


def verification_line(record: dict) -> str:
    """One log line from a recorded verification block (:meth:`VerificationResult.as_dict`)."""
    parts = [f"TPR@FPR={f}: {v['tpr']:.1%} (d <= {v['threshold']:.4g})" for f, v in record["at_fpr"].items()]
    return (f"Verification ({record['num_positive']} same-person / {record['num_negative']} different-person "
            f"pairs across cameras): ROC AUC {record['roc_auc']:.2%}, " + ", ".join(parts))


def _check_fprs(fprs: Iterable[float]) -> Tuple[float, ...]:
    out = tuple(fprs)
    if not out:
        raise ValueError("fprs is empty; give at least one false positive rate in (0, 1)")
    for f in out:
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating)) or not 0.0 < float(f) < 1.0:
            raise ValueError(f"fprs: {f!r} is not a false positive rate in (0, 1)")
    return tuple(float(f) for f in out)


def _allowed(fpr: float, num_negative: int) -> int:
    """The most negatives k with ``k / num_negative <= fpr`` (the float comparison a ROC makes)."""
    k = min(num_negative, int(math.floor(fpr * num_negative)))
    while k < num_negative and (k + 1) / num_negative <= fpr:
        k += 1
    while k > 0 and k / num_negative > fpr:
        k -= 1
    return k


def _label_counts(keys_g: torch.Tensor, keys_q: torch.Tensor) -> torch.Tensor:
    """For each query key: how many gallery items have it."""
    uniq, counts = torch.unique(keys_g, return_counts=True)
    at = torch.searchsorted(uniq, keys_q).clamp(max=uniq.numel() - 1)
    return torch.where(uniq[at] == keys_q, counts[at], torch.zeros_like(keys_q))


class _Labels:
    """Labels on the distances' device; per block of query rows, the masks of positive and negative pairs."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int, device: torch.device):
        self.q_pids = as_labels(q_pids, "q_pids", num_q, device)
        self.g_pids = as_labels(g_pids, "g_pids", num_g, device)
        self.q_cams = as_labels(q_camids, "q_camids", num_q, device)
        self.g_cams = as_labels(g_camids, "g_camids", num_g, device)
        # pair counts from label counts: cross-camera pairs, and among them same-pid ones
        _, pid = torch.unique(torch.cat([self.q_pids, self.g_pids]), return_inverse=True)
        cams, cam = torch.unique(torch.cat([self.q_cams, self.g_cams]), return_inverse=True)
        pidcam = pid * cams.numel() + cam
        cross = num_g - _label_counts(self.g_cams, self.q_cams)
        same = (_label_counts(pid[num_q:], pid[:num_q]) - _label_counts(pidcam[num_q:], pidcam[:num_q]))
        self.num_positive = int(same.sum())
        self.num_negative = int(cross.sum()) - self.num_positive

    def positive(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop``: same pid, other camera."""
        same_pid = self.q_pids[start:stop].unsqueeze(1) == self.g_pids.unsqueeze(0)
        return same_pid.logical_and_(self.q_cams[start:stop].unsqueeze(1) != self.g_cams.unsqueeze(0))

    def not_negative(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop``: same pid or same camera (everything but the negatives)."""
        same_pid = self.q_pids[start:stop].unsqueeze(1) == self.g_pids.unsqueeze(0)
        return same_pid.logical_or_(self.q_cams[start:stop].unsqueeze(1) == self.g_cams.unsqueeze(0))


class _Smallest:
    """The ``k`` smallest values of a stream (as a multiset): values below the current k-th smallest
    are buffered, and the buffer is cut back to ``k`` when it doubles."""

    def __init__(self, k: int):
        self.k = k
        self.parts, self.size, self.tau = [], 0, None

    def add(self, v: torch.Tensor) -> None:
        if self.tau is not None:
            v = v[v < self.tau]  # a value >= the k-th smallest so far changes no value of the k smallest
        if v.numel():
            self.parts.append(v)
            self.size += v.numel()
            if self.size >= 2 * self.k:
                self._cut()

    def _cut(self) -> None:
        v = torch.cat(self.parts)
        if v.numel() > self.k:
            v = torch.topk(v, self.k, largest=False, sorted=False).values
            self.tau = v.max()
        self.parts, self.size = [v], v.numel()

    def sorted(self) -> torch.Tensor:
        self._cut()
        return torch.sort(self.parts[0]).values


def _check_nan(d: torch.Tensor, start: int) -> None:
    if torch.isnan(d.amax()):
        bad = torch.isnan(d).nonzero()[0].tolist()
        raise ValueError(f"distmat contains NaN (first at query {start + bad[0]}, gallery {bad[1]})")


def _as_block(d: torch.Tensor) -> torch.Tensor:
    """Distances as the passes compare them: float32 or float64 (half precision widened, exactly)."""
    if not d.is_floating_point():
        return d.double()
    return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d


def _keys(d: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integers in the order of the values (int32 for float32, int64 for float64), into ``out`` if
    given. -0.0 gets the key -1, +0.0 the key 0 (:class:`_BelowCounter` treats the two as equal)."""
    wide = d.dtype == torch.float64
    b = d.view(torch.int64 if wide else torch.int32)
    k = torch.bitwise_right_shift(b, 63 if wide else 31, out=out)
    return k.bitwise_and_(0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF).bitwise_xor_(b)


class _BelowCounter:
    """Sum over negatives of #(positives < n) and #(positives == n), exactly, without a search per item.

    The positives' range of keys (:func:`_keys`) is cut into at most about 2^_TABLE_BITS bins aligned
    to a power of two (``key >> shift``); a negative's bin is counted in a histogram (slot 0: below the
    range, no positive below; the last: above it, all). A bin that holds no positive has the same count
    below for every value in it, so the histogram times that count is exact; only the negatives in the
    few bins that hold a positive (0.3% of them at the Market shape) are searched among the positives.
    """

    def __init__(self, pos: torch.Tensor, num_negative: int):
        self.pos, dev = pos, pos.device
        kp = _keys(pos + 0.0).long()  # + 0.0: a positive -0.0 is 0.0, key 0
        lo, hi = int(kp[0]), int(kp[-1])
        has_zero = bool((pos == 0).any())
        if has_zero:  # a negative -0.0 (key -1) must land in a searched bin, as a tie with the positive 0.0
            lo = min(lo, -1)
        bits = min(_TABLE_BITS, max(4, num_negative.bit_length() - 3))  # tables no larger than the data
        self.shift = shift = max(0, (hi - lo).bit_length() - bits)
        base = lo >> shift
        bins = (hi >> shift) - base + 1
        small, large = (-2 ** 31, 2 ** 31 - 1) if pos.dtype == torch.float32 else (-2 ** 63, 2 ** 63 - 1)
        n = pos.numel()
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        starts = (torch.arange(bins, device=dev, dtype=torch.int64) + base).bitwise_left_shift_(shift)  # <= hi
        below = torch.cat([torch.searchsorted(kp, starts), zero + n])  # positives below each bin's first key
        # slots: 0 below the range, 1..bins the bins, bins + 1 above, bins + 2 not a negative
        self.below = torch.cat([zero, below[:-1], zero + n, zero])
        self.hot = torch.cat([zero, below[1:] - below[:-1], zero, zero]) > 0
        if has_zero:
            self.hot[1 + ((-1) >> shift) - base] = True  # the bin of -0.0 (that of 0.0 holds a positive)
        self.dump = bins + 2
        # keys clamped to one bin below / above the range, so that (key >> shift) - (base - 1) is a slot in
        # [0, bins + 1] and nothing overflows (where "one bin above" is past the key type's largest value,
        # items above the range fall in the last bin, which holds a positive: searched, so still exact)
        self.clamp = (max((base - 1) << shift, small), min((base + bins) << shift, large))
        self.offset = base - 1
        self.hist = torch.zeros(bins + 3, dtype=torch.int64, device=dev)
        self.less_hot = self.ties = 0
        self._buffer: Optional[torch.Tensor] = None

    def add(self, d: torch.Tensor, not_negative: torch.Tensor) -> None:
        """Count the negatives of block ``d`` (the items where ``not_negative`` is False)."""
        dtype = torch.int64 if d.dtype == torch.float64 else torch.int32
        if self._buffer is None or self._buffer.shape != d.shape or self._buffer.dtype != dtype:
            self._buffer = torch.empty(d.shape, dtype=dtype, device=d.device)  # reused: blocks share a shape
        k = _keys(d, out=self._buffer).clamp_(*self.clamp).bitwise_right_shift_(self.shift).sub_(self.offset)
        flat = k.masked_fill_(not_negative, self.dump).view(-1)
        self.hist += torch.bincount(flat, minlength=self.hist.numel())
        vals = d[self.hot.index_select(0, flat).view(d.shape)]
        if vals.numel():
            pos = self.pos
            below = torch.searchsorted(pos, vals)  # #positives < n
            self.less_hot += int(below.sum())
            cand = (below < pos.numel()).nonzero().squeeze(1)
            tie = cand[pos[below[cand]] == vals[cand]]  # equal to the positive just above
            if tie.numel():
                self.ties += int((torch.searchsorted(pos, vals[tie], right=True) - below[tie]).sum())

    def totals(self) -> Tuple[int, int]:
        """(#(pos, neg) pairs with d_pos < d_neg, #pairs with d_pos == d_neg)."""
        cold = (self.hist * torch.where(self.hot, 0, self.below))[: self.dump].sum()
        return int(cold) + self.less_hot, self.ties


class VerificationPasses:
    """E6 over blocks of query rows of a distance matrix, in two passes that must see the same values:
    :meth:`first` with every block (the positive distances), then :meth:`second` with the same blocks
    (the negatives: counted against the positives, the smallest kept), then :meth:`result`.

    Lets the evaluator feed the first pass from its own ranking pass (``evaluate_features``'s
    ``block_hook``), then recompute the blocks it saw (:attr:`bounds`) for the second.
    """

    def __init__(self, q_pids: LabelLike, g_pids: LabelLike, q_camids: LabelLike, g_camids: LabelLike,
                 num_query: int, num_gallery: int, device: torch.device, fprs: Sequence[float] = FPRS):
        self.fprs = _check_fprs(fprs)
        self.labels = _Labels(q_pids, g_pids, q_camids, g_camids, num_query, num_gallery, torch.device(device))
        n_pos, n_neg = self.labels.num_positive, self.labels.num_negative
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"verification needs same-person and different-person pairs across cameras; found "
                             f"{n_pos} same-person and {n_neg} different-person pairs")
        self.allowed = {f: _allowed(f, n_neg) for f in self.fprs}
        self.bounds: list = []  # (first row, end row) of each block of the first pass
        self._found: list = []
        self._pos = self._counter = self._smallest = None

    def first(self, start: int, block: torch.Tensor) -> None:
        d = _as_block(block)
        _check_nan(d, start)
        self._found.append(d[self.labels.positive(start, start + d.shape[0])])
        self.bounds.append((start, start + d.shape[0]))

    def second(self, start: int, block: torch.Tensor) -> None:
        d = _as_block(block)
        if self._pos is None:
            self._pos = torch.sort(torch.cat(self._found)).values
            self._found = []
            self._counter = _BelowCounter(self._pos, self.labels.num_negative)
            self._smallest = _Smallest(max(self.allowed.values()) + 1)
        other = self.labels.not_negative(start, start + d.shape[0])
        self._counter.add(d, other)
        tau = self._smallest.tau  # only values below the k-th smallest so far can enter
        self._smallest.add(d[~other if tau is None else torch.lt(d, tau).masked_fill_(other, False)])

    def result(self) -> VerificationResult:
        pos, n_pos, n_neg = self._pos, self.labels.num_positive, self.labels.num_negative
        if pos is None or pos.numel() != n_pos:
            raise RuntimeError("VerificationPasses: both passes must see every block")
        less, ties = self._counter.totals()
        neg = self._smallest.sorted()
        auc = (2 * less + ties) / (2 * n_pos * n_neg)
        at_fpr = {}
        for f in self.fprs:
            v = neg[self.allowed[f]]  # the first negative the limit does not allow
            j = int(torch.searchsorted(pos, v.reshape(1)))  # positives below v
            i = int(torch.searchsorted(neg, v.reshape(1)))  # negatives below v
            below = [x for x in (pos[j - 1] if j else None, neg[i - 1] if i else None) if x is not None]
            if below:
                threshold = float(torch.maximum(*below) if len(below) == 2 else below[0])
            else:
                threshold = float(torch.nextafter(v, torch.tensor(-math.inf, dtype=v.dtype, device=v.device)))
            at_fpr[f] = (j / n_pos, threshold)
        return VerificationResult(roc_auc=float(auc), num_positive=n_pos, num_negative=n_neg, at_fpr=at_fpr)


@torch.no_grad()
def verification_metrics(
    distmat: ArrayLike,
    q_pids: LabelLike,
    g_pids: LabelLike,
    q_camids: LabelLike,
    g_camids: LabelLike,
    fprs: Sequence[float] = FPRS,
    chunk_size: Optional[int] = None,
) -> VerificationResult:
    """ROC AUC, and TPR and distance threshold at each of ``fprs``, of the cross-camera pairs of a
    query x gallery distance matrix (numpy or torch, any device; the work runs there). Works a block of
    ``chunk_size`` query rows at a time (None: automatic); NaN distances raise ``ValueError``."""
    d = as_real_matrix(distmat, "distmat", "num_query x num_gallery")  # no copy: read a block at a time
    passes = VerificationPasses(q_pids, g_pids, q_camids, g_camids, d.shape[0], d.shape[1], d.device, fprs)
    rows = auto_chunk_rows(d.shape[1], d.device) if chunk_size is None else check_chunk_size(chunk_size)
    for step in (passes.first, passes.second):
        for s in range(0, d.shape[0], rows):
            step(s, d[s:s + rows])
    return passes.result()


@torch.no_grad()
def verification_from_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: LabelLike,
    g_pids: LabelLike,
    q_camids: LabelLike,
    g_camids: LabelLike,
    metric: str = "euclidean",
    normalize: bool = False,
    fprs: Sequence[float] = FPRS,
    chunk_size: Optional[int] = None,
) -> VerificationResult:
    """:func:`verification_metrics` of ``compute_distance_matrix(qf, gf, metric, normalize)`` (squared
    Euclidean or 1 - cos, as the evaluator ranks by), computed a block of query rows at a time: the
    matrix never exists."""
    q, g, qn, gn = prepare_features(qf, gf, metric, normalize)
    passes = VerificationPasses(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0], q.device, fprs)
    rows = auto_chunk_rows(g.shape[0], q.device) if chunk_size is None else check_chunk_size(chunk_size)
    for start, block in distance_blocks(q, g, qn, gn, rows):
        passes.first(start, block)
    return second_pass_from_features(passes, qf, gf, metric, normalize)


@torch.no_grad()
def second_pass_from_features(passes: VerificationPasses, qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean",
                              normalize: bool = False) -> VerificationResult:
    """Finish ``passes`` whose first pass saw ``iter_distance_chunks(qf, gf, metric, normalize, ...)``-style
    blocks (e.g. through ``evaluate_features(..., block_hook=passes.first)``): the same blocks
    (:attr:`VerificationPasses.bounds`) are computed again, with the same function and shapes, so the
    same values, for the second pass."""
    q, g, qn, gn = prepare_features(qf, gf, metric, normalize)
    for a, b in passes.bounds:
        passes.second(a, distance_block(q[a:b], g, None if qn is None else qn[a:b], gn))
    return passes.result()


# ----------------------------------------------------------------------------------------------
# reading a threshold back


def load_record(path: str) -> Any:
    """The JSON content of a calibration file (a metrics.json); a missing or unreadable file is a
    one-line :class:`~torchreid_ext.errors.UserError`."""
    if not osp.isfile(path):
        raise InputNotFound(f"calibration file '{path}' does not exist (give the metrics.json of a labelled "
                            "evaluation: a training run's save dir or torchreid-ext-evaluate's output)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeployInputError(f"calibration file '{path}' is not a readable metrics.json ({exc})") from None


def read_verification(path: str, target: Optional[str] = None) -> Dict[str, Any]:
    """The verification block (:meth:`VerificationResult.as_dict`) of a metrics.json: from a training run
    (``torchreid-ext``: the last evaluation, of dataset ``target`` where it evaluated several) or from
    ``torchreid-ext-evaluate`` (one query / gallery pair; ``target`` must be None). Raises a
    :class:`~torchreid_ext.errors.UserError` (one line) where there is none."""
    return verification_block(load_record(path), path, target)


def verification_block(data: Any, path: str, target: Optional[str] = None) -> Dict[str, Any]:
    """:func:`read_verification` of ``data``, the content of the metrics.json at ``path`` (named in
    errors), for a caller that reads the file once for more than this block."""
    if isinstance(data, dict) and isinstance(data.get("evaluations"), list):
        if not data["evaluations"] or not isinstance(data["evaluations"][-1], dict):
            raise DeployInputError(f"calibration file '{path}' records no evaluation yet (the run has not "
                                   "evaluated); use the metrics.json of a run that has")
        last = data["evaluations"][-1]
        results = last.get("results") or {}
        names = list(results)
        if target is None and len(names) > 1:
            raise DeployInputError(f"calibration file '{path}' holds evaluations of several datasets {names}; "
                                   "name the one to take the threshold from")
        if target is not None and target not in results:
            raise DeployInputError(f"calibration file '{path}' has no evaluation of dataset '{target}' in its "
                                   f"last evaluation (epoch {last.get('epoch')}); it evaluated {names}")
        res = results[target if target is not None else names[0]] if names else {}
        where = f" (last evaluation, epoch {last.get('epoch')}, dataset '{target or (names[0] if names else '')}')"
    elif isinstance(data, dict) and isinstance(data.get("results"), dict):
        if target is not None:
            raise DeployInputError(f"calibration file '{path}' is a saved-features evaluation of one query / "
                                   f"gallery pair; a dataset name ('{target}') applies to a training run's "
                                   "metrics.json only")
        res, where = data["results"], ""
    else:
        raise DeployInputError(f"calibration file '{path}' is not a metrics.json of torchreid-ext (neither a "
                               "training run's record nor torchreid-ext-evaluate's)")
    block = res.get("verification") if isinstance(res, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("at_fpr"), dict):
        raise DeployInputError(f"calibration file '{path}' has no verification metrics{where}; evaluate with "
                               "this version (torchreid-ext-evaluate) to record them")
    return block


def threshold_from_metrics(path: str, fpr: float, target: Optional[str] = None) -> float:
    """The distance threshold recorded at false positive rate ``fpr`` in a metrics.json
    (:func:`read_verification` picks the block): accept a pair as the same person when its distance
    is <= it. Only recorded rates are available; any other ``fpr`` is a one-line
    :class:`~torchreid_ext.errors.UserError` naming the file and the recorded rates."""
    _check_fpr(fpr)
    return threshold_at(read_verification(path, target), fpr, path)


def _check_fpr(fpr: float) -> None:
    if not is_number(fpr) or not 0.0 < float(fpr) < 1.0:
        raise DeployInputError(f"fpr = {fpr!r} is not a false positive rate in (0, 1) (e.g. 0.01)")


def threshold_at(block: Dict[str, Any], fpr: float, path: str) -> float:
    """:func:`threshold_from_metrics` from the verification ``block`` of the file at ``path``
    (:func:`verification_block`)."""
    _check_fpr(fpr)
    at_fpr = block["at_fpr"]
    for key, entry in at_fpr.items():
        try:
            match = float(key) == float(fpr)
        except ValueError:
            continue
        if match:
            return float(entry["threshold"])
    raise DeployInputError(f"calibration file '{path}' records thresholds at FPR {', '.join(at_fpr)}, not at "
                           f"{fpr_key(fpr)}; choose one of those")
