"""MSGR: the multi-scale gradient regulariser (docs/methods.md G1-G7), usable without an engine.

For chosen stages s with outputs x_s (B samples), the penalty is (G2)

    R = sum_s eps_s * mean_i ||g_{s,i}||_q,   g_s = dL_grad / dx_s,

where g_{s,i} is sample i's slice of g_s, flattened, and L_grad is ``B * L_mean`` (``grad_of
'sum'``: each sample's gradient is that of its own loss term) or ``L_mean`` (``'mean'``).
``squared=True`` uses ||g_{s,i}||_q ** 2. The training objective is L_mean + R.

Modules, one concept each:

* :mod:`.stages`: :class:`StageCapture`, forward hooks that capture the named stage outputs
  of any model during its ordinary forward (and optionally perturb them); stage names.
* :mod:`.penalty`: the exact penalty :func:`feature_gradient_penalty` (G4) from
  ``autograd.grad(..., create_graph=True)``, norms in float32; AMP-ready (G6).
* :mod:`.fast`: fast mode's direction (:func:`dual_direction`, G1) and the replay that keeps
  its second forward on the first one's piece (RNG, running statistics, ReLU masks).
* :mod:`.batchnorm`: a ~3x cheaper BatchNorm double backward for exact mode.
* :mod:`.step`: a whole MSGR backward, :func:`exact_step` (G4) or :func:`fast_step` (G5),
  accumulating into ``.grad`` like ``loss.backward()`` (:func:`msgr_backward` picks one by
  ``mode``); :class:`torchreid_ext.engines.msgr.MSGREngine` uses them.

    with StageCapture(model, ['layer1', 'layer2']) as cap:
        loss = F.cross_entropy(model(x), y)
    R = feature_gradient_penalty(x.shape[0] * loss, cap.outputs, eps=0.01).penalty
    (loss + R).backward()
"""
from ..distributed import unwrap_model
from .batchnorm import FusedBatchNormDoubleBackward, check_double_backward, find_sync_batchnorm
from .fast import PiecewiseReplay, RNGSnapshot, dual_direction, frozen_running_stats
from .options import GRAD_OF, MODES, Q_VALUES, MSGROptions
from .penalty import (
    GradientPenalty,
    check_grad_of,
    check_q,
    feature_gradient_penalty,
    penalty_from_gradients,
    per_sample_norm,
)
from .stages import StageCapture, expand_eps, stage_modules
from .step import FastInfo, MSGRStep, check_mode, exact_step, fast_step, msgr_backward

__all__ = [
    "GradientPenalty",
    "MSGRStep",
    "FastInfo",
    "StageCapture",
    "unwrap_model",
    "stage_modules",
    "expand_eps",
    "check_q",
    "check_grad_of",
    "check_mode",
    "GRAD_OF",
    "MODES",
    "Q_VALUES",
    "MSGROptions",
    "per_sample_norm",
    "feature_gradient_penalty",
    "penalty_from_gradients",
    "dual_direction",
    "frozen_running_stats",
    "RNGSnapshot",
    "PiecewiseReplay",
    "FusedBatchNormDoubleBackward",
    "find_sync_batchnorm",
    "check_double_backward",
    "exact_step",
    "fast_step",
    "msgr_backward",
]
