"""data/checks.py: split-folder scans, training identities, valid queries, image decoding."""
import glob
import os
import os.path as osp
import shutil

import pytest
from PIL import Image

from conftest import png_declaring
from torchreid_ext.data import SynthSpec, generate
from torchreid_ext.data.checks import (
    DatasetError,
    UnreadableImageError,
    check_images,
    check_queries,
    check_train_identities,
    read_image,
    scan_image_folders,
)

SPLITS = ("bounding_box_train", "query", "bounding_box_test")


@pytest.fixture(scope="module")
def market_tree(tmp_path_factory):
    """A Market-1501 tree (8 train + 8 test identities) to copy and break."""
    root = tmp_path_factory.mktemp("market-src")
    counts = generate(str(root / "market1501" / "Market-1501-v15.09.15"),
                      SynthSpec(num_train_ids=8, num_test_ids=8, num_distractors=4, num_junk=2, seed=3))
    return root, counts


@pytest.fixture
def market(market_tree, tmp_path):
    """A fresh copy: ``(root, data_dir)``."""
    root = tmp_path / "root"
    shutil.copytree(market_tree[0], root)
    return str(root), str(root / "market1501" / "Market-1501-v15.09.15")


def test_scan_counts_identities_per_split(market):
    root, data_dir = market
    scan = scan_image_folders("market1501", root)
    assert scan.data_dir == data_dir
    for split in SPLITS:  # against the file names themselves
        names = [osp.basename(p) for p in glob.glob(osp.join(data_dir, split, "*.jpg"))]
        assert scan.pids[split] == {int(n.split("_")[0]) for n in names} - {-1}
    assert len(scan.train_pids) == 8
    assert scan_image_folders("synthreid", root) is None  # not a folder-layout dataset


@pytest.mark.parametrize("split", SPLITS)
def test_scan_refuses_an_empty_split_folder(market, split):
    root, data_dir = market
    for path in glob.glob(osp.join(data_dir, split, "*")):
        os.remove(path)
    with pytest.raises(DatasetError, match=rf"'market1501'.*{split}' holds no \.jpg images"):
        scan_image_folders("market1501", root)


@pytest.mark.parametrize("name, pattern", [
    ("person.jpg", r"does not fit the pattern <pid>_c<camera>.*0002_c1s1_000451_03\.jpg"),
    ("1600_c1s1_000001_00.jpg", r"gives pid 1600 and camera 1; .*0 <= pid <= 1501"),
    ("0001_c7s1_000001_00.jpg", r"gives pid 1 and camera 7; .*1 <= camera <= 6"),
])
def test_scan_names_a_file_that_does_not_parse(market, name, pattern):
    root, data_dir = market
    src = sorted(glob.glob(osp.join(data_dir, "query", "*.jpg")))[0]
    os.rename(src, osp.join(data_dir, "query", name))
    with pytest.raises(DatasetError, match=pattern) as err:
        scan_image_folders("market1501", root)
    assert name in str(err.value)


def test_train_identities(market):
    root, data_dir = market
    scan = scan_image_folders("market1501", root)
    assert check_train_identities([scan], 8) == 8
    with pytest.raises(DatasetError, match=r"'market1501' has 8\) has 8 identities; training needs at least 9 "
                                           r"because P"):
        check_train_identities([scan], 9, " because P")
    assert check_train_identities([scan, scan], 16) == 16  # sources are concatenated
    # combineall adds the test identities (8), not the distractors (0)
    assert check_train_identities([scan], 16, combineall=True) == 16


def item(pid, cam):
    return (f"{pid}_{cam}.jpg", pid, cam, 0)


def test_check_queries_counts_queries_with_a_cross_camera_match():
    gallery = [item(1, 0), item(1, 1), item(2, 0), item(0, 3)]
    assert check_queries("t", [item(1, 0), item(2, 1), item(2, 0), item(3, 1)], gallery) == 2
    with pytest.raises(DatasetError, match=r"target dataset 'tgt': none of its 2 queries"):
        check_queries("tgt", [item(2, 0), item(3, 1)], gallery)  # same camera only / absent


def write_truncated_jpeg(path, size=(64, 128)):
    Image.effect_noise(size, 64).convert("RGB").save(path, quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_header_check_misses_a_truncated_jpeg_that_decoding_finds(tmp_path):
    good = []
    for i in range(70):  # > 64: the threaded path
        good.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", (64, 128), (i, 2 * i, 3 * i)).save(good[-1])
    bad = str(tmp_path / "truncated.jpg")
    write_truncated_jpeg(bad)
    paths = good[:40] + [bad] + good[40:]
    assert check_images(paths) == 71  # the header is intact
    for workers in (1, 4):
        with pytest.raises(UnreadableImageError, match=r"truncated\.jpg.*truncated"):
            check_images(paths, decode=True, workers=workers)
    assert check_images(paths[:5], decode=True) == 5  # the unthreaded path
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        check_images([bad], decode=True)
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        read_image(bad)  # what Torchreid's loader would meet during the final test


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "webp", "tif"])
@pytest.mark.parametrize("size", [(16, 32), (301, 7)])
def test_declared_size_is_the_size_pil_decodes(tmp_path, ext, size):
    from torchreid_ext.data.checks import declared_size

    path = str(tmp_path / f"x.{ext}")
    Image.new("RGB", size, (1, 2, 3)).save(path)
    with Image.open(path) as img:
        img.load()
        assert declared_size(path) == img.size == size
    text = tmp_path / "x.txt"
    text.write_text("not an image")
    assert declared_size(str(text)) is None


def test_a_side_over_the_limit_is_refused_unread_and_the_limit_is_inclusive(tmp_path):
    from torchreid_ext.data.checks import open_image, set_max_image_side

    path = str(tmp_path / "wide.png")
    Image.new("RGB", (40, 20)).save(path)
    assert open_image(path, max_side=40).size == (40, 20)
    with pytest.raises(UnreadableImageError, match=r"wide\.png' declares 40x20 pixels, above data.max_image_side = 39"):
        open_image(path, max_side=39)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(60000, 60000))
    for check in (lambda p: read_image(p), lambda p: check_images([p]), lambda p: check_images([p], decode=True)):
        with pytest.raises(UnreadableImageError, match=r"bomb\.png' declares 60000x60000 pixels, above data"):
            check(str(bomb))
    # Torchreid's ImageDataset reads through ours (plugin.py), with the run's limit
    from torchreid_ext.adapter import torchreid

    try:
        set_max_image_side(39)
        with pytest.raises(UnreadableImageError, match=r"above data.max_image_side = 39"):
            torchreid().dataset_base.read_image(path)
    finally:
        set_max_image_side(4096)
    assert torchreid().dataset_base.read_image(path).size == (40, 20)


def test_a_limit_raised_past_pils_own_bomb_check_still_gives_one_clear_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(60000, 60000))
    with pytest.raises(UnreadableImageError, match=r"cannot read image file '.*bomb\.png'.*decompression bomb"):
        read_image(str(bomb), max_side=100000)  # PIL's DecompressionBombError, named
