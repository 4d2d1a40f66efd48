"""Feature extraction for files: a trained model over a folder or a dataset split -> HDF5.

Features are computed by :func:`torchreid_ext.features.extract_loader` (the engine's own
extraction) with the config's ``test.flip``, ``test.batch_size``, ``data.workers``, device
(``use_gpu``), ``train.amp`` and ``train.channels_last``, on images read with Torchreid's test
transform at ``data.height`` x ``data.width``: features of a dataset's query and gallery equal
those the engine evaluates.
"""
from __future__ import annotations

import logging
import os.path as osp
from typing import Optional, Tuple

import numpy as np
import torch

from ..data.checks import set_max_image_side
from ..features import extract_loader
from ..memory import allocation_failures, check_memory, meta_model
from ..models import ModelOptions
from .errors import DeployInputError, check_output_path
from .images import (
    DATASET_SPLITS,
    CheckedBatches,
    ImageSet,
    dataset_images,
    eval_transform,
    folder_images,
    image_loader,
)
from .model import build_eval_model, file_sha256, model_device, resolve_weights
from .saved_features import FEATURES_KIND, FeatureSet, save_features

__all__ = ["eval_model", "image_features", "extract_features"]

logger = logging.getLogger(__name__)


def _autocast(cfg, device: torch.device):
    """The engine's evaluation autocast for ``train.amp`` (a no-op for 'none')."""
    from ..engines.options import AMP_DTYPES

    dtype = AMP_DTYPES[cfg.train.amp]
    if dtype is None:
        return None
    return lambda: torch.autocast(device.type, dtype=dtype)


def eval_model(cfg, weights_path: str, device: torch.device) -> Tuple[torch.nn.Module, str]:
    """``(model, weights file used)``: :func:`~torchreid_ext.deploy.model.build_eval_model`, in
    channels-last memory format with ``train.channels_last``."""
    model, weights_path = build_eval_model(cfg, weights_path, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, weights_path


def image_features(cfg, model: torch.nn.Module, image_set: ImageSet, device: torch.device,
                   progress: bool = True, desc: str = "features") -> np.ndarray:
    """float32 ``N x D`` features of ``image_set`` in its order: Torchreid's test transform at
    ``data.height`` x ``data.width``, ``test.flip``, ``test.batch_size``, ``data.workers``,
    ``train.amp`` and ``train.channels_last``, with a progress bar named ``desc``."""
    transform = eval_transform(cfg.data.height, cfg.data.width, cfg.data.norm_mean, cfg.data.norm_std)
    loader = image_loader(image_set, transform, cfg.data.height, cfg.data.width, cfg.test.batch_size,
                          workers=cfg.data.workers, pin_memory=device.type == "cuda")
    feats, _, _ = extract_loader(model, CheckedBatches(loader), device, flip=bool(cfg.test.get("flip", False)),
                                 autocast=_autocast(cfg, device), channels_last=cfg.train.channels_last,
                                 desc=desc, progress=progress)
    return feats.numpy()


def extract_features(
    cfg,
    out: Optional[str] = None,
    *,
    images: Optional[str] = None,
    dataset: Optional[str] = None,
    split: Optional[str] = None,
    weights: str = "",
    progress: bool = True,
    force: bool = False,
    config_file: str = "",
) -> FeatureSet:
    """Features of the images in folder ``images``, or of ``split`` of registered ``dataset``.

    ``weights``: a checkpoint of ours or Torchreid's (default: ``model.load_weights``, else the
    newest in ``<data.save_dir>/model``). Writes ``out`` (HDF5, see
    :mod:`~torchreid_ext.deploy.saved_features`) when given and returns the :class:`FeatureSet`.
    Every input is checked (output folder, weights file, images, dataset, split) before the
    model is built; nothing is written unless extraction succeeds. ``out`` must not be the weights
    file or ``config_file`` (the config's file, if any), nor an existing file other than HDF5 unless
    ``force``; the memory extraction needs at ``test.batch_size`` is checked too.
    """
    if (images is None) == (dataset is None):
        raise DeployInputError("give either images (a folder) or dataset (a registered dataset name, with split)")
    if dataset is not None and split not in DATASET_SPLITS:
        raise DeployInputError(f"split = {split!r} is not valid; choose one of {list(DATASET_SPLITS)}")
    if images is not None and split is not None:
        raise DeployInputError(f"split = {split!r} goes with dataset, not with images (a folder)")
    weights_path = resolve_weights(cfg, weights)
    if out is not None:
        out = check_output_path(out, "features file", inputs={"weights file": weights_path, "--config": config_file},
                                kind=FEATURES_KIND, force=force)
    set_max_image_side(cfg.data.max_image_side)  # images declaring a larger side are refused unread
    image_set = (folder_images(images, max_side=cfg.data.max_image_side) if images is not None
                 else dataset_images(cfg, dataset, split))
    device = model_device(cfg)
    size = f"{cfg.data.height}x{cfg.data.width}"
    lower = "data.height / data.width or test.batch_size"
    model_options = ModelOptions.from_config(cfg)
    check_memory(lambda: meta_model(model_options), batch=cfg.test.batch_size, height=cfg.data.height,
                 width=cfg.data.width, train=False, device=device, lower=lower, half_precision=cfg.train.amp != "none",
                 what=f"extracting with '{cfg.model.name}' at {size} with test.batch_size = {cfg.test.batch_size}")
    with allocation_failures(f"extraction with '{cfg.model.name}' at {size}", lower):
        model, weights_path = eval_model(cfg, weights_path, device)
        flip = bool(cfg.test.get("flip", False))
        logger.info("Extracting %d images (%s) with '%s'%s on %s", len(image_set.paths), image_set.source,
                    cfg.model.name, " (flip)" if flip else "", device)
        feats = image_features(cfg, model, image_set, device, progress=progress)
    from .. import __version__

    fs = FeatureSet(
        features=feats, paths=image_set.paths, pids=image_set.pids, camids=image_set.camids,
        model_name=cfg.model.name, config=cfg.dump(),
        meta={"source": image_set.source, "weights": weights_path, "weights_sha256": file_sha256(weights_path),
              "flip": flip, "height": int(cfg.data.height), "width": int(cfg.data.width),
              "torchreid_ext_version": __version__},
    )
    if out is not None:
        replaced = osp.exists(out)
        fs.path = save_features(fs, out)
        logger.info("Saved %d x %d features to '%s'%s", *fs.features.shape, out,
                    " (replaced the existing file)" if replaced else "")
    return fs
