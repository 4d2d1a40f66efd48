"""MSGR: the multi-scale gradient regulariser (METHOD.md G1-G7), usable without an engine.

For chosen stages s with outputs x_s (B samples), the penalty is (G2)

    R = sum_s eps_s * mean_i ||g_{s,i}||_q,   g_s = dL_grad / dx_s,

where g_{s,i} is sample i's slice of g_s, flattened, and L_grad is ``B * L_mean`` (``grad_of
'sum'``: each sample's gradient is that of its own loss term) or ``L_mean`` (``'mean'``).
``squared=True`` uses ||g_{s,i}||_q ** 2. The training objective is L_mean + R.

Pieces:

* :func:`feature_gradient_penalty`: the exact penalty (G4) from ``autograd.grad(...,
  create_graph=True)``, norms taken in float32 (float64 stays float64); AMP-ready (G6:
  pass the scaled loss and ``grad_scale``).
* :class:`StageCapture`: forward hooks that capture the named stage outputs of any model
  during its ordinary forward, and optionally add a perturbation to them.
* :func:`dual_direction`: the per-sample unit direction of G1.
* :func:`msgr_backward`: a whole MSGR backward (exact or fast, G4/G5), accumulating into
  ``.grad`` like ``loss.backward()``; :class:`torchreid_ext.engines.msgr.MSGREngine` uses it.

Stage names are module paths for ``model.get_submodule``: ResNets (Torchreid's ``resnet*``,
our ``resnet50_bnfc512`` / ``msfl_resnet50``) ``layer1``..``layer4`` (C2..C5); OSNet
``conv1``..``conv5``.

Exact mode (G4): one forward, ``autograd.grad(L_grad, x_s, create_graph=True)``, one backward
of L_mean + R. BatchNorm's native double backward was its largest cost (1.1 s of a 2.2 s
msfl_resnet50 CPU step); training-mode ``F.batch_norm`` is routed through
:class:`FusedBatchNormDoubleBackward` (same kernels and values, ~3x cheaper double backward).

Fast mode (G5), our construction. Take the detached per-sample direction v_{s,i} (dual of
q, unit p-norm, <g_{s,i}, v_{s,i}> = ||g_{s,i}||_q), delta_s = h * eps_s * v_s / B, and one
more forward with x_s + delta_s at every stage at once: R ~= (L_grad(x + delta) - L_grad(x)) / h,
whose parameter gradient is, to first order in h, exact mode's dR/dtheta (Danskin:
d||g||_q = <dg, v> with v held fixed). Cost (F a forward, a backward ~ 2F): forward, ONE
backward of L_mean that also yields g (tensor hooks on the stage outputs: nothing is
recomputed), the extra forward, its backward: about twice a plain step, a little less as
the part below the first stage is back-propagated once (backward 1 stops at a detached leaf
there; the last backward carries both passes' gradients through it). The first pass's
parameter gradients are rescaled to (1 - a/h) dL_mean(x)/dtheta (a = B for grad_of 'sum',
1 for 'mean'; gradients accumulated before the call are kept) and the second backward adds
(a/h) dL_mean(x + delta)/dtheta: together d(L_mean + R)/dtheta.

Three things make the finite difference sound (each is tested):

* the extra forward replays the first one's RNG state (same dropout masks) and updates no
  running statistics (BatchNorm's ``num_batches_tracked`` included);
* :class:`PiecewiseReplay` keeps the extra forward on the first forward's piece (ReLU masks,
  max-pool argmaxes, detached / no_grad values, discrete decisions). Without it the fast
  gradient of a ReLU network is noise: measured on resnet50_bnfc512 (float64 even), cosine
  ~0.01 to exact mode's dR/dtheta and 50-100x its norm; with it, cosine 1.0000;
* the step: per sample ||delta_{s,i}||_p = h eps_s / B is tiny next to ||x_{s,i}|| (e.g.
  1e-8 of it for R50 layer1 at 256x128, B = 64, h = 0.1), below float32 resolution, so
  x + delta rounds back towards x (R_fd 10% low at 128x64, B = 16, h = 0.1). ``h=None``
  (engine: ``fast_h 'auto'``) picks h per batch so that the largest stage perturbation is
  ``rel_step`` (3e-6) of the stage output: float32 rounding is ~1e-7 and the curvature of
  the network along v (BatchNorm, loss) biases the difference from ~1e-5 on.

The logged ``R`` is computed from the exact g in both modes; ``R_fd`` (fast) is the
finite-difference value, a check on h.

``squared=True`` in fast mode: d(||g||^2) = 2 ||g|| <dg, v>, so the direction becomes
2 ||g_{s,i}||_q v_{s,i} (detached); the parameter gradient is first-order exact, the
finite difference estimates 2R (``R_fd`` is reported halved). Under fp16/bf16 autocast the
fast-mode perturbation would round away: use exact mode with AMP.

Integration notes (G6). DDP: exact mode is correct with default settings and silently
wrong with ``static_graph=True``; fast mode runs its first forward/backward under
``no_sync()`` (gradient-accumulation pattern). SyncBatchNorm has no double backward: exact
mode refuses it. ``torch.compile`` cannot double-backward: do not compile the model for
exact mode. Stage outputs must not be modified in place downstream (checked).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "GradientPenalty",
    "MSGRStep",
    "FastInfo",
    "StageCapture",
    "unwrap_model",
    "stage_modules",
    "expand_eps",
    "per_sample_norm",
    "feature_gradient_penalty",
    "penalty_from_gradients",
    "dual_direction",
    "frozen_running_stats",
    "RNGSnapshot",
    "PiecewiseReplay",
    "FusedBatchNormDoubleBackward",
    "find_sync_batchnorm",
    "msgr_backward",
]

INF = float("inf")
Scale = Union[float, torch.Tensor]


# ------------------------------------------------------------------ stages and hooks


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers (``.module``)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def stage_modules(model: nn.Module, stages: Sequence[str]) -> Dict[str, nn.Module]:
    """``{name: model.get_submodule(name)}``; an unknown name is a ValueError listing the model's
    top-level children (ResNet: layer1..layer4; OSNet: conv1..conv5)."""
    net = unwrap_model(model)
    if not stages:
        raise ValueError("MSGR needs at least one stage name, e.g. ['layer1', 'layer2']")
    if len(set(stages)) != len(stages):
        raise ValueError(f"MSGR stage names repeat: {list(stages)}")
    found = {}
    for name in stages:
        try:
            found[name] = net.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in net.named_children()]
            raise ValueError(
                f"MSGR stage '{name}' is not a submodule of {type(net).__name__}; its top-level "
                f"modules are {children} (ResNet stages: layer1..layer4; OSNet: conv1..conv5)"
            ) from None
    return found


class StageCapture:
    """Forward hooks on named stages: ``outputs[name]`` is the stage's output of the forward
    run inside the ``with`` block; with ``deltas`` the hook returns ``output + deltas[name]``
    instead (and records that); ``on_output(name)`` is called after each capture. Each stage
    must run exactly once per forward. Fast mode's extras: ``split_first`` returns a detached
    leaf for the first stage that runs (the original in ``upstream = (name, tensor)``), and
    ``base[name]`` replaces that stage's output by a given tensor (before ``deltas``).

        with StageCapture(model, ['layer1', 'layer2']) as cap:
            logits = model(x)
        cap.outputs['layer1']
    """

    def __init__(self, model: nn.Module, stages: Sequence[str],
                 deltas: Optional[Mapping[str, torch.Tensor]] = None,
                 on_output: Optional[Callable[[str], None]] = None,
                 split_first: bool = False,
                 base: Optional[Mapping[str, torch.Tensor]] = None):
        self.modules = stage_modules(model, stages)
        self.on_output = on_output
        self.split_first = split_first
        self.base = dict(base or {})
        self.upstream: Optional[tuple] = None
        self.deltas = dict(deltas or {})
        unknown = set(self.deltas) - set(self.modules)
        if unknown:
            raise ValueError(f"perturbation given for unknown stages {sorted(unknown)}")
        self.outputs: Dict[str, torch.Tensor] = {}
        self._versions: Dict[str, int] = {}
        self._handles: List = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_tensor(output):
                raise TypeError(f"MSGR stage '{name}' returned {type(output).__name__}, not a tensor")
            if name in self.outputs:
                raise RuntimeError(
                    f"MSGR stage '{name}' ran twice in one forward (shared module, or DataParallel "
                    "on several GPUs); choose a module that runs once"
                )
            if name in self.base:  # the given tensor stands in for this forward's output
                output = self.base[name]
            if self.split_first and not self.outputs and output.requires_grad:
                # the graph below the first stage is kept apart: a backward of the loss
                # stops at this leaf, and the caller back-props ``upstream`` once, later
                self.upstream = (name, output)
                output = output.detach().requires_grad_()
            if name in self.deltas:
                output = output + self.deltas[name].to(output.dtype)
            self.outputs[name] = output
            self._versions[name] = output._version
            if self.on_output is not None:
                self.on_output(name)
            return output

        return hook

    def __enter__(self) -> "StageCapture":
        self.upstream = None
        self.outputs.clear()
        self._versions.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            missing = [n for n in self.modules if n not in self.outputs]
            if missing:
                raise RuntimeError(f"MSGR stages {missing} did not run in the forward pass")

    def check_unmodified(self) -> None:
        """Raise if a captured output was modified in place after the stage returned it
        (its gradient would then be that of the modified tensor)."""
        bad = [n for n, t in self.outputs.items() if t._version != self._versions[n]]
        if bad:
            raise RuntimeError(
                f"the outputs of MSGR stages {bad} were modified in place later in the forward "
                "(e.g. ReLU(inplace=True) right after the stage); pick another stage or make "
                "that operation out of place"
            )


def expand_eps(eps: Union[float, Sequence[float]], stages: Sequence[str]) -> Dict[str, float]:
    """One eps for all stages, or one per stage (G3) -> ``{stage: eps}``."""
    if isinstance(eps, (int, float)):
        values = [float(eps)] * len(stages)
    else:
        values = [float(e) for e in eps]
        if len(values) == 1:
            values = values * len(stages)
    if len(values) != len(stages):
        raise ValueError(f"eps has {len(values)} values for {len(stages)} stages {list(stages)}; "
                         "give one value or one per stage")
    if any(not (e >= 0) for e in values):
        raise ValueError(f"eps must be >= 0, got {values}")
    return dict(zip(stages, values))


def _check_q(q: float) -> float:
    q = float(q)
    if not (q >= 1):
        raise ValueError(f"q = {q} is not a valid norm; use q >= 1 (1, 2 or inf in configs)")
    return q


# ------------------------------------------------------------------ exact penalty (G2, G4)


class GradientPenalty(NamedTuple):
    """``penalty``: R (scalar tensor; differentiable in exact mode). ``stage_penalty``:
    {stage: eps_s * mean_i ||g_{s,i}||_q (squared if asked)}, summing to R. ``stage_gnorm``:
    {stage: mean_i ||g_{s,i}||_q} (never squared), detached. All float32 or wider."""

    penalty: torch.Tensor
    stage_penalty: Dict[str, torch.Tensor]
    stage_gnorm: Dict[str, torch.Tensor]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Float32 for half types (G4: norms in float32), float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample_norm(g: torch.Tensor, q: float = 2.0, squared: bool = False) -> torch.Tensor:
    """||g_i||_q of each sample's flattened slice (B,), in float32 or wider (differentiable)."""
    q = _check_q(q)
    flat = _wide(g).flatten(1)
    if q == 2 and squared:
        return flat.pow(2).sum(1)
    if q == INF:
        norm = flat.abs().amax(1)
    elif q == 1:
        norm = flat.abs().sum(1)
    else:
        norm = torch.linalg.vector_norm(flat, ord=q, dim=1)
    return norm.pow(2) if squared else norm


def penalty_from_gradients(grads: Mapping[str, torch.Tensor], eps: Mapping[str, float], q: float = 2.0,
                           squared: bool = False) -> GradientPenalty:
    """R and its per-stage parts from the stage gradients g_s (G2)."""
    total = None
    parts, gnorms = {}, {}
    for name, g in grads.items():
        if squared and q == 2:  # sum of squares: smooth at g = 0
            norms = per_sample_norm(g, 2.0, squared=True)
            gnorm = norms.detach().sqrt()
        else:
            base = per_sample_norm(g, q)
            norms = base.pow(2) if squared else base
            gnorm = base.detach()
        part = eps[name] * norms.mean()
        parts[name] = part
        gnorms[name] = gnorm.mean()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no stage gradients given")
    return GradientPenalty(total, parts, gnorms)


def feature_gradient_penalty(
    loss_sum: torch.Tensor,
    features: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]],
    eps: Union[float, Sequence[float], Mapping[str, float]],
    q: float = 2.0,
    squared: bool = False,
    grad_scale: Optional[Scale] = None,
    create_graph: bool = True,
) -> GradientPenalty:
    """Exact MSGR penalty R = sum_s eps_s * mean_i ||d loss_sum / d x_{s,i}||_q (G2, G4).

    ``features``: {stage: x_s} (or a list, named '0', '1', ...), tensors of the graph of
    ``loss_sum`` with batch as the first dimension. Pass ``L_sum = B * L_mean`` for G2's
    per-sample gradients. ``grad_scale`` (G6, AMP): ``loss_sum`` is already multiplied by it
    (GradScaler's scaled loss); the gradients are divided by it before the norms. The result
    is differentiable w.r.t. everything ``loss_sum`` depends on (``create_graph``); back-prop
    ``L_mean + R`` once. Returns :class:`GradientPenalty`.
    """
    if not isinstance(features, Mapping):
        features = {str(i): t for i, t in enumerate(features)}
    names = list(features)
    eps_map = dict(eps) if isinstance(eps, Mapping) else expand_eps(eps, names)
    frozen = [n for n in names if not features[n].requires_grad]
    if frozen:
        raise ValueError(f"stage outputs {frozen} do not require grad (frozen stages); leave them out")
    grads = torch.autograd.grad(loss_sum, [features[n] for n in names], create_graph=create_graph,
                                allow_unused=True)
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise RuntimeError(f"the loss does not depend on the outputs of MSGR stages {unused}")
    gmap = {}
    for n, g in zip(names, grads):
        g = _wide(g)
        gmap[n] = g if grad_scale is None else g / grad_scale
    return penalty_from_gradients(gmap, eps_map, q, squared)


# ------------------------------------------------------------------ fast mode pieces (G5)


@torch.no_grad()
def dual_direction(g: torch.Tensor, q: float = 2.0) -> torch.Tensor:
    """Per-sample v_i with ||v_i||_p = 1 (1/p + 1/q = 1) and <g_i, v_i> = ||g_i||_q (G1):
    q=2: g/||g||_2; q=1: sign(g); q=inf: one-hot at argmax |g| with its sign; otherwise
    sign(g)|g|^(q-1)/||g||_q^(q-1). Zero rows give v = 0. Same shape and dtype as g."""
    q = _check_q(q)
    flat = _wide(g).flatten(1)
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


# ------------------------------------------------------------------ exact mode: BatchNorm double backward


class _BNBackward(torch.autograd.Function):
    """Training-mode BatchNorm backward (native kernel) with a cheap backward of its own.

    PyTorch's double backward of batch_norm takes ~20 full-size passes; on msfl_resnet50 it
    was the largest single cost of exact MSGR (1.1 s of a 2.2 s CPU step). With x_hat the
    normalised input, P(v) = v - mean(v) - x_hat * mean(v * x_hat) per channel, and
    dx = gamma * invstd * P(dy), the gradients for an incoming (u = d/d dx, gdw, gdb) are
    per-channel affine combinations of dy, u and x_hat (checked against finite differences by
    torch.autograd.gradgradcheck in tests/test_msgr.py):

        d dy    = gamma invstd P(u) + gdw x_hat + gdb
        d x     = -gamma invstd^2 [mean(u x_hat) P(dy) + m2 P(u) + x_hat T / M] + gdw invstd P(dy)
        d gamma = T invstd,   T = sum(u dy) - M (m1 mean(u) + m2 mean(u x_hat)),

    m1 = mean(dy), m2 = mean(dy x_hat) (from the first backward's dbeta, dgamma), M the
    elements per channel: three reductions and five fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, dy, x, weight, mean, invstd, eps):
        w = weight if weight is not None else torch.ones_like(mean)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(dy, x, weight, mean, invstd, dw, db)
        return dx, dw, db

    @staticmethod
    def backward(ctx, gdx, gdw, gdb):
        dy, x, weight, mean, invstd, dw, db = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        M = x.numel() // x.shape[1]
        inv = invstd.view(shape)
        gi = inv if weight is None else weight.view(shape) * inv
        xh = torch.addcmul(-mean.view(shape) * inv, x, inv)
        m1, m2 = db.view(shape) / M, dw.view(shape) / M
        if gdx is not None:
            mu = gdx.sum(dims, keepdim=True) / M
            mux = (gdx * xh).sum(dims, keepdim=True) / M
            T = (gdx * dy).sum(dims, keepdim=True) - M * (m1 * mu + m2 * mux)
        else:
            mu = mux = T = torch.zeros_like(inv)
        gi2 = gi * inv
        a, b = -gi2 * mux, -gi2 * m2  # d x = a dy + b u + c x_hat + d
        c, d = -gi2 * (T / M - 2 * m2 * mux), gi2 * (mux * m1 + m2 * mu)
        f, g = -gi * mux, -gi * mu  # d dy = gi u + f x_hat + g
        if gdw is not None:
            gw = gdw.view(shape)
            a, c, d, f = a + gw * inv, c - gw * inv * m2, d - gw * inv * m1, f + gw
        if gdb is not None:
            g = g + gdb.view(shape)
        grad_x = torch.addcmul(d, c, xh).addcmul_(a, dy)
        grad_dy = torch.addcmul(g, f, xh)
        if gdx is not None:
            grad_x.addcmul_(b, gdx)
            grad_dy.addcmul_(gi, gdx)
        grad_x = grad_x.expand_as(x).to(x.dtype)
        grad_dy = grad_dy.expand_as(dy).to(dy.dtype)
        grad_w = (T * inv).view(-1).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_dy, grad_x, grad_w, None, None, None


class _BNTrain(torch.autograd.Function):
    """Training-mode batch_norm (native kernels, running statistics updated as usual) whose
    backward is :class:`_BNBackward`, so a double backward uses the cheap formula."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = _BNBackward.apply(dy, x, weight, mean, invstd, ctx.eps)
        return (dx, dw if weight is not None else None, db if ctx.has_bias else None,
                None, None, None, None)


def _bind_bn(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


class FusedBatchNormDoubleBackward(TorchFunctionMode):
    """Inside the block, training-mode ``F.batch_norm`` calls with gradients use
    :class:`_BNTrain` (same values and running statistics; a ~3x cheaper double backward).
    Exact mode enables it around the forward (``fused_bn=True``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and torch.is_grad_enabled():
            x, rm, rv, w, b, training, momentum, eps = _bind_bn(*args, **kwargs)
            if training and _requires_grad((x, w, b), {}):
                F._verify_batch_size(x.size())
                return _BNTrain.apply(x, w, b, rm, rv, momentum, eps)
        return func(*args, **kwargs)


def find_sync_batchnorm(model: nn.Module) -> List[str]:
    """Names of SyncBatchNorm modules (no double backward: exact MSGR cannot use them)."""
    return [n for n, m in unwrap_model(model).named_modules() if isinstance(m, nn.SyncBatchNorm)]


# ------------------------------------------------------------------ one MSGR backward


class FastInfo(NamedTuple):
    """Fast-mode diagnostics: ``penalty_fd`` the finite-difference estimate of R (a check on
    h), ``h`` the step used, ``rel_step`` the largest ||delta_s|| / ||x_s|| (per sample, L2)."""

    penalty_fd: torch.Tensor
    h: float
    rel_step: float


class MSGRStep(NamedTuple):
    """What :func:`msgr_backward` did. ``outputs``: the model outputs of the (unperturbed)
    forward; ``loss``: L_mean (detached); ``penalty``: :class:`GradientPenalty` (values
    detached), or None when every stage was skipped; ``fast``: :class:`FastInfo` (None in
    exact mode); ``skipped``: stages left out because
    their outputs do not require grad (frozen, e.g. Torchreid's fixbase epochs)."""

    outputs: object
    loss: torch.Tensor
    penalty: Optional[GradientPenalty]
    fast: Optional[FastInfo]
    skipped: List[str]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _mean_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(_wide(t).flatten(1), dim=1).mean())


def _reaches_upstream(loss: torch.Tensor, upstream: torch.Tensor) -> bool:
    """Does ``loss``'s graph reach nodes with saved tensors below ``upstream`` other than
    through it (e.g. a skip connection around the first stage)? Then backward 1 must retain
    its graph for the final backward through ``upstream``."""

    def walk(root, stop=None) -> Iterator:
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            yield node
            todo.extend(fn for fn, _ in node.next_functions)

    below = {n for n in walk(upstream.grad_fn) if type(n).__name__ != "AccumulateGrad"}
    return any(n in below for n in walk(loss.grad_fn))


def _detached(p: GradientPenalty) -> GradientPenalty:
    return GradientPenalty(p.penalty.detach(), {k: v.detach() for k, v in p.stage_penalty.items()},
                           p.stage_gnorm)


def msgr_backward(
    model: nn.Module,
    forward_fn: Callable[[], object],
    loss_fn: Callable[[object], torch.Tensor],
    stages: Sequence[str],
    eps: Union[float, Sequence[float]],
    q: float = 2.0,
    squared: bool = False,
    grad_of: str = "sum",
    mode: str = "exact",
    h: Optional[float] = 0.1,
    loss_scale: Optional[Scale] = None,
    freeze_kinks: bool = True,
    fused_bn: bool = True,
    rel_step: float = 3e-6,
    params: Optional[Sequence[torch.Tensor]] = None,
) -> MSGRStep:
    """Forward(s) and backward of L_mean + R, gradients accumulated into ``.grad`` (G4, G5).

    ``forward_fn()`` runs the model (put autocast inside it); ``loss_fn(outputs)`` returns the
    batch-mean loss L_mean. ``mode='exact'``: one forward, R from
    :func:`feature_gradient_penalty`, one backward of L_mean + R. ``mode='fast'``: see the
    module docstring (two forwards, two backward passes, no double backward). ``loss_scale``
    (AMP, G6): backward passes use ``loss_scale * objective`` and stage gradients are divided
    by it. ``freeze_kinks`` (fast mode): the second forward reuses the first one's ReLU masks
    and max-pool argmaxes (:class:`PiecewiseReplay`); without it the fast gradient of a ReLU
    network is noise. ``fused_bn`` (exact mode): BatchNorm's double backward by
    :class:`FusedBatchNormDoubleBackward`. ``h``: G5's step (delta = h eps_s v / B); ``None`` picks it per batch so
    that the largest stage perturbation is ``rel_step`` times the stage output in L2 norm
    (float32 needs ~1e-6..1e-5: below, x + delta rounds back to x; above, curvature biases).
    ``params``: the parameters whose pass-1 gradients are rescaled (default
    ``model.parameters()``; give the optimizer's if the loss has parameters of its own).
    The caller zeroes gradients (or not: they accumulate) and steps the optimizer after.
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode = {mode!r}; choose 'exact' or 'fast'")
    if grad_of not in ("sum", "mean"):
        raise ValueError(f"grad_of = {grad_of!r}; choose 'sum' or 'mean'")
    q = _check_q(q)
    eps_map = expand_eps(eps, stages)
    scale = 1.0 if loss_scale is None else loss_scale
    if mode == "exact":
        sync = find_sync_batchnorm(model)
        if sync:
            raise RuntimeError(f"exact MSGR needs double backward, which SyncBatchNorm lacks ({sync[:3]}); "
                               "use msgr.mode fast or plain BatchNorm")
    fast = mode == "fast"
    rng = RNGSnapshot(_model_device(model)) if fast else None
    kinks = PiecewiseReplay() if fast and freeze_kinks else None

    cap = StageCapture(model, stages, on_output=kinks.arm if kinks is not None else None, split_first=fast)
    if kinks is not None:
        mode_ctx = kinks
    elif not fast and fused_bn:
        mode_ctx = FusedBatchNormDoubleBackward()
    else:
        mode_ctx = contextlib.nullcontext()
    # DDP, fast mode: forward 1 and backward 1 accumulate locally (no_sync), the final
    # backward after the synced forward 2 all-reduces the sum (gradient-accumulation pattern)
    ddp = fast and isinstance(model, nn.parallel.DistributedDataParallel)
    local = contextlib.ExitStack()
    if ddp:
        local.enter_context(model.no_sync())
    with local:
        with mode_ctx:
            with cap:
                outputs = forward_fn()
            loss = loss_fn(outputs)
        cap.check_unmodified()
        feats = {n: t for n, t in cap.outputs.items() if t.requires_grad}
        skipped = [n for n in cap.outputs if n not in feats]
        if not feats:  # (no split either: it happens only to an output that requires grad)
            if ddp:  # forward 1 ran unsynced: run it again, synced, as a plain step
                local.close()
                with rng.replay(), frozen_running_stats(model):
                    outputs = forward_fn()
                    loss = loss_fn(outputs)
            (loss * scale).backward()
            return MSGRStep(outputs, loss.detach(), None, None, skipped)
        batch = next(iter(feats.values())).shape[0]
        a = float(batch) if grad_of == "sum" else 1.0
        eps_used = {n: eps_map[n] for n in feats}

        if mode == "exact":
            pen = feature_gradient_penalty(loss * (a * scale), feats, eps_used, q, squared, grad_scale=loss_scale)
            ((loss + pen.penalty) * scale).backward()
            return MSGRStep(outputs, loss.detach(), _detached(pen), None, skipped)

        # ---- fast mode (G5): backward 1 of L_mean(x), catching g at the stage outputs
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        stash = [p.grad for p in params]  # gradients accumulated before this call, put aside
        for p in params:
            p.grad = None
        # The graph below the first stage (``upstream``) is cut off by a leaf: backward 1 stops
        # there and the end of the step back-props it once, with both passes' gradients.
        up_name, up_tensor = cap.upstream if cap.upstream is not None else (None, None)
        retain = up_tensor is not None and _reaches_upstream(loss, up_tensor)
        caught: Dict[str, torch.Tensor] = {}
        handles = [t.register_hook(lambda grad, n=n: caught.__setitem__(n, grad)) for n, t in feats.items()]
        try:
            (loss * scale).backward(retain_graph=retain)
        finally:
            for hd in handles:
                hd.remove()
    if up_name is not None:
        feats[up_name].grad = None
    up_grad = caught.get(up_name)
    with torch.no_grad():
        grads = {n: _wide(caught[n]) * (a / scale) for n in feats}
        caught.clear()
        pen = penalty_from_gradients(grads, eps_used, q, squared)
        dirs = {}
        for n, g in grads.items():
            v = dual_direction(g, q)
            if squared:  # d||g||^2 = <dg, 2 ||g|| v>
                v = v * (2 * per_sample_norm(g, q)).to(v.dtype).view(-1, *([1] * (g.dim() - 1)))
            dirs[n] = v
        del grads
        rel = {n: _mean_norm(dirs[n]) * eps_used[n] / (batch * _mean_norm(feats[n].detach())) for n in feats}
        if h is None:  # auto: the largest relative stage perturbation equals rel_step
            top = max(rel.values())
            h = rel_step / top if top > 0 else 1.0
        h = float(h)
        if not h > 0:
            raise ValueError(f"fast-mode step h = {h} must be > 0")
        deltas = {n: (h * eps_used[n] / batch) * v for n, v in dirs.items()}
        del dirs
        # pass-1 gradients become (1 - a/h) dL_mean(x)/dtheta; earlier gradients are added back
        now = [p.grad for p in params if p.grad is not None]
        if now:
            torch._foreach_mul_(now, 1.0 - a / h)
        for p, old in zip(params, stash):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        del stash, now
    # ---- backward 2 of (a/h) L_mean(x + delta): same RNG (dropout), no running-stat update;
    # the first stage's recomputed output is replaced by forward 1's (graph kept) + delta
    cap2 = StageCapture(model, list(feats), deltas, on_output=kinks.arm if kinks is not None else None,
                        base={up_name: up_tensor} if up_name is not None else None)
    with rng.replay(), frozen_running_stats(model):
        with kinks.replay() if kinks is not None else contextlib.nullcontext():
            with cap2:
                outputs2 = forward_fn()
            loss2 = loss_fn(outputs2)
            if kinks is not None:
                kinks.check_consumed()
    cap2.check_unmodified()
    del kinks, deltas
    roots, seeds = [loss2 * ((a / h) * scale)], [None]
    if up_name is not None:  # forward 1's share of the gradient below the first stage
        roots.append(up_tensor)
        seeds.append(up_grad * (1.0 - a / h))
    torch.autograd.backward(roots, seeds)
    fd = (loss2.detach().double() - loss.detach().double()) * (a / h)
    if squared:
        fd = fd / 2
    info = FastInfo(fd.to(pen.penalty.dtype), h, h * max(rel.values()))
    return MSGRStep(outputs, loss.detach(), pen, info, skipped)
