"""Options that a component owns, declared once: the base of every ``*Options`` dataclass.

A component (MSGR, the evaluation, MSFL-ResNet50, the engine, distributed training, the data
checks) declares its options as a frozen dataclass deriving from :class:`ConfigOptions`:

* each field is one option with its default;
* ``KEYS`` maps a field to its config key (default ``<SECTION>.<field>``; ``None``: not a
  config key, e.g. derived or runtime-only);
* ``CHOICES`` maps a field to its allowed values, ``CHECKS`` to a check returning what is wrong
  (or None). The instance checks itself on construction, naming the config key.

The yacs defaults (:func:`torchreid_ext.config.get_default_config`) and the config's value
checks (:func:`torchreid_ext.config.validate_config`) are built from these classes, and the
component's own code reads ``CHOICES`` too, so an allowed-value set lives in one place.
This module is a leaf: it imports nothing of the package but :mod:`torchreid_ext.errors`.
"""
from __future__ import annotations

import numbers
from dataclasses import fields
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence

from .errors import ConfigError

__all__ = ["ConfigOptions", "is_int", "is_number", "positive_int", "config_value", "plain_value"]


def is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def positive_int(x: Any) -> Optional[str]:
    """None for an integer >= 1, else what it must be."""
    return None if is_int(x) and x >= 1 else "must be an integer >= 1"


def config_value(cfg, key: str) -> Any:
    """``cfg`` at dotted ``key``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def plain_value(value: Any) -> Any:
    """A config value as an options object holds it: lists become tuples (hashable, frozen)."""
    return tuple(plain_value(v) for v in value) if isinstance(value, (list, tuple)) else value


def _shown(value: Any) -> Any:
    """A field's value as the config wrote it (tuples were lists there)."""
    return list(value) if isinstance(value, tuple) else value


class ConfigOptions:
    """Base of a component's options dataclass (see the module docstring)."""

    SECTION: ClassVar[str] = ""
    KEYS: ClassVar[Dict[str, Optional[str]]] = {}
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- declaration
    @classmethod
    def key_of(cls, name: str) -> Optional[str]:
        """The config key of field ``name`` (None: not in the config)."""
        return cls.KEYS[name] if name in cls.KEYS else f"{cls.SECTION}.{name}"

    @classmethod
    def config_keys(cls) -> Dict[str, str]:
        """``{config key: field name}`` of every field that is a config key."""
        return {cls.key_of(f.name): f.name for f in fields(cls) if cls.key_of(f.name) is not None}

    @classmethod
    def config_defaults(cls) -> Dict[str, Any]:
        """``{config key: default}``, lists for sequences (yacs values)."""
        out = {}
        for f in fields(cls):
            key = cls.key_of(f.name)
            if key is not None:
                out[key] = list(f.default) if isinstance(f.default, tuple) else f.default
        return out

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_config(cls, cfg, **overrides):
        """The options ``cfg`` sets (``overrides`` for fields that are not config keys, or to
        change one); a bad value raises :class:`ConfigError` naming its key."""
        values = {name: plain_value(config_value(cfg, key)) for key, name in cls.config_keys().items()}
        values.update(overrides)
        return cls(**values)

    def as_config(self) -> Dict[str, Any]:
        """``{field name: value}`` of the fields that are config keys, as the config writes them
        (lists for tuples), in declaration order."""
        return {f.name: _shown(getattr(self, f.name)) for f in fields(self) if self.key_of(f.name) is not None}

    # ---------------------------------------------------------------- checking
    def describe(self, name: str) -> str:
        """How a message names field ``name``: its config key, else the field name."""
        return self.key_of(name) or name

    @classmethod
    def check_value(cls, name: str, value: Any, label: Optional[str] = None, error: type = ValueError) -> Any:
        """``value`` if field ``name`` allows it (``CHOICES``, ``CHECKS``), else ``error`` naming it
        as ``label`` (default: the field name). Library functions check their arguments with it."""
        label = label or name
        if name in cls.CHOICES and value not in cls.CHOICES[name]:
            raise error(f"{label} = {_shown(value)!r} is not valid; choose one of {list(cls.CHOICES[name])}")
        problem = cls.CHECKS[name](value) if name in cls.CHECKS else None
        if problem:
            raise error(f"{label} = {_shown(value)!r} {problem}")
        return value

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first value outside ``CHOICES`` (then failing ``CHECKS``),
        naming its config key, then run :meth:`check` (rules between fields)."""
        for name in (*self.CHOICES, *self.CHECKS):
            self.check_value(name, getattr(self, name), self.describe(name), ConfigError)
        self.check()

    def check(self) -> None:
        """Rules between this component's fields (subclasses); raise :class:`ConfigError`."""
