"""P x K identity sampling for DistributedDataParallel: Torchreid's RandomIdentitySampler, split.

Every rank builds the same plan for the epoch from ``(seed, epoch)`` alone (no
communication): each identity's images are shuffled and cut into chunks of K (an identity
with fewer than K images is drawn K times with replacement, as Torchreid does); each step
draws P x world_size distinct identities among those with chunks left and takes one chunk
of each; rank r gets the r-th group of P identities. So a rank's batches are P x K, no
identity appears on two ranks in the same step, and the steps concatenated over ranks are
exactly the single-process plan with batch size world_size x P x K (the union of the
identities equals that sampler's). ``set_epoch(e)`` (the engine calls it) selects the
epoch's plan; a resumed run draws the same batches.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import ConfigError

__all__ = ["DistributedIdentitySampler"]


class DistributedIdentitySampler(Sampler):
    """Indices of this rank's P x K batches (``batch_size`` = P x K, per rank).

    ``data_source``: items ``(path, pid, camid, ...)`` (Torchreid's ``dataset.train``);
    ``num_replicas`` / ``rank``: default to the process group's (1 / 0 without one);
    ``seed``: with the epoch, fixes the plan.
    """

    def __init__(self, data_source: Sequence, batch_size: int, num_instances: int,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, seed: int = 0):
        from ..distributed import get_rank, get_world_size

        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size = {batch_size} must be a positive multiple of "
                             f"num_instances = {num_instances} (P identities x K images)")
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank = {self.rank} is not in [0, num_replicas = {self.num_replicas})")
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.num_pids_per_batch = self.batch_size // self.num_instances
        self.seed = int(seed)
        self.epoch = 0
        self.index_dic: Dict[int, List[int]] = defaultdict(list)
        for index, item in enumerate(data_source):
            self.index_dic[item[1]].append(index)
        self.pids = list(self.index_dic)
        need = self.num_pids_per_batch * self.num_replicas
        if len(self.pids) < need:
            raise ConfigError(
                f"the training set has {len(self.pids)} identities, fewer than P x world size = "
                f"{self.num_pids_per_batch} x {self.num_replicas} = {need} needed by one step; "
                "lower train.batch_size or the number of processes"
            )
        self._cache: Optional[tuple] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self) -> List[List[int]]:
        """The epoch's steps: each the indices of all ranks' batches, rank 0 first."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.num_instances
        chunks: Dict[int, List[List[int]]] = {}
        for pid in self.pids:
            idxs = list(self.index_dic[pid])
            if len(idxs) < k:
                idxs = rng.choice(idxs, size=k, replace=True).tolist()
            idxs = [idxs[i] for i in rng.permutation(len(idxs))]
            chunks[pid] = [idxs[i:i + k] for i in range(0, len(idxs) - len(idxs) % k, k)]
        available = list(self.pids)
        need = self.num_pids_per_batch * self.num_replicas
        steps = []
        while len(available) >= need:
            picked = [available[i] for i in rng.choice(len(available), size=need, replace=False)]
            step = []
            for pid in picked:
                step.extend(chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
            steps.append(step)
        self._cache = (self.epoch, steps)
        return steps

    def __iter__(self) -> Iterator[int]:
        lo = self.rank * self.batch_size
        for step in self.plan():
            yield from step[lo:lo + self.batch_size]

    def __len__(self) -> int:
        return len(self.plan()) * self.batch_size
