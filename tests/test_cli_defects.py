"""Every command line as a new user and as an attacker uses it: each bad input is one line on stderr,
exit status 2 (130 when interrupted), no traceback, no new or partial file, and the error comes
before any training or extraction."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Sequence, Tuple

import h5py
import numpy as np
import pytest

from conftest import REPO, tiny_opts
from deploy.deploy_fixtures import SUBPROCESS_ENV, checkpoints, one_thread, query_images  # noqa: F401
from readonly import read_only
from torchreid_ext import cli
from torchreid_ext.deploy.commands import evaluate_main, export_main, extract_main
from torchreid_ext.experiments.compare import main as compare_main

MAINS = {"main": cli.main, "extract": extract_main, "evaluate": evaluate_main, "export": export_main,
         "compare": compare_main}
# what each command prints once its long work has begun
WORK_STARTED = {"main": "=> Start training", "extract": "Extracting", "evaluate": "Evaluated",
                "export": "export of", "compare": "running"}


@dataclass
class Env:
    root: str  # everything a case may write goes here
    data: str
    weights: str
    features: dict = field(default_factory=dict)

    def opts(self, **overrides) -> List[str]:
        return tiny_opts(self.data, osp.join(self.root, "run"), **overrides)


@pytest.fixture(scope="module")
def features(data_root, checkpoints, tmp_path_factory):
    """Query, gallery and train features of synthreid_small, extracted with a calibrated OSNet."""
    from torchreid_ext.config import load_config
    from torchreid_ext.deploy import extract_features

    folder = tmp_path_factory.mktemp("features")
    cfg = load_config(None, tiny_opts(data_root, str(folder / "unused")))
    paths = {}
    for split in ("query", "gallery", "train"):
        paths[split] = str(folder / f"{split}.h5")
        extract_features(cfg, paths[split], dataset="synthreid_small", split=split,
                         weights=checkpoints("osnet_x0_25"), progress=False)
    return paths


@pytest.fixture
def env(data_root, checkpoints, features, tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    return Env(str(root), data_root, checkpoints("osnet_x0_25"), features)


def _feature_file(env: Env, name: str, change: Callable[[np.ndarray], np.ndarray]) -> str:
    """A copy of the query features with ``change`` applied to the feature matrix (outside root)."""
    path = osp.join(osp.dirname(env.features["query"]), f"{name}.h5")
    if not osp.exists(path):
        import shutil

        shutil.copy(env.features["query"], path)
        with h5py.File(path, "r+") as f:
            feats = change(f["features"][()])
            for key in ("features", "paths", "pids", "camids"):
                data = f[key][()]
                del f[key]
                if key == "features":
                    f.create_dataset(key, data=feats)
                else:
                    n = feats.shape[0]
                    f.create_dataset(key, data=data[:n], dtype=h5py.string_dtype("utf-8") if key == "paths" else None)
    return path


def _nan(x):
    x = x.copy()
    x[3, 5] = np.nan
    return x


def _text(env, name, text):
    path = osp.join(osp.dirname(env.features["query"]), name)
    with open(path, "wb") as f:
        f.write(text)
    return path


@dataclass
class Case:
    name: str
    cli: str
    argv: Callable[[Env], Sequence[str]]
    needles: Tuple[str, ...]
    status: int = 2


def _extract(env, *args, **overrides):
    return ["--weights", env.weights, "--dataset", "synthreid_small", "--split", "query",
            "--out", osp.join(env.root, "f.h5"), *args, *env.opts(**overrides)]


def _export(env, *args, **overrides):
    return ["--weights", env.weights, "--format", "torchscript", "--out", osp.join(env.root, "m.pt"), *args,
            *env.opts(**overrides)]


def _evaluate(env, *args, query=None, gallery=None):
    return ["--query", query or env.features["query"], "--gallery", gallery or env.features["gallery"],
            "--no-write", *args]


CASES = [
    # 1: absurd image sizes, refused up front
    Case("1-export-size", "export", lambda e: _export(e, "--height", "100000", "--width", "100000"),
         ("height = 100000 is above data.max_image_side = 4096",)),
    Case("1-train-size", "main", lambda e: e.opts(**{"data.height": 100000}),
         ("data.height = 100000 is above data.max_image_side",)),
    Case("1-extract-size", "extract", lambda e: _extract(e, **{"data.height": 100000}),
         ("data.height = 100000 is above data.max_image_side",)),
    Case("1-batch-memory", "main", lambda e: e.opts(**{"data.height": 4096, "data.width": 4096,
                                                       "train.batch_size": 4096, "sampler.num_instances": 4}),
         ("input size 4096x4096 with a batch of 4096 needs", "GiB for the input alone")),
    # 3: test-time options against the data, before training
    Case("3-rerank-k1", "main", lambda e: e.opts(**{"test.rerank": True, "test.rerank_k1": 300}),
         ("target dataset 'synthreid_small'", "test.rerank_k1 = 300")),
    Case("3-aqe-k", "main", lambda e: e.opts(**{"test.aqe": True, "test.aqe_k": 5000}),
         ("target dataset 'synthreid_small'", "test.aqe_k = 5000 exceeds")),
    # 5: saved features that cannot be evaluated
    Case("5-nan", "evaluate", lambda e: _evaluate(e, query=_feature_file(e, "nan", _nan)),
         ("non-finite values (NaN or inf) in 1 of", "row 3")),
    Case("5-empty", "evaluate", lambda e: _evaluate(e, query=_feature_file(e, "empty", lambda x: x[:0])),
         ("hold no rows (0 images)",)),
    Case("5-no-valid-query", "evaluate", lambda e: _evaluate(e, gallery=e.features["train"]),
         ("none of its", "queries has a gallery image of the same identity from another camera")),
    Case("5-rerank-k1", "evaluate", lambda e: _evaluate(e, "test.rerank", "True", "test.rerank_k1", "5000"),
         ("test.rerank_k1 = 5000 needs at least",)),
    Case("5-aqe-k", "evaluate", lambda e: _evaluate(e, "test.aqe", "True", "test.aqe_k", "5000"),
         ("test.aqe_k = 5000 exceeds the number of query + gallery features",)),
    # 6: seeds
    Case("6-seed", "main", lambda e: e.opts(**{"train.seed": -1}), ("train.seed = -1 is not valid",)),
    Case("6-compare-seeds", "compare", lambda e: [osp.join(REPO, "configs", "quickstart.yaml"), "--seeds", "-1",
                                                  "--out", osp.join(e.root, "cmp")],
         ("--seeds -1: a seed is an integer in [0, 2**32 - 1]",)),
    # 7: what a weights file that is not a checkpoint is
    Case("7-text", "extract", lambda e: _extract(e, "--weights", _text(e, "w.txt", b"hello world\n")),
         ("is a text file, not a PyTorch checkpoint (it starts with 'hello world')",)),
    Case("7-yaml-like", "extract", lambda e: _extract(e, "--weights", _text(e, "a.txt", b"a: [1\n")),
         ("is a text file, not a PyTorch checkpoint",)),
    Case("7-random", "extract", lambda e: _extract(e, "--weights", _text(e, "r.bin", bytes(range(256)) * 4)),
         ("is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)",)),
    Case("7-empty", "extract", lambda e: _extract(e, "--weights", _text(e, "empty.pth", b"")),
         ("is empty (0 bytes)",)),
    Case("7-folder", "extract", lambda e: _extract(e, "--weights", osp.dirname(e.features["query"])),
         ("is a folder, not a file",)),
    # 8: an output folder where nothing can be written
    Case("8-proc", "extract", lambda e: _extract(e, "--out", "/proc/x.h5"), ("cannot write in folder '/proc'",)),
    # 11: a corrupt model.load_weights, before anything is written
    Case("11-load-weights", "main", lambda e: e.opts(**{"model.load_weights": _text(e, "bad.pth", b"\x80\x02junk")}),
         ("is a pickle that is not a readable PyTorch checkpoint",)),
    # 12: messages
    Case("12-weights-prefix", "export", lambda e: _export(e, "--weights", _text(e, "w2.txt", b"weights?\n")),
         ("error: Checkpoint '",)),
    Case("12-parent-is-file", "extract", lambda e: _extract(e, "--weights", e.features["query"] + "/w.pth"),
         ("is a file, not a folder",)),
    Case("12-yaml-tab", "main", lambda e: ["--config", _text(e, "tab.yaml", b"model:\n\tname: x\n")],
         ("is not valid YAML", "line 2, column 1", "never tabs")),
    Case("12-yaml-syntax", "main", lambda e: ["--config", _text(e, "syntax.yaml", b"model: {name: [x\n")],
         ("is not valid YAML", "expected ',' or ']'")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_before_work_and_nothing_written(case, env, capsys):
    argv = list(case.argv(env))
    capsys.readouterr()
    before = sorted(os.walk(env.root))
    status = MAINS[case.cli](argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == case.status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err
    assert WORK_STARTED[case.cli] not in out  # refused before any long work
    assert sorted(os.walk(env.root)) == before  # no new or partial file


def test_evaluate_to_a_read_only_folder_is_refused_before_evaluating(env, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        status = evaluate_main(["--query", env.features["query"], "--gallery", env.features["gallery"],
                                "--out", str(ro)])
    out, err = capsys.readouterr()
    assert status == 2 and len(err.strip().splitlines()) == 1 and "cannot write in folder" in err
    assert "Evaluated" not in out and os.listdir(ro) == []


def test_the_weights_file_changing_between_extractions_is_named_once(env, capsys, tmp_path):
    import shutil

    changed = str(tmp_path / "g.h5")
    shutil.copy(env.features["gallery"], changed)
    with h5py.File(changed, "r+") as f:
        f.attrs["weights_sha256"] = "0" * 64  # same file name, other contents
    status = evaluate_main(_evaluate(env, gallery=changed))
    err = capsys.readouterr().err
    assert status == 2 and f"the weights file '{env.weights}' changed between" in err
    assert err.count(env.weights) == 1 and "different files" not in err


def test_same_file_as_query_and_gallery_warns_and_outputs_say_replaced(env, capsys):
    status = evaluate_main(_evaluate(env, gallery=env.features["query"]))
    out, _ = capsys.readouterr()
    assert status == 0 and "the same file" in out and "given as query and gallery" in out
    for _ in range(2):
        assert extract_main(_extract(env)) == 0
    out, _ = capsys.readouterr()
    assert out.count("(replaced the existing file)") == 1


def test_export_without_a_dataset_checks_on_the_random_batch(env, capsys):
    argv = ["--weights", env.weights, "--format", "torchscript", "--out", osp.join(env.root, "m.pt"),
            *env.opts(**{"data.root": osp.join(env.root, "no-data"), "data.targets": "[market1501]"})]
    assert export_main(argv) == 0
    out, _ = capsys.readouterr()
    assert "No real image to check the export with" in out and "checking on the random batch only" in out
    assert osp.isfile(osp.join(env.root, "m.pt")) and not osp.exists(osp.join(env.root, "no-data"))


def test_a_killed_exports_temporary_file_is_removed_by_the_next_export(env, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = osp.join(env.root, f".m.pt.tmp-{dead}")
    open(stale, "wb").write(b"half an export")
    assert export_main(_export(env)) == 0
    assert sorted(os.listdir(env.root)) == ["m.pt"]


def test_ctrl_c_during_extraction_is_one_line_exit_130_and_no_file(env, tmp_path):
    out = tmp_path / "f.h5"
    argv = [sys.executable, osp.join(REPO, "scripts", "extract.py"), *_extract(env, "--out", str(out)),
            "data.height", "512", "data.width", "256", "test.batch_size", "1", "test.flip", "True"]
    # One image a batch, flipped, at 512x256: extraction takes seconds even on a fast machine, and the
    # signal goes as soon as the log says it has begun (a fixed sleep raced a fast extraction).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    started = time.time()
    for line in proc.stdout:  # wait until extraction has begun
        if "Extracting" in line or time.time() - started > 300:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".f.h5")] == []
