"""One registry type for every named kind of component (models, losses, engines, datasets).

A :class:`Registry` maps names to objects. The rule for a duplicate name is the same for every
kind: registering the same object again (or a re-imported copy of it: same module and qualified
name) is harmless, anything else under a taken name is a ``ValueError`` naming both. An unknown
name is a :class:`UnknownNameError` (a ``UserError`` and a ``KeyError`` that prints cleanly):
``<key> = '<name>' is unknown; choose one of [...]``, the key being the config key or argument
that named it (the registry's kind if the caller does not say).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import UnknownNameError

__all__ = ["Registry", "UnknownNameError", "same_object"]

T = TypeVar("T")


def same_object(a: Any, b: Any) -> bool:
    """``a`` is ``b``, or both are the same definition imported twice (module + qualified name),
    or equal values (frozen specs)."""
    if a is b:
        return True
    key = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa: E731
    if key(a)[1] is not None and key(a) == key(b):
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - incomparable objects are different
        return False


class Registry(Generic[T]):
    """Names -> objects of one kind (``kind`` is used in messages: 'model', 'loss', ...), in
    registration order. ``same(current, new)`` says when a taken name may be registered again
    (default :func:`same_object`); the entry is then rebound to ``new``."""

    def __init__(self, kind: str, same: Optional[Callable[[Any, Any], bool]] = None):
        self.kind = kind
        self.same = same or same_object  # when a name may be registered again (then it is rebound)
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None) -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator; returns ``obj``."""
        if obj is None:
            def decorator(o: T) -> T:
                self.register(name, o)
                return o

            return decorator
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        current = self._items.get(name)
        if current is not None and not self.same(current, obj):
            raise ValueError(f"{self.kind} name '{name}' is already registered to {current!r}; "
                             f"cannot register {obj!r} under it")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str, key: Optional[str] = None) -> T:
        """The object under ``name``; an unknown name is an :class:`UnknownNameError` naming ``key``
        (the config key or argument that gave the name; default: the kind)."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"{key or self.kind} = {name!r} is unknown; choose one of {self.names()}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def items(self):
        return self._items.items()

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

