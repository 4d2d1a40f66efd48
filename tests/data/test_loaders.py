"""data/loaders.py: the train loader's distributed form under torchrun."""
import pytest
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from torchreid_ext.config import ConfigError
from torchreid_ext.data.loaders import DDP_SAMPLERS, check_distributed_sampler, distributed_loader
from torchreid_ext.data.sampler import DistributedIdentitySampler


class Items(Dataset):
    """Torchreid-like: ``train`` holds (path, pid, camid, dsetid); items are indices."""

    def __init__(self, pids):
        self.train = [(f"{i}.jpg", pid, 0, 0) for i, pid in enumerate(pids)]

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        return i


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_each_sampler_gets_its_distributed_form(one_process_group):
    loader = DataLoader(Items([p for p in range(6) for _ in range(4)]), batch_size=8, num_workers=0)
    ident = distributed_loader(loader, "RandomIdentitySampler", num_instances=4, seed=3)
    assert isinstance(ident.sampler, DistributedIdentitySampler)
    assert ident.batch_size == 8 and ident.drop_last and ident.dataset is loader.dataset
    assert ident.sampler.num_pids_per_batch == 2 and ident.sampler.seed == 3
    for batch in ident:  # P x K: 2 identities x 4 images
        pids = sorted(loader.dataset.train[i][1] for i in batch.tolist())
        assert len(set(pids)) == 2 and pids.count(pids[0]) == 4
    for name, shuffle in (("RandomSampler", True), ("SequentialSampler", False)):
        out = distributed_loader(loader, name, num_instances=4, seed=3)
        assert isinstance(out.sampler, DistributedSampler) and out.sampler.shuffle is shuffle
        assert out.sampler.seed == 3 and out.sampler.drop_last
    assert list(distributed_loader(loader, "SequentialSampler", 4, 0).sampler) == list(range(24))


def test_samplers_without_a_distributed_form_are_refused():
    assert DDP_SAMPLERS == ("RandomIdentitySampler", "RandomSampler", "SequentialSampler")
    with pytest.raises(ConfigError, match=r"'RandomDomainSampler' has no distributed form.*RandomIdentitySampler"):
        check_distributed_sampler("RandomDomainSampler")
