"""The model a config names, with its factory's options, read once (:class:`ModelOptions`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional

from ..options import ConfigOptions, config_value, plain_value
from .registry import MODEL_OPTIONS

__all__ = ["ModelOptions"]


@dataclass(frozen=True)
class ModelOptions(ConfigOptions):
    """``model.name``, ``model.pretrained``, ``model.load_weights`` and ``loss.name`` (which tells
    a factory what training mode returns), and ``factory_options``: the keyword options the
    factory declares (``register_model(..., options=keys)``), named after their key's last part.
    Upstream's keys keep their defaults in :func:`torchreid_ext.config.get_default_config`, so the
    fields here have none."""

    SECTION: ClassVar[str] = "model"
    KEYS: ClassVar[Dict[str, Optional[str]]] = {"loss": "loss.name", "factory_options": None}

    name: str
    pretrained: bool
    load_weights: str
    loss: str
    factory_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "ModelOptions":
        """The options ``cfg`` sets, the factory's own ones included."""
        keys = MODEL_OPTIONS.get(cfg.model.name, ())
        factory = {key.rsplit(".", 1)[-1]: plain_value(config_value(cfg, key)) for key in keys}
        return super().from_config(cfg, **{"factory_options": factory, **overrides})
