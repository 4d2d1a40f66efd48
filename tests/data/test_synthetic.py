"""data/synthetic.py: the generated dataset's layout, file modes and Torchreid classes."""
import glob
import os
import os.path as osp
import pickle
import re
import stat

import pytest

import torchreid_ext.data.synthetic as synthetic
from torchreid_ext.adapter import torchreid
from torchreid_ext.data import SynthSpec, ensure_generated

TINY = SynthSpec(num_train_ids=3, num_test_ids=3, num_distractors=1, num_junk=1, max_cameras=2,
                 max_images=2, seed=5)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_generated_folders_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = ensure_generated(str(tmp_path / "synth"), TINY)
    finally:
        os.umask(old)
    folders = [out] + [osp.join(out, d) for d in ("bounding_box_train", "query", "bounding_box_test")]
    assert {mode(f) for f in folders} == {0o777 & ~umask}, [oct(mode(f)) for f in folders]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folder left


def test_generated_layout_follows_market1501(tmp_path):
    out = ensure_generated(str(tmp_path / "synth"), TINY)
    names = [osp.basename(p) for p in glob.glob(osp.join(out, "*", "*.jpg"))]
    assert names and all(re.fullmatch(r"(-1|\d{4})_c[1-6]s1_\d{6}_00\.jpg", n) for n in names)
    queries = glob.glob(osp.join(out, "query", "*.jpg"))
    assert len(queries) == 2 * TINY.num_test_ids  # two cameras per test identity
    assert ensure_generated(out, TINY) == out  # a matching copy is reused


def test_dataset_classes_are_torchreids_and_picklable():
    classes = synthetic.dataset_classes()
    assert set(classes) == {"synthreid", "synthreid_small"}
    market = torchreid().datasets.Market1501
    for name, cls in classes.items():
        assert issubclass(cls, market) and cls.generated
        assert torchreid().image_datasets()[name] is cls
        assert pickle.loads(pickle.dumps(cls)) is cls  # DataLoader workers may pickle datasets
    assert synthetic.SyntheticReIDSmall is classes["synthreid_small"]
    assert synthetic.dataset_classes() is classes  # made once
    with pytest.raises(AttributeError):
        synthetic.SyntheticNothing  # noqa: B018


def test_small_dataset_parses_through_torchreid(data_root):
    ds = synthetic.SyntheticReIDSmall(root=data_root, mode="query", verbose=False)
    assert ds.num_train_pids == 24 and len({item[1] for item in ds.query}) == 24
    assert all(len(item) == 4 for item in ds.train + ds.query + ds.gallery)
