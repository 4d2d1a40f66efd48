"""The exact MSGR penalty (docs/methods.md G2, G4).

For stage outputs x_s (B samples) and their gradients g_s = dL_grad / dx_s,

    R = sum_s eps_s * mean_i ||g_{s,i}||_q,

where g_{s,i} is sample i's slice of g_s, flattened, and L_grad is ``B * L_mean`` (``grad_of
'sum'``: each sample's gradient is that of its own loss term) or ``L_mean`` (``'mean'``).
``squared=True`` uses ||g_{s,i}||_q ** 2. The training objective is L_mean + R.

:func:`feature_gradient_penalty` takes g_s from ``autograd.grad(..., create_graph=True)``
(G4), so R is differentiable and one backward of L_mean + R trains with it. Norms are taken
in float32 (float64 stays float64), and it is AMP-ready (G6: pass the scaled loss and
``grad_scale``).
"""
from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from .options import MSGROptions
from .stages import expand_eps

__all__ = [
    "GradientPenalty",
    "check_q",
    "check_grad_of",
    "widen",
    "per_sample_norm",
    "penalty_from_gradients",
    "feature_gradient_penalty",
]

INF = float("inf")
Scale = Union[float, torch.Tensor]


def check_q(q: float) -> float:
    """``q`` as a float if :class:`~.options.MSGROptions` allows it (a norm order >= 1), else a ValueError."""
    return float(MSGROptions.check_value("q", q))


def check_grad_of(grad_of: str) -> str:
    """``grad_of`` if :class:`~.options.MSGROptions` allows it ('sum': L_grad = B * L_mean, 'mean':
    L_grad = L_mean), else a ValueError."""
    return MSGROptions.check_value("grad_of", grad_of)


class GradientPenalty(NamedTuple):
    """``penalty``: R (scalar tensor; differentiable in exact mode). ``stage_penalty``:
    {stage: eps_s * mean_i ||g_{s,i}||_q (squared if asked)}, summing to R. ``stage_gnorm``:
    {stage: mean_i ||g_{s,i}||_q} (never squared), detached. All float32 or wider."""

    penalty: torch.Tensor
    stage_penalty: Dict[str, torch.Tensor]
    stage_gnorm: Dict[str, torch.Tensor]


def widen(t: torch.Tensor) -> torch.Tensor:
    """Float32 for half types (G4: norms in float32), float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample_norm(g: torch.Tensor, q: float = 2.0, squared: bool = False) -> torch.Tensor:
    """||g_i||_q of each sample's flattened slice (B,), in float32 or wider (differentiable)."""
    q = check_q(q)
    flat = widen(g).flatten(1)
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
        g = widen(g)
        gmap[n] = g if grad_scale is None else g / grad_scale
    return penalty_from_gradients(gmap, eps_map, q, squared)
