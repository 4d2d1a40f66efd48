"""The real-data protocols on the real files (skipped where ../shared/data is absent)."""
import glob
import json
import os.path as osp

import pytest

from torchreid_ext.adapter import torchreid
from torchreid_ext.data.image_list import load_items
from torchreid_ext.data.real import REAL_SPECS, SPLIT_SEED

SPECS = {spec.name: spec for spec in REAL_SPECS}


def _files(root, pattern):
    return sorted(glob.glob(osp.join(root, pattern)))


def test_cuhk03_pair1_counts(real_data):
    items = load_items(SPECS["cuhk03_pair1"], real_data)
    train = _files(real_data, "cuhk03_pair1/labeled/train/*.jpg")
    val = _files(real_data, "cuhk03_pair1/labeled/val/*.jpg")
    assert (len(train), len(val)) == (7239, 938)
    assert sorted(p for p, _, _ in items.train) == train
    assert sorted({pid for _, pid, _ in items.train}) == list(range(743))  # relabelled from 0
    # query = camera a (image index 00-04), gallery = camera b (05-09); every val image used once
    index = lambda p: int(osp.basename(p)[5:7])  # noqa: E731
    assert sorted(p for p, _, _ in items.query) == [p for p in val if index(p) < 5]
    assert sorted(p for p, _, _ in items.gallery) == [p for p in val if index(p) >= 5]
    assert (len(items.query), len(items.gallery)) == (451, 487)
    assert {pid for _, pid, _ in items.query} == {pid for _, pid, _ in items.gallery} == set(range(100))
    assert {c for _, _, c in items.query} == {0} and {c for _, _, c in items.gallery} == {1}
    assert all(int(osp.basename(p)[:4]) == pid for p, pid, _ in items.query + items.gallery)
    assert items.num_valid_queries == 451


@pytest.mark.parametrize("name, ids, per_camera", [("viper_full", 632, 632), ("cuhk01_full", 971, 1942)])
def test_full_protocols_use_every_identity(real_data, name, ids, per_camera):
    items = load_items(SPECS[name], real_data)
    assert items.train == []
    assert len(items.query) == len(items.gallery) == per_camera
    assert len({pid for _, pid, _ in items.query}) == len({pid for _, pid, _ in items.gallery}) == ids
    if name == "viper_full":
        assert all("/cam_a/" in p for p, _, _ in items.query) and all("/cam_b/" in p for p, _, _ in items.gallery)
    else:
        assert all(osp.basename(p)[4:7] in ("001", "002") for p, _, _ in items.query)
        assert all(osp.basename(p)[4:7] in ("003", "004") for p, _, _ in items.gallery)


def _splits(name, root, cache, monkeypatch, split_id):
    monkeypatch.setenv("TORCHREID_EXT_CACHE", str(cache))
    ds = torchreid().datasets.init_image_dataset(name, root=root, mode="train", split_id=split_id, verbose=False)
    files = glob.glob(osp.join(str(cache), "splits", "*.json"))
    assert len(files) == 1
    return ds, files[0]


@pytest.mark.parametrize("name, ids", [("viper_10split", 632), ("cuhk01_10split", 971)])
def test_ten_split_protocols_are_deterministic_and_written_to_the_cache(real_data, tmp_path, monkeypatch,
                                                                         name, ids):
    before = set(glob.glob(osp.join(real_data, "**"), recursive=True))
    a, file_a = _splits(name, real_data, tmp_path / "a", monkeypatch, 0)
    b, file_b = _splits(name, real_data, tmp_path / "b", monkeypatch, 0)
    assert set(glob.glob(osp.join(real_data, "**"), recursive=True)) == before  # nothing written there
    assert f"seed{SPLIT_SEED}" in osp.basename(file_a)
    assert json.load(open(file_a)) == json.load(open(file_b))  # same draw in two fresh caches
    splits = json.load(open(file_a))
    assert len(splits) == 20
    for k in range(0, 20, 2):  # Torchreid's pairs: A->B then B->A on one halving
        s, t = splits[k], splits[k + 1]
        assert s["train"] == t["train"] and s["query"] == t["gallery"] and s["gallery"] == t["query"]
        train_files = {p for p, _, _ in s["train"]}
        assert not train_files & {p for p, _, _ in s["query"] + s["gallery"]}
        assert s["num_train_pids"] == ids // 2
    assert splits[0]["train"] != splits[2]["train"]  # ten different halvings
    assert a.num_train_pids == ids // 2 and a.train == [tuple(x) + (0,) for x in splits[0]["train"]]
