"""The eval-mode model of a config and its weights: what extraction and export run.

Weights are found in this order: the ``weights`` argument, ``model.load_weights``, the newest
``<data.save_dir>/model/model.pth.tar-N``; with none of them the model is used as the config
builds it (ImageNet init with ``model.pretrained``, else random), with a warning. Files are read
by :func:`torchreid_ext.checkpoint.load_model_weights` (``weights_only``, numpy allowlist for
Torchreid's own checkpoints) with ``strict=True``: every tensor but the classifier must fit.
"""
from __future__ import annotations

import hashlib
import logging
import os.path as osp
from typing import Tuple

import torch

from ..checkpoint import CheckpointError, latest_checkpoint, load_model_weights
from ..errors import InputNotFound
from ..files import missing_file_reason

__all__ = ["resolve_weights", "build_eval_model", "file_sha256", "model_device"]

logger = logging.getLogger(__name__)


def resolve_weights(cfg, weights: str = "") -> str:
    """The weights file to load ('' for none); a named file that does not exist is an error."""
    for value, what in ((weights, "weights"), (cfg.model.load_weights, "model.load_weights")):
        if value:
            if not osp.isfile(osp.expanduser(value)):
                raise InputNotFound(f"{what} file '{value}' {missing_file_reason(osp.expanduser(value))}")
            return osp.abspath(osp.expanduser(value))
    return latest_checkpoint(osp.join(cfg.data.save_dir, "model")) or ""


def model_device(cfg) -> torch.device:
    """``cuda`` when ``use_gpu`` is set and a GPU is present, else ``cpu``."""
    return torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")


def build_eval_model(cfg, weights: str = "", device: torch.device = torch.device("cpu")
                     ) -> Tuple[torch.nn.Module, str]:
    """``(model in eval mode on device, weights file used or '')`` for ``cfg.model.name``."""
    from dataclasses import replace

    from ..builders import build_run_model
    from ..models import ModelOptions

    path = resolve_weights(cfg, weights)
    options = ModelOptions.from_config(cfg)
    if path:  # every tensor is replaced by the file's: no ImageNet download needed
        options = replace(options, pretrained=False)
    model = build_run_model(options, num_classes=1, use_gpu=cfg.use_gpu)  # the classifier is not used in eval mode
    if path:
        report = load_model_weights(model, path, strict=True, model_name=options.name)
        # strict covers the model's tensors; a file with more (another model's layers) is refused too
        extra = [k for k in report["skipped"] if not k.startswith("classifier.")]
        if extra:
            raise CheckpointError(
                f"weights file '{path}' does not fit model.name = '{options.name}': {len(extra)} of the "
                f"file's tensors have no counterpart of the same shape in the model, the first '{extra[0]}' "
                "(weights of another model?)")
    else:
        logger.warning("No weights given, no model.load_weights and no checkpoint in '%s': using "
                       "'%s' as built (%s)", osp.join(cfg.data.save_dir, "model"), options.name,
                       "ImageNet init" if options.pretrained else "random init")
    return model.to(device).eval(), path


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file ('' for no file): tells whether two feature files share weights."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
