"""MSGREngine: ImageMetricEngine's losses plus the multi-scale gradient regulariser (METHOD.md G).

Each step minimises L_mean + R, R = sum_s eps_s * mean_i ||dL_grad/dx_{s,i}||_q over the
outputs x_s of the modules named in ``stages`` (G2), with the loss terms of
:class:`ImageMetricEngine` (softmax, triplet, drsl, sn). ``mode='exact'`` (G4, the paper's):
one forward with the stage outputs captured by forward hooks, ``autograd.grad(...,
create_graph=True)``, one backward of L_mean + R. ``mode='fast'`` (G5, ours): one more forward
with a first-order adversarial perturbation of every stage, no double backward; see
:mod:`torchreid_ext.msgr` for the construction and its numerics.

Stage names are module paths: Torchreid's ResNets and our ``resnet50_bnfc512`` /
``msfl_resnet50`` use ``layer1``..``layer4`` (C2..C5; the paper regularises layer1 and layer2);
OSNet uses ``conv1``..``conv5``. The loss summary (console, TensorBoard ``Train/*``) gets the
base terms plus ``msgr/R``, ``msgr/R_<stage>`` and ``msgr/gnorm_<stage>`` (mean per-sample
gradient norm), and in fast mode ``msgr/R_fd`` (finite-difference R) and ``msgr/fast_h``.

G6 interactions: stages whose outputs do not require grad (frozen by Torchreid's fixbase
epochs) are skipped, with one log line per epoch; exact mode refuses SyncBatchNorm at
construction (no double backward); under DDP do not use ``static_graph=True`` (silently
wrong with the penalty's extra autograd pass); ``torch.compile`` cannot double-backward, so
do not compile the model for exact mode. AMP (``amp='bf16' | 'fp16'``, base engine): exact
mode runs the forward under autocast and follows PyTorch's gradient-penalty recipe (G6): the
scaled loss goes into ``autograd.grad``, the stage gradients are divided by the scale before
the norms, and ``GradScaler.step`` unscales the parameter gradients. Fast mode runs its
forwards in float32 even with AMP (one log line per epoch says so): its perturbation, ~3e-6 of
the stage output, is far below bf16 / fp16 resolution (~4e-3 / 5e-4) and rounds away
(measured on osnet_x0_25: cosine to exact mode's dR/dtheta 0.05-0.3 under bf16 for any step).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Union

from .. import msgr
from .metric import ImageMetricEngine

__all__ = ["MSGREngine"]


class MSGREngine(ImageMetricEngine):
    """ImageMetricEngine + MSGR (METHOD.md G1-G7).

    ``stages``: module names (``model.get_submodule``); ``eps``: one value or one per stage;
    ``q``: 1, 2 or inf; ``squared``: penalise ||g||_q ** 2; ``grad_of``: 'sum' (L_grad =
    B * L_mean, each sample's own gradient, G2) or 'mean'; ``mode``: 'exact' or 'fast';
    ``fast_h``: G5's step (delta = h eps_s v / B) or 'auto' (None): per batch, the largest
    stage perturbation is ``fast_rel_step`` of the stage output (L2), which suits float32;
    ``freeze_kinks``: fast mode's second forward keeps the first one's ReLU / max-pool pattern.
    """

    def __init__(
        self,
        *args,
        stages: Sequence[str] = ("layer1", "layer2"),
        eps: Union[float, Sequence[float]] = 0.01,
        q: float = 2.0,
        squared: bool = False,
        grad_of: str = "sum",
        mode: str = "exact",
        fast_h: Union[float, str, None] = "auto",
        fast_rel_step: float = 3e-6,
        freeze_kinks: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        model = self.model
        if mode not in ("exact", "fast"):
            raise ValueError(f"MSGR mode = {mode!r}; choose 'exact' or 'fast'")
        if grad_of not in ("sum", "mean"):
            raise ValueError(f"MSGR grad_of = {grad_of!r}; choose 'sum' or 'mean'")
        self.msgr_stages: List[str] = list(stages)
        msgr.stage_modules(model, self.msgr_stages)  # unknown names fail here, listing the children
        self.msgr_eps: Dict[str, float] = msgr.expand_eps(eps, self.msgr_stages)
        self.msgr_q = msgr._check_q(q)
        self.msgr_squared = bool(squared)
        self.msgr_grad_of = grad_of
        self.msgr_mode = mode
        if isinstance(fast_h, str):
            if fast_h != "auto":
                raise ValueError(f"fast_h = {fast_h!r}; give a positive float or 'auto'")
            fast_h = None
        if fast_h is not None and not float(fast_h) > 0:
            raise ValueError(f"fast_h = {fast_h} must be > 0 (or 'auto')")
        self.msgr_fast_h: Optional[float] = None if fast_h is None else float(fast_h)
        self.msgr_fast_rel_step = float(fast_rel_step)
        self.msgr_freeze_kinks = bool(freeze_kinks)
        if mode == "exact":
            sync = msgr.find_sync_batchnorm(model)
            if sync:
                raise ValueError(
                    f"MSGR exact mode needs a double backward, which SyncBatchNorm does not have "
                    f"(model has {len(sync)}, e.g. '{sync[0]}'); set msgr.mode fast, or "
                    "train.sync_bn False"
                )
        self._msgr_notes: Dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg, datamanager, model, optimizer, scheduler=None, **engine_kwargs) -> "MSGREngine":
        """The engine ``cfg.msgr`` describes; ``engine_kwargs`` are ImageMetricEngine's arguments.
        ``msgr.fast_h <= 0`` means 'auto'."""
        sec = cfg.msgr
        fast_h = float(sec.fast_h)
        return cls(
            datamanager, model, optimizer, scheduler,
            stages=list(sec.stages), eps=list(sec.eps), q=float(sec.q), squared=bool(sec.squared),
            grad_of=sec.grad_of, mode=sec.mode, fast_h=fast_h if fast_h > 0 else "auto",
            **engine_kwargs,
        )

    # ------------------------------------------------------------------ training step
    def _note_once(self, key: str, message: str) -> None:
        """Print ``message`` once per epoch for ``key``."""
        epoch = int(getattr(self, "epoch", 0))
        if self._msgr_notes.get(key) != epoch:
            self._msgr_notes[key] = epoch
            print(message)

    def forward_backward(self, data) -> Dict[str, float]:
        imgs, pids = self.train_inputs(data)
        summaries: List[Dict[str, float]] = []
        autocast = self.autocast
        if self.msgr_mode == "fast" and self.autocast_dtype is not None:
            autocast = contextlib.nullcontext
            self._note_once("amp", f"MSGR fast: the forward passes run in float32, not {self.autocast_dtype} "
                                   "(the finite-difference step would round away); use msgr.mode exact for AMP")

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
            loss_scale=self.loss_scale(),
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
                ))
        return summary
