"""Bad input to extract / evaluate / export: exit 2, one line naming the problem, nothing written."""
import os
import os.path as osp
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO, tiny_opts
from deploy_fixtures import SUBPROCESS_ENV, checkpoints, listing, one_thread, query_images  # noqa: F401
from torchreid_ext.deploy.commands import evaluate_main, export_main, extract_main


@pytest.fixture
def env(data_root, tmp_path, checkpoints, query_images):
    """Paths for one case: an empty output folder, weights, images and the tiny overrides."""
    out = tmp_path / "out"
    out.mkdir()
    return {"out": out, "opts": tiny_opts(data_root, str(tmp_path / "log")), "tmp": tmp_path,
            "osnet": checkpoints("osnet_x0_25"), "msfl": checkpoints("msfl_resnet50"), "image": query_images[0]}


def _fails(main, argv, capsys, *needles, out=None):
    """``main(argv)`` exits 2 with one error line containing every needle; ``out`` stays empty."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    if out is not None:
        assert listing(str(out)) == []
    return lines[0]


def _extract(env, *args, model=None):
    """extract argv: ``args`` (options), then the tiny overrides (and ``model.name model``)."""
    name = ["model.name", model] if model else []
    return ["--dataset", "synthreid_small", "--split", "query", "--out", str(env["out"] / "f.h5"), *args,
            *env["opts"], *name]


def _export(env, *args, fmt="onnx", model=None):
    name = ["model.name", model] if model else []
    return ["--format", fmt, "--out", str(env["out"] / "m.onnx"), "--check-image", env["image"], *args,
            *env["opts"], *name]


# ------------------------------------------------------------------ weights

@pytest.mark.parametrize("main,argv", [(extract_main, _extract), (export_main, _export)])
def test_missing_weights_file(main, argv, env, capsys):
    missing = str(env["tmp"] / "nope.pth.tar")
    _fails(main, argv(env, "--weights", missing), capsys, "does not exist", missing, out=env["out"])


@pytest.mark.parametrize("main,argv", [(extract_main, _extract), (export_main, _export)])
def test_weights_of_another_model_name_the_model_and_the_first_key(main, argv, env, capsys):
    # msfl_resnet50's file holds every resnet50_bnfc512 tensor plus its pyramid: refused, not half-used
    line = _fails(main, argv(env, "--weights", env["msfl"], model="resnet50_bnfc512"), capsys,
                  "resnet50_bnfc512", "'neck.lateral.", out=env["out"])
    assert env["msfl"] in line
    # nothing of an OSNet fits a ResNet: MSFL's backbone check names the backbone and its first key
    _fails(main, argv(env, "--weights", env["osnet"], model="msfl_resnet50"), capsys,
           "msfl_resnet50", "its resnet50 backbone: 0 of", "first missing 'conv1.weight'",
           "weights of another backbone", out=env["out"])
    # a model without that check names the file's first key
    _fails(main, argv(env, "--weights", env["msfl"], model="osnet_x0_25"), capsys,
           "osnet_x0_25", "first mismatching key 'conv1.weight'", out=env["out"])


def test_weights_missing_a_tensor_name_it(env, capsys, tmp_path):
    from torchreid_ext.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(env["osnet"])["state_dict"]
    del state["conv5.bn.running_var"]
    partial = save_checkpoint({"state_dict": state}, str(tmp_path / "partial.pth.tar"))
    _fails(extract_main, _extract(env, "--weights", partial), capsys, "osnet_x0_25", "'conv5.bn.running_var'",
           "absent from the file", out=env["out"])


def _malicious_checkpoint(path, marker):
    """A checkpoint whose unpickling runs ``touch marker``."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Payload()}, path)
    with zipfile.ZipFile(path) as z:  # the pickle really calls os.system
        assert any(b"system" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))


@pytest.mark.parametrize("script", ["extract.py", "export.py"])
def test_a_malicious_checkpoint_runs_no_code_even_when_torch_is_told_to_trust_files(script, env):
    marker = env["tmp"] / "code-ran"
    weights = env["tmp"] / "evil.pth.tar"
    _malicious_checkpoint(weights, marker)
    argv = (_extract if script == "extract.py" else _export)(env, "--weights", str(weights))
    proc = subprocess.run([sys.executable, osp.join(REPO, "scripts", script), *argv], capture_output=True, text=True,
                          timeout=600, env={**SUBPROCESS_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Refusing to load" in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists() and listing(str(env["out"])) == []


# ------------------------------------------------------------------ images and dataset

def test_empty_image_folder(env, capsys):
    folder = env["tmp"] / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    _fails(extract_main, ["--images", str(folder), "--out", str(env["out"] / "f.h5"), "--weights", env["osnet"],
                          *env["opts"]], capsys, "holds no image files", str(folder), out=env["out"])


def test_missing_image_folder(env, capsys):
    folder = str(env["tmp"] / "nowhere")
    _fails(extract_main, ["--images", folder, "--out", str(env["out"] / "f.h5"), "--weights", env["osnet"],
                          *env["opts"]], capsys, "does not exist", folder, out=env["out"])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named(damage, env, capsys):
    folder = env["tmp"] / "imgs"
    folder.mkdir()
    good = open(env["image"], "rb").read()
    for i in range(3):
        (folder / f"ok{i}.jpg").write_bytes(good)
    bad = folder / "bad.jpg"
    # garbage: the header check finds it before the model is built; truncated: the header is
    # fine and decoding fails inside a DataLoader worker, raised in the main process
    bad.write_bytes(b"not a jpeg at all" if damage == "garbage" else good[: len(good) // 2])
    argv = ["--images", str(folder), "--out", str(env["out"] / "f.h5"), "--weights", env["osnet"],
            *env["opts"], "data.workers", "1", "test.batch_size", "2"]
    _fails(extract_main, argv, capsys, "cannot read image file", str(bad), out=env["out"])


@pytest.mark.parametrize("argv,needle", [
    (["--split", "probe"], "invalid choice: 'probe'"),
    (["--dataset", "nope_dataset", "--split", "query"], "dataset = 'nope_dataset' is unknown; choose one of ["),
    ([], "--dataset needs --split"),
])
def test_unknown_split_or_dataset(argv, needle, env, capsys):
    base = ["--out", str(env["out"] / "f.h5"), "--weights", env["osnet"]]
    if argv[:1] != ["--dataset"]:
        base += ["--dataset", "synthreid_small"]
    _fails(extract_main, base + argv + env["opts"], capsys, needle, out=env["out"])


def test_python_api_rejects_unknown_split_and_format(env, data_root):
    from torchreid_ext.config import load_config
    from torchreid_ext.deploy import DeployInputError, export_model, extract_features

    cfg = load_config(None, env["opts"])
    with pytest.raises(DeployInputError,
                       match=r"split = 'probe' is not valid; choose one of \['query', 'gallery', 'train'\]"):
        extract_features(cfg, dataset="synthreid_small", split="probe")
    with pytest.raises(DeployInputError, match="split = 'query' goes with dataset"):
        extract_features(cfg, images=str(env["tmp"]), split="query")
    with pytest.raises(DeployInputError,
                       match=r"format = 'tflite' is not valid; choose one of \['onnx', 'torchscript'\]"):
        export_model(cfg, str(env["out"] / "m"), "tflite")
    assert listing(str(env["out"])) == []


# ------------------------------------------------------------------ output paths and formats

@pytest.mark.parametrize("main,argv", [(extract_main, _extract), (export_main, _export)])
def test_output_in_a_missing_folder(main, argv, env, capsys):
    target = env["tmp"] / "no" / "such" / "f.out"
    args = [a if a != str(env["out"] / ("f.h5" if main is extract_main else "m.onnx")) else str(target)
            for a in argv(env, "--weights", env["osnet"])]
    _fails(main, args, capsys, "does not exist", str(env["tmp"] / "no" / "such"))
    assert not (env["tmp"] / "no").exists()


def test_unknown_export_format(env, capsys):
    _fails(export_main, _export(env, "--weights", env["osnet"], fmt="tflite"), capsys, "invalid choice: 'tflite'",
           out=env["out"])


def test_bad_export_size_and_check_image(env, capsys, tmp_path):
    _fails(export_main, _export(env, "--weights", env["osnet"], "--height", "0"), capsys, "height = 0 is not valid",
           out=env["out"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    argv = [a if a != env["image"] else str(bad) for a in _export(env, "--weights", env["osnet"])]
    _fails(export_main, argv, capsys, "cannot read image file", str(bad), out=env["out"])


def test_evaluate_bad_files_and_output(env, capsys, tmp_path):
    missing = str(tmp_path / "q.h5")
    _fails(evaluate_main, ["--query", missing, "--gallery", missing], capsys, "does not exist", missing)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(pickle.dumps("not hdf5"))
    _fails(evaluate_main, ["--query", str(junk), "--gallery", str(junk), "--out", str(env["out"])], capsys,
           "is not an HDF5 file", str(junk), out=env["out"])
