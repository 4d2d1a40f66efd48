"""Test helper: the largest tensor any ATen op produces inside a block.

A dispatch mode sees the output of every ATen op, including the backward ops the autograd
engine runs, so the bound it gives on intermediates is exact and deterministic, unlike RSS or
allocator statistics on a machine shared with other processes (docs/methods.md D6: no B^3 tensor).
"""
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    """Records ``numel`` of the largest tensor returned by any op, and the number of ops."""

    def __init__(self):
        super().__init__()
        self.numel, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out
