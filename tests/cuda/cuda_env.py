"""Where the ``pytest -m cuda`` tests run, and the one skip they share.

The tests in tests/cuda run on ``cuda`` and skip (one reason, below) when
``torch.cuda.is_available()`` is False. ``TORCHREID_EXT_TEST_DEVICE=cpu`` runs the same test
bodies on the CPU instead of skipping: a development check that the tests themselves are right
on a machine without a GPU (CPU results say nothing about CUDA). Nothing is built at import.
"""
import contextlib
import os

import pytest
import torch

_FORCED = os.environ.get("TORCHREID_EXT_TEST_DEVICE", "").strip().lower()
if _FORCED not in ("", "cpu", "cuda"):
    raise ValueError(f"TORCHREID_EXT_TEST_DEVICE = {_FORCED!r}; use 'cpu' (development check) or 'cuda'")

DEVICE = torch.device(_FORCED or "cuda")
ON_GPU = DEVICE.type == "cuda"
FORCED_CPU = DEVICE.type == "cpu"
AVAILABLE = FORCED_CPU or torch.cuda.is_available()

SKIP_REASON = ("CUDA is not available (torch.cuda.is_available() is False); "
               "TORCHREID_EXT_TEST_DEVICE=cpu runs these tests on the CPU as a development check")

#: every module's ``pytestmark``: the ``cuda`` marker and the shared skip
MARKS = [pytest.mark.cuda, pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)]


@contextlib.contextmanager
def strict_fp32():
    """Full float32 matrix products and convolutions inside the block (no TF32), for comparisons
    with float64; the previous settings are restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
