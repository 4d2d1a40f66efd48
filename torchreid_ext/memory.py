"""How much memory a step needs and how much it may use, known before the step allocates anything.

* :func:`available_memory`: what may still be allocated: on the CPU the least of the kernel's
  ``MemAvailable``, the cgroup's limit less its usage and ``ulimit -v`` less this process's
  address space; on a GPU its free memory.
* :func:`forward_peak_bytes`: the most bytes that tensors hold at once during a forward pass
  (with the backward pass and the tensors autograd saves for it, when training), measured by
  running the model on the ``meta`` device: every tensor has its shape and no storage, and a
  dispatch mode counts the storages alive after each operation. On the CPU this is 65-85% of the
  peak the same pass really reaches (OSNet and ResNet50, measured with the process's peak RSS):
  the allocator's own overhead and temporary buffers inside kernels are not counted, so the
  figure is a lower bound.
* :func:`check_memory`: a :class:`~torchreid_ext.errors.MemoryLimitError` when parameters plus that
  peak exceed what is available, naming the options to lower, before any work.
* :func:`allocation_failures`: an allocation that still fails (the estimate is a lower bound)
  becomes one such error instead of an allocator traceback.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import weakref
from dataclasses import replace
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import MemoryLimitError, UserError
from .models import ModelOptions, build_model_from_options

__all__ = ["available_memory", "forward_peak_bytes", "meta_model", "check_memory", "is_allocation_failure",
           "allocation_failures", "gib"]

logger = logging.getLogger(__name__)

# The meta-device pass is skipped when this many times the input batch still fits: measured peaks are
# 8-18 times the input batch for inference (OSNet-x0.25, ResNet50) and 50-340 times for training
# (OSNet-x0.25 50, ResNet50 155, OSNet-x1.0 210, MSFL-ResNet50 340).
SKIP_FACTOR = 1000
# Messages of allocators that ran out of memory (torch's CPU allocator, CUDA, onnxruntime, C++).
_ALLOCATION_MESSAGES = ("can't allocate memory", "out of memory", "failed to allocate memory", "bad_alloc",
                        "cannot allocate memory")


def gib(n: float) -> str:
    """``n`` bytes in GiB, for messages."""
    return f"{n / 2 ** 30:.1f} GiB"


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> Optional[int]:
    """The cgroup's memory limit less its usage (v2, else v1), or None when unlimited."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        top, used = _read_int(limit), _read_int(usage)
        if top is not None and used is not None and top < 2 ** 60:
            return max(top - used, 0)
    return None


def _address_space_room() -> Optional[int]:
    """``ulimit -v`` (RLIMIT_AS) less this process's address space, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(soft - size, 0)


def available_memory(device: Optional[torch.device] = None) -> Tuple[Optional[int], str]:
    """``(bytes, where)``: what may still be allocated on ``device`` (default CPU) and which limit
    that is, or ``(None, '')`` when it cannot be told."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on GPU {torch.cuda.get_device_name(device)}"
    limits = [(_meminfo("MemAvailable"), "available on this machine"),
              (_cgroup_room(), "left under the cgroup's limit"),
              (_address_space_room(), "left under ulimit -v")]
    found = [(n, where) for n, where in limits if n is not None]
    return min(found) if found else (None, "")


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of the storages that live tensors hold, and their peak. A storage counts
    from the first operation that returns it until the last tensor using it is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.users: Dict[int, int] = {}
        self.sizes: Dict[int, int] = {}
        self.live = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.users:
            self.users[key], self.sizes[key] = 0, storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.users[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs:  # in-place ops return their input
                self.track(t)
        return out


def forward_peak_bytes(model: torch.nn.Module, batch: int, height: int, width: int, train: bool) -> int:
    """The most bytes tensors hold at once while ``model`` (on the ``meta`` device) runs a batch of
    ``batch`` x 3 x ``height`` x ``width`` images: in eval mode under ``no_grad`` (inference), or in
    train mode with the tensors saved for backward kept and a backward pass (training). Parameters
    are not counted; their gradients are."""
    model.train(train)
    counter = _StorageCounter()
    with counter:
        images = torch.empty(batch, 3, height, width, device="meta")
        counter.track(images)
        if train:
            # the saved tensors stay Python objects, so the counter sees them live until backward frees them
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                out = model(images)
                outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
                loss = sum(o.float().sum() for o in outputs)
            if torch.is_tensor(loss):
                loss.backward()
        else:
            with torch.no_grad():
                out = model(images)
        del out
    return counter.peak


def meta_model(options: ModelOptions, num_classes: int = 2) -> Optional[torch.nn.Module]:
    """The model of ``options`` (:class:`~torchreid_ext.models.ModelOptions`) built on the ``meta``
    device (no weights read, no memory), or None when that model cannot be built there."""
    factory = {k: ("" if k == "backbone_weights" else v) for k, v in options.factory_options.items()}
    meta = replace(options, pretrained=False, factory_options=factory)  # no download, no weights file read
    try:
        with torch.device("meta"):
            return build_model_from_options(meta, num_classes)
    except Exception as exc:  # noqa: BLE001 - a model that needs real tensors to build is measured by running it
        logger.debug("%s cannot be built on the meta device (%s)", options.name, exc)
        return None


def check_memory(model_fn: Callable[[], Optional[torch.nn.Module]], *, batch: int, height: int, width: int,
                 train: bool, device: Optional[torch.device] = None, what: str = "", lower: str = "",
                 half_precision: bool = False) -> Optional[int]:
    """Refuse (:class:`MemoryLimitError`) a step that needs more than :func:`available_memory` on
    ``device``: the model's parameters (buffers too) plus :func:`forward_peak_bytes` (halved with
    ``half_precision``: autocast stores most activations in 16 bits). ``model_fn`` returns the model
    on the meta device (e.g. :func:`meta_model`), or None to skip the check; it is called only when
    the input batch is large enough to matter (:data:`SKIP_FACTOR`). ``what`` names the step and
    ``lower`` what to lower in the message. Returns the bytes needed, or None when not measured."""
    room, where = available_memory(device)
    if room is None or batch * 3 * height * width * 4 * SKIP_FACTOR < room:
        return None
    model = model_fn()
    if model is None:
        return None
    try:
        peak = forward_peak_bytes(model, batch, height, width, train)
    except Exception as exc:  # noqa: BLE001 - an operation without a meta kernel: not measured
        logger.debug("memory of %s not estimated: the meta-device pass failed (%s)", what, exc)
        return None
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    need = params + (peak // 2 if half_precision else peak)
    logger.debug("%s needs at least %s (parameters %s, activations %s); %s %s", what, gib(need), gib(params),
                 gib(peak), gib(room), where)
    if need > room:
        raise MemoryLimitError(
            f"{what} needs at least {gib(need)} ({'training' if train else 'inference'} activations "
            f"{gib(peak)}, parameters {gib(params)}), more than the {gib(room)} {where}; lower {lower}")
    return need


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is an allocator running out of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return False
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _ALLOCATION_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def allocation_failures(what: str, lower: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into a :class:`MemoryLimitError` saying that
    ``what`` ran out of memory and what to ``lower``."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an allocation failure
        if not is_allocation_failure(exc):
            raise
        first = " ".join(str(exc).split())
        first = first if len(first) <= 160 else first[:160] + " ..."
        raise MemoryLimitError(f"{what} ran out of memory ({type(exc).__name__}: {first}); lower {lower}") from exc
