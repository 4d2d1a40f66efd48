"""ImageMetricEngine: ``w_x * CE(logits) + sum_m w_m * L_m(features)`` for any model.

One engine for every registered ``loss.name`` (softmax, triplet, drsl, sn, ...;
docs/methods.md D5, S4): the cross-entropy term is Torchreid's ``CrossEntropyLoss`` (label
smoothing switchable), the metric terms are any ``loss(features, pids)`` modules (Torchreid's
``TripletLoss``, ``DRSLoss``, ``SupportNeighborLoss``, yours). Each term (``loss_<name>``;
Torchreid's ``loss_t`` for triplet), and each loss's ``last_stats`` diagnostics
(``<name>/<key>``), go into the loss summary, hence to the console and TensorBoard.

:class:`ImageDRSLEngine` and :class:`ImageSNEngine` take Torchreid's constructor conventions
(those of ``torchreid.engine.ImageTripletEngine``), so an existing Torchreid script switches loss
by changing its engine line.

Losses are computed in float32 outside autocast (``train.amp``). ``gather_features``
(``dist.gather_features``): under DDP the metric losses see every rank's features and pids
(:func:`torchreid_ext.distributed.all_gather_with_grad`, rank-major, i.e. the concatenated
batch) and their terms enter the backward multiplied by the world size, which makes the DDP
step that of one process on the concatenated batch (summary values are unscaled). The
cross-entropy term is per sample and needs no gathering.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .. import distributed
from ..adapter import torchreid
from ..losses import DRSLoss, SupportNeighborLoss, check_loss_weights, get_loss, loss_names
from .base import ReIDEngine

__all__ = ["ImageMetricEngine", "ImageDRSLEngine", "ImageSNEngine", "split_outputs", "summary_key"]


def summary_key(name: str) -> str:
    """The loss-summary key of metric term ``name`` (the registry's; ``loss_<name>`` otherwise)."""
    return get_loss(name).summary_key if name in loss_names() else f"loss_{name}"


def split_outputs(outputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Training-mode model outputs -> (logits, features or None) (Torchreid convention),
    half-precision tensors cast to float32 (losses run in float32 under AMP)."""
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and torch.is_tensor(outputs[1]):
        return _float32(outputs[0]), _float32(outputs[1])
    return _float32(outputs), None


def _float32(x):
    if isinstance(x, (tuple, list)):
        return type(x)(_float32(t) for t in x)
    return x.float() if torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16) else x


class ImageMetricEngine(ReIDEngine):
    """Cross-entropy plus weighted metric losses on the embedding."""

    def __init__(
        self,
        datamanager,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        use_gpu: bool = True,
        weight_x: float = 1.0,
        label_smooth: bool = True,
        metric_losses: Optional[Mapping[str, Tuple[float, nn.Module]]] = None,
        gather_features: bool = False,
        **kwargs,
    ):
        metric_losses = dict(metric_losses or {})
        check_loss_weights({"weight_x": weight_x, **{f"metric_losses['{n}'] weight": w
                                                     for n, (w, _) in metric_losses.items()}})
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, **kwargs)
        self.weight_x = float(weight_x)
        # a weight of 0 turns a term off
        self.metric_losses: Dict[str, Tuple[float, nn.Module]] = {
            name: (float(w), loss) for name, (w, loss) in metric_losses.items() if w > 0
        }
        self.gather_features = bool(gather_features)
        self.criterion_x = torchreid().losses.CrossEntropyLoss(
            num_classes=datamanager.num_train_pids, use_gpu=self.use_gpu, label_smooth=label_smooth
        )

    @classmethod
    def from_options(cls, options, datamanager, model, optimizer, scheduler=None, **common) -> "ImageMetricEngine":
        """The engine with the base engines' arguments ``common``
        (:func:`torchreid_ext.builders.build_run_engine`); a subclass reads its own options from
        ``options``, the run's (:class:`~torchreid_ext.run_options.RunOptions`)."""
        return cls(datamanager, model, optimizer, scheduler, **common)

    def compute_loss_terms(self, outputs, pids: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Weighted total (batch mean; gathered terms x world size, see the module docstring)
        and the summary of every term (unscaled)."""
        logits, features = split_outputs(outputs)
        summary: Dict[str, float] = {}
        total = logged = 0.0
        if self.weight_x > 0:
            loss_x = self.compute_loss(self.criterion_x, logits, pids)
            total = total + self.weight_x * loss_x
            logged = logged + self.weight_x * loss_x.item()
            summary["loss_x"] = loss_x.item()
            acc_logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            summary["acc"] = torchreid().metrics.accuracy(acc_logits, pids)[0].item()
        if self.metric_losses and features is None:
            raise RuntimeError(
                "the model returned only logits in training mode, but metric losses "
                f"{sorted(self.metric_losses)} need features; build Torchreid models with "
                "loss='triplet' (torchreid_ext.build_model does this for every loss but softmax)"
            )
        scale = 1
        if self.metric_losses and self.gather_features and distributed.get_world_size() > 1:
            features = distributed.all_gather_with_grad(features)
            pids = distributed.all_gather_tensor(pids)
            scale = distributed.get_world_size()
        for name, (weight, criterion) in self.metric_losses.items():
            value = criterion(features, pids)
            total = total + (weight * scale) * value
            logged = logged + weight * value.item()
            summary[summary_key(name)] = value.item()
            for key, stat in getattr(criterion, "last_stats", {}).items():
                summary[f"{name}/{key}"] = float(stat)
        summary["loss"] = float(logged)
        return total, summary

    def forward_backward(self, data) -> Dict[str, float]:
        imgs, pids = self.train_inputs(data)
        with self.autocast():
            outputs = self.model(imgs)
        loss, summary = self.compute_loss_terms(outputs, pids)
        self.backward_and_step(loss)
        return summary


_DRSL = get_loss("drsl").defaults
_SN = get_loss("sn").defaults


class ImageDRSLEngine(ImageMetricEngine):
    """Cross-entropy + DRSL with Torchreid's engine conventions (docs/methods.md D5).

    Drop-in for ``torchreid.engine.ImageTripletEngine(datamanager, model, optimizer, margin,
    weight_t, weight_x, scheduler, use_gpu, label_smooth)``: the same positional order, with
    ``weight_drsl`` for ``weight_t`` and DRSL's ``tau_rel`` / ``lambda_sort`` (the config
    defaults of ``loss.drsl``) after them. Build the model as for the triplet engine
    (``loss='triplet'``: training mode returns ``(logits, features)``). Further keywords go to
    :class:`ImageMetricEngine` (``evaluator``, ``amp``, ``seed``, ...).
    """

    def __init__(
        self,
        datamanager,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weight_drsl: float = _DRSL["weight"],
        weight_x: float = _DRSL["weight_x"],
        scheduler=None,
        use_gpu: bool = True,
        label_smooth: bool = True,
        tau_rel: float = _DRSL["tau_rel"],
        lambda_sort: float = _DRSL["lambda_sort"],
        **kwargs,
    ):
        super().__init__(
            datamanager, model, optimizer, scheduler=scheduler, use_gpu=use_gpu, weight_x=weight_x,
            label_smooth=label_smooth,
            metric_losses={"drsl": (weight_drsl, DRSLoss(tau_rel=tau_rel, lambda_sort=lambda_sort))}, **kwargs,
        )


class ImageSNEngine(ImageMetricEngine):
    """Support Neighbor loss (+ optional cross-entropy) with Torchreid's engine conventions
    (docs/methods.md S4).

    Like :class:`ImageDRSLEngine`: ``weight_sn`` and ``weight_x`` (default 0: the authors train with
    SN alone), then SN's ``alpha``, ``k``, ``weight_squeeze``, ``squeeze`` (the config defaults of
    ``loss.sn``). The train batch must hold at least k + 2 images. Build the model with
    ``loss='triplet'``.
    """

    def __init__(
        self,
        datamanager,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weight_sn: float = _SN["weight"],
        weight_x: float = _SN["weight_x"],
        scheduler=None,
        use_gpu: bool = True,
        label_smooth: bool = True,
        alpha: float = _SN["alpha"],
        k: int = _SN["k"],
        weight_squeeze: float = _SN["weight_squeeze"],
        squeeze: str = _SN["squeeze"],
        **kwargs,
    ):
        loss = SupportNeighborLoss(alpha=alpha, k=k, weight_squeeze=weight_squeeze, squeeze=squeeze)
        super().__init__(
            datamanager, model, optimizer, scheduler=scheduler, use_gpu=use_gpu, weight_x=weight_x,
            label_smooth=label_smooth, metric_losses={"sn": (weight_sn, loss)}, **kwargs,
        )
