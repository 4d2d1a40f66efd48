"""Process groups for torchrun (DistributedDataParallel), the model's preparation and DDP
wrapping, and the feature all-gather (the torchrun-only config rules are checked by
:func:`torchreid_ext.preflight.check_torchrun`).

``torchrun --nproc_per_node N scripts/main.py ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them
(``init_method='env://'``). Backend ``auto``: NCCL when training on GPUs, Gloo on CPU.

:func:`all_gather_with_grad` lets a batch ranking loss (triplet, DRSL, SN) see the features
of every rank (``dist.gather_features``). Only the local slice carries a gradient, so the
gradient a rank gets is that of its own copy of the loss; every rank computes the same
gathered loss, hence the full gradient is the SUM over ranks, and DDP AVERAGES: the engine
multiplies the gathered terms by the world size in the backward (values logged unscaled),
which makes a DDP step equal a single-process step on the concatenated batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError
from .options import ConfigOptions
from .torchrun import env_local_rank, env_world_size

__all__ = [
    "DistOptions",
    "DistInfo",
    "env_world_size",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "init_distributed",
    "cleanup_distributed",
    "prepare_model",
    "wrap_ddp",
    "barrier",
    "main_first",
    "all_gather_tensor",
    "all_gather_with_grad",
    "unwrap_model",
]

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistOptions(ConfigOptions):
    """The ``dist`` section: ``backend`` (auto: nccl on GPUs, gloo on the CPU) and
    ``gather_features`` (batch ranking losses see every rank's features)."""

    SECTION: ClassVar[str] = "dist"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"backend": BACKENDS}

    backend: str = "auto"
    gather_features: bool = False


class DistInfo(NamedTuple):
    """This process's place in the job; ``device`` is where its model lives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(backend: str = "auto", use_gpu: bool = True) -> DistInfo:
    """Join the job torchrun started (env://); a no-op with ``WORLD_SIZE`` 1.

    ``backend``: 'auto' (nccl with ``use_gpu``, else gloo), 'nccl' or 'gloo'. On GPUs each
    process uses ``cuda:LOCAL_RANK``.
    """
    DistOptions(backend=backend)  # a ConfigError for an unknown backend
    local_rank = env_local_rank()
    if use_gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if env_world_size() == 1 or is_distributed():
        return DistInfo(get_rank(), get_world_size(), local_rank, device)
    if backend == "auto":
        backend = "nccl" if use_gpu else "gloo"
    if backend == "nccl" and not use_gpu:
        raise ConfigError("dist.backend = 'nccl' needs GPUs; this run is on the CPU: use 'gloo' or 'auto'")
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup_distributed(wait: bool = True) -> None:
    """Leave the process group (if any), after every rank got here with ``wait`` (not after
    an error: the other ranks may never arrive)."""
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def prepare_model(model: torch.nn.Module, device: torch.device, sync_bn: bool = False,
                  channels_last: bool = False) -> torch.nn.Module:
    """SyncBatchNorm (``sync_bn``), ``device``, channels-last: the same model, converted."""
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel with default settings (MSGR: never ``static_graph``,
    docs/methods.md G6) when the job has more than one process; else ``model`` itself.
    ``find_unused_parameters``: while fixbase epochs freeze the base."""
    if info.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a dataset), the other ranks after it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) over ranks, rank 0 first; no gradient."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_tensor` whose own rank's slice is ``t`` itself (keeps its gradient);
    the other ranks' slices are constants. See the module docstring for the loss scaling."""
    if not is_distributed():
        return t
    parts = list(all_gather_tensor(t.detach()).split(t.shape[0]))
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers (``.module``)."""
    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model
