"""MSFL-ResNet50 (Wang, arXiv 2012.14061) and its ablation variants, as Torchreid models.

docs/methods.md M1-M8. :class:`MSFLResNet50` composes the ResNet50 backbone, a neck and the M4
head, like torchvision's models compose an FPN: the neck is :class:`CSIP` (the feature pyramid,
M2, with the MSFF blocks, M3) or :class:`StageSelect` (no pyramid). Its training output is set by
``return_features``; the factories translate Torchreid's ``loss`` argument into it once. Three
registered names cover every Table I / Table IV row:

* ``resnet50_bnfc512``: the paper's baseline, M1 + GAP(C5) + M4 head. Its ``direct_fuse``
  switch gives Table I(b)/(c): GAP of the raw stages concatenated, no CSIP, head input
  ``'c45'`` 1024 + 2048 = 3072-d, ``'c2345'`` 256 + 512 + 1024 + 2048 = 3840-d.
* ``msfl_resnet50_csip``: M1-M2 (CSIP), no MSFF blocks (Table IV "+CSIP", Table I(d)/(e)).
* ``msfl_resnet50``: M1-M4 (Table IV "+MSFF", Table II(c)).

Pyramid switches (M2, M6):

* ``lateral=False`` (Table I(d)): no lateral connection merges C2..C4 into the top-down
  path. P5 = BN(Conv1x1(C5 -> 512)) is kept (the entry of the 512-d top-down path; module
  ``neck.lateral.p5``) and P_i = BN(Conv_k(Up(P_{i+1}))) for i = 4, 3, 2, so the shallow levels
  are decoded from C5 alone.
* ``topdown=False``: P_i = l_i (each level its own lateral, no information from above).
* ``lateral=False`` and ``topdown=False`` together leave no pyramid (use ``direct_fuse``).
* ``fuse_levels``: the levels pooled and concatenated (head input = len x lateral_channels);
  levels below the lowest fused one are not built; MSFF blocks on an unfused level are not built.

Module names (for ``train.new_layers`` / ``open_layers``): backbone ``conv1``, ``bn1``,
``layer1``..``layer4`` (torchvision's names, so C2..C5 are the outputs of ``layer1``..``layer4``
and forward hooks on them see, and may replace, the stage outputs: M8); new layers ``neck``
(``neck.lateral``, ``neck.topdown``, ``neck.msff``), ``head``, ``classifier``. Without hooks,
``model(x, return_stages=True)`` also returns ``{'layer1': C2, ..., 'layer4': C5}``.
"""
from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from ..checkpoint import load_state_dict_from_url, strip_module_prefix
from ..errors import BackboneWeightsError
from ..options import ConfigOptions
from ..losses import get_loss, loss_names
from .registry import register_model

logger = logging.getLogger(__name__)

__all__ = [
    "MSFLResNet50",
    "MSFLOptions",
    "CSIP",
    "StageSelect",
    "BackboneWeightsError",
    "load_backbone_weights",
    "resnet50_bnfc512",
    "msfl_resnet50_csip",
    "msfl_resnet50",
]

BACKBONE = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
STAGES = ("layer1", "layer2", "layer3", "layer4")  # outputs C2, C3, C4, C5 (M1)
STAGE_CHANNELS = {2: 256, 3: 512, 4: 1024, 5: 2048}
DIRECT_FUSE = {"": (5,), "c45": (4, 5), "c2345": (2, 3, 4, 5)}
Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # f | logits | (logits, f)


@dataclass(frozen=True)
class MSFLOptions(ConfigOptions):
    """MSFL-ResNet50's switches (the ``model.msfl`` section; docs/methods.md M2-M6), declared once:
    the factories' defaults, the config's defaults and its check of ``direct_fuse``."""

    SECTION: ClassVar[str] = "model.msfl"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"direct_fuse": tuple(DIRECT_FUSE)}

    lateral: bool = True  # Table I "no lateral" row: False
    topdown: bool = True  # Table I "no top-down" row: False
    topdown_kernel: int = 1  # M5: 1 matches Table II's compute; the paper's text says 3
    lateral_channels: int = 512
    msff_blocks: Tuple[int, ...] = (3, 2, 1, 0)  # extra bottlenecks on P2, P3, P4, P5
    fuse_levels: Tuple[int, ...] = (2, 3, 4, 5)  # pyramid levels pooled and concatenated
    direct_fuse: str = ""  # "" | "c45" | "c2345": Table I direct-fusion rows
    embedding_dim: int = 512


_D = MSFLOptions  # the defaults below


class CSIP(nn.Module):
    """Cross-scale information propagation (M2), with MSFF blocks on its fused levels (M3): a neck
    that takes the backbone stages ``{level: C_level}`` and returns the fused maps, lowest level
    first. ``in_channels[level]``: the stage widths; every pyramid map has ``channels``."""

    def __init__(
        self,
        in_channels: Mapping[int, int] = STAGE_CHANNELS,
        channels: int = _D.lateral_channels,
        lateral: bool = _D.lateral,
        topdown: bool = _D.topdown,
        topdown_kernel: int = _D.topdown_kernel,
        msff_blocks: Sequence[int] = _D.msff_blocks,
        fuse_levels: Sequence[int] = _D.fuse_levels,
    ) -> None:
        super().__init__()
        self.levels, self.built_levels = _check_pyramid(lateral, topdown, topdown_kernel, channels, msff_blocks,
                                                        fuse_levels)
        self.with_topdown = bool(topdown)
        ch = int(channels)
        # M2 lateral l_i = BN(Conv1x1(C_i -> ch)); without laterals only P5's entry projection.
        self.lateral = nn.ModuleDict({
            f"p{i}": _conv_bn(in_channels[i], ch, 1) for i in self.built_levels if lateral or i == 5
        })
        # M2 top-down: BN(Conv_k(Up(P_{i+1}))) producing P_i, for every built level below 5.
        self.topdown = nn.ModuleDict({
            f"p{i}": _conv_bn(ch, ch, int(topdown_kernel)) for i in self.built_levels if topdown and i < 5
        })
        # M3 MSFF: extra bottlenecks (ch in and out) on the fused levels.
        blocks = dict(zip((2, 3, 4, 5), msff_blocks))
        self.msff = nn.ModuleDict({
            f"p{i}": nn.Sequential(*[Bottleneck(ch, ch // Bottleneck.expansion) for _ in range(blocks[i])])
            for i in self.levels if blocks[i] > 0
        })
        self.out_channels = len(self.levels) * ch  # of the pooled, concatenated maps

    def forward(self, c: Mapping[int, torch.Tensor]) -> List[torch.Tensor]:
        p: Dict[int, torch.Tensor] = {}
        for i in sorted(self.built_levels, reverse=True):
            lat = self.lateral[f"p{i}"](c[i]) if f"p{i}" in self.lateral else None
            if i == 5 or not self.with_topdown:
                p[i] = lat
                continue
            # nearest upsampling to the lateral's size: exact x2 at 256x128, not at 250x120
            up = F.interpolate(p[i + 1], size=c[i].shape[-2:], mode="nearest")
            td = self.topdown[f"p{i}"](up)
            p[i] = td if lat is None else lat + td
        return [self.msff[f"p{i}"](p[i]) if f"p{i}" in self.msff else p[i] for i in self.levels]


class StageSelect(nn.Module):
    """No pyramid: the backbone stages of ``direct_fuse`` as they are (the baseline: C5; Table I's
    direct fusion: C4 + C5 or C2..C5)."""

    def __init__(self, direct_fuse: str = _D.direct_fuse, in_channels: Mapping[int, int] = STAGE_CHANNELS) -> None:
        super().__init__()
        self.levels = DIRECT_FUSE[MSFLOptions.check_value("direct_fuse", direct_fuse)]
        self.out_channels = sum(in_channels[i] for i in self.levels)

    def forward(self, c: Mapping[int, torch.Tensor]) -> List[torch.Tensor]:
        return [c[i] for i in self.levels]


class MSFLResNet50(nn.Module):
    """ResNet50 bottom-up path (M1), a neck (:class:`CSIP`, or :class:`StageSelect` for the
    baseline family), global average pooling of the neck's maps and the M4 head.

    Eval mode returns the embedding f (B x embedding_dim), Torchreid's convention (M8); train mode
    returns ``(logits, f)`` with ``return_features`` (what a ranking loss needs), else logits.
    """

    def __init__(self, num_classes: int, neck: nn.Module, embedding_dim: int = _D.embedding_dim,
                 return_features: bool = False) -> None:
        super().__init__()
        self.return_features = bool(return_features)
        # M1: torchvision's ResNet50 stem and stages under torchvision's names (M7 loading).
        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )
        self.neck = neck
        head_in = neck.out_channels
        # M4 head: BN1d -> Linear -> ReLU gives f; the classifier is used in training only.
        self.head = nn.Sequential(
            nn.BatchNorm1d(head_in), nn.Linear(head_in, embedding_dim), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.feature_dim = embedding_dim
        self.head_in_features = head_in
        self.stage_names = STAGES

        for name, module in self.named_children():
            if name not in BACKBONE:  # the backbone keeps torchvision's init or ImageNet weights
                _kaiming_init(module)
        # Torchreid's classifier init: near-uniform softmax at the start whatever num_classes
        # (Kaiming fan_out would scale the logits with 1 / sqrt(num_classes)).
        nn.init.normal_(self.classifier.weight, 0, 0.01)

    def forward(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> Union[Output, Tuple[Output, Dict[str, torch.Tensor]]]:
        """Torchreid's outputs (see the class); ``return_stages=True`` returns
        ``(outputs, {'layer1': C2, ..., 'layer4': C5})`` from the same pass (M8, no hooks).

        The stage maps are what ``layer1``..``layer4`` return *after* their forward hooks,
        so a hook that replaces a stage output (MSGR's perturbation) is seen downstream.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)  # stage outputs must come from these calls (hooks, M8)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        c = {2: c2, 3: c3, 4: c4, 5: c5}
        v = torch.cat([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in self.neck(c)], dim=1)
        f = self.head(v)
        if not self.training:
            out: Output = f
        else:
            logits = self.classifier(f)
            out = (logits, f) if self.return_features else logits
        if return_stages:
            return out, {name: c[i] for i, name in zip((2, 3, 4, 5), STAGES)}
        return out


def _conv_bn(in_ch: int, out_ch: int, kernel: int) -> nn.Module:
    """BN(Conv_k) without bias or activation (M2)."""
    return Conv2dNormActivation(
        in_ch, out_ch, kernel_size=kernel, norm_layer=nn.BatchNorm2d, activation_layer=None
    )


def _check_pyramid(
    lateral: bool,
    topdown: bool,
    kernel: int,
    channels: int,
    msff_blocks: Sequence[int],
    fuse_levels: Sequence[int],
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Validate the switches; return (fused levels, levels to build) in ascending order."""
    if not lateral and not topdown:
        raise ValueError(
            "lateral=False and topdown=False leave no pyramid; for GAP of the raw stages use "
            "resnet50_bnfc512 with direct_fuse 'c45' or 'c2345'"
        )
    levels = tuple(sorted(int(i) for i in fuse_levels))
    if not levels or len(set(levels)) != len(levels) or not set(levels) <= set(STAGE_CHANNELS):
        raise ValueError(f"fuse_levels = {list(fuse_levels)} must be distinct levels from [2, 3, 4, 5]")
    if len(msff_blocks) != 4 or any(int(n) < 0 for n in msff_blocks):
        raise ValueError(
            f"msff_blocks = {list(msff_blocks)} must give 4 block counts >= 0 (for P2, P3, P4, P5)"
        )
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"topdown_kernel = {kernel} must be odd and positive (1 or 3)")
    if channels < Bottleneck.expansion or channels % Bottleneck.expansion:
        raise ValueError(f"lateral_channels = {channels} must be a positive multiple of 4 (MSFF bottlenecks)")
    built = tuple(range(levels[0], 6)) if topdown else levels
    return levels, built


def _kaiming_init(module: nn.Module) -> None:
    """M7: new layers get Kaiming-normal weights (fan_out, ReLU gain), zero biases; BN 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- ImageNet weights (M7)

# Torchreid's resnet50 caches ImageNet weights under this name (torchvision's first ResNet50
# release, the same tensor names); a Torchreid user's cache holds it, not torchvision's file.
TORCHREID_RESNET50_FILE = "resnet50-19c8e357.pth"


def _imagenet_state_dict() -> Tuple[Mapping[str, torch.Tensor], str]:
    """ImageNet ResNet50 from torch hub's cache: torchvision's IMAGENET1K_V1 file, else
    Torchreid's; with neither, torchvision's is downloaded."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(hub, os.path.basename(urlparse(weights.url).path))
    for path in (cached, os.path.join(hub, TORCHREID_RESNET50_FILE)):
        if os.path.isfile(path):
            return _read_state_dict(path, what="cached ImageNet weights"), path
    try:
        state = load_state_dict_from_url(weights.url, progress=True, check_hash=True)  # through the safe loader
    except (OSError, urllib.error.URLError) as exc:  # offline: DNS / connection / HTTP errors
        raise BackboneWeightsError(
            f"Could not download the ImageNet ResNet50 weights from {weights.url} ({exc}). "
            f"This machine may be offline: put the file at '{cached}', or point at a local "
            "torchvision ResNet50 state dict with `model.backbone_weights <path>`, or train "
            "from scratch with `model.pretrained False`."
        ) from exc
    return state, cached


def _read_state_dict(path: str, what: str = "model.backbone_weights") -> Mapping[str, torch.Tensor]:
    """A local state dict (through the safe loader): raw or under 'state_dict'; 'module.'
    prefixes stripped. ``what`` names the file in errors."""
    from ..checkpoint import CheckpointError, load_checkpoint

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"{what}: file '{path}' does not exist")
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise BackboneWeightsError(f"{what}: cannot read '{path}' ({exc})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(
            f"{what}: '{path}' holds a {type(obj).__name__}, not a state dict"
        )
    return dict(strip_module_prefix(obj))


def load_backbone_weights(model: MSFLResNet50, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Copy a torchvision ResNet50 state dict into the backbone (M7); return the tensor count.

    Every backbone tensor must be present (BN ``num_batches_tracked`` counters may be absent,
    as in torchvision's own file); ``fc.*`` is ignored; any other key is an error.
    """
    target = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in BACKBONE}
    ignored = sorted(k for k in state if k.startswith("fc."))
    unexpected = sorted(k for k in state if k not in target and not k.startswith("fc."))
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneWeightsError(
            f"{source} lacks {len(missing)} backbone tensor(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''} (not a torchvision ResNet50 state dict?)"
        )
    if unexpected:
        raise BackboneWeightsError(
            f"{source} has keys a torchvision ResNet50 lacks: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise BackboneWeightsError(f"{source}: shape mismatch: {'; '.join(wrong[:8])}")
    model.load_state_dict({k: state[k] for k in target if k in state}, strict=False)
    loaded = [k for k in target if k in state]
    values = sum(state[k].numel() for k in loaded)
    logger.info(
        f"Loaded ImageNet backbone: {len(loaded)} tensors ({values / 1e6:.2f} M values) from {source}"
        f"{'; ignored ' + ', '.join(ignored) if ignored else ''}"
    )
    return len(loaded)


def _init_backbone(model: MSFLResNet50, pretrained: bool, backbone_weights: str) -> MSFLResNet50:
    if not pretrained:
        if backbone_weights:
            logger.warning(f"model.pretrained is False: backbone_weights '{backbone_weights}' not loaded")
        return model
    if backbone_weights:
        state, source = _read_state_dict(backbone_weights), backbone_weights
    else:
        state, source = _imagenet_state_dict()
    load_backbone_weights(model, state, source)
    return model


# ---------------------------------------------------------------- registered variants (M6)

def _returns_features(loss: str) -> bool:
    """Whether training mode must return ``(logits, f)`` for ``loss`` (a registered loss name):
    the factories read the loss name once, the model only this flag."""
    if loss not in loss_names():
        raise ValueError(f"Unsupported loss '{loss}'; valid losses: {', '.join(loss_names())}")
    return get_loss(loss).needs_features


_COMMON = ("model.backbone_weights", "model.msfl.embedding_dim")
_CSIP = (
    "model.msfl.lateral",
    "model.msfl.topdown",
    "model.msfl.topdown_kernel",
    "model.msfl.lateral_channels",
    "model.msfl.fuse_levels",
)


@register_model("resnet50_bnfc512", options=_COMMON + ("model.msfl.direct_fuse",))
def resnet50_bnfc512(
    num_classes: int,
    loss: str = "softmax",
    pretrained: bool = True,
    use_gpu: bool = True,
    *,
    backbone_weights: str = "",
    direct_fuse: str = _D.direct_fuse,
    embedding_dim: int = _D.embedding_dim,
) -> MSFLResNet50:
    """Baseline R50 + BN-FC(512)-ReLU (M1, M4); ``direct_fuse`` 'c45' / 'c2345': Table I(b)/(c)."""
    model = MSFLResNet50(num_classes, StageSelect(direct_fuse), embedding_dim, _returns_features(loss))
    return _init_backbone(model, pretrained, backbone_weights)


@register_model("msfl_resnet50_csip", options=_COMMON + _CSIP)
def msfl_resnet50_csip(
    num_classes: int,
    loss: str = "softmax",
    pretrained: bool = True,
    use_gpu: bool = True,
    *,
    backbone_weights: str = "",
    lateral: bool = _D.lateral,
    topdown: bool = _D.topdown,
    topdown_kernel: int = _D.topdown_kernel,
    lateral_channels: int = _D.lateral_channels,
    fuse_levels: Sequence[int] = _D.fuse_levels,
    embedding_dim: int = _D.embedding_dim,
) -> MSFLResNet50:
    """R50 + CSIP pyramid (M1-M2, M4), no MSFF blocks: Table IV "+CSIP", Table I(d)/(e)."""
    neck = CSIP(STAGE_CHANNELS, lateral_channels, lateral, topdown, topdown_kernel, (0, 0, 0, 0), fuse_levels)
    model = MSFLResNet50(num_classes, neck, embedding_dim, _returns_features(loss))
    return _init_backbone(model, pretrained, backbone_weights)


@register_model("msfl_resnet50", options=_COMMON + _CSIP + ("model.msfl.msff_blocks",))
def msfl_resnet50(
    num_classes: int,
    loss: str = "softmax",
    pretrained: bool = True,
    use_gpu: bool = True,
    *,
    backbone_weights: str = "",
    lateral: bool = _D.lateral,
    topdown: bool = _D.topdown,
    topdown_kernel: int = _D.topdown_kernel,
    lateral_channels: int = _D.lateral_channels,
    msff_blocks: Sequence[int] = _D.msff_blocks,
    fuse_levels: Sequence[int] = _D.fuse_levels,
    embedding_dim: int = _D.embedding_dim,
) -> MSFLResNet50:
    """Full MSFL-ResNet50 (M1-M4): Table IV "+MSFF", Table II(c)."""
    neck = CSIP(STAGE_CHANNELS, lateral_channels, lateral, topdown, topdown_kernel, msff_blocks, fuse_levels)
    model = MSFLResNet50(num_classes, neck, embedding_dim, _returns_features(loss))
    return _init_backbone(model, pretrained, backbone_weights)
