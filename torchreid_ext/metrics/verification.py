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
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DeployInputError, InputNotFound
from ..options import is_number
from .distance import ArrayLike, _blocks, _check_chunk, _prepare, as_real_matrix, auto_chunk_rows
from .rank import LabelLike, _as_labels

__all__ = ["FPRS", "VerificationResult", "fpr_key", "read_verification", "threshold_from_metrics",
           "verification_from_features", "verification_line", "verification_metrics"]

FPRS = (1e-4, 1e-3, 1e-2)  # the false positive rates FastReID reports


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
        self.q_pids = _as_labels(q_pids, "q_pids", num_q, device)
        self.g_pids = _as_labels(g_pids, "g_pids", num_g, device)
        self.q_cams = _as_labels(q_camids, "q_camids", num_q, device)
        self.g_cams = _as_labels(g_camids, "g_camids", num_g, device)
        # pair counts from label counts: cross-camera pairs, and among them same-pid ones
        _, pid = torch.unique(torch.cat([self.q_pids, self.g_pids]), return_inverse=True)
        cams, cam = torch.unique(torch.cat([self.q_cams, self.g_cams]), return_inverse=True)
        pidcam = pid * cams.numel() + cam
        cross = num_g - _label_counts(self.g_cams, self.q_cams)
        same = (_label_counts(pid[num_q:], pid[:num_q]) - _label_counts(pidcam[num_q:], pidcam[:num_q]))
        self.num_positive = int(same.sum())
        self.num_negative = int(cross.sum()) - self.num_positive

    def masks(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        same_pid = self.q_pids[start:stop].unsqueeze(1) == self.g_pids.unsqueeze(0)
        cross = self.q_cams[start:stop].unsqueeze(1) != self.g_cams.unsqueeze(0)
        return same_pid & cross, cross & ~same_pid


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


def _pass_one(blocks: Iterator[Tuple[int, torch.Tensor]], labels: _Labels) -> torch.Tensor:
    """Sorted positive distances."""
    found = []
    for start, d in blocks:
        _check_nan(d, start)
        pos, _ = labels.masks(start, start + d.shape[0])
        found.append(d[pos])
    return torch.sort(torch.cat(found)).values


def _check_nan(d: torch.Tensor, start: int) -> None:
    if torch.isnan(d.amax()):
        bad = torch.isnan(d).nonzero()[0].tolist()
        raise ValueError(f"distmat contains NaN (first at query {start + bad[0]}, gallery {bad[1]})")


def _pass_two(blocks: Iterator[Tuple[int, torch.Tensor]], labels: _Labels, pos: torch.Tensor,
              keep: int) -> Tuple[int, int, torch.Tensor]:
    """(#(pos, neg) pairs with d_pos < d_neg, #pairs with d_pos == d_neg, the ``keep`` smallest
    negative distances, sorted)."""
    num_pos = pos.numel()
    lo_edge, hi_edge = pos[0], pos[-1]
    less = ties = 0
    smallest = _Smallest(keep)
    for start, d in blocks:
        _, neg_mask = labels.masks(start, start + d.shape[0])
        neg = d[neg_mask]
        del neg_mask
        smallest.add(neg)
        above = neg > hi_edge  # every positive is below it
        less += int(above.sum()) * num_pos
        mid = neg[(neg >= lo_edge) & ~above]  # those below the smallest positive count 0
        if mid.numel():
            below = torch.searchsorted(pos, mid)  # #positives < n
            less += int(below.sum())
            cand = (below < num_pos).nonzero().squeeze(1)
            tie = cand[pos[below[cand]] == mid[cand]]  # equal to the positive just above
            if tie.numel():
                ties += int((torch.searchsorted(pos, mid[tie], right=True) - below[tie]).sum())
    return less, ties, smallest.sorted()


def _result(blocks, labels: _Labels, fprs: Tuple[float, ...]) -> VerificationResult:
    """Both passes; ``blocks()`` yields the same ``(first row, block)`` sequence on every call."""
    n_pos, n_neg = labels.num_positive, labels.num_negative
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"verification needs same-person and different-person pairs across cameras; found "
                         f"{n_pos} same-person and {n_neg} different-person pairs")
    allowed = {f: _allowed(f, n_neg) for f in fprs}
    pos = _pass_one(blocks(), labels)
    less, ties, neg = _pass_two(blocks(), labels, pos, max(allowed.values()) + 1)
    auc = (2 * less + ties) / (2 * n_pos * n_neg)
    at_fpr = {}
    for f in fprs:
        v = neg[allowed[f]]  # the first negative the limit does not allow
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
    fprs = _check_fprs(fprs)
    d = as_real_matrix(distmat, "distmat", "num_query x num_gallery")  # no copy: read a block at a time
    if not d.is_floating_point():
        d = d.double()
    labels = _Labels(q_pids, g_pids, q_camids, g_camids, d.shape[0], d.shape[1], d.device)
    rows = auto_chunk_rows(d.shape[1], d.device) if chunk_size is None else _check_chunk(chunk_size)

    def blocks():
        return ((s, d[s:s + rows]) for s in range(0, d.shape[0], rows))

    return _result(blocks, labels, fprs)


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
    fprs = _check_fprs(fprs)
    q, g, qn, gn = _prepare(qf, gf, metric, normalize)
    labels = _Labels(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0], q.device)
    rows = auto_chunk_rows(g.shape[0], q.device) if chunk_size is None else _check_chunk(chunk_size)
    return _result(lambda: _blocks(q, g, qn, gn, rows), labels, fprs)


# ----------------------------------------------------------------------------------------------
# reading a threshold back


def _load_record(path: str) -> Any:
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
    data = _load_record(path)
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
    if not is_number(fpr) or not 0.0 < float(fpr) < 1.0:
        raise DeployInputError(f"fpr = {fpr!r} is not a false positive rate in (0, 1) (e.g. 0.01)")
    at_fpr = read_verification(path, target)["at_fpr"]
    for key, entry in at_fpr.items():
        try:
            match = float(key) == float(fpr)
        except ValueError:
            continue
        if match:
            return float(entry["threshold"])
    raise DeployInputError(f"calibration file '{path}' records thresholds at FPR {', '.join(at_fpr)}, not at "
                           f"{fpr_key(fpr)}; choose one of those")
