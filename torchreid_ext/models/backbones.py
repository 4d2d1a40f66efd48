"""Backbones for MSFL (docs/methods.md M1, M9): a network cut into named layers that run in order,
four of which give the stage maps C2..C5.

The MSFL neck does not care where its stages come from, as torchvision's FeaturePyramidNetwork
does not. A :class:`Backbone` says which layers to run, which of them give C2..C5 and how wide
those are. The model adds the layers as its own top-level modules under these names, so the
state-dict keys are the backbone's own (a torchvision ResNet50 or a Torchreid OSNet file loads
by name) and MSGR's ``msgr.stages`` name them as in the plain network.

* ``resnet50`` (M1): torchvision's ResNet50, ``conv1, bn1, relu, maxpool, layer1..layer4``;
  ``layer1..layer4`` give C2..C5 (256 / 512 / 1024 / 2048 channels, strides 4 / 8 / 16 / 32).
* ``osnet_<width>`` (M9): Torchreid's OSNet (x1_0, x0_75, x0_5, x0_25), ``conv1, maxpool,
  conv2..conv5``. ``conv2 -> C2`` (stride 8: OSNet's conv2 ends with its transition, a 1x1
  conv and a 2x2 average pool), ``conv3 -> C3`` (stride 16, same), ``conv4 -> C4`` (stride 16,
  no transition), ``conv5 -> C5`` (stride 16, a 1x1 conv). Widths are OSNet's channels c1..c3,
  c3: x0_25 gives 64 / 96 / 128 / 128. C3, C4 and C5 share one resolution, so the paper's
  "up-sample x2" of the top-down path (M2) is the identity from P5 to P4 and from P4 to P3
  and a true x2 only from P3 to P2: the neck resizes to the lateral's size, whatever it is.
  OSNet's own ``global_avgpool``, ``fc`` and ``classifier`` are not part of the backbone.
"""
from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from ..adapter import torchreid
from ..errors import BackboneWeightsError

logger = logging.getLogger(__name__)

__all__ = ["Backbone", "BACKBONES", "OSNET_CHANNELS", "resnet50", "osnet", "read_state_dict"]

StateDict = Mapping[str, torch.Tensor]

# OSNet's channels c0..c3 per width (Torchreid's osnet_<width> factories); C2..C5 = c1, c2, c3, c3.
OSNET_CHANNELS: Dict[str, Tuple[int, int, int, int]] = {
    "x1_0": (64, 256, 384, 512),
    "x0_75": (48, 192, 288, 384),
    "x0_5": (32, 128, 192, 256),
    "x0_25": (16, 64, 96, 128),
}


@dataclass(frozen=True, eq=False)
class Backbone:
    """A network cut for MSFL: ``build()`` makes its layers, ``(name, module)`` pairs that run in
    this order (``layer_names``); ``stages`` are the four whose outputs are C2..C5,
    ``channels[level]`` their widths: known before anything is built, so a neck can be sized
    (and initialised) first.

    ``lateral_channels`` is the neck's width when the config leaves ``model.msfl.lateral_channels``
    null; ``file_extras`` are the key prefixes a weights file of this family holds besides the
    backbone (a head and classifier, ignored when the backbone is loaded); ``imagenet`` returns
    ``(state dict, source)`` of the family's ImageNet weights (``model.pretrained``)."""

    name: str
    layer_names: Tuple[str, ...]
    build: Callable[[], Tuple[Tuple[str, nn.Module], ...]] = field(repr=False)
    stages: Tuple[str, str, str, str]
    channels: Mapping[int, int]
    lateral_channels: int
    file_extras: Tuple[str, ...]
    imagenet: Callable[[], Tuple[StateDict, str]] = field(repr=False)


# ---------------------------------------------------------------- ResNet50 (M1)

# Torchreid's resnet50 caches ImageNet weights under this name (torchvision's first ResNet50
# release, the same tensor names); a Torchreid user's cache holds it, not torchvision's file.
TORCHREID_RESNET50_FILE = "resnet50-19c8e357.pth"


def resnet50() -> Backbone:
    """torchvision's ResNet50 under torchvision's names (M1). The neck is 512 wide (M2)."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def build() -> Tuple[Tuple[str, nn.Module], ...]:
        net = torchvision.models.resnet50(weights=None)
        return tuple((n, getattr(net, n)) for n in names)

    return Backbone(
        name="resnet50",
        layer_names=names,
        build=build,
        stages=("layer1", "layer2", "layer3", "layer4"),
        channels={2: 256, 3: 512, 4: 1024, 5: 2048},
        lateral_channels=512,
        file_extras=("fc.",),
        imagenet=_resnet50_imagenet,
    )


def _resnet50_imagenet() -> Tuple[StateDict, str]:
    """ImageNet ResNet50 from torch hub's cache: torchvision's IMAGENET1K_V1 file, else
    Torchreid's; with neither, torchvision's is downloaded (and read through the safe loader)."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(hub, os.path.basename(urlparse(weights.url).path))
    for path in (cached, os.path.join(hub, TORCHREID_RESNET50_FILE)):
        if os.path.isfile(path):
            return read_state_dict(path, what="cached ImageNet weights"), path
    try:
        os.makedirs(hub, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, cached, hash_prefix=None, progress=True)
    except (OSError, urllib.error.URLError) as exc:  # offline: DNS / connection / HTTP errors
        raise BackboneWeightsError(
            f"Could not download the ImageNet ResNet50 weights from {weights.url} ({exc}). "
            f"This machine may be offline: put the file at '{cached}', or point at a local "
            "torchvision ResNet50 state dict with `model.backbone_weights <path>`, or train "
            "from scratch with `model.pretrained False`."
        ) from exc
    return read_state_dict(cached, what="downloaded ImageNet weights"), cached


# ---------------------------------------------------------------- OSNet (M9)

def osnet(width: str) -> Backbone:
    """Torchreid's OSNet of ``width`` (x1_0, x0_75, x0_5, x0_25) cut at conv2..conv5 (see the
    module docstring). The neck's default width is C5's: 128 for x0_25, 512 for x1_0."""
    if width not in OSNET_CHANNELS:
        raise ValueError(f"width = {width!r} is unknown; choose one of {list(OSNET_CHANNELS)}")
    _, c1, c2, c3 = OSNET_CHANNELS[width]
    names = ("conv1", "maxpool", "conv2", "conv3", "conv4", "conv5")

    def build() -> Tuple[Tuple[str, nn.Module], ...]:
        net = torchreid().model_factory()[f"osnet_{width}"](num_classes=1, pretrained=False, loss="softmax")
        return tuple((n, getattr(net, n)) for n in names)

    return Backbone(
        name=f"osnet_{width}",
        layer_names=names,
        build=build,
        stages=("conv2", "conv3", "conv4", "conv5"),
        channels={2: c1, 3: c2, 4: c3, 5: c3},
        lateral_channels=c3,
        file_extras=("fc.", "classifier."),
        imagenet=lambda: _osnet_imagenet(width),
    )


def _osnet_imagenet(width: str) -> Tuple[StateDict, str]:
    """Torchreid's ImageNet OSNet file from its cache (``$TORCH_HOME/checkpoints``), downloaded
    there first as Torchreid does when missing; read through the safe loader."""
    key = f"osnet_{width}"
    cached = os.path.join(os.path.dirname(torch.hub.get_dir()), "checkpoints", f"{key}_imagenet.pth")
    if not os.path.isfile(cached):
        url = torchreid().submodule("models.osnet").pretrained_urls[key]
        try:
            _download(url, cached)
        except Exception as exc:  # noqa: BLE001 - gdown raises many kinds when offline
            raise BackboneWeightsError(
                f"Could not download Torchreid's ImageNet {key} weights ({type(exc).__name__}: {exc}). "
                f"This machine may be offline: put the file at '{cached}', or load a Torchreid OSNet "
                "file with `model.load_weights <path>` (a model-zoo file) or `model.backbone_weights "
                "<path>`, or train from scratch with `model.pretrained False`."
            ) from exc
    return read_state_dict(cached, what="cached ImageNet weights"), cached


def _download(url: str, path: str) -> None:
    """Torchreid's download of its model-zoo files (gdown), into ``path``."""
    import gdown

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if gdown.download(url, path, quiet=False) is None or not os.path.isfile(path):
        raise OSError(f"nothing was downloaded from {url}")


# ---------------------------------------------------------------- registry and files

BACKBONES: Dict[str, Callable[[], Backbone]] = {
    "resnet50": resnet50,
    **{f"osnet_{w}": (lambda w=w: osnet(w)) for w in OSNET_CHANNELS},
}


def read_state_dict(path: str, what: str = "model.backbone_weights") -> Dict[str, torch.Tensor]:
    """A local state dict (through the safe loader): raw or under 'state_dict'; 'module.'
    prefixes stripped (:func:`~torchreid_ext.checkpoint.state_dict_of`). ``what`` names the file
    in errors."""
    from ..checkpoint import CheckpointError, load_checkpoint, state_dict_of

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"{what}: file '{path}' does not exist")
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise BackboneWeightsError(f"{what}: cannot read '{path}' ({exc})") from exc
    try:
        return dict(state_dict_of(obj, path))
    except CheckpointError as exc:  # not a state dict
        raise BackboneWeightsError(f"{what}: {exc}") from exc
