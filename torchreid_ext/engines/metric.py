"""ImageMetricEngine: ``w_x * CE(logits) + sum_m w_m * L_m(features)`` for any model.

One engine for ``loss.name`` softmax, triplet, drsl and sn (METHOD.md D5, S4): the
cross-entropy term is Torchreid's ``CrossEntropyLoss`` (label smoothing switchable), the
metric terms are any ``loss(features, pids)`` modules (Torchreid's ``TripletLoss``,
``DRSLoss``, ``SupportNeighborLoss``). Each term, and each loss's ``last_stats``
diagnostics, go into the loss summary, hence to the console and TensorBoard.

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
from .base import ReIDEngine

__all__ = ["ImageMetricEngine", "split_outputs"]

_tr = torchreid()

# Summary names: Torchreid's for its own terms.
SUMMARY_NAMES = {"triplet": "loss_t"}


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
        super().__init__(datamanager, model, optimizer, scheduler, use_gpu, **kwargs)
        self.weight_x = float(weight_x)
        self.metric_losses: Dict[str, Tuple[float, nn.Module]] = {
            name: (float(w), loss) for name, (w, loss) in (metric_losses or {}).items() if w > 0
        }
        if self.weight_x < 0 or any(w < 0 for w, _ in self.metric_losses.values()):
            raise ValueError("loss weights must be >= 0")
        if self.weight_x == 0 and not self.metric_losses:
            raise ValueError("no loss term has a positive weight")
        self.gather_features = bool(gather_features)
        self.criterion_x = _tr.losses.CrossEntropyLoss(
            num_classes=datamanager.num_train_pids, use_gpu=self.use_gpu, label_smooth=label_smooth
        )

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
            summary["acc"] = _tr.metrics.accuracy(acc_logits, pids)[0].item()
        if self.metric_losses and features is None:
            raise RuntimeError(
                "the model returned only logits in training mode, but metric losses "
                f"{sorted(self.metric_losses)} need features; build Torchreid models with "
                "loss='triplet' (torchreid_ext.build_model does this for drsl/sn)"
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
            summary[SUMMARY_NAMES.get(name, f"loss_{name}")] = value.item()
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
