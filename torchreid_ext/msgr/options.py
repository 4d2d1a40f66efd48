"""MSGR's options (the ``msgr`` config section), declared once (docs/methods.md G3-G5).

The config's defaults and checks, :class:`~torchreid_ext.engines.msgr.MSGREngine` and the step
functions' argument checks all read :class:`MSGROptions` (``CHOICES`` / ``CHECKS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..options import ConfigOptions, is_int, is_number

__all__ = ["MSGROptions", "MODES", "GRAD_OF", "Q_VALUES"]

INF = float("inf")
MODES = ("exact", "fast")  # G4 (double backward, the paper's) | G5 (finite difference, ours)
GRAD_OF = ("sum", "mean")  # L_grad = B * L_mean (each sample's own gradient, G2) | L_mean
Q_VALUES = (1.0, 2.0, INF)  # the dual norms G3 compares; any order q >= 1 is computed


def _q(q: Any) -> Optional[str]:
    try:
        if float(q) >= 1:
            return None
    except (TypeError, ValueError):
        pass
    return "is not valid; q is a norm order >= 1 (inf allowed; the paper compares 1, 2 and inf)"


def _eps(eps: Sequence[Any]) -> Optional[str]:
    if all(is_number(e) and e >= 0 for e in eps):
        return None
    return "is not valid; every eps must be a number >= 0 (checked whether or not msgr.enabled)"


def _interval(n: Any) -> Optional[str]:
    return (None if is_int(n) and n >= 1
            else "is not valid; apply R every N-th step with an integer N >= 1 (1: every step)")


def _fast_h(h: Any) -> Optional[str]:
    return None if is_number(h) else "is not valid; give the fast-mode step h (> 0), or 0 for automatic"


@dataclass(frozen=True)
class MSGROptions(ConfigOptions):
    """MSGR's settings: ``enabled``; ``mode``; ``stages`` (module names, ``model.get_submodule``);
    ``eps`` (one value for all stages, or one per stage); ``q``; ``squared`` (penalise ||g||_q ** 2);
    ``grad_of``; ``fast_h`` (G5's step, delta = h eps_s v / B; <= 0: automatic, the largest stage
    perturbation 3e-6 of the stage output); ``interval`` (lazy MSGR: R with weight N on every N-th
    step, plain steps between)."""

    SECTION: ClassVar[str] = "msgr"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"mode": MODES, "grad_of": GRAD_OF}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {
        "q": _q, "eps": _eps, "interval": _interval, "fast_h": _fast_h}

    enabled: bool = False
    mode: str = "exact"
    stages: Tuple[str, ...] = ("layer1", "layer2")
    eps: Tuple[float, ...] = (0.01,)
    q: float = 2.0
    squared: bool = False
    grad_of: str = "sum"
    fast_h: float = 0.0
    interval: int = 1

    def check(self) -> None:
        if not self.enabled:
            return
        if not self.stages:
            raise ConfigError("msgr.stages is empty; name at least one module, e.g. ['layer1']")
        if len(self.eps) not in (1, len(self.stages)):
            raise ConfigError(f"msgr.eps has {len(self.eps)} values for {len(self.stages)} stages "
                              f"{list(self.stages)}; give one value or one per stage")

    @property
    def step_h(self) -> Optional[float]:
        """The fast-mode step h, or None for the automatic choice (``fast_h`` <= 0)."""
        return float(self.fast_h) if self.fast_h > 0 else None
