"""ImageMetricEngine: ``w_x * CE(logits) + sum_m w_m * L_m(features)`` for any model.

One engine for ``loss.name`` softmax, triplet, drsl and sn (METHOD.md D5, S4): the
cross-entropy term is Torchreid's ``CrossEntropyLoss`` (label smoothing switchable), the
metric terms are any ``loss(features, pids)`` modules (Torchreid's ``TripletLoss``,
``DRSLoss``, ``SupportNeighborLoss``). Each term, and each loss's ``last_stats``
diagnostics, go into the loss summary, hence to the console and TensorBoard.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..adapter import torchreid
from .base import ReIDEngine

__all__ = ["ImageMetricEngine", "split_outputs"]

_tr = torchreid()

# Summary names: Torchreid's for its own terms.
SUMMARY_NAMES = {"triplet": "loss_t"}


def split_outputs(outputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Training-mode model outputs -> (logits, features or None) (Torchreid convention)."""
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and torch.is_tensor(outputs[1]):
        return outputs[0], outputs[1]
    return outputs, None


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
        self.criterion_x = _tr.losses.CrossEntropyLoss(
            num_classes=datamanager.num_train_pids, use_gpu=self.use_gpu, label_smooth=label_smooth
        )

    def compute_loss_terms(self, outputs, pids: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Weighted total (batch mean) and the summary of every term."""
        logits, features = split_outputs(outputs)
        summary: Dict[str, float] = {}
        total = 0.0
        if self.weight_x > 0:
            loss_x = self.compute_loss(self.criterion_x, logits, pids)
            total = total + self.weight_x * loss_x
            summary["loss_x"] = loss_x.item()
            acc_logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            summary["acc"] = _tr.metrics.accuracy(acc_logits, pids)[0].item()
        if self.metric_losses and features is None:
            raise RuntimeError(
                "the model returned only logits in training mode, but metric losses "
                f"{sorted(self.metric_losses)} need features; build Torchreid models with "
                "loss='triplet' (torchreid_ext.build_model does this for drsl/sn)"
            )
        for name, (weight, criterion) in self.metric_losses.items():
            value = criterion(features, pids)
            total = total + weight * value
            summary[SUMMARY_NAMES.get(name, f"loss_{name}")] = value.item()
            for key, stat in getattr(criterion, "last_stats", {}).items():
                summary[f"{name}/{key}"] = float(stat)
        summary["loss"] = float(total.item())
        return total, summary

    def forward_backward(self, data) -> Dict[str, float]:
        imgs, pids = self.parse_data_for_train(data)
        imgs, pids = self.to_device(imgs, pids)
        outputs = self.model(imgs)
        loss, summary = self.compute_loss_terms(outputs, pids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return summary
