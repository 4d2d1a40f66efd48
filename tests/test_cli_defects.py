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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    needles: Tuple[Union[str, Callable[[Env], str]], ...]
    status: int = 2
    setenv: Optional[Callable[[Env], Dict[str, str]]] = None  # environment variables of the run
    check: Optional[Callable[[Env], None]] = None  # more assertions after the run
    absent: Tuple[str, ...] = ()  # what the error line must not say


def _scratch(env: Env, name: str) -> str:
    """A path for this case's own input files: beside the root (outside what must stay unchanged)."""
    return osp.join(osp.dirname(env.root), name)


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a planted weights file does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(env: Env, rel: str) -> Dict[str, str]:
    """A malicious pickle at ``$TORCH_HOME/<rel>`` (a fresh TORCH_HOME); the environment to use it."""
    import torch

    home = _scratch(env, "torch-home")
    os.makedirs(osp.dirname(osp.join(home, rel)), exist_ok=True)
    torch.save({"conv1.weight": _Payload(_scratch(env, "MARKER"))}, osp.join(home, rel))
    return {"TORCH_HOME": home}


def _no_marker(env: Env) -> None:
    assert not osp.exists(_scratch(env, "MARKER")), "the planted pickle ran its code"


def _checkpoint(env: Env, name: str, change: Callable[[dict], dict]) -> str:
    """A copy of the test checkpoint with ``change`` applied to its dict (beside the root)."""
    import torch

    from torchreid_ext.checkpoint import load_checkpoint

    path = _scratch(env, name)
    torch.save(change(load_checkpoint(env.weights)), path)
    return path


CONV1 = "conv1.conv.weight"  # a tensor of OSNet's


def _with_key(ckpt: dict, key, value) -> dict:
    return {**ckpt, key: value}


def _copy(env: Env, source: str, name: str) -> str:
    import shutil

    path = _scratch(env, name)
    shutil.copy(source, path)
    return path


def _fifo(env: Env, name: str) -> str:
    path = osp.join(env.root, name)
    os.mkfifo(path)
    return path


def _symlink(env: Env, name: str) -> str:
    target = _copy(env, env.features["gallery"], "link-target")
    path = osp.join(env.root, name)
    os.symlink(target, path)
    return path


def _still_special(env: Env) -> None:
    """The FIFO / symbolic link of a case is still one, and the link's target is unchanged."""
    import stat

    for name in os.listdir(env.root):
        path = osp.join(env.root, name)
        if name.startswith("fifo"):
            assert stat.S_ISFIFO(os.lstat(path).st_mode)
        if name.startswith("link"):
            assert osp.islink(path) and open(_scratch(env, "link-target"), "rb").read() == open(
                env.features["gallery"], "rb").read()


def _torchscript(env: Env) -> str:
    import torch

    from torchreid_ext.models import build_model

    path = _scratch(env, "model.pt")
    model = build_model("osnet_x0_25", num_classes=2, pretrained=False, use_gpu=False).eval()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 64, 32)), path)
    return path


def _huge_features(env: Env) -> str:
    """An HDF5 file of a few KB declaring features of twice the rows this machine's memory holds."""
    from torchreid_ext.memory import available_memory

    room = available_memory()[0] or 2 ** 34
    rows = 2 * room // (512 * 4) + 1
    path = _copy(env, env.features["query"], "huge.h5")
    with h5py.File(path, "r+") as f:
        del f["features"]
        f.create_dataset("features", shape=(rows, 512), dtype="float32", chunks=(1024, 512))
    assert osp.getsize(path) < 1 << 20
    return path


def _train_batch_over_memory(height: int, width: int) -> int:
    """A training batch (a multiple of 4) whose activations for OSNet-x0.25 at ``height`` x ``width``
    need about twice the available memory (measured: over 500 bytes a pixel when training), while
    the input batch alone stays under a tenth of it."""
    from torchreid_ext.memory import available_memory

    room = available_memory()[0] or 2 ** 34
    return 4 * (2 * room // (250 * height * width * 4) + 1)


def _export_side_over_memory() -> int:
    """An export size (side of a square) at which OSNet-x0.25 inference on the check batch of 3 needs
    about three times the available memory (measured: about 100 bytes a pixel), while the input
    batch alone stays under half the machine's memory."""
    from torchreid_ext.memory import available_memory

    room = available_memory()[0] or 2 ** 34
    return int((room / 100) ** 0.5) + 1


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
    # issue 31, 1: Torchreid's ImageNet loading reads planted pickles through the safe loader
    Case("i31-1-resnet50-hub-cache", "main", lambda e: e.opts(**{"model.name": "resnet50", "model.pretrained": True}),
         ("Refusing to load '", "resnet50-19c8e357.pth': it contains the Python object"),
         setenv=lambda e: _plant(e, "hub/checkpoints/resnet50-19c8e357.pth"), check=_no_marker),
    Case("i31-1-osnet-imagenet-forced", "main", lambda e: e.opts(**{"model.pretrained": True}),
         ("Refusing to load '", "osnet_x0_25_imagenet.pth': it contains the Python object"),
         setenv=lambda e: {**_plant(e, "checkpoints/osnet_x0_25_imagenet.pth"),
                           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, check=_no_marker),
    Case("i31-1-extract-imagenet", "extract",
         lambda e: _extract(e, "--weights", "", **{"model.pretrained": True,
                                                    "data.save_dir": osp.join(e.root, "no-run")}),
         ("Refusing to load '", "osnet_x0_25_imagenet.pth'"),
         setenv=lambda e: _plant(e, "checkpoints/osnet_x0_25_imagenet.pth"), check=_no_marker),
    # 2: outputs never replace a FIFO or a symbolic link
    Case("i31-2-extract-fifo", "extract", lambda e: _extract(e, "--out", _fifo(e, "fifo.h5")),
         ("fifo.h5' is a FIFO (named pipe); only a regular file is ever replaced",), check=_still_special),
    Case("i31-2-extract-fifo-force", "extract", lambda e: _extract(e, "--out", _fifo(e, "fifo.h5"), "--force"),
         ("is a FIFO",), check=_still_special),
    Case("i31-2-extract-symlink", "extract", lambda e: _extract(e, "--out", _symlink(e, "link.h5")),
         ("link.h5' is a symbolic link (to '",), check=_still_special),
    Case("i31-2-export-fifo", "export", lambda e: _export(e, "--out", _fifo(e, "fifo.pt")),
         ("fifo.pt' is a FIFO",), check=_still_special),
    Case("i31-2-export-symlink", "export", lambda e: _export(e, "--out", _symlink(e, "link.pt"), "--force"),
         ("link.pt' is a symbolic link",), check=_still_special),
    # 3: an output that is an input, or an existing file of another kind
    Case("i31-3-extract-out-is-weights", "extract",
         lambda e: (lambda w: _extract(e, "--weights", w, "--out", w, "--force"))(_copy(e, e.weights, "w.pth")),
         ("is also this command's weights file",)),
    Case("i31-3-export-out-is-weights", "export",
         lambda e: (lambda w: _export(e, "--weights", w, "--out", w))(_copy(e, e.weights, "w.pth")),
         ("is also this command's weights file",)),
    Case("i31-3-export-out-is-config", "export",
         lambda e: (lambda c: ["--config", c, *_export(e, "--out", c)])(
             _text(e, "c.yaml", b"model:\n  name: osnet_x0_25\n")),
         ("is also this command's --config",)),
    Case("i31-3-extract-over-checkpoint", "extract",
         lambda e: _extract(e, "--out", _copy(e, e.weights, "other.pth")),
         ("exists and is not an HDF5 file", "--force to replace it")),
    Case("i31-3-extract-over-text", "extract", lambda e: _extract(e, "--out", _text(e, "notes.txt", b"notes\n")),
         ("exists and is not an HDF5 file",)),
    Case("i31-3-export-over-checkpoint", "export", lambda e: _export(e, "--out", _copy(e, e.weights, "other.pth")),
         ("exists and is not an ONNX or TorchScript file",)),
    # 8: saved features declaring a shape larger than memory
    Case("i31-8-huge-features", "evaluate", lambda e: _evaluate(e, query=_huge_features(e)),
         ("huge.h5' declares features (", "reading it needs at least")),
    # 10: crafted checkpoint contents, refused when read, before any training
    Case("i31-10-int-key-load-weights", "main",
         lambda e: e.opts(**{"model.load_weights": _checkpoint(
             e, "k.pth", lambda c: _with_key(c, "state_dict", {**c["state_dict"], 5: c["state_dict"][CONV1]}))}),
         ("k.pth': its 'state_dict' has the key 5 (int)",)),
    Case("i31-10-int-key-weights", "extract",
         lambda e: _extract(e, "--weights", _checkpoint(e, "k.pth", lambda c: {1: c["state_dict"][CONV1]})),
         ("k.pth': it has the key 1 (int)",)),
    Case("i31-10-int-key-resume", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(
             e, "k.pth", lambda c: _with_key(c, "state_dict", {7: c["state_dict"][CONV1]}))}),
         ("k.pth': its 'state_dict' has the key 7 (int)",)),
    Case("i31-10-epoch-text", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "e.pth", lambda c: _with_key(c, "epoch", "abc"))}),
         ("e.pth': 'epoch' = 'abc' is not valid; expected the number of finished epochs",)),
    Case("i31-10-epoch-negative", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "e.pth", lambda c: _with_key(c, "epoch", -5))}),
         ("'epoch' = -5 is not valid",)),
    Case("i31-10-optimizer", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "o.pth", lambda c: _with_key(c, "optimizer", {"bad": 1}))}),
         ("'optimizer' = {'bad': 1} is not valid; expected an optimizer's state dict",)),
    Case("i31-10-rng", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "r.pth", lambda c: _with_key(c, "rng", {"python": 1}))}),
         ("'rng' = {'python': 1} is not a saved RNG state",)),
    Case("i31-10-rng-values", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "r.pth", lambda c: _with_key(
             c, "rng", {"python": 1, "numpy": {}, "torch": 2}))}),
         ("is not a saved RNG state: it does not restore",)),
    # 11: the memory bound counts activations, before any work
    Case("i31-11-train-activations", "main",
         lambda e: e.opts(**{"data.height": 1024, "data.width": 512,
                             "train.batch_size": _train_batch_over_memory(1024, 512)}),
         ("training 'osnet_x0_25' at 1024x512 with train.batch_size", "needs at least", "training activations",
          "lower data.height / data.width or train.batch_size")),
    Case("i31-11-export-activations", "export",
         lambda e: (lambda side: _export(e, "--height", str(side), "--width", str(side),
                                         **{"data.max_image_side": side}))(_export_side_over_memory()),
         ("export of 'osnet_x0_25' at", "needs at least", "inference activations", "lower --height / --width")),
    # 12: messages and leftovers
    Case("i31-12-load-weights-no-fit", "main",
         lambda e: e.opts(**{"model.load_weights": _checkpoint(
             e, "n.pth", lambda c: {"head.weight": c["state_dict"][CONV1]})}),
         ("does not fit model 'osnet_x0_25': no tensor matches",)),
    Case("i31-12-resume-no-fit", "main",
         lambda e: e.opts(**{"model.resume": _checkpoint(e, "n.pth", lambda c: _with_key(
             c, "state_dict", {"x." + k: v for k, v in c["state_dict"].items()}))}),
         ("does not fit this model (OSNet):", "tensors are missing from the file", "entries are not in the model")),
    Case("i31-12-torchscript-weights", "extract", lambda e: _extract(e, "--weights", _torchscript(e)),
         ("model.pt' is a TorchScript module",), absent=("weights_only",)),
    Case("i31-12-evaluate-out-is-file", "evaluate",
         lambda e: ["--query", e.features["query"], "--gallery", e.features["gallery"], "--out", e.features["train"]],
         (lambda e: f"output folder '{e.features['train']}' is a file, not a folder",)),
    Case("i31-12-query-is-folder", "evaluate", lambda e: _evaluate(e, query=osp.dirname(e.features["query"])),
         ("is a folder, not a file",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_before_work_and_nothing_written(case, env, capsys, monkeypatch):
    argv = list(case.argv(env))
    for key, value in (case.setenv(env) if case.setenv else {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    before = sorted(os.walk(env.root))
    status = MAINS[case.cli](argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == case.status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in case.needles:
        needle = needle(env) if callable(needle) else needle
        assert needle in lines[0], (needle, lines[0])
    for needle in case.absent:
        assert needle not in lines[0], (needle, lines[0])
    assert len(lines[0]) < 1200, lines[0]
    assert "Traceback" not in out + err
    assert WORK_STARTED[case.cli] not in out  # refused before any long work
    assert sorted(os.walk(env.root)) == before  # no new or partial file
    if case.check:
        case.check(env)


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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_during_extraction_is_one_line_exit_130_and_no_file(env, tmp_path):
    out = tmp_path / "f.h5"
    argv = [sys.executable, osp.join(REPO, "scripts", "extract.py"), *_extract(env, "--out", str(out)),
            "data.height", "512", "data.width", "256", "test.batch_size", "1", "test.flip", "True"]
    # One image a batch, flipped, at 512x256: extraction takes seconds even on a fast machine, and the
    # signal goes as soon as the log says it has begun (a fixed sleep raced a fast extraction).
    # The child gets SIGINT's default action and an unblocked mask whatever the test worker's are (a
    # disposition of SIG_IGN is inherited through exec, and Python then installs no handler of its own).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV,
                            preexec_fn=_default_sigint)
    started, begun = time.time(), False
    for line in proc.stdout:  # wait until extraction has begun
        begun = "Extracting" in line
        if begun or time.time() - started > 300:
            break
    proc.send_signal(signal.SIGINT)
    printed, err = proc.communicate(timeout=300)
    assert begun, f"the signal was not sent during extraction: no 'Extracting' line came ({printed!r})"
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".f.h5")] == []


# ------------------------------------------------------------------ issue 31: what still works, and the pieces


@pytest.mark.parametrize("name, rel, first", [
    ("resnet50", "hub/checkpoints/resnet50-19c8e357.pth", "conv1.weight"),  # model_zoo.load_url
    ("osnet_x0_25", "checkpoints/osnet_x0_25_imagenet.pth", "conv1.conv.weight"),  # torch.load
])
def test_torchreids_imagenet_files_still_load_through_the_safe_loader(name, rel, first, tmp_path, monkeypatch):
    """A genuine weights file in the cache is loaded (every tensor the model has), with the loaders
    rebound; and with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set, as that does not change the safe loader."""
    import torch

    from torchreid_ext.models import build_model

    torch.manual_seed(3)
    reference = build_model(name, num_classes=5, pretrained=False, use_gpu=False).state_dict()
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    torch.save({k: v for k, v in reference.items() if not k.startswith("classifier.")}, path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.manual_seed(4)
    model = build_model(name, num_classes=5, pretrained=True, use_gpu=False)
    loaded = model.state_dict()
    assert torch.equal(loaded[first], reference[first])
    assert all(torch.equal(loaded[k], v) for k, v in reference.items() if not k.startswith("classifier."))


def test_force_replaces_a_regular_file_of_another_kind(env, capsys):
    notes = osp.join(env.root, "notes.txt")
    open(notes, "w").write("notes\n")
    assert extract_main(_extract(env, "--out", notes, "--force")) == 0
    assert h5py.is_hdf5(notes)
    assert export_main(_export(env, "--out", notes, "--force")) == 0  # an HDF5 file is not an export either
    from torchreid_ext.deploy.export import is_export_file

    assert is_export_file(notes) and sorted(os.listdir(env.root)) == ["notes.txt"]
    assert export_main(_export(env, "--out", notes)) == 0  # an earlier export is replaced without --force


def test_atomic_output_never_replaces_a_link_that_appears_while_writing(tmp_path):
    """The check before the rename: a symbolic link put at the path during the write stays, and the
    temporary file goes."""
    from torchreid_ext.errors import OutputPathError
    from torchreid_ext.files import atomic_output

    target = tmp_path / "target"
    target.write_text("keep")
    out = tmp_path / "out.bin"
    with pytest.raises(OutputPathError, match=r"out.bin' is a symbolic link \(to '.*target'\)"):
        with atomic_output(str(out)) as tmp:
            open(tmp, "wb").write(b"new")
            os.symlink(target, out)
    assert out.is_symlink() and target.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["out.bin", "target"]


def test_an_allocator_failure_becomes_one_error_naming_what_to_lower():
    import torch

    from torchreid_ext.console import error_line
    from torchreid_ext.errors import MemoryLimitError
    from torchreid_ext.memory import allocation_failures

    with pytest.raises(MemoryLimitError) as info:
        with allocation_failures("extraction at 64x32", "test.batch_size"):
            torch.empty(2 ** 62, dtype=torch.uint8)  # a real allocation the CPU allocator refuses
    line = error_line(info.value)
    assert line.startswith("error: extraction at 64x32 ran out of memory") and line.endswith("; lower test.batch_size")
    with pytest.raises(ValueError):  # anything else passes through
        with allocation_failures("x", "y"):
            raise ValueError("not memory")


def test_forward_peak_counts_the_storages_alive_at_once():
    """Against the count by hand for conv -> ReLU: the input, the convolution's output and the ReLU's
    are alive together (inference); training keeps more (saved tensors, gradients)."""
    import torch

    from torchreid_ext.memory import forward_peak_bytes

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    b, h, w = 5, 64, 32
    image, feature = b * 3 * h * w * 4, b * 8 * h * w * 4
    assert forward_peak_bytes(model, b, h, w, train=False) == image + 2 * feature
    with torch.device("meta"):
        inplace = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True))
    assert forward_peak_bytes(inplace, b, h, w, train=False) == image + feature
    assert forward_peak_bytes(model, b, h, w, train=True) > image + 2 * feature
