"""data/real.py: the split files of viper_10split / cuhk01_10split in the cache, checked before use
and drawn again when damaged (on tiny stand-ins for the real folders)."""
import copy
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from PIL import Image

from torchreid_ext.adapter import torchreid
from torchreid_ext.data.checks import DatasetError


def _image(path, value=0):
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 16), (value, 0, 0)).save(path)


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    """A data root with VIPeR's layout (10 persons) and CUHK01's (12 persons, 4 images each), and an
    empty cache."""
    root = tmp_path / "root"
    for i in range(10):
        _image(str(root / "viper" / "VIPeR" / "cam_a" / f"{i:03d}_45.bmp"), i)
        _image(str(root / "viper" / "VIPeR" / "cam_b" / f"{i:03d}_90.bmp"), i)
    for p in range(1, 13):
        for k in range(1, 5):
            _image(str(root / "cuhk01" / "campus" / f"{p:04d}{k:03d}.png"), p)
    monkeypatch.setenv("TORCHREID_EXT_CACHE", str(tmp_path / "cache"))
    return str(root), str(tmp_path / "cache" / "splits")


def _build(name, root, split_id=0):
    return torchreid().datasets.init_image_dataset(name, root=root, mode="train", split_id=split_id, verbose=False)


def _file(cache, name):
    files = glob.glob(osp.join(cache, f"{name}-*.json"))
    assert len(files) == 1
    return files[0]


def _shift_train(s):
    for item in s[0]["train"]:
        item[1] += 1


def _query_pid(s):
    s[5]["query"][0][1] = 99


def _drop_image(s):
    s[7]["gallery"].pop()


def _train_person_in_test(s):
    s[2]["gallery"][0][0] = s[2]["train"][0][0]


def _same_camera(s):
    for item in s[4]["gallery"]:
        item[2] = s[4]["query"][0][2]


DAMAGE = {  # what a damaged file holds -> what the warning says
    "truncated": (lambda text: text[: len(text) // 3], "not readable as JSON"),
    "empty list": (lambda text: "[]", "it holds 0 entries, not a list of 20 splits"),
    "not UTF-8": (lambda text: "\udcff", "not readable as JSON"),
    "shifted train ids": (_shift_train, "split 0: the training pids are not 0..num_train_pids-1"),
    "a wrong query pid": (_query_pid, "split 5: one person has two pids"),
    "an image missing": (_drop_image, "split 7 uses"),
    "a training image in test": (_train_person_in_test, "split 2: the image"),
    "one camera": (_same_camera, "split 4: query and gallery are not from two different cameras"),
    "huge id": (lambda s: s[1]["query"][0].__setitem__(1, 10 ** 30), "split 1: query holds"),
}


@pytest.mark.parametrize("name", ["viper_10split", "cuhk01_10split"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_split_file_is_drawn_again_with_a_warning(layouts, caplog, name, damage):
    root, cache = layouts
    first = _build(name, root, split_id=3)
    path = _file(cache, name)
    fresh = open(path).read()
    change, message = DAMAGE[damage]
    text = change(fresh) if damage in ("truncated", "empty list", "not UTF-8") else None
    if text is None:
        splits = json.loads(fresh)
        change(splits)
        text = json.dumps(splits)
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    caplog.clear()
    again = _build(name, root, split_id=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is damaged (" + message in warnings[0] and path in warnings[0], warnings
    assert open(path).read() == fresh and again.train == first.train and again.query == first.query
    caplog.clear()
    _build(name, root, split_id=3)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # a good file is used as it is


def test_a_killed_draw_leaves_nothing_that_stops_the_next(layouts):
    """A process killed while writing left 818 KB of the JSON; now it writes a temporary file,
    which the next draw removes."""
    root, cache = layouts
    _build("viper_10split", root)
    path = _file(cache, "viper_10split")
    fresh = open(path).read()
    os.remove(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = osp.join(cache, f".{osp.basename(path)}.tmp-{dead}")
    with open(stale, "w") as f:
        f.write(fresh[:1000])
    _build("viper_10split", root)
    assert open(path).read() == fresh and not osp.exists(stale)


def test_the_split_file_is_what_the_seeded_draw_gives(layouts):
    """Checked against a draw done here with Torchreid's own algorithm and numpy seed 0."""
    import numpy as np

    from torchreid_ext.data.real import SPLIT_SEED, split_problem

    root, cache = layouts
    _build("viper_10split", root)
    splits = json.load(open(_file(cache, "viper_10split")))
    rng = np.random.RandomState(SPLIT_SEED)
    cam_a = sorted(glob.glob(osp.join(root, "viper", "VIPeR", "cam_a", "*.bmp")))
    for k in range(10):
        order = np.arange(10)
        rng.shuffle(order)
        assert [p for p, _, _ in splits[2 * k]["query"]] == [cam_a[i] for i in order[5:]]
    persons = {p: i for i, p in enumerate(cam_a)}
    persons.update({p.replace("cam_a", "cam_b").replace("_45", "_90"): i for p, i in persons.items()})
    assert split_problem(splits, persons) is None
    broken = copy.deepcopy(splits)
    broken[0]["train"][0][1], broken[0]["train"][2][1] = broken[0]["train"][2][1], broken[0]["train"][0][1]
    assert split_problem(broken, persons) == "split 0: train pid 0 is given to two different persons"


@pytest.mark.parametrize("split_id", [20, -1, "3"])
def test_a_split_id_outside_0_19_is_refused(layouts, split_id):
    root, _ = layouts
    with pytest.raises(DatasetError, match=rf"data.split_id = {split_id!r} is not valid for dataset "
                                           "'viper_10split': it has 20 splits, 0-19"):
        _build("viper_10split", root, split_id=split_id)


def test_unequal_viper_cameras_are_named(layouts):
    root, _ = layouts
    os.remove(osp.join(root, "viper", "VIPeR", "cam_b", "003_90.bmp"))
    with pytest.raises(DatasetError, match=r"cam_a' holds 10 \.bmp images and '.*cam_b' 9"):
        _build("viper_10split", root)


def test_a_read_only_cache_serves_a_good_file_and_names_itself_for_a_damaged_one(layouts):
    from readonly import read_only

    root, cache = layouts
    first = _build("cuhk01_10split", root)
    path = _file(cache, "cuhk01_10split")
    with read_only(cache):
        assert _build("cuhk01_10split", root).train == first.train  # read, nothing written
    with open(path, "w") as f:
        f.write("[]")
    with read_only(cache):
        with pytest.raises(DatasetError, match=rf"its split file '{path}' is damaged \(it holds 0 entries, not a list "
                                               rf"of 20 splits\) and cannot be written: the split cache '{cache}' is "
                                               "not writable"):
            _build("cuhk01_10split", root)
    assert sorted(os.listdir(cache)) == [f".{osp.basename(path)}.lock", osp.basename(path)]
