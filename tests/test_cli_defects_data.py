"""Issue 31's data cases through the command lines: the split cache (4), dataset files (5),
decompression bombs (6), huge ids (7), encodings (9), list datasets (13), and a folder given as a
dataset file (12). Each bad input is one line on stderr, exit status 2, no traceback, no new or
partial file, and the error comes before any training or extraction (the approach of
tests/test_cli_defects.py, whose command table this reuses)."""
import glob
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np
import pytest
from PIL import Image
from test_cli_defects import MAINS, WORK_STARTED

from conftest import png_declaring, tiny_opts
from deploy.deploy_fixtures import checkpoints, one_thread  # noqa: F401
from readonly import read_only


def _image(path: str, value: int = 100) -> str:
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not osp.exists(path):
        Image.new("RGB", (16, 32), (value, 60, 60)).save(path)
    return path


# A list dataset that trains and evaluates: 4 training ids (2 cameras x 2 images), 2 test ids.
GOOD_ROWS = ([(f"train/{p}_{c}_{i}.jpg", p, c, "train") for p in (1, 2, 3, 4) for c in (0, 1) for i in (0, 1)]
             + [(f"query/{p}_0.jpg", p, 0, "query") for p in (11, 12)]
             + [(f"gallery/{p}_1.jpg", p, 1, "gallery") for p in (11, 12)])


@dataclass
class Env:
    root: str  # everything a case may write goes here (snapshotted)
    data: str  # data the case makes before running (outside root)
    weights: str

    def dataset(self, name: str, rows=GOOD_ROWS, spec: str = "", list_text: bytes = b"",
                make: Sequence[str] = ()) -> str:
        """A list dataset ``name`` under data/<name> (its images made, ``make``: other files to make)
        and its dataset file; returns the dataset file's path."""
        folder = osp.join(self.data, name)
        for rel, pid, _, _ in rows:
            target = osp.normpath(osp.join(folder, rel))
            if not rel.endswith(".png"):
                _image(target, 10 * (int(pid) % 20) if str(pid).isdigit() else 100)
        for rel in make:
            _image(osp.normpath(osp.join(folder, rel)))
        os.makedirs(folder, exist_ok=True)
        with open(osp.join(folder, "list.csv"), "wb") as f:
            f.write(list_text or ("path,pid,camid,split\n" + "".join(f"{r},{p},{c},{s}\n" for r, p, c, s in rows))
                    .encode())
        spec_file = osp.join(self.data, f"{name}.yaml")
        with open(spec_file, "w") as f:
            f.write(spec or f"name: {name}\nfolder: {name}\nlist: list.csv\n")
        return spec_file

    def run_opts(self, name: str, spec_file: str, **overrides) -> list:
        return tiny_opts(self.data, osp.join(self.root, "run"), **{
            "data.custom_datasets": f"[{spec_file}]", "data.sources": f"[{name}]", "data.targets": f"[{name}]",
            "train.max_epoch": 1, **overrides})

    def extract(self, *args, **overrides) -> list:
        return ["--weights", self.weights, *args, "--out", osp.join(self.root, "f.h5"),
                *tiny_opts(self.data, osp.join(self.root, "run"), **overrides)]

    def file(self, name: str, data: bytes) -> str:
        path = osp.join(self.data, name)
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path


@pytest.fixture
def env(checkpoints, tmp_path):
    root, data = tmp_path / "work", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    return Env(str(root), str(data), checkpoints("osnet_x0_25"))


def run_refused(cli: str, argv: Sequence[str], root: str, needles: Sequence[str], capsys) -> str:
    """Run command ``cli`` and assert the refusal rules; returns the error line."""
    capsys.readouterr()
    before = sorted(os.walk(root))
    status = MAINS[cli](list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err
    assert WORK_STARTED[cli] not in out and "Extracting" not in out  # refused before any long work
    assert sorted(os.walk(root)) == before  # no new or partial file (no save dir, no train.log)
    return lines[0]


@dataclass
class Case:
    name: str
    cli: str
    argv: Callable[[Env], Sequence[str]]
    needles: Callable[[Env], Tuple[str, ...]]


def _spec_case(name: str, key_text: str, *needles: str) -> Case:
    """A dataset file whose keys are ``key_text`` (a YAML mapping's lines)."""
    def argv(e: Env):
        spec = e.file(f"spec-{name}.yaml", key_text.encode())
        e.dataset("t5_ok")
        return e.run_opts("t5_ok", spec)

    return Case(f"5-{name}", "main", argv, lambda e: (f"dataset file '{osp.join(e.data, f'spec-{name}.yaml')}': ",
                                                      *needles))


def _folder_as_dataset_file(e: Env):
    folder = osp.join(e.data, "folder.yaml")
    os.makedirs(folder)
    return e.run_opts("t12", folder)




def _taken(name: str) -> Case:
    def argv(e: Env):
        return e.run_opts(name, e.dataset(f"t5_{name}", spec=f"name: {name}\nfolder: t5_{name}\nlist: list.csv\n"))

    return Case(f"5-name-{name}", "main", argv, lambda e: (f"t5_{name}.yaml", f"name: '{name}' is taken by",
                                                            "choose another name"))


def _two_files(e: Env):
    a = e.dataset("t5_twin_a", spec="name: t5_twin\nfolder: t5_twin_a\nlist: list.csv\n")
    b = e.dataset("t5_twin_b", spec="name: t5_twin\nfolder: t5_twin_b\nlist: list.csv\n")
    return tiny_opts(e.data, osp.join(e.root, "run"), **{"data.custom_datasets": f"[{a}, {b}]",
                                                         "data.sources": "[t5_twin]", "data.targets": "[t5_twin]"})


def _rows(**changes):
    """GOOD_ROWS with rows replaced ({index: row}) or added (key 'add': [rows])."""
    rows = list(GOOD_ROWS)
    for i, row in changes.items():
        if i != "add":
            rows[int(i[1:])] = row
    return rows + list(changes.get("add", []))


def _list_case(name: str, rows, *needles: str, cli: str = "main") -> Case:
    dataset = f"t_{name.replace('-', '_')}"

    def argv(e: Env):
        spec = e.dataset(dataset, rows=rows)
        if cli == "extract":
            return e.extract("--dataset", dataset, "--split", "query", **{"data.custom_datasets": f"[{spec}]"})
        return e.run_opts(dataset, spec)

    return Case(name, cli, argv, lambda e: tuple(n.format(list=osp.join(e.data, dataset, "list.csv")) for n in needles))


def _bomb_in_list(name: str, split: str, cli: str = "main") -> Case:
    rows = GOOD_ROWS + [(f"{split}/bomb.png", 11 if split != "train" else 1, 1 if split == "gallery" else 0, split)]
    dataset = f"t6_{name.replace('-', '_')}"

    def argv(e: Env):
        e.file(f"{dataset}/{split}/bomb.png", png_declaring(60000, 60000))
        spec = e.dataset(dataset, rows=rows)
        if cli == "extract":
            return e.extract("--dataset", dataset, "--split", split, **{"data.custom_datasets": f"[{spec}]"})
        return e.run_opts(dataset, spec)

    return Case(name, cli, argv, lambda e: (f"'{osp.join(e.data, dataset, split, 'bomb.png')}' declares 60000x60000",
                                            "data.max_image_side = 4096"))


def _bomb_folder(e: Env):
    _image(osp.join(e.data, "crops", "a.jpg"))
    e.file("crops/sub/bomb.png", png_declaring(60000, 60000))
    return e.extract("--images", osp.join(e.data, "crops"))


def _bomb_check_image(e: Env):
    bomb = e.file("check/bomb.png", png_declaring(60000, 60000))
    return ["--weights", e.weights, "--format", "torchscript", "--out", osp.join(e.root, "m.pt"),
            "--check-image", bomb, *tiny_opts(e.data, osp.join(e.root, "run"))]


LATIN1 = "caf\u00e9".encode("latin-1")
HEAD = "name: t5_ok\nfolder: t5_ok\nlist: list.csv\n"

CASES = [
    # 5: dataset files
    *[_taken(name) for name in ("market1501", "cuhk03_pair1", "synthreid", "viper_10split")],
    Case("5-two-files-one-name", "main", _two_files, lambda e: ("t5_twin_a.yaml", "t5_twin_b.yaml",
                                                                 "both have name: 't5_twin'")),
    _spec_case("camid_map-text", f"{HEAD}camid_map: {{a: x}}\n", "camid_map: {'a': 'x'} is not allowed",
               "an integer camera id"),
    _spec_case("camid_map-list", f"{HEAD}camid_map: [1, 2]\n", "camid_map: [1, 2] is not allowed", "a mapping"),
    _spec_case("query_cameras-scalar", f"{HEAD}query_cameras: 5\n", "query_cameras: 5 is not allowed",
               "a list of integer camera ids"),
    _spec_case("query_cameras-text", f"{HEAD}query_cameras: [a]\n", "query_cameras: ['a'] is not allowed"),
    _spec_case("name-int", "name: 123\nfolder: t5_ok\nlist: list.csv\n", "name: 123 is not allowed",
               "a non-empty string"),
    _spec_case("name-list", "name: [a]\nfolder: t5_ok\nlist: list.csv\n", "name: ['a'] is not allowed"),
    _spec_case("name-empty", "name: ''\nfolder: t5_ok\nlist: list.csv\n", "name: '' is not allowed"),
    _spec_case("folder-list", "name: t5_ok\nfolder: [my]\nlist: list.csv\n", "folder: ['my'] is not allowed"),
    _spec_case("split_map-text", f"{HEAD}split_map: x\n", "split_map: 'x' is not allowed",
               "one of ['train', 'query', 'gallery', 'test']"),
    Case("5-not-utf8", "main", lambda e: e.run_opts("t5_ok", e.file("latin1.yaml", b"name: t5_ok\nfolder: t5_ok\n"
                                                                    b"list: list.csv\ndescription: " + LATIN1 + b"\n")),
         lambda e: ("dataset file '", "latin1.yaml' is not UTF-8 text (byte 0xe9 on line 4)")),
    # 12: a folder given as a dataset file
    Case("12-dataset-file-is-a-folder", "main", _folder_as_dataset_file,
         lambda e: (f"dataset file '{osp.join(e.data, 'folder.yaml')}' is a folder, not a file",)),
    # 6: decompression bombs, refused before decoding, naming the file
    _bomb_in_list("6-bomb-in-query", "query"),
    _bomb_in_list("6-bomb-in-gallery", "gallery"),
    _bomb_in_list("6-bomb-in-train", "train"),
    _bomb_in_list("6-bomb-in-extract-dataset", "query", cli="extract"),
    Case("6-bomb-in-images-folder", "extract", _bomb_folder,
         lambda e: (f"'{osp.join(e.data, 'crops', 'sub', 'bomb.png')}' declares 60000x60000",)),
    Case("6-bomb-as-check-image", "export", _bomb_check_image,
         lambda e: (f"'{osp.join(e.data, 'check', 'bomb.png')}' declares 60000x60000",)),
    # 7: ids outside int64, refused when the list is read
    _list_case("7-huge-pid", _rows(r16=("query/11_0.jpg", 10 ** 29, 0, "query")),
               "{list}:18: pid 100000000000000000000000000000 is outside the int64 range"),
    _list_case("7-huge-camid", _rows(r18=("gallery/11_1.jpg", 11, 10 ** 23, "gallery")),
               "{list}:20: camid 100000000000000000000000 is outside the int64 range"),
    _list_case("7-huge-pid-extract", _rows(r16=("query/11_0.jpg", 10 ** 29, 0, "query")),
               "{list}:18: pid 100000000000000000000000000000 is outside", cli="extract"),
    # 9: encodings
    Case("9-config-not-utf8", "main", lambda e: ["--config", e.file("latin1-config.yaml", b"# " + LATIN1 + b"\n"),
                                                 *tiny_opts(e.data, osp.join(e.root, "run"))],
         lambda e: ("Config file '", "latin1-config.yaml' is not UTF-8 text (byte 0xe9 on line 1)")),
    Case("9-list-not-utf8", "main",
         lambda e: e.run_opts("t9_latin1", e.dataset("t9_latin1", list_text=b"path,pid,camid,split\n"
                                                                          b"train/" + LATIN1 + b".jpg,1,0,train\n")),
         lambda e: (f"list file '{osp.join(e.data, 't9_latin1', 'list.csv')}' is not UTF-8 text "
                    "(byte 0xe9 on line 2)",)),
    # 13: lists naming one image twice, or images outside the folder
    _list_case("13-duplicate-row", _rows(add=[GOOD_ROWS[3]]),
               "{list}:22: the image 'train/1_1_1.jpg' repeats the row at {list}:5"),
    _list_case("13-train-and-gallery", _rows(add=[("train/3_0_0.jpg", 101, 1, "gallery")]),
               "{list}:22: the image 'train/3_0_0.jpg' is in gallery (pid 101) here and in train (pid 3) at {list}:10"),
    _list_case("13-two-pids", _rows(add=[("train/3_0_0.jpg", 4, 0, "train")]),
               "{list}:22: the image 'train/3_0_0.jpg' is listed under pid 4 here and under pid 3 at {list}:10"),
    _list_case("13-outside-the-folder", _rows(add=[("../elsewhere/1_0.jpg", 1, 0, "train")]),
               "{list}:22: the image '../elsewhere/1_0.jpg' is outside the dataset folder", "allow_outside: true"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_data_is_one_line_exit_2_before_work_and_nothing_written(case, env, capsys):
    argv = list(case.argv(env))
    run_refused(case.cli, argv, env.root, case.needles(env), capsys)


# ---------------------------------------------------------------------------
# 4: the split cache of viper_10split
# ---------------------------------------------------------------------------
def fake_viper(root: str, persons: int = 8) -> str:
    """VIPeR's layout with ``persons`` tiny pairs (cam_a / cam_b); returns the data root."""
    for cam in ("a", "b"):
        for i in range(persons):
            _image(osp.join(root, "viper", "VIPeR", f"cam_{cam}", f"{i:03d}_{45 if cam == 'a' else 90}.bmp"), 20 * i)
    return root


def _viper_opts(env: Env, **overrides):
    return tiny_opts(env.data, osp.join(env.root, "run"), **{
        "data.sources": "[viper_10split]", "data.targets": "[viper_10split]", "train.max_epoch": 1,
        "train.batch_size": 8, "sampler.num_instances": 2, **overrides})


def _split_file(cache: str) -> str:
    files = glob.glob(osp.join(cache, "splits", "viper_10split-*.json"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("cli", ["main", "extract"])
def test_a_read_only_split_cache_is_one_line_naming_it(cli, env, capsys, monkeypatch):
    fake_viper(env.data)
    cache = osp.join(env.data, "cache")
    os.makedirs(cache)
    monkeypatch.setenv("TORCHREID_EXT_CACHE", cache)
    argv = _viper_opts(env) if cli == "main" else env.extract("--dataset", "viper_10split", "--split", "query")
    with read_only(cache):
        line = run_refused(cli, argv, env.root, ("dataset 'viper_10split': its split file", "is missing and cannot "
                                                 f"be written: the split cache '{osp.join(cache, 'splits')}' is not "
                                                 "writable", "TORCHREID_EXT_CACHE"), capsys)
    assert os.listdir(cache) == [], line


def _shift_train_ids(splits):
    for split in splits:
        for item in split["train"]:
            item[1] += 1
    return splits


@pytest.mark.parametrize("cli", ["main", "extract"])
def test_a_damaged_split_file_is_drawn_again_with_a_warning_before_any_work(cli, env, capsys, monkeypatch):
    """Shifted training ids failed with an IndexError after training had started (main), and
    extraction used the file silently; now both warn and use a fresh draw."""
    fake_viper(env.data)
    cache = osp.join(env.data, "cache")
    monkeypatch.setenv("TORCHREID_EXT_CACHE", cache)
    from torchreid_ext.adapter import torchreid

    torchreid().datasets.init_image_dataset("viper_10split", root=env.data, mode="train", verbose=False)
    path = _split_file(cache)
    fresh = json.load(open(path))
    json.dump(_shift_train_ids(json.load(open(path))), open(path, "w"))
    capsys.readouterr()
    argv = _viper_opts(env) if cli == "main" else env.extract("--dataset", "viper_10split", "--split", "query")
    status = MAINS[cli](argv)
    out, err = capsys.readouterr()
    assert status == 0 and "Traceback" not in out + err, err
    warning = f"the split file '{path}' is damaged (split 0: the training pids are not 0..num_train_pids-1"
    assert warning in out and out.index(warning) < out.index(WORK_STARTED[cli])
    assert json.load(open(path)) == fresh


def _build_viper(root: str, go, results) -> None:
    """A forked process: wait for ``go``, build viper_10split, report its sizes or its error."""
    from torchreid_ext.adapter import torchreid

    go.wait(60)
    try:
        ds = torchreid().datasets.init_image_dataset("viper_10split", root=root, mode="train", verbose=False)
        results.put((len(ds.train), len(ds.query)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put(repr(exc))


def test_runs_starting_together_with_an_empty_cache_all_succeed(env, tmp_path, monkeypatch):
    """Three processes (forked: no second import of torch) released at once on an empty cache: one
    draws, the others wait for its lock and read its file; before, one crashed in 2 of 3 trials."""
    import multiprocessing

    fake_viper(env.data, persons=40)
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("TORCHREID_EXT_CACHE", cache)
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_build_viper, args=(env.data, go, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    go.set()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert got == [(40, 20)] * 3 and [p.exitcode for p in procs] == [0, 0, 0]
    path = _split_file(cache)
    from torchreid_ext.data.real import _viper_persons, split_problem

    class Layout:
        cam_a_dir = osp.join(env.data, "viper", "VIPeR", "cam_a")
        cam_b_dir = osp.join(env.data, "viper", "VIPeR", "cam_b")

    assert split_problem(json.load(open(path)), _viper_persons(Layout)) is None
    assert [n for n in os.listdir(osp.dirname(path)) if ".tmp-" in n] == []


# ---------------------------------------------------------------------------
# 9 and 13: what is accepted
# ---------------------------------------------------------------------------
def test_an_excel_csv_with_a_byte_order_mark_trains(env, capsys):
    text = "path,pid,camid,split\n" + "".join(f"{r},{p},{c},{s}\n" for r, p, c, s in GOOD_ROWS)
    spec = env.dataset("t9_bom", list_text=b"\xef\xbb\xbf" + text.encode())
    from torchreid_ext.data.image_list import load_items, load_spec_file

    items = load_items(load_spec_file(spec), env.data)
    assert len(items.train) == 16 and len(items.query) == len(items.gallery) == 2


def test_allow_outside_lets_a_list_name_images_outside_its_folder(env):
    from torchreid_ext.data.image_list import load_items, load_spec_file

    rows = _rows(add=[("../shared_crops/1_0.jpg", 1, 0, "train")])
    spec = env.dataset("t13_outside", rows=rows, spec="name: t13_outside\nfolder: t13_outside\nlist: list.csv\n"
                                                       "allow_outside: true\n")
    items = load_items(load_spec_file(spec), env.data)
    assert osp.join(env.data, "shared_crops", "1_0.jpg") in {p for p, _, _ in items.train}


def test_evaluate_warns_when_the_gallery_is_a_link_to_the_query_file(env, capsys):
    from torchreid_ext.config import load_config
    from torchreid_ext.deploy import FeatureSet, save_features
    from torchreid_ext.deploy.commands import evaluate_main

    cfg = load_config(None, tiny_opts(env.data, osp.join(env.root, "run")))
    rng = np.random.default_rng(0)
    query = osp.join(env.data, "q.h5")
    save_features(FeatureSet(features=rng.standard_normal((6, 8)), paths=[f"{i}.jpg" for i in range(6)],
                             pids=[0, 0, 1, 1, 2, 2], camids=[0, 1, 0, 1, 0, 1], model_name="osnet_x0_25",
                             config=cfg.dump(), meta={"weights": "w", "weights_sha256": "0" * 64}), query)
    link = osp.join(env.data, "g.h5")
    os.symlink(query, link)
    capsys.readouterr()
    assert evaluate_main(["--query", query, "--gallery", link, "--no-write"]) == 0
    out = capsys.readouterr().out
    assert f"the same file '{query}' (also as '{link}') is given as query and gallery" in out
