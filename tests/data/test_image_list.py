"""data/image_list.py: a folder + file-name rule, or a CSV / YAML list, as a Torchreid dataset."""
import os
import os.path as osp
import re

import pytest
from PIL import Image

from torchreid_ext import cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.data import ImageListSpec, load_spec_file, register_image_dataset
from torchreid_ext.data.checks import DatasetError
from torchreid_ext.data.image_list import load_items
from torchreid_ext.preflight import check_datasets
from torchreid_ext.run_options import RunOptions

# (split, pid, camera, index): train ids 7 and 9 (relabelled 0, 1), test ids 3 and 5.
ROWS = [("train", 9, 1, 0), ("train", 9, 2, 1), ("train", 7, 1, 0), ("train", 7, 2, 1),
        ("query", 3, 1, 0), ("query", 5, 1, 0),
        ("gallery", 3, 2, 0), ("gallery", 5, 2, 0), ("gallery", 5, 1, 1)]


def _image(path, value=128):
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 32), (value, 0, 0)).save(path)


@pytest.fixture
def crops(tmp_path):
    """``<root>/crops/<split>/<pid>_c<cam>_<i>.jpg`` for ROWS; returns the data root."""
    root = tmp_path / "root"
    for split, pid, cam, i in ROWS:
        _image(str(root / "crops" / split / f"{pid:04d}_c{cam}_{i}.jpg"))
    return str(root)


def _rel(split, pid, cam, i):
    return f"{split}/{pid:04d}_c{cam}_{i}.jpg"


RULE = r"(?P<split>train|query|gallery)/(?P<pid>\d+)_c(?P<camid>\d+)_\d+\.jpg"


def test_folder_rule_gives_torchreid_lists_with_train_relabelled(crops):
    items = load_items(ImageListSpec(name="t_rule", folder="crops", pattern=RULE), crops)
    path = lambda *r: osp.join(crops, "crops", _rel(*r))  # noqa: E731
    # sorted by path: train 0007 before 0009; pid 7 -> label 0, 9 -> 1
    assert items.train == [(path("train", 7, 1, 0), 0, 1), (path("train", 7, 2, 1), 0, 2),
                           (path("train", 9, 1, 0), 1, 1), (path("train", 9, 2, 1), 1, 2)]
    assert items.query == [(path("query", 3, 1, 0), 3, 1), (path("query", 5, 1, 0), 5, 1)]
    assert sorted(items.gallery) == sorted([(path(*r), r[1], r[2]) for r in ROWS if r[0] == "gallery"])
    assert items.num_valid_queries == 2


def test_test_split_is_divided_by_camera(tmp_path):
    root = tmp_path / "root"
    for pid in (1, 2):
        for idx in range(4):  # index 0-1: camera a, 2-3: camera b (as CUHK03 pair 1, in small)
            _image(str(root / "d" / f"{pid:02d}_{idx}.png"))
    spec = ImageListSpec(name="t_cams", folder="d", pattern=r"(?P<pid>\d+)_(?P<camid>\d)\.png",
                         camid_map={"0": 0, "1": 0, "2": 1, "3": 1}, default_split="test", query_cameras=(0,))
    items = load_items(spec, str(root))
    assert items.train == []
    assert [(osp.basename(p), pid, cam) for p, pid, cam in items.query] == [
        ("01_0.png", 1, 0), ("01_1.png", 1, 0), ("02_0.png", 2, 0), ("02_1.png", 2, 0)]
    assert {(osp.basename(p), cam) for p, _, cam in items.gallery} == {
        ("01_2.png", 1), ("01_3.png", 1), ("02_2.png", 1), ("02_3.png", 1)}


def _write_list(crops, name, rows, kind):
    path = osp.join(crops, "crops", name)
    with open(path, "w") as f:
        if kind == "csv":
            f.write("path,pid,camid,split\n")
            f.writelines(f"{r[0]},{r[1]},{r[2]},{r[3]}\n" for r in rows)
        else:
            f.writelines(f"- {{path: '{r[0]}', pid: '{r[1]}', camid: '{r[2]}', split: {r[3]}}}\n" for r in rows)
    return path


@pytest.mark.parametrize("kind", ["csv", "yaml"])
def test_a_list_gives_the_same_dataset_as_the_rule(crops, kind):
    rows = [(_rel(*r), r[1], r[2], r[0]) for r in ROWS]
    _write_list(crops, f"list.{kind}", rows, kind)
    from_list = load_items(ImageListSpec(name="t_list", folder="crops", list_file=f"list.{kind}"), crops)
    from_rule = load_items(ImageListSpec(name="t_rule", folder="crops", pattern=RULE), crops)
    assert sorted(from_list.train) == sorted(from_rule.train)
    assert sorted(from_list.query) == sorted(from_rule.query)
    assert sorted(from_list.gallery) == sorted(from_rule.gallery)


GOOD = [(_rel(*r), r[1], r[2], r[0]) for r in ROWS]


@pytest.mark.parametrize("kind", ["csv", "yaml"])
@pytest.mark.parametrize("case, change, message", [
    ("missing file", {3: ("train/nope.jpg", 7, 2, "train")}, r"{file}:{line}: the image '.*nope\.jpg' does not exist"),
    ("pid not an integer", {3: (_rel("train", 7, 2, 1), "seven", 2, "train")},
     r"{file}:{line}: pid 'seven' is not an integer"),
    ("camera missing", {3: (_rel("train", 7, 2, 1), 7, "", "train")}, r"{file}:{line}: camid is missing"),
    ("unknown split", {3: (_rel("train", 7, 2, 1), 7, 2, "val")},
     r"{file}:{line}: image .* has split 'val'; choose one of"),
])
def test_a_bad_row_names_the_file_and_line(crops, kind, case, change, message):
    rows = [change.get(i, r) for i, r in enumerate(GOOD)]
    path = _write_list(crops, f"bad.{kind}", rows, kind)
    line = 5 if kind == "csv" else 4  # row 3 (0-based): after the csv header, or a yaml line per row
    with pytest.raises(DatasetError, match=message.format(file=re.escape(path), line=line)) as err:
        load_items(ImageListSpec(name="t_bad", folder="crops", list_file=f"bad.{kind}"), crops)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case, rows, message", [
    ("empty query", [r for r in GOOD if r[3] != "query"], r"the query split is empty in .*empty\.csv"),
    ("empty gallery", [r for r in GOOD if r[3] != "gallery"], r"the gallery split is empty in .*empty\.csv"),
    ("no cross-camera match", [r for r in GOOD if not (r[3] == "gallery" and r[2] == 2)],
     r"none of its 2 queries has a gallery image of the same identity from another camera \(.*empty\.csv\)"),
    ("a pid in train and test", [r if i != 0 else (r[0], 3, r[2], r[3]) for i, r in enumerate(GOOD)],
     r"empty\.csv:2: pid 3 is in both train and test"),
])
def test_a_bad_dataset_names_the_file(crops, case, rows, message):
    _write_list(crops, "empty.csv", rows, "csv")
    with pytest.raises(DatasetError, match=message):
        load_items(ImageListSpec(name="t_bad", folder="crops", list_file="empty.csv"), crops)


def test_independently_numbered_splits_may_share_pids(crops):
    rows = [r if i != 0 else (r[0], 3, r[2], r[3]) for i, r in enumerate(GOOD)]
    _write_list(crops, "indep.csv", rows, "csv")
    items = load_items(ImageListSpec(name="t_indep", folder="crops", list_file="indep.csv", independent_ids=True),
                       crops)
    assert sorted({pid for _, pid, _ in items.train}) == [0, 1, 2]  # 3, 7, 9 relabelled


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="exactly one of pattern"):
        ImageListSpec(name="x", folder="f")
    with pytest.raises(ValueError, match="no named group 'camid'"):
        ImageListSpec(name="x", folder="f", pattern=r"(?P<pid>\d+)\.jpg")
    with pytest.raises(ValueError, match="split 'dev'"):
        ImageListSpec(name="x", folder="f", pattern=RULE, default_split="dev")


def test_an_image_outside_the_rule_is_named(crops):
    _image(osp.join(crops, "crops", "train", "stray.jpg"))
    with pytest.raises(DatasetError, match=r"stray\.jpg' does not fit the file-name rule"):
        load_items(ImageListSpec(name="t_rule", folder="crops", pattern=RULE), crops)


def test_registered_dataset_runs_in_torchreids_data_manager(crops):
    register_image_dataset(ImageListSpec(name="t_registered", folder="crops", pattern=RULE))
    register_image_dataset(ImageListSpec(name="t_registered", folder="crops", pattern=RULE))  # harmless
    with pytest.raises(ValueError, match="already defined"):
        register_image_dataset(ImageListSpec(name="t_registered", folder="elsewhere", pattern=RULE))
    dm = torchreid().data.ImageDataManager(root=crops, sources="t_registered", height=32, width=16,
                                           batch_size_train=2, workers=0, use_gpu=False)
    assert dm.num_train_pids == 2
    batch = next(iter(dm.train_loader))
    assert tuple(batch["img"].shape) == (2, 3, 32, 16) and set(batch["pid"].tolist()) <= {0, 1}
    assert len(dm.test_dataset["t_registered"]["query"]) == 2


def test_a_dataset_file_in_the_config_is_registered_and_checked(crops, tmp_path):
    rows = [(_rel(*r), r[1], r[2], r[0]) for r in ROWS]
    _write_list(crops, "mine.csv", rows, "csv")
    spec_file = tmp_path / "mine.yaml"
    spec_file.write_text("name: t_from_file\nfolder: crops\nlist: mine.csv\n")
    assert load_spec_file(str(spec_file)) == ImageListSpec(name="t_from_file", folder="crops", list_file="mine.csv")
    cfg, _ = cli.load_run_config(["data.root", crops, "data.custom_datasets", f"[{spec_file}]",
                                  "data.sources", "[t_from_file]", "data.targets", "[t_from_file]"])
    check_datasets(RunOptions(cfg))  # registers, reads and checks the list
    assert "t_from_file" in torchreid().image_datasets()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t_bad_file\nfolder: crops\nlst: mine.csv\n")
    with pytest.raises(DatasetError, match=r"bad\.yaml: unknown key 'lst'"):
        load_spec_file(str(bad))


def test_a_test_only_dataset_is_refused_as_a_source(tmp_path):
    root = tmp_path / "root"
    for pid in (1, 2):
        for idx in range(4):
            _image(str(root / "d" / f"{pid:02d}_{idx}.png"))
    spec_file = tmp_path / "testonly.yaml"
    spec_file.write_text("name: t_test_only\nfolder: d\npattern: '(?P<pid>\\d+)_(?P<camid>\\d)\\.png'\n"
                         "camid_map: {'0': 0, '1': 0, '2': 1, '3': 1}\ndefault_split: test\nquery_cameras: [0]\n")
    cfg, _ = cli.load_run_config(["data.root", str(root), "data.custom_datasets", f"[{spec_file}]",
                                  "data.sources", "[t_test_only]", "data.targets", "[t_test_only]"])
    with pytest.raises(DatasetError, match="'t_test_only', which has no training split"):
        check_datasets(RunOptions(cfg))


def _list_rows(crops, name, rows, spec=None):
    """``rows`` as a CSV list in the crops folder; returns its spec."""
    _write_list(crops, name, rows, "csv")
    return spec or ImageListSpec(name="t_rows", folder="crops", list_file=name)


@pytest.mark.parametrize("pid, ok", [(2 ** 63 - 1, True), (-2 ** 63, True), (2 ** 63, False), (-2 ** 63 - 1, False)])
def test_ids_must_fit_in_int64(crops, pid, ok):
    rows = [r if i != 4 else (r[0], pid, r[2], r[3]) for i, r in enumerate(GOOD)]  # a query's pid
    spec = _list_rows(crops, "ids.csv", rows)
    if ok:
        assert pid in {p for _, p, _ in load_items(spec, crops).query}
    else:
        with pytest.raises(DatasetError, match=rf"ids\.csv:6: pid {pid} is outside the int64 range"):
            load_items(spec, crops)


def test_a_second_name_for_the_same_image_is_a_repeated_row(crops):
    os.symlink(osp.join(crops, "crops", GOOD[0][0]), osp.join(crops, "crops", "train", "alias.jpg"))
    rows = GOOD + [("train/alias.jpg", GOOD[0][1], GOOD[0][2], "train")]
    with pytest.raises(DatasetError, match=r"links\.csv:11: the image 'train/alias\.jpg' repeats the row at "
                                           r".*links\.csv:2"):
        load_items(_list_rows(crops, "links.csv", rows), crops)


def test_an_absolute_path_outside_the_folder_needs_allow_outside(crops, tmp_path):
    outside = str(tmp_path / "elsewhere" / "0007_c3_0.jpg")
    _image(outside)
    rows = GOOD + [(outside, 7, 3, "train")]
    with pytest.raises(DatasetError, match=r"abs\.csv:11: the image '.*elsewhere/0007_c3_0\.jpg' is outside the "
                                           r"dataset folder"):
        load_items(_list_rows(crops, "abs.csv", rows), crops)
    spec = ImageListSpec(name="t_abs", folder="crops", list_file="abs.csv", allow_outside=True)
    assert outside in {p for p, _, _ in load_items(spec, crops).train}
    inside = [r if i != 0 else (osp.join(crops, "crops", r[0]), *r[1:]) for i, r in enumerate(GOOD)]
    assert len(load_items(_list_rows(crops, "abs_in.csv", inside), crops).train) == 4  # absolute, inside: fine


def test_dataset_file_values_are_converted_or_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: t_values\nfolder: crops\nlist: l.csv\ncamid_map: {a: 0, b: '1', 3: 2}\n"
                    "split_map: {val: test}\nquery_cameras: [0, '2']\nindependent_ids: true\nallow_outside: true\n")
    spec = load_spec_file(str(good))
    assert spec.camid_map == {"a": 0, "b": 1, "3": 2} and spec.query_cameras == (0, 2)
    assert spec.split_map == {"val": "test"} and spec.independent_ids and spec.allow_outside
    for text, message in [
        ("camid_map: {a: true}", "camid_map: {'a': True} is not allowed"),
        (f"camid_map: {{a: {2 ** 64}}}", f"camid_map: {{'a': {2 ** 64}}} is not allowed"),
        ("split_map: {val: dev}", "split_map: {'val': 'dev'} is not allowed"),
        ("default_split: [test]", "default_split: ['test'] is not allowed; default_split is one of"),
        ("independent_ids: 'yes'", "independent_ids: 'yes' is not allowed; independent_ids is true or false"),
        ("allow_outside: 1", "allow_outside: 1 is not allowed"),
        ("pattern: 5\nlist: ''", "pattern: 5 is not allowed"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"name: t_values\nfolder: crops\nlist: l.csv\n{text}\n")
        with pytest.raises(DatasetError, match=re.escape(f"dataset file '{bad}': {message}")):
            load_spec_file(str(bad))


def test_the_same_dataset_file_twice_is_harmless_but_a_taken_name_is_named(crops, tmp_path):
    from torchreid_ext.data.image_list import register_dataset_files

    _write_list(crops, "twice.csv", GOOD, "csv")
    spec_file = tmp_path / "twice.yaml"
    spec_file.write_text("name: t_twice\nfolder: crops\nlist: twice.csv\n")
    cfg, _ = cli.load_run_config(["data.root", crops, "data.custom_datasets", f"[{spec_file}, {spec_file}]"])
    register_dataset_files(cfg.data.custom_datasets)
    register_dataset_files(cfg.data.custom_datasets)  # again, as each step of a run does
    assert "t_twice" in torchreid().image_datasets()
    spec_file.write_text("name: t_twice\nfolder: crops\nlist: twice.csv\nindependent_ids: true\n")
    with pytest.raises(DatasetError, match=r"twice\.yaml': name: 't_twice' is taken by the dataset of '.*twice\.yaml', "
                                           "registered earlier in this process with other keys"):
        register_dataset_files(cfg.data.custom_datasets)
