"""The engine's training options that are ours (the ``train`` keys beyond upstream's), declared once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence

import torch

from ..options import ConfigOptions, is_int
from .registry import ENGINES

__all__ = ["AMP_DTYPES", "EngineOptions"]

# train.amp -> autocast dtype
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _engine(name: Any) -> Optional[str]:
    if name == "" or name in ENGINES:
        return None
    return f"is not valid; choose one of {ENGINES.names()} (or '' for msgr / metric by msgr.enabled)"


def _checkpoint_freq(n: Any) -> Optional[str]:
    return (None if is_int(n) and n >= 0
            else "is not valid; give the epochs between checkpoints (>= 0; 0: evaluation epochs only)")


@dataclass(frozen=True)
class EngineOptions(ConfigOptions):
    """``train.engine`` (a registered engine), ``train.amp`` (none | fp16 | bf16 autocast),
    ``train.channels_last``, ``train.sync_bn``
    (SyncBatchNorm under torchrun), ``train.checkpoint_freq`` (epochs between resumable
    checkpoints) and ``train.deterministic`` (deterministic kernels, no cudnn.benchmark)."""

    SECTION: ClassVar[str] = "train"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"amp": tuple(AMP_DTYPES)}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {"checkpoint_freq": _checkpoint_freq,
                                                                    "engine": _engine}

    engine: str = ""  # a registered engine (torchreid_ext.engines.ENGINES); '': msgr / metric by msgr.enabled
    checkpoint_freq: int = 1
    deterministic: bool = False
    amp: str = "none"
    channels_last: bool = False
    sync_bn: bool = False
