"""Fast mode's pieces (docs/methods.md G1, G5): the perturbation direction, and what keeps the
second forward on the first one's piece so that the finite difference is sound.

Fast mode (G5, ours) replaces exact mode's double backward by one more forward with every
stage output moved along the per-sample dual direction of its gradient (:func:`dual_direction`,
G1), and reads R off the difference of the two losses. That is only the derivative autograd
would take if the second forward computes the same function, on the same piece, as the first:

* it replays the first forward's RNG state (same dropout masks: :class:`RNGSnapshot`) and
  updates no running statistics (BatchNorm's ``num_batches_tracked`` included:
  :func:`frozen_running_stats`);
* :class:`PiecewiseReplay` keeps it on the first forward's piece (ReLU masks, max-pool
  argmaxes, detached / no_grad values, discrete decisions). Without it the fast gradient of
  a ReLU network is noise: measured on resnet50_bnfc512 (float64 even), cosine ~0.01 to exact
  mode's dR/dtheta and 50-100x its norm; with it, cosine 1.0000.

The size of the step is the third condition; see :mod:`torchreid_ext.msgr.step`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .penalty import INF, check_q, widen

__all__ = ["dual_direction", "frozen_running_stats", "RNGSnapshot", "PiecewiseReplay"]


@torch.no_grad()
def dual_direction(g: torch.Tensor, q: float = 2.0) -> torch.Tensor:
    """Per-sample v_i with ||v_i||_p = 1 (1/p + 1/q = 1) and <g_i, v_i> = ||g_i||_q (G1):
    q=2: g/||g||_2; q=1: sign(g); q=inf: one-hot at argmax |g| with its sign; otherwise
    sign(g)|g|^(q-1)/||g||_q^(q-1). Zero rows give v = 0. Same shape and dtype as g."""
    q = check_q(q)
    flat = widen(g).flatten(1)
    if q == 1:
        v = flat.sign()
    elif q == INF:
        idx = flat.abs().argmax(1, keepdim=True)
        v = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx).sign())
    elif q == 2:
        v = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    else:
        # scale-free: divide by max |g| first so |g|^(q-1) cannot overflow
        top = flat.abs().amax(1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        u = flat / top
        w = u.sign() * u.abs().pow(q - 1)
        norm = torch.linalg.vector_norm(u, ord=q, dim=1, keepdim=True)  # >= 1 unless the row is 0
        v = w / norm.pow(q - 1).masked_fill(norm == 0, 1.0)
    return v.view_as(g).to(g.dtype)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """No running-statistics update inside the block (G5's extra forward): training-mode
    _BatchNorm modules get ``track_running_stats = False`` (they still normalise with batch
    statistics; ``num_batches_tracked`` untouched); other norm layers with running buffers
    (e.g. InstanceNorm with track_running_stats) are snapshotted and restored."""
    flipped, saved = [], []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            if m.training and m.track_running_stats:
                m.track_running_stats = False
                flipped.append(m)
        elif isinstance(m, _NormBase) and m.track_running_stats and m.training:
            saved.append((m, [b.detach().clone() for b in m.buffers(recurse=False)]))
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True
        with torch.no_grad():
            for m, bufs in saved:
                for b, s in zip(m.buffers(recurse=False), bufs):
                    b.copy_(s)


class RNGSnapshot:
    """The RNG state before a forward (CPU, and the accelerator of ``device``), so a later
    forward can replay the same dropout masks: ``with snap.replay(): model(x)``; the state
    after the block is what it was before it."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cpu = torch.get_rng_state()
        self.accel = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.accel is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.accel is not None:
                torch.cuda.set_rng_state(self.accel, self.device)
            yield


def _bind_relu(input, inplace=False):
    return input, 0.0, bool(inplace)


def _bind_leaky(input, negative_slope=0.01, inplace=False):
    return input, float(negative_slope), bool(inplace)


def _bind_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return input, (kernel_size, stride, padding, dilation, ceil_mode), bool(return_indices)


def _bind_apool(input, output_size, return_indices=False):
    return input, (output_size,), bool(return_indices)


_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
_RELU = {F.relu, torch.relu, torch.Tensor.relu} | _RELU_INPLACE
_LEAKY = {F.leaky_relu, torch._C._nn.leaky_relu_}
_MAXPOOL = {F.max_pool2d, F._max_pool2d, F.max_pool2d_with_indices}
_AMAXPOOL = {F.adaptive_max_pool2d, F._adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}
_WITH_INDICES = {F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices}


_CONSTANT = {torch.Tensor.detach, torch.detach, torch.Tensor.item, torch.Tensor.tolist}


def _requires_grad(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten((args, kwargs))[0])


class PiecewiseReplay(TorchFunctionMode):
    """Fast mode's second forward on the first forward's piece (G5, ours).

    Autograd, hence exact mode, differentiates a ReLU network on the piece where the batch
    lies and treats stop-gradient values as constants. A finite difference over a step delta
    also sees units that change piece (ReLU sign flips, max-pool argmax switches): few,
    random, each of O(1) effect, so the fast-mode parameter gradient is noise dominated
    (measured on resnet50_bnfc512: cosine ~0.01 to exact mode's dR/dtheta, 50-100x its norm);
    and it sees detached quantities move (DRSL's temperature and sort target: R_fd ~15% off).

    Once ``arm()`` is called (at the first stage output), the first forward records, in call
    order: the mask of each ``relu`` / ``leaky_relu``; the argmax of each ``max_pool2d`` /
    ``adaptive_max_pool2d``; the result of every call made on a tensor that requires grad
    and returning a constant for autograd (``detach``, ``item``, ``tolist``, anything
    computed under ``no_grad``, bool or integer results such as comparisons and argsort).
    Under ``replay()`` the second forward evaluates the first two on the recorded pattern
    (input * mask; gather at the recorded indices) and returns the recorded constants, so the
    finite difference converges to exact mode's gradient. Not frozen: other kinks computed
    with grad (hardtanh/ReLU6, clamp, abs, max/min reductions, hinge losses).
    """

    def __init__(self):
        super().__init__()
        self.patterns: List[object] = []
        self.armed = False
        self.replaying = False
        self._pos = 0

    def arm(self, *_: object) -> None:
        self.armed = True

    def replay(self) -> "PiecewiseReplay":
        """Use as ``with kinks.replay(): ...`` for the second forward (arm it again there)."""
        self.armed, self.replaying, self._pos = False, True, 0
        return self

    def check_consumed(self) -> None:
        if self.replaying and self._pos != len(self.patterns):
            raise RuntimeError(
                f"fast MSGR: the second forward replayed {self._pos} of the first forward's "
                f"{len(self.patterns)} recorded ops; its control flow must not depend on the data"
            )

    def _record(self, value: object) -> object:
        self.patterns.append(value)
        return value

    def _next(self, kind: str, check: Callable[[object], bool]) -> object:
        entry = self.patterns[self._pos] if self._pos < len(self.patterns) else (None, None)
        if entry[0] != kind or not check(entry[1]):
            raise RuntimeError(
                f"fast MSGR: the second forward's op #{self._pos} ({kind}) differs from the first "
                "forward's; this model's forward depends on the data: use msgr mode exact"
            )
        self._pos += 1
        return entry[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.armed:
            return func(*args, **kwargs)
        if func in _RELU or func in _LEAKY:
            x, slope, inplace = (_bind_leaky if func in _LEAKY else _bind_relu)(*args, **kwargs)
            inplace = inplace or func in _RELU_INPLACE or func is torch._C._nn.leaky_relu_
            if not self.replaying:
                self._record(("mask", x.detach() > 0))
                return func(*args, **kwargs)
            mask = self._next("mask", lambda m: m.shape == x.shape)
            factor = mask if slope == 0.0 else torch.where(mask, 1.0, slope).to(x.dtype)
            return x.mul_(factor) if inplace else x * factor
        if func in _MAXPOOL or func in _AMAXPOOL:
            pool = func in _MAXPOOL
            x, opts, with_idx = (_bind_pool if pool else _bind_apool)(*args, **kwargs)
            with_idx = with_idx or func in _WITH_INDICES
            if not self.replaying:
                out, idx = (F.max_pool2d_with_indices if pool else F.adaptive_max_pool2d_with_indices)(
                    x, *opts, return_indices=True)
                self._record(("argmax", idx))
            else:
                idx = self._next("argmax", lambda i: i.shape[:-2] == x.shape[:-2])
                out = x.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)
            return (out, idx) if with_idx else out
        if not _requires_grad(args, kwargs):
            return func(*args, **kwargs)
        if func in _CONSTANT or not torch.is_grad_enabled():
            if self.replaying:
                return self._next("const", lambda v: True)
            return self._record(("const", func(*args, **kwargs)))[1]
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not (out.is_floating_point() or out.is_complex()):
            if self.replaying:
                return self._next("decision", lambda v: v.shape == out.shape)
            self._record(("decision", out))
        return out
