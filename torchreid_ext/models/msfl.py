"""MSFL (Wang, arXiv 2012.14061) and its ablation variants on any backbone with stages, as
Torchreid models.

docs/methods.md M1-M9. :class:`MSFLNet` composes a backbone (:mod:`.backbones`: torchvision's
ResNet50 or Torchreid's OSNet, cut at C2..C5), a neck and the M4 head, like torchvision's models
compose an FPN: the neck is :class:`CSIP` (the feature pyramid, M2, with the MSFF blocks, M3) or
:class:`StageSelect` (no pyramid). One private builder, :func:`_build`, makes every registered
variant from a backbone name, a neck kind and an :class:`MSFLOptions`. Per backbone, three names
cover every Table I / Table IV row:

* ``resnet50_bnfc512`` / ``osnet_<w>_bnfc512``: the baseline, GAP(C5) + M4 head. Its
  ``direct_fuse`` switch gives Table I(b)/(c): GAP of the raw stages concatenated, no CSIP
  (ResNet50: ``'c45'`` 1024 + 2048 = 3072-d, ``'c2345'`` 256 + 512 + 1024 + 2048 = 3840-d).
* ``msfl_resnet50_csip`` / ``msfl_osnet_<w>_csip``: CSIP, no MSFF blocks (Table IV "+CSIP",
  Table I(d)/(e)).
* ``msfl_resnet50`` / ``msfl_osnet_<w>``: CSIP + MSFF (Table IV "+MSFF", Table II(c)).

``<w>`` is one of OSNet's widths x1_0, x0_75, x0_5, x0_25.

Pyramid switches (M2, M6):

* ``lateral=False`` (Table I(d)): no lateral connection merges C2..C4 into the top-down
  path. P5 = BN(Conv1x1(C5 -> width)) is kept (the entry of the top-down path; module
  ``neck.lateral.p5``) and P_i = BN(Conv_k(Up(P_{i+1}))) for i = 4, 3, 2, so the shallow levels
  are decoded from C5 alone.
* ``topdown=False``: P_i = l_i (each level its own lateral, no information from above).
* ``lateral=False`` and ``topdown=False`` together leave no pyramid (use ``direct_fuse``).
* ``fuse_levels``: the levels pooled and concatenated (head input = len x lateral_channels);
  levels below the lowest fused one are not built; MSFF blocks on an unfused level are not built.
* ``lateral_channels``: the neck's width; null takes the backbone's default (ResNet50 512, the
  paper's; OSNet its C5 width, M9).

Module names (for ``train.new_layers`` / ``open_layers`` and ``msgr.stages``): the backbone's
own (ResNet50 ``conv1``, ``bn1``, ``layer1``..``layer4``; OSNet ``conv1``, ``conv2``..``conv5``),
so forward hooks on the stage modules see, and may replace, C2..C5 (M8); new layers ``neck``
(``neck.lateral``, ``neck.topdown``, ``neck.msff``), ``head``, ``classifier``. Without hooks,
``model(x, return_stages=True)`` also returns ``{stage name: C_i}``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from ..errors import BackboneWeightsError
from ..losses import get_loss, loss_names
from ..options import ConfigOptions, is_int
from .backbones import BACKBONES, OSNET_CHANNELS, Backbone, read_state_dict
from .registry import register_model

logger = logging.getLogger(__name__)

__all__ = [
    "MSFLNet",
    "MSFLOptions",
    "CSIP",
    "StageSelect",
    "BackboneWeightsError",
    "load_backbone_weights",
    "resnet50_bnfc512",
    "msfl_resnet50_csip",
    "msfl_resnet50",
]

LEVELS = (2, 3, 4, 5)
DIRECT_FUSE = {"": (5,), "c45": (4, 5), "c2345": (2, 3, 4, 5)}
Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # f | logits | (logits, f)


def _lateral_channels(x: Any) -> Optional[str]:
    if x is None or (is_int(x) and x >= 1):
        return None
    return "must be an integer >= 1, or null for the backbone's default"


@dataclass(frozen=True)
class MSFLOptions(ConfigOptions):
    """MSFL's switches (the ``model.msfl`` section; docs/methods.md M2-M6, M9), declared once:
    the factories' defaults, the config's defaults and its checks."""

    SECTION: ClassVar[str] = "model.msfl"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"direct_fuse": tuple(DIRECT_FUSE)}
    CHECKS: ClassVar[Dict[str, Any]] = {"lateral_channels": _lateral_channels}

    lateral: bool = True  # Table I "no lateral" row: False
    topdown: bool = True  # Table I "no top-down" row: False
    topdown_kernel: int = 1  # M5: 1 matches Table II's compute; the paper's text says 3
    lateral_channels: Optional[int] = None  # None: the backbone's default (ResNet50 512; M9)
    msff_blocks: Tuple[int, ...] = (3, 2, 1, 0)  # extra bottlenecks on P2, P3, P4, P5
    fuse_levels: Tuple[int, ...] = (2, 3, 4, 5)  # pyramid levels pooled and concatenated
    direct_fuse: str = ""  # "" | "c45" | "c2345": Table I direct-fusion rows
    embedding_dim: int = 512


class CSIP(nn.Module):
    """Cross-scale information propagation (M2), with MSFF blocks on its fused levels (M3): a neck
    that takes the backbone stages ``{level: C_level}`` and returns the fused maps, lowest level
    first. ``in_channels[level]``: the stage widths; every pyramid map has ``channels``."""

    def __init__(
        self,
        *,
        in_channels: Mapping[int, int],
        channels: int,
        lateral: bool = True,
        topdown: bool = True,
        topdown_kernel: int = 1,
        msff_blocks: Sequence[int] = (0, 0, 0, 0),
        fuse_levels: Sequence[int] = LEVELS,
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
        blocks = dict(zip(LEVELS, msff_blocks))
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
            # nearest resizing to the lateral's size: x2 at 256x128 on ResNet50, not at 250x120;
            # the identity where two stages share a resolution (OSNet's C3..C5, M9)
            up = F.interpolate(p[i + 1], size=c[i].shape[-2:], mode="nearest")
            td = self.topdown[f"p{i}"](up)
            p[i] = td if lat is None else lat + td
        return [self.msff[f"p{i}"](p[i]) if f"p{i}" in self.msff else p[i] for i in self.levels]


class StageSelect(nn.Module):
    """No pyramid: the backbone stages of ``direct_fuse`` as they are (the baseline: C5; Table I's
    direct fusion: C4 + C5 or C2..C5)."""

    def __init__(self, *, in_channels: Mapping[int, int], direct_fuse: str = "") -> None:
        super().__init__()
        self.levels = DIRECT_FUSE[MSFLOptions.check_value("direct_fuse", direct_fuse)]
        self.out_channels = sum(in_channels[i] for i in self.levels)

    def forward(self, c: Mapping[int, torch.Tensor]) -> List[torch.Tensor]:
        return [c[i] for i in self.levels]


class MSFLNet(nn.Module):
    """A backbone's layers (M1 / M9), a neck (:class:`CSIP`, or :class:`StageSelect` for the
    baseline family), global average pooling of the neck's maps and the M4 head.

    Eval mode returns the embedding f (B x embedding_dim), Torchreid's convention (M8); train mode
    returns ``(logits, f)`` with ``return_features`` (what a ranking loss needs), else logits.
    """

    def __init__(self, num_classes: int, backbone: Backbone, neck: nn.Module, embedding_dim: int = 512,
                 return_features: bool = False) -> None:
        super().__init__()
        self.return_features = bool(return_features)
        # The backbone's layers become top-level modules under their own names (state-dict keys
        # of the backbone's weights files; MSGR's stage names).
        for name, layer in backbone.build():
            self.add_module(name, layer)
        self.model_name = backbone.name  # the registered name, set by the factory
        self.backbone_name = backbone.name
        self.backbone_layers = backbone.layer_names
        self.backbone_file_extras = backbone.file_extras
        self.stage_names = backbone.stages
        self._stage_level = dict(zip(backbone.stages, LEVELS))
        self.neck = neck
        head_in = neck.out_channels
        # M4 head: BN1d -> Linear -> ReLU gives f; the classifier is used in training only.
        self.head = nn.Sequential(
            nn.BatchNorm1d(head_in), nn.Linear(head_in, embedding_dim), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.feature_dim = embedding_dim
        self.head_in_features = head_in

        for name, module in self.named_children():
            if name not in self.backbone_layers:  # the backbone keeps its own init or weights
                _kaiming_init(module)
        # Torchreid's classifier init: near-uniform softmax at the start whatever num_classes
        # (Kaiming fan_out would scale the logits with 1 / sqrt(num_classes)).
        nn.init.normal_(self.classifier.weight, 0, 0.01)

    def forward(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> Union[Output, Tuple[Output, Dict[str, torch.Tensor]]]:
        """Torchreid's outputs (see the class); ``return_stages=True`` returns
        ``(outputs, {stage name: C_i})`` from the same pass (M8, no hooks).

        The stage maps are what the stage modules return *after* their forward hooks, so a hook
        that replaces a stage output (MSGR's perturbation) is seen downstream.
        """
        c: Dict[int, torch.Tensor] = {}
        for name in self.backbone_layers:
            x = self._modules[name](x)  # stage outputs must come from these calls (hooks, M8)
            if name in self._stage_level:
                c[self._stage_level[name]] = x
        v = torch.cat([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in self.neck(c)], dim=1)
        f = self.head(v)
        if not self.training:
            out: Output = f
        else:
            logits = self.classifier(f)
            out = (logits, f) if self.return_features else logits
        if return_stages:
            return out, {name: c[i] for name, i in self._stage_level.items()}
        return out

    def backbone_keys(self) -> List[str]:
        """The state-dict keys of the backbone's layers."""
        return [k for k in self.state_dict() if k.split(".", 1)[0] in self.backbone_layers]

    def select_loaded_weights(self, matched: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                              source: str) -> Tuple[Dict[str, torch.Tensor], str]:
        """What ``model.load_weights`` takes from ``source``: all of ``matched`` (the tensors that fit
        by name and shape) from a file of this model; from a backbone's own file (a Torchreid OSNet
        or torchvision ResNet50 file: it has no ``neck`` / ``head`` keys) the backbone only, whose
        every tensor must be there (a :class:`BackboneWeightsError` otherwise, e.g. weights of
        another backbone). Returns ``(tensors to load, what the log says of the parts)``."""
        backbone = self.backbone_keys()
        missing = [k for k in backbone if k not in matched]
        if missing:
            got = len(backbone) - len(missing)
            raise BackboneWeightsError(
                f"Weights file '{source}' does not fit model '{self.model_name}' (its {self.backbone_name} "
                f"backbone: {got} of its {len(backbone)} tensors found, first missing '{missing[0]}')"
                + (" (weights of another backbone?)" if got == 0 else ""))
        own = any(k.split(".", 1)[0] in ("neck", "head") for k in state)
        take = dict(matched) if own else {k: matched[k] for k in backbone}
        ignored: Dict[str, int] = {}
        for k in state:
            if k not in take:
                ignored[k.split(".", 1)[0]] = ignored.get(k.split(".", 1)[0], 0) + 1
        new: Dict[str, int] = {}
        for k in self.state_dict():
            if k not in take:
                new[k.split(".", 1)[0]] = new.get(k.split(".", 1)[0], 0) + 1

        def counts(d: Dict[str, int]) -> str:
            return ", ".join(f"{p} {n}" for p, n in d.items())

        note = f"backbone {self.backbone_name}: all {len(backbone)} tensors loaded"
        note += f"; ignored from the file: {counts(ignored)}" if ignored else ""
        note += f"; new, kept as built: {counts(new)}" if new else ""
        return take, note


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
            "a *_bnfc512 model with direct_fuse 'c45' or 'c2345'"
        )
    levels = tuple(sorted(int(i) for i in fuse_levels))
    if not levels or len(set(levels)) != len(levels) or not set(levels) <= set(LEVELS):
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


# ---------------------------------------------------------------- backbone weights (M7)

def load_backbone_weights(model: MSFLNet, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Copy a backbone state dict (torchvision ResNet50, Torchreid OSNet) into the model's
    backbone (M7); return the tensor count.

    Every backbone tensor must be present (BN ``num_batches_tracked`` counters may be absent,
    as in torchvision's own file); the family's head keys (ResNet ``fc.*``; OSNet ``fc.*``,
    ``classifier.*``) are ignored; any other key is an error.
    """
    target = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in model.backbone_layers}
    extras = tuple(model.backbone_file_extras)
    ignored = sorted(k for k in state if k.startswith(extras))
    unexpected = sorted(k for k in state if k not in target and not k.startswith(extras))
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    family = model.backbone_name
    if missing:
        raise BackboneWeightsError(
            f"{source} lacks {len(missing)} backbone tensor(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''} (not a {family} state dict?)"
        )
    if unexpected:
        raise BackboneWeightsError(
            f"{source} has keys a {family} backbone lacks: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise BackboneWeightsError(f"{source}: shape mismatch: {'; '.join(wrong[:8])}")
    model.load_state_dict({k: state[k] for k in target if k in state}, strict=False)
    loaded = [k for k in target if k in state]
    values = sum(state[k].numel() for k in loaded)
    shown = ", ".join(ignored) if len(ignored) <= 4 else f"{len(ignored)} tensors ({', '.join(extras)})"
    logger.info(
        f"Loaded {family} backbone: {len(loaded)} tensors ({values / 1e6:.2f} M values) from {source}"
        f"{'; ignored ' + shown if ignored else ''}"
    )
    return len(loaded)


def _init_backbone(model: MSFLNet, backbone: Backbone, pretrained: bool, backbone_weights: str) -> MSFLNet:
    if not pretrained:
        if backbone_weights:
            logger.warning(f"model.pretrained is False: backbone_weights '{backbone_weights}' not loaded")
        return model
    if backbone_weights:
        state, source = read_state_dict(backbone_weights), backbone_weights
    else:
        state, source = backbone.imagenet()
    load_backbone_weights(model, state, source)
    return model


# ---------------------------------------------------------------- the builder and variants (M6)

# The options each neck kind takes (the rest of MSFLOptions does not apply to it).
NECK_OPTIONS = {
    "direct": ("direct_fuse", "embedding_dim"),
    "csip": ("lateral", "topdown", "topdown_kernel", "lateral_channels", "fuse_levels", "embedding_dim"),
    "msfl": ("lateral", "topdown", "topdown_kernel", "lateral_channels", "msff_blocks", "fuse_levels",
             "embedding_dim"),
}


def _returns_features(loss: str) -> bool:
    """Whether training mode must return ``(logits, f)`` for ``loss`` (a registered loss name):
    the factories read the loss name once, the model only this flag."""
    if loss not in loss_names():
        raise ValueError(f"loss = {loss!r} is unknown; choose one of {loss_names()}")
    return get_loss(loss).needs_features


def _build(backbone_name: str, neck_kind: str, num_classes: int, loss: str, pretrained: bool,
           backbone_weights: str, options: MSFLOptions) -> MSFLNet:
    """Every registered variant: backbone ``backbone_name`` (:data:`.backbones.BACKBONES`), neck
    ``neck_kind`` (``direct`` | ``csip`` | ``msfl``), the M4 head, and the backbone's weights."""
    backbone = BACKBONES[backbone_name]()  # a description; the model builds its layers
    if neck_kind == "direct":
        neck: nn.Module = StageSelect(in_channels=backbone.channels, direct_fuse=options.direct_fuse)
    else:
        neck = CSIP(
            in_channels=backbone.channels,
            channels=options.lateral_channels or backbone.lateral_channels,
            lateral=options.lateral,
            topdown=options.topdown,
            topdown_kernel=options.topdown_kernel,
            msff_blocks=options.msff_blocks if neck_kind == "msfl" else (0, 0, 0, 0),
            fuse_levels=options.fuse_levels,
        )
    model = MSFLNet(num_classes, backbone, neck, options.embedding_dim, _returns_features(loss))
    return _init_backbone(model, backbone, pretrained, backbone_weights)


def _factory(name: str, backbone_name: str, neck_kind: str, doc: str):
    """Register ``name``: Torchreid's factory signature, plus ``backbone_weights`` and the
    keyword options of its neck kind (an option of another kind is a TypeError)."""
    allowed = NECK_OPTIONS[neck_kind]

    def factory(num_classes: int, loss: str = "softmax", pretrained: bool = True, use_gpu: bool = True,
                *, backbone_weights: str = "", **options: Any) -> MSFLNet:
        extra = sorted(set(options) - set(allowed))
        if extra:
            raise TypeError(f"{name}() got unexpected option(s) {extra}; it takes {list(allowed)}")
        plain = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        model = _build(backbone_name, neck_kind, num_classes, loss, pretrained, backbone_weights,
                       MSFLOptions(**plain))
        model.model_name = name
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    keys = ("model.backbone_weights",) + tuple(f"model.msfl.{o}" for o in allowed)
    return register_model(name, options=keys)(factory)


_DOCS = {
    "direct": "Baseline {b} + BN-FC(512)-ReLU (M1, M4); ``direct_fuse`` 'c45' / 'c2345': Table I(b)/(c).",
    "csip": "{b} + CSIP pyramid (M2, M4), no MSFF blocks: Table IV \"+CSIP\", Table I(d)/(e).",
    "msfl": "Full MSFL on {b} (M1-M4): Table IV \"+MSFF\", Table II(c).",
}


def _names(backbone_name: str) -> Dict[str, str]:
    """The three registered names of a backbone: ``<b>_bnfc512``, ``msfl_<b>_csip``, ``msfl_<b>``."""
    return {"direct": f"{backbone_name}_bnfc512", "csip": f"msfl_{backbone_name}_csip",
            "msfl": f"msfl_{backbone_name}"}


VARIANTS: Dict[str, Tuple[str, str]] = {}  # registered name -> (backbone, neck kind)


def _register(backbone_name: str, neck_kind: str):
    name = _names(backbone_name)[neck_kind]
    VARIANTS[name] = (backbone_name, neck_kind)
    return _factory(name, backbone_name, neck_kind, _DOCS[neck_kind].format(b=backbone_name))


resnet50_bnfc512 = _register("resnet50", "direct")
msfl_resnet50_csip = _register("resnet50", "csip")
msfl_resnet50 = _register("resnet50", "msfl")
for _width in OSNET_CHANNELS:  # osnet_<w>_bnfc512, msfl_osnet_<w>_csip, msfl_osnet_<w>
    for _kind in NECK_OPTIONS:
        _register(f"osnet_{_width}", _kind)
