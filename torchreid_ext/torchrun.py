"""What torchrun tells this process through its environment (a leaf: imports nothing of ours).

``torchrun --nproc_per_node N`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the config's
torchrun-only rules read the world size here before any process group exists.
"""
from __future__ import annotations

import os

__all__ = ["env_world_size", "env_local_rank"]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """``LOCAL_RANK`` as torchrun sets it (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
