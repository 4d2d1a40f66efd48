"""The loss registry: every ``loss.name`` a config can choose, and what each one needs.

One entry (:class:`LossSpec`) per loss says: its name; its builder (``builder(section)`` gets
``cfg.loss.<name>`` and returns the loss module, or is ``None`` for cross-entropy alone); its
config section with defaults; which keys of that section weight which terms; whether the model
must return features in training mode; whether the batch must hold positives (same-identity
pairs); and the smallest batch it accepts. The config (``get_default_config``,
``validate_config``), the run's options (:class:`LossOptions`, whose :func:`build_loss_terms` the
engine builder calls) and the models (what training mode returns) all read this registry, so a
loss registered here, after ``import torchreid_ext`` and before the config is built, works
everywhere ``loss.name`` does.

Terms of ``loss.name = N`` (section ``s = cfg.loss.N``): cross-entropy weighted by ``s.weight_x``
(1 for ``softmax``), N's own term weighted by ``s.weight`` (``s.weight_t`` for ``triplet``, whose
section is upstream Torchreid's), and Torchreid's triplet loss (margin ``loss.triplet.margin``)
weighted by ``s.weight_t``. A weight of 0 turns a term off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn

from ..adapter import torchreid
from ..errors import ConfigError, UnknownNameError
from ..registry import Registry, same_object

__all__ = [
    "LossSpec",
    "LossOptions",
    "UnknownLossError",
    "WEIGHT_DEFAULTS",
    "register_loss",
    "unregister_loss",
    "get_loss",
    "loss_names",
    "specs",
    "build_loss",
    "build_loss_terms",
    "check_loss_weights",
    "section_weights",
    "loss_terms",
]

logger = logging.getLogger(__name__)

Builder = Callable[[Any], nn.Module]
# (smallest batch the loss accepts, why: a phrase naming the config keys it depends on)
MinBatch = Callable[[Any], Tuple[int, str]]

# The usual weight keys of a section and their defaults (``defaults`` may override them).
WEIGHT_DEFAULTS: Dict[str, float] = {"weight": 1.0, "weight_x": 1.0, "weight_t": 0.0}
_VALUE_TYPES = (bool, int, float, str, list, tuple)


@dataclass(frozen=True)
class LossSpec:
    """One registered loss (see the module docstring for the meaning of the weight keys)."""

    name: str
    builder: Optional[Builder]
    defaults: Mapping[str, Any]  # the whole config section cfg.loss.<name>, in order
    term_key: Optional[str] = "weight"  # weights this loss's own term
    ce_key: Optional[str] = "weight_x"  # weights cross-entropy (None: weight 1)
    triplet_key: Optional[str] = "weight_t"  # weights an added Torchreid triplet term
    needs_positives: bool = True  # anchors need a same-identity image in the batch
    summary_name: str = ""  # loss-summary key of its term; default 'loss_<name>'
    min_batch_size: Optional[MinBatch] = None

    @property
    def needs_features(self) -> bool:
        """The model must return ``(logits, features)`` in training mode (Torchreid's
        ``loss='triplet'`` convention) rather than logits only."""
        return self.builder is not None

    @property
    def weight_keys(self) -> Tuple[str, ...]:
        return tuple(k for k in (self.term_key, self.ce_key, self.triplet_key) if k)

    @property
    def summary_key(self) -> str:
        return self.summary_name or f"loss_{self.name}"

    def weights(self, section) -> Tuple[float, Dict[str, float]]:
        """(cross-entropy weight, {term loss name: weight}) read from ``section``."""
        weight_x = float(section[self.ce_key]) if self.ce_key else 1.0
        terms: Dict[str, float] = {}
        if self.term_key:
            terms[self.name] = float(section[self.term_key])
        if self.triplet_key:
            terms["triplet"] = float(section[self.triplet_key])
        return weight_x, terms


class UnknownLossError(UnknownNameError):
    """``loss.name`` names no registered loss."""


_BUILTIN = ("softmax", "triplet", "drsl", "sn")
# A name may be registered again with the same builder (a re-imported plug-in): the spec is rebound.
LOSSES: Registry = Registry("loss", same=lambda a, b: same_object(a.builder, b.builder))


def _section_defaults(name: str, defaults: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``defaults`` (checked), then the usual weight keys (their defaults unless given)."""
    defaults = dict(defaults or {})
    for key, value in defaults.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"loss '{name}': default key {key!r} must be a name (letters, digits, _)")
        if not isinstance(value, _VALUE_TYPES):
            raise TypeError(
                f"loss '{name}': default {key} = {value!r} has type {type(value).__name__}; config values "
                "must be bool, int, float, str or a list of them"
            )
    section = {k: v for k, v in defaults.items() if k not in WEIGHT_DEFAULTS}
    for key, value in WEIGHT_DEFAULTS.items():
        section[key] = float(defaults.get(key, value))
    return section


def _add(spec: LossSpec) -> LossSpec:
    return LOSSES.register(spec.name, spec)


def register_loss(
    name: str,
    builder: Builder,
    defaults: Optional[Mapping[str, Any]] = None,
    *,
    needs_positives: bool = True,
    min_batch_size: Optional[MinBatch] = None,
) -> LossSpec:
    """Make ``loss.name <name>`` select ``builder(cfg.loss.<name>)`` as the metric-loss term.

    ``defaults`` seeds the config section ``loss.<name>`` beside the usual keys ``weight`` (this
    loss's term, default 1), ``weight_x`` (cross-entropy, default 1) and ``weight_t`` (an added
    Torchreid triplet term, default 0); it may override those too. Register before building the
    config (``get_default_config`` / ``load_config``): the section is created there.
    ``needs_positives=False`` for a loss that needs no same-identity pairs in the batch (then any
    sampler is allowed); ``min_batch_size(section) -> (n, why)`` for a loss that needs batches of
    at least ``n`` images (checked against ``train.batch_size`` before training).

    ``validate_config`` calls every builder once on its section, so that the values the loss's
    constructor refuses are refused before anything is written: keep builders cheap and free of
    side effects.
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "name":
        raise ValueError(f"loss name {name!r} must be a Python identifier other than 'name'")
    if not callable(builder):
        raise TypeError(f"loss '{name}': builder must be callable(section) -> module, got {builder!r}")
    if name in _BUILTIN and name in LOSSES and not same_object(LOSSES[name].builder, builder):
        raise ValueError(f"loss name '{name}' is built in; register yours under another name")
    spec = LossSpec(
        name=name, builder=builder, defaults=_section_defaults(name, defaults),
        needs_positives=bool(needs_positives), min_batch_size=min_batch_size,
    )
    return _add(spec)


def unregister_loss(name: str) -> None:
    """Remove a loss added with :func:`register_loss` (built-in losses stay)."""
    if name in _BUILTIN:
        raise ValueError(f"loss '{name}' is built in and cannot be unregistered")
    LOSSES.unregister(name)


def loss_names() -> List[str]:
    """Every registered name, in registration order (built-in ones first)."""
    return list(LOSSES)


def specs() -> List[LossSpec]:
    """Every registered loss, in registration order."""
    return [spec for _, spec in LOSSES.items()]


def get_loss(name: str) -> LossSpec:
    """The entry of ``loss.name`` = ``name``; an unknown name is an :class:`UnknownLossError`."""
    if name not in LOSSES:
        raise UnknownLossError(f"loss.name = {name!r} is unknown; choose one of {loss_names()}")
    return LOSSES[name]


def build_loss(name: str, section) -> nn.Module:
    """The module of loss ``name`` built from its section ``cfg.loss.<name>``. A value of the
    section the loss refuses is a :class:`~torchreid_ext.errors.ConfigError` naming the section
    (an unknown name, e.g. ``loss.drsl.distance``, one naming its key)."""
    spec = get_loss(name)
    if spec.builder is None:
        raise ValueError(f"loss '{name}' is cross-entropy only; it has no metric-loss module")
    try:
        module = spec.builder(section)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from exc
    except ValueError as exc:  # a constructor's value check: say which section
        raise ConfigError(f"loss.{name}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise TypeError(f"the builder of loss '{name}' returned {type(module).__name__}, not an nn.Module "
                        "called as loss(features, targets)")
    return module


def check_loss_weights(weights: Mapping[str, float], require_positive: bool = True) -> None:
    """Every weight >= 0 (0 turns a term off) and, with ``require_positive``, at least one > 0;
    ``weights`` maps the name to show in the message (a config key or an argument) to the value."""
    for key, value in weights.items():
        if not float(value) >= 0:
            raise ValueError(f"{key} = {value} must be >= 0 (0 turns its term off)")
    if require_positive and not any(float(value) > 0 for value in weights.values()):
        listed = ", ".join(f"{k} = {v}" for k, v in weights.items())
        raise ValueError(f"no loss term has a positive weight ({listed}); set at least one > 0")


def section_weights(name: str, section) -> Dict[str, float]:
    """{'loss.<name>.<key>': value} for the weight keys of loss ``name``'s section."""
    spec = get_loss(name)
    return {f"loss.{name}.{key}": float(section[key]) for key in spec.weight_keys}


@dataclass(frozen=True)
class LossOptions:
    """``loss.name`` and the config section of every registered loss (read-only copies): the
    argument each loss's builder takes, its own ``from_config``. :func:`build_loss_terms` turns
    them into the terms a run trains with."""

    name: str
    sections: Mapping[str, Any]  # loss name -> its section (a frozen yacs node: attribute access)

    @classmethod
    def from_config(cls, cfg) -> "LossOptions":
        sections = {}
        for spec in specs():
            if spec.name in cfg.loss:
                section = cfg.loss[spec.name].clone()
                section.freeze()
                sections[spec.name] = section
        return cls(name=cfg.loss.name, sections=sections)

    @property
    def label_smooth(self) -> bool:
        """Cross-entropy's label smoothing (upstream's ``loss.softmax.label_smooth``)."""
        return bool(self.sections["softmax"].label_smooth)


def loss_terms(options: LossOptions) -> Tuple[float, Dict[str, float]]:
    """(cross-entropy weight, {term name: weight}) of ``loss.name``, weights checked
    (:class:`~torchreid_ext.errors.ConfigError` naming the config key); terms with weight 0 are
    left out."""
    name = options.name
    spec = get_loss(name)
    keyed = section_weights(name, options.sections[name])
    try:
        check_loss_weights(keyed if keyed else {"cross-entropy (loss.name softmax)": 1.0})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    weight_x, terms = spec.weights(options.sections[name])
    return weight_x, {term: w for term, w in terms.items() if w > 0}


def build_loss_terms(options: LossOptions) -> Tuple[float, Dict[str, Tuple[float, nn.Module]]]:
    """(cross-entropy weight, {term name: (weight, module)}) for ``loss.name``: the loss terms a
    run trains with. Raises ConfigError naming the config key of a bad value."""
    weight_x, terms = loss_terms(options)
    return weight_x, {term: (w, build_loss(term, options.sections[term])) for term, w in terms.items()}


def _triplet(section) -> nn.Module:
    return torchreid().losses.TripletLoss(margin=section.margin)


# Torchreid's own losses, whose sections are upstream's (hence their own weight keys); ours register
# themselves in drsl.py and sn.py.
# Cross-entropy alone: no metric term, the model returns logits only.
_add(LossSpec("softmax", None, {"label_smooth": True}, term_key=None, ce_key=None, triplet_key=None,
              needs_positives=False))
# Upstream Torchreid's section, unchanged: its term is weighted by weight_t, CE by weight_x.
_add(LossSpec("triplet", _triplet, {"margin": 0.3, "weight_t": 1.0, "weight_x": 0.0},
              term_key="weight_t", triplet_key=None, summary_name="loss_t"))
