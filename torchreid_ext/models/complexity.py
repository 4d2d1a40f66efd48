"""Model size and compute for the run record and ``scripts/model_stats.py`` (docs/methods.md M5).

Params exclude the ``classifier`` (its size depends on the dataset; the paper's Table II
convention). MACs are counted for convolutions and linear layers only (multiply-accumulates
of one image, bias and normalisation ignored), from forward hooks on one eval-mode pass.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module, exclude: Sequence[str] = ("classifier",)) -> int:
    """Number of parameters outside the top-level modules named in ``exclude``."""
    return sum(
        p.numel() for name, p in model.named_parameters() if name.split(".", 1)[0] not in exclude
    )


def count_macs(model: nn.Module, height: int, width: int) -> int:
    """Conv + linear MACs of one ``height`` x ``width`` image in eval mode.

    Every module's train/eval flag is restored afterwards (some may be frozen in eval).
    """
    first = next(model.parameters(), None)
    x = torch.zeros(
        1, 3, height, width,
        device=first.device if first is not None else None,
        dtype=first.dtype if first is not None else None,
    )
    total = 0

    def conv_hook(m: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    modes = {m: m.training for m in model.modules()}
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return int(total)
