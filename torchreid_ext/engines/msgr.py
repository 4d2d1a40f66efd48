"""MSGREngine: ImageMetricEngine's losses plus the multi-scale gradient regulariser (docs/methods.md G).

Each step minimises L_mean + R, R = sum_s eps_s * mean_i ||dL_grad/dx_{s,i}||_q over the
outputs x_s of the modules named in ``stages`` (G2), with the loss terms of
:class:`ImageMetricEngine` (softmax, triplet, drsl, sn). ``mode='exact'`` (G4, the paper's):
one forward with the stage outputs captured by forward hooks, ``autograd.grad(...,
create_graph=True)``, one backward of L_mean + R. ``mode='fast'`` (G5, ours): one more forward
with a first-order adversarial perturbation of every stage, no double backward; see
:mod:`torchreid_ext.msgr.step` for the construction and its numerics.

Lazy MSGR (``interval`` N, ours after the lazy regularisation of Karras et al., StyleGAN2,
CVPR 2020): R is applied on every N-th step with weight N (L_mean + N * R) and the other steps
are plain steps of the base losses (ImageMetricEngine's, under autocast with AMP even in fast
mode), so R keeps its average weight at about 1/N of its extra cost.
The choice comes from the global step index ``epoch * num_batches + batch_idx`` (Torchreid's
``Engine.train`` sets them): the same on every DDP rank, and a resumed run makes the choices
of an uninterrupted one.

Stage names are module paths: Torchreid's ResNets and our ``resnet50_bnfc512`` /
``msfl_resnet50`` use ``layer1``..``layer4`` (C2..C5; the paper regularises layer1 and layer2);
OSNet uses ``conv1``..``conv5``. The loss summary (console, TensorBoard ``Train/*``) gets the
base terms plus ``msgr/applied`` (1 if R was part of this step, else 0), and on the steps that
compute R: ``msgr/R`` (unweighted, comparable across intervals), ``msgr/R_<stage>`` and
``msgr/gnorm_<stage>`` (mean per-sample gradient norm), and in fast mode ``msgr/R_fd``
(finite-difference R) and ``msgr/fast_h``. Steps that skip R (lazy) leave these keys out, so
their averages are over the steps that computed them.

G6 interactions: stages whose outputs do not require grad (frozen by Torchreid's fixbase
epochs) are skipped, with one log line per epoch (``msgr/R`` is then 0); exact mode refuses
SyncBatchNorm at construction (no double backward); under DDP do not use ``static_graph=True``
(silently wrong with the penalty's extra autograd pass); ``torch.compile`` cannot
double-backward, so do not compile the model for exact mode. AMP (``amp='bf16' | 'fp16'``,
base engine): exact mode runs the forward under autocast and follows PyTorch's
gradient-penalty recipe (G6): the scaled loss goes into ``autograd.grad``, the stage gradients
are divided by the scale before the norms, and ``GradScaler.step`` unscales the parameter
gradients. Fast mode runs its forwards in float32 even with AMP (one log line per epoch says
so): its perturbation, ~3e-6 of the stage output, is far below bf16 / fp16 resolution (~4e-3 /
5e-4) and rounds away (measured on osnet_x0_25: cosine to exact mode's dR/dtheta 0.05-0.3
under bf16 for any step).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Sequence, Union

from .. import msgr
from ..msgr import MSGROptions
from .metric import ImageMetricEngine

__all__ = ["MSGREngine", "penalty_due"]

logger = logging.getLogger(__name__)


def penalty_due(epoch: int, batch_idx: int, num_batches: int, interval: int) -> bool:
    """Lazy MSGR: does the step at (``epoch``, ``batch_idx``) apply R? Yes when its global
    index ``epoch * num_batches + batch_idx`` is a multiple of ``interval`` (the first step
    of a run does)."""
    return (int(epoch) * int(num_batches) + int(batch_idx)) % int(interval) == 0


class MSGREngine(ImageMetricEngine):
    """ImageMetricEngine + MSGR (docs/methods.md G1-G7).

    ``stages``: module names (``model.get_submodule``); ``eps``: one value or one per stage;
    ``q``: a norm order >= 1 (inf allowed); ``squared``: penalise ||g||_q ** 2; ``grad_of``: 'sum' (L_grad =
    B * L_mean, each sample's own gradient, G2) or 'mean'; ``mode``: 'exact' or 'fast';
    ``fast_h``: G5's step (delta = h eps_s v / B), or <= 0 for automatic: per batch, the largest
    stage perturbation is ``fast_rel_step`` of the stage output (L2), which suits float32;
    ``freeze_kinks``: fast mode's second forward keeps the first one's ReLU / max-pool pattern;
    ``interval``: lazy MSGR, R with weight N on every N-th step (:func:`penalty_due`), plain
    steps in between (1: every step).
    """

    def __init__(
        self,
        *args,
        stages: Sequence[str] = MSGROptions.stages,
        eps: Union[float, Sequence[float]] = MSGROptions.eps,
        q: float = MSGROptions.q,
        squared: bool = MSGROptions.squared,
        grad_of: str = MSGROptions.grad_of,
        mode: str = MSGROptions.mode,
        fast_h: float = MSGROptions.fast_h,
        fast_rel_step: float = 3e-6,
        freeze_kinks: bool = True,
        interval: int = MSGROptions.interval,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        eps = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
        self.msgr_options = MSGROptions(enabled=True, mode=mode, stages=tuple(stages), eps=eps, q=q,
                                        squared=bool(squared), grad_of=grad_of, fast_h=fast_h, interval=interval)
        self.msgr_stages: List[str] = list(stages)
        msgr.stage_modules(self.model, self.msgr_stages)  # unknown names fail here, listing the children
        self.msgr_eps: Dict[str, float] = msgr.expand_eps(list(eps), self.msgr_stages)
        self.msgr_fast_rel_step = float(fast_rel_step)
        self.msgr_freeze_kinks = bool(freeze_kinks)
        if mode == "exact":
            msgr.check_double_backward(self.model)
        self._msgr_notes: Dict[str, int] = {}

    # the settings, read from msgr_options (one copy)
    msgr_mode = property(lambda self: self.msgr_options.mode)
    msgr_grad_of = property(lambda self: self.msgr_options.grad_of)
    msgr_q = property(lambda self: float(self.msgr_options.q))
    msgr_squared = property(lambda self: self.msgr_options.squared)
    msgr_interval = property(lambda self: self.msgr_options.interval)
    msgr_fast_h = property(lambda self: self.msgr_options.step_h, doc="G5's step h, or None: automatic")

    @classmethod
    def from_options(cls, options, datamanager, model, optimizer, scheduler=None, **engine_kwargs) -> "MSGREngine":
        """The engine ``options.msgr`` (:class:`~torchreid_ext.msgr.MSGROptions`) describes;
        ``engine_kwargs`` are ImageMetricEngine's arguments."""
        o = options.msgr
        return cls(datamanager, model, optimizer, scheduler, stages=o.stages, eps=o.eps, q=o.q, squared=o.squared,
                   grad_of=o.grad_of, mode=o.mode, fast_h=o.fast_h, interval=o.interval, **engine_kwargs)

    # ------------------------------------------------------------------ training step
    def _note_once(self, key: str, message: str, level: int = logging.INFO) -> None:
        """Log ``message`` once per epoch for ``key``."""
        epoch = int(getattr(self, "epoch", 0))
        if self._msgr_notes.get(key) != epoch:
            self._msgr_notes[key] = epoch
            logger.log(level, message)

    def penalty_due(self) -> bool:
        """Does this step apply R? :func:`penalty_due` at Torchreid's ``epoch`` / ``batch_idx`` /
        ``num_batches`` (0 / 0 / 1 before ``Engine.train`` sets them)."""
        if self.msgr_interval == 1:
            return True
        return penalty_due(getattr(self, "epoch", 0), getattr(self, "batch_idx", 0),
                           getattr(self, "num_batches", 1), self.msgr_interval)

    def forward_backward(self, data) -> Dict[str, float]:
        if not self.penalty_due():  # lazy MSGR: a plain step of the base losses
            summary = super().forward_backward(data)
            summary["msgr/applied"] = 0.0
            return summary
        imgs, pids = self.train_inputs(data)
        summaries: List[Dict[str, float]] = []
        autocast = self.autocast
        if self.msgr_mode == "fast" and self.autocast_dtype is not None:
            autocast = contextlib.nullcontext
            self._note_once("amp", f"MSGR fast: the forward passes run in float32, not {self.autocast_dtype} "
                                   "(the finite-difference step would round away); use msgr.mode exact for AMP",
                            logging.WARNING)

        def forward():
            with autocast():
                return self.model(imgs)

        def loss_fn(outputs):
            loss, summary = self.compute_loss_terms(outputs, pids)
            summaries.append(summary)
            return loss

        self.optimizer.zero_grad(set_to_none=True)
        step = msgr.msgr_backward(
            self.model, forward, loss_fn, self.msgr_stages, [self.msgr_eps[s] for s in self.msgr_stages],
            q=self.msgr_q, squared=self.msgr_squared, grad_of=self.msgr_grad_of, mode=self.msgr_mode,
            h=self.msgr_fast_h, rel_step=self.msgr_fast_rel_step, freeze_kinks=self.msgr_freeze_kinks,
            loss_scale=self.loss_scale(), weight=float(self.msgr_interval),
            params=[p for group in self.optimizer.param_groups for p in group["params"]],
        )
        self.step_optimizer()

        summary = dict(summaries[0])  # the unperturbed forward's terms
        if step.skipped:
            self._note_once("skip", (
                f"MSGR: epoch {int(getattr(self, 'epoch', 0)) + 1}: the outputs of stages {step.skipped} "
                "do not require grad (frozen, e.g. train.fixbase_epoch), so R leaves them out this epoch"
            ))
        pen = step.penalty
        summary["msgr/applied"] = 1.0 if pen is not None else 0.0
        summary["msgr/R"] = float(pen.penalty) if pen is not None else 0.0
        if pen is not None:
            for name in pen.stage_penalty:
                summary[f"msgr/R_{name}"] = float(pen.stage_penalty[name])
                summary[f"msgr/gnorm_{name}"] = float(pen.stage_gnorm[name])
        if step.fast is not None:
            summary["msgr/R_fd"] = float(step.fast.penalty_fd)
            summary["msgr/fast_h"] = step.fast.h
            if self.msgr_fast_h is not None and step.fast.rel_step < 1e-6:
                self._note_once("h", (
                    f"MSGR fast: msgr.fast_h {self.msgr_fast_h} perturbs the stage outputs by only "
                    f"{step.fast.rel_step:.1e} of their norm, near float32 resolution (R_fd "
                    f"{summary['msgr/R_fd']:.4g} vs R {summary['msgr/R']:.4g}); use msgr.fast_h 0 (auto)"
                ), logging.WARNING)
        return summary
