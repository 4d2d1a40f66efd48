"""Train loaders under torchrun: each rank gets its own share of the data.

Torchreid's ``ImageDataManager`` builds a single-process train loader; under
DistributedDataParallel :func:`distribute_train_loader` replaces its sampler by the
distributed form: :class:`~torchreid_ext.data.sampler.DistributedIdentitySampler` for
``RandomIdentitySampler``, torch's ``DistributedSampler`` for ``RandomSampler`` /
``SequentialSampler``. ``train.batch_size`` stays per rank.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError
from .sampler import DistributedIdentitySampler

__all__ = ["DDP_SAMPLERS", "check_distributed_sampler", "distributed_loader", "distribute_train_loader"]

DDP_SAMPLERS = ("RandomIdentitySampler", "RandomSampler", "SequentialSampler")


def check_distributed_sampler(name: str) -> None:
    """ConfigError unless Torchreid sampler ``name`` has a distributed form."""
    if name not in DDP_SAMPLERS:
        raise ConfigError(f"sampler.train_sampler = '{name}' has no distributed form; "
                          f"under torchrun choose one of {list(DDP_SAMPLERS)}")


def distributed_loader(loader: DataLoader, sampler_name: str, num_instances: int, seed: int) -> DataLoader:
    """A copy of ``loader`` (same dataset, batch size, workers) whose sampler gives this rank
    its share of each epoch (``set_epoch`` selects the epoch)."""
    check_distributed_sampler(sampler_name)
    if sampler_name == "RandomIdentitySampler":
        sampler = DistributedIdentitySampler(loader.dataset.train, loader.batch_size, num_instances, seed=seed)
    else:
        sampler = DistributedSampler(loader.dataset, shuffle=sampler_name == "RandomSampler", seed=seed,
                                     drop_last=True)
    return DataLoader(loader.dataset, sampler=sampler, batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=True)


def distribute_train_loader(dm, sampler_name: str, num_instances: int, seed: int) -> None:
    """Replace ``dm.train_loader`` by its distributed form (:func:`distributed_loader`)."""
    dm.train_loader = distributed_loader(dm.train_loader, sampler_name, num_instances, seed)
