"""One MSGR training step (docs/methods.md G4, G5, G6): forward(s) and backward of L_mean + R,
gradients accumulated into ``.grad`` like ``loss.backward()``.

:func:`exact_step` (G4, the paper's): one forward with the stage outputs captured, R from
``autograd.grad(L_grad, x_s, create_graph=True)`` (:func:`~.penalty.feature_gradient_penalty`),
one backward of L_mean + R; BatchNorm's double backward by
:class:`~.batchnorm.FusedBatchNormDoubleBackward`.

:func:`fast_step` (G5, ours). Take the detached per-sample direction v_{s,i} (dual of q, unit
p-norm, <g_{s,i}, v_{s,i}> = ||g_{s,i}||_q), delta_s = h * eps_s * v_s / B, and one more
forward with x_s + delta_s at every stage at once: R ~= (L_grad(x + delta) - L_grad(x)) / h,
whose parameter gradient is, to first order in h, exact mode's dR/dtheta (Danskin:
d||g||_q = <dg, v> with v held fixed). Cost (F a forward, a backward ~ 2F): forward, ONE
backward of L_mean that also yields g (tensor hooks on the stage outputs: nothing is
recomputed), the extra forward, its backward: about twice a plain step, a little less as the
part below the first stage is back-propagated once (backward 1 stops at a detached leaf
there; the last backward carries both passes' gradients through it). The first pass's
parameter gradients are rescaled to (1 - a/h) dL_mean(x)/dtheta (a = B for grad_of 'sum', 1
for 'mean'; gradients accumulated before the call are kept) and the second backward adds
(a/h) dL_mean(x + delta)/dtheta: together d(L_mean + R)/dtheta.

Three things make the finite difference sound (each is tested): the extra forward replays
the first one's RNG state and updates no running statistics, and stays on the first one's
piece (:mod:`torchreid_ext.msgr.fast`); and the step is right. Per sample
||delta_{s,i}||_p = h eps_s / B can be tiny next to ||x_{s,i}||, below float32 resolution, so
that x + delta rounds back towards x. ``h=None`` (engine: ``msgr.fast_h`` <= 0) picks h per
batch so that the largest stage perturbation is ``rel_step`` of the stage output: large enough
to stay above float32 rounding, small enough that the curvature of the network along v
(BatchNorm, loss) does not bias the difference (tests/msgr/test_msgr_fast.py checks both).

The logged ``R`` is computed from the exact g in both modes; ``R_fd`` (fast) is the
finite-difference value, a check on h. ``squared=True`` in fast mode: d(||g||^2) =
2 ||g|| <dg, v>, so the direction becomes 2 ||g_{s,i}||_q v_{s,i} (detached); the parameter
gradient is first-order exact, the finite difference estimates 2R (``R_fd`` is reported
halved). Under fp16/bf16 autocast the fast-mode perturbation would round away: use exact
mode with AMP.

``weight`` (both steps) multiplies R in the objective, L_mean + weight * R, while the
returned R stays unweighted (fast mode: the perturbation is unchanged, the second pass's
factor a/h becomes weight * a/h): lazy regularisation (MSGREngine's ``interval`` N applies R
every N-th step with weight N; Karras et al., StyleGAN2, CVPR 2020).

Integration notes (G6). DDP: exact mode is correct with default settings and silently wrong
with ``static_graph=True``; fast mode runs its first forward/backward under ``no_sync()``
(gradient-accumulation pattern). SyncBatchNorm has no double backward: callers of exact mode
refuse it (:func:`~.batchnorm.check_double_backward`, as MSGREngine does at construction).
``torch.compile`` cannot double-backward: do not compile the model for exact mode. Stage
outputs must not be modified in place downstream (checked).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .batchnorm import FusedBatchNormDoubleBackward
from .fast import PiecewiseReplay, RNGSnapshot, dual_direction, frozen_running_stats
from .options import MSGROptions
from .penalty import (
    GradientPenalty,
    Scale,
    check_grad_of,
    check_q,
    feature_gradient_penalty,
    penalty_from_gradients,
    per_sample_norm,
    widen,
)
from .stages import StageCapture, expand_eps

__all__ = ["FastInfo", "MSGRStep", "check_mode", "exact_step", "fast_step", "msgr_backward"]

ForwardFn = Callable[[], object]
LossFn = Callable[[object], torch.Tensor]


def check_mode(mode: str) -> str:
    """``mode`` if :class:`~.options.MSGROptions` allows it ('exact', G4; 'fast', G5), else a ValueError."""
    return MSGROptions.check_value("mode", mode)


class FastInfo(NamedTuple):
    """Fast-mode diagnostics: ``penalty_fd`` the finite-difference estimate of R (a check on
    h), ``h`` the step used, ``rel_step`` the largest ||delta_s|| / ||x_s|| (per sample, L2)."""

    penalty_fd: torch.Tensor
    h: float
    rel_step: float


class MSGRStep(NamedTuple):
    """What a step did. ``outputs``: the model outputs of the (unperturbed) forward; ``loss``:
    L_mean (detached); ``penalty``: :class:`GradientPenalty` (values detached, unweighted), or
    None when every stage was skipped; ``fast``: :class:`FastInfo` (None in exact mode);
    ``skipped``: stages left out because their outputs do not require grad (frozen, e.g.
    Torchreid's fixbase epochs)."""

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
    return float(torch.linalg.vector_norm(widen(t).flatten(1), dim=1).mean())


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


def _checked(stages: Sequence[str], eps: Union[float, Sequence[float]], q: float, grad_of: str,
             weight: float) -> Tuple[float, Dict[str, float], float]:
    """The step functions' shared argument checks: ``(q, {stage: eps}, weight)``."""
    check_grad_of(grad_of)
    weight = float(weight)
    if not weight > 0:
        raise ValueError(f"MSGR weight = {weight} must be > 0 (the factor of R in L_mean + weight * R)")
    return check_q(q), expand_eps(eps, stages), weight


def _captured_forward(cap: StageCapture, forward_fn: ForwardFn, loss_fn: LossFn, mode_ctx):
    """Forward and loss with the stages captured: (outputs, loss, {stage: x_s that requires
    grad}, stages skipped because their outputs do not)."""
    with mode_ctx:
        with cap:
            outputs = forward_fn()
        loss = loss_fn(outputs)
    cap.check_unmodified()
    feats = {n: t for n, t in cap.outputs.items() if t.requires_grad}
    skipped = [n for n in cap.outputs if n not in feats]
    return outputs, loss, feats, skipped


def exact_step(
    model: nn.Module,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    stages: Sequence[str],
    eps: Union[float, Sequence[float]],
    q: float = 2.0,
    squared: bool = False,
    grad_of: str = "sum",
    loss_scale: Optional[Scale] = None,
    fused_bn: bool = True,
    weight: float = 1.0,
) -> MSGRStep:
    """Exact MSGR (G4): one forward, R from :func:`feature_gradient_penalty`, one backward of
    ``L_mean + weight * R``, gradients accumulated into ``.grad``.

    ``forward_fn()`` runs the model (put autocast inside it); ``loss_fn(outputs)`` returns the
    batch-mean loss L_mean. ``loss_scale`` (AMP, G6): the backward uses ``loss_scale *
    objective`` and stage gradients are divided by it. ``fused_bn``: BatchNorm's double
    backward by :class:`FusedBatchNormDoubleBackward`. The model must not contain
    SyncBatchNorm (:func:`~.batchnorm.check_double_backward`). The caller zeroes gradients
    (or not: they accumulate) and steps the optimizer after.
    """
    q, eps_map, weight = _checked(stages, eps, q, grad_of, weight)
    scale = 1.0 if loss_scale is None else loss_scale
    mode_ctx = FusedBatchNormDoubleBackward() if fused_bn else contextlib.nullcontext()
    outputs, loss, feats, skipped = _captured_forward(StageCapture(model, stages), forward_fn, loss_fn, mode_ctx)
    if not feats:
        (loss * scale).backward()
        return MSGRStep(outputs, loss.detach(), None, None, skipped)
    batch = next(iter(feats.values())).shape[0]
    a = float(batch) if grad_of == "sum" else 1.0
    eps_used = {n: eps_map[n] for n in feats}
    pen = feature_gradient_penalty(loss * (a * scale), feats, eps_used, q, squared, grad_scale=loss_scale)
    ((loss + pen.penalty * weight) * scale).backward()
    return MSGRStep(outputs, loss.detach(), _detached(pen), None, skipped)


def fast_step(
    model: nn.Module,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    stages: Sequence[str],
    eps: Union[float, Sequence[float]],
    q: float = 2.0,
    squared: bool = False,
    grad_of: str = "sum",
    h: Optional[float] = 0.1,
    rel_step: float = 3e-6,
    freeze_kinks: bool = True,
    loss_scale: Optional[Scale] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
    weight: float = 1.0,
) -> MSGRStep:
    """Fast MSGR (G5, see the module docstring): two forwards, two backward passes, no double
    backward; the gradients of ``L_mean + weight * R`` (to first order in h) accumulated into
    ``.grad``.

    ``forward_fn``, ``loss_fn``, ``loss_scale``: as :func:`exact_step`. ``h``: G5's step
    (delta = h eps_s v / B); ``None`` picks it per batch so that the largest stage perturbation
    is ``rel_step`` times the stage output in L2 norm (float32 needs ~1e-6..1e-5: below,
    x + delta rounds back to x; above, curvature biases). ``freeze_kinks``: the second forward
    reuses the first one's ReLU masks and max-pool argmaxes (:class:`PiecewiseReplay`);
    without it the fast gradient of a ReLU network is noise. ``params``: the parameters whose
    pass-1 gradients are rescaled (default ``model.parameters()``; give the optimizer's if the
    loss has parameters of its own).
    """
    q, eps_map, weight = _checked(stages, eps, q, grad_of, weight)
    scale = 1.0 if loss_scale is None else loss_scale
    rng = RNGSnapshot(_model_device(model))
    kinks = PiecewiseReplay() if freeze_kinks else None
    arm = kinks.arm if kinks is not None else None
    cap = StageCapture(model, stages, on_output=arm, split_first=True)
    # DDP: forward 1 and backward 1 accumulate locally (no_sync), the final backward after
    # the synced forward 2 all-reduces the sum (gradient-accumulation pattern)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    local = contextlib.ExitStack()
    if ddp:
        local.enter_context(model.no_sync())
    with local:
        mode_ctx = kinks if kinks is not None else contextlib.nullcontext()
        outputs, loss, feats, skipped = _captured_forward(cap, forward_fn, loss_fn, mode_ctx)
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

        # ---- backward 1 of L_mean(x), catching g at the stage outputs
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
        grads = {n: widen(caught[n]) * (a / scale) for n in feats}
        caught.clear()
        pen = penalty_from_gradients(grads, eps_used, q, squared)
        dirs = _directions(grads, q, squared)
        del grads
        deltas, h, rel = _perturbations(dirs, feats, eps_used, batch, h, rel_step)
        del dirs
        c = weight * a / h  # the second pass's factor (a/h, times R's weight)
        _rescale_first_pass(params, stash, 1.0 - c)
        del stash
    # ---- backward 2 of c L_mean(x + delta): same RNG (dropout), no running-stat update;
    # the first stage's recomputed output is replaced by forward 1's (graph kept) + delta
    loss2 = _perturbed_loss(model, forward_fn, loss_fn, list(feats), deltas, rng, kinks,
                            {up_name: up_tensor} if up_name is not None else None)
    del kinks, deltas
    roots, seeds = [loss2 * (c * scale)], [None]
    if up_name is not None:  # forward 1's share of the gradient below the first stage
        roots.append(up_tensor)
        seeds.append(up_grad * (1.0 - c))
    torch.autograd.backward(roots, seeds)
    fd = (loss2.detach().double() - loss.detach().double()) * (a / h)
    if squared:
        fd = fd / 2
    info = FastInfo(fd.to(pen.penalty.dtype), h, h * max(rel.values()))
    return MSGRStep(outputs, loss.detach(), pen, info, skipped)


def _rescale_first_pass(params: Sequence[torch.Tensor], stash: Sequence[Optional[torch.Tensor]],
                        factor: float) -> None:
    """Pass-1 gradients become ``factor`` dL_mean(x)/dtheta; the gradients accumulated before the
    step (``stash``) are added back."""
    now = [p.grad for p in params if p.grad is not None]
    if now:
        torch._foreach_mul_(now, factor)
    for p, old in zip(params, stash):
        if old is not None:
            p.grad = old if p.grad is None else p.grad.add_(old)


def _perturbed_loss(model: nn.Module, forward_fn: ForwardFn, loss_fn: LossFn, stages: Sequence[str],
                    deltas: Dict[str, torch.Tensor], rng: RNGSnapshot, kinks: Optional[PiecewiseReplay],
                    base: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """Forward 2, L_mean(x + delta): forward 1's RNG state (dropout), no running-stat update, the
    first pass's pieces (``kinks``), and the first stage's output taken from forward 1 (``base``,
    graph kept) plus its delta."""
    arm = kinks.arm if kinks is not None else None
    cap = StageCapture(model, stages, deltas, on_output=arm, base=base)
    with rng.replay(), frozen_running_stats(model):
        with kinks.replay() if kinks is not None else contextlib.nullcontext():
            with cap:
                outputs = forward_fn()
            loss = loss_fn(outputs)
            if kinks is not None:
                kinks.check_consumed()
    cap.check_unmodified()
    return loss


def _directions(grads: Dict[str, torch.Tensor], q: float, squared: bool) -> Dict[str, torch.Tensor]:
    """{stage: v_s}: the dual direction of g_s (G1), times 2 ||g_{s,i}||_q for ``squared``."""
    dirs = {}
    for n, g in grads.items():
        v = dual_direction(g, q)
        if squared:  # d||g||^2 = <dg, 2 ||g|| v>
            v = v * (2 * per_sample_norm(g, q)).to(v.dtype).view(-1, *([1] * (g.dim() - 1)))
        dirs[n] = v
    return dirs


def _perturbations(dirs: Dict[str, torch.Tensor], feats: Dict[str, torch.Tensor], eps: Dict[str, float],
                   batch: int, h: Optional[float], rel_step: float):
    """Fast mode's stage perturbations delta_s = (h eps_s / B) v_s, the step h (chosen when
    None: the largest relative perturbation is ``rel_step``) and {stage: mean_i ||v_{s,i}||
    eps_s / (B mean_i ||x_{s,i}||)}, the relative perturbation per unit h (L2 norms)."""
    rel = {n: _mean_norm(dirs[n]) * eps[n] / (batch * _mean_norm(feats[n].detach())) for n in feats}
    if h is None:  # auto: the largest relative stage perturbation equals rel_step
        top = max(rel.values())
        h = rel_step / top if top > 0 else 1.0
    h = float(h)
    if not h > 0:
        raise ValueError(f"fast-mode step h = {h} must be > 0")
    deltas = {n: (h * eps[n] / batch) * v for n, v in dirs.items()}
    return deltas, h, rel


def msgr_backward(
    model: nn.Module,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
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
    weight: float = 1.0,
) -> MSGRStep:
    """:func:`exact_step` (``mode='exact'``; uses ``fused_bn``) or :func:`fast_step`
    (``'fast'``; uses ``h``, ``rel_step``, ``freeze_kinks``, ``params``) with the other
    arguments passed on."""
    if check_mode(mode) == "exact":
        return exact_step(model, forward_fn, loss_fn, stages, eps, q, squared, grad_of,
                          loss_scale=loss_scale, fused_bn=fused_bn, weight=weight)
    return fast_step(model, forward_fn, loss_fn, stages, eps, q, squared, grad_of, h=h, rel_step=rel_step,
                     freeze_kinks=freeze_kinks, loss_scale=loss_scale, params=params, weight=weight)
