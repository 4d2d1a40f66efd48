"""Embeddings of images and of whole loaders: the one place features are extracted.

The engine's evaluation, feature extraction for files, rank lists and export checks all call
:func:`embed` / :func:`extract_loader`, so a test-time option such as ``test.flip`` (the
embedding of an image averaged with that of its horizontal mirror, as FastReID's flip test)
means the same everywhere.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional, Tuple

import numpy as np
import torch

__all__ = ["embed", "extract_loader"]


@torch.no_grad()
def embed(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """``model(images)`` as float32; with ``flip`` the mean of it and of the images mirrored
    left-right (``images.flip(-1)``, NCHW width axis)."""
    feats = model(images).float()
    if flip:
        feats = (feats + model(images.flip(-1)).float()) / 2
    return feats


@torch.no_grad()
def extract_loader(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    flip: bool = False,
    autocast: Optional[Callable[[], ContextManager]] = None,
    channels_last: bool = False,
    desc: str = "features",
    progress: bool = True,
) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Features (float32, CPU), pids and camids of a Torchreid test loader (batches are dicts
    with ``img``, ``pid``, ``camid``), with a tqdm progress bar."""
    from tqdm import tqdm

    autocast = autocast or contextlib.nullcontext
    feats, pids, camids = [], [], []
    batches = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=not progress)
    for data in batches:
        imgs = data["img"].to(device, non_blocking=True)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        with autocast():
            feats.append(embed(model, imgs, flip).cpu())
        pids.append(np.asarray(data["pid"]))
        camids.append(np.asarray(data["camid"]))
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)
