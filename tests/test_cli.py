"""scripts/main.py end to end: training, outputs, kill-and-resume, and every bad input."""
import glob
import hashlib
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

from torchreid_ext import cli
from torchreid_ext.checkpoint import load_checkpoint
from torchreid_ext.config import ConfigError
from torchreid_ext.data import SynthSpec, generate
from torchreid_ext.data.checks import DatasetNotFound, UnreadableImageError
from torchreid_ext.engines import ImageMetricEngine, build_engine

from conftest import REPO


def run_main(argv):
    cfg, args = cli.load_run_config(argv)
    return cli.run(cfg, args.config)


def scalars(save_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(save_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_and_evaluate_writes_all_outputs(tiny, tmp_path, capsys):
    save = str(tmp_path / "run")
    results = run_main(tiny(save_dir=save, **{"test.eval_freq": 1, "train.max_epoch": 2}))
    out = capsys.readouterr().out
    res = results["synthreid_small"]
    assert 0.0 <= res["rank1"] <= 1.0 and 0.0 <= res["mAP"] <= 1.0
    for line in ("Rank-1  :", "Rank-5  :", "Rank-10 :", "mAP:"):
        assert line in out
    # one evaluation after epoch 1, the final one after epoch 2
    metrics = json.load(open(osp.join(save, "metrics.json")))
    assert [e["epoch"] for e in metrics["evaluations"]] == [1, 2]
    assert metrics["evaluations"][-1]["results"]["synthreid_small"]["mAP"] == pytest.approx(res["mAP"])
    assert metrics["model"] == "osnet_x0_25" and metrics["train_seconds"] > 0
    assert metrics["max_epoch"] == 2
    tags = scalars(save)
    assert len(tags["Test/synthreid_small/mAP"]) == 2 and "Train/loss" in tags
    assert len(tags["Test/synthreid_small/mINP"]) == 2 and "mINP:" in out
    ckpt = load_checkpoint(osp.join(save, "model", "model.pth.tar-2"))
    assert ckpt["epoch"] == 2 and isinstance(ckpt["rank1"], float)
    assert glob.glob(osp.join(save, "train.log-*"))
    assert "mAP" in open(glob.glob(osp.join(save, "train.log-*"))[0]).read()


def final_weights(save_dir, epoch):
    return load_checkpoint(osp.join(save_dir, "model", f"model.pth.tar-{epoch}"))["state_dict"]


def main_cmd(opts):
    return [sys.executable, osp.join(REPO, "scripts", "main.py")] + opts


def test_killed_and_resumed_run_equals_uninterrupted_run(tiny, tmp_path):
    """SIGKILL a 3-epoch run after its epoch-2 checkpoint, resume: same final weights."""
    common = {"train.max_epoch": 3, "data.workers": 1, "train.deterministic": True,
              "model.resume": "auto", "test.eval_freq": 2}
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(main_cmd(tiny(save_dir=straight, **common)), check=True, capture_output=True)

    proc = subprocess.Popen(main_cmd(tiny(save_dir=killed, **common)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt2 = osp.join(killed, "model", "model.pth.tar-2")
    deadline = time.time() + 300
    while not osp.exists(ckpt2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert osp.exists(ckpt2)
    assert not osp.exists(osp.join(killed, "model", "model.pth.tar-3")), "killed too late"

    subprocess.run(main_cmd(tiny(save_dir=killed, **common)), check=True, capture_output=True)
    a, b = final_weights(straight, 3), final_weights(killed, 3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run kept the evaluation history of the killed one
    hist = json.load(open(osp.join(killed, "metrics.json")))["evaluations"]
    assert [e["epoch"] for e in hist] == [2, 3]


def digest(directory):
    h = hashlib.sha256()
    for p in sorted(glob.glob(osp.join(directory, "**", "*"), recursive=True)):
        if osp.isfile(p):
            h.update(p.encode() + open(p, "rb").read())
    return h.hexdigest()


def test_existing_checkpoints_are_never_overwritten(tiny, tmp_path):
    save = str(tmp_path / "run")
    run_main(tiny(save_dir=save, **{"train.max_epoch": 1}))
    before = digest(save)
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*model\.resume auto"):
        run_main(tiny(save_dir=save, **{"train.max_epoch": 1}))
    assert digest(save) == before


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"model.name": "resnet5O"}, ConfigError, r"resnet5O.*Available models:.*osnet_x1_0"),
        ({"loss.name": "arcface"}, ConfigError, r"arcface.*softmax.*triplet"),
        ({"data.sources": "[marked1501]"}, KeyError, r"marked1501.*Available datasets:.*market1501"),
        ({"sampler.train_sampler": "PKSampler"}, ConfigError, r"PKSampler.*RandomIdentitySampler"),
        ({"train.batch_size": 18}, ConfigError, r"batch_size = 18 is not divisible by .*num_instances = 4"),
        ({"train.optim": "adamw"}, ConfigError, r"adamw.*amsgrad"),
        ({"model.resume": "/nonexistent/model.pth.tar-9"}, FileNotFoundError, r"does not exist"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tiny, tmp_path, overrides, error, pattern):
    save = tmp_path / "run"
    with pytest.raises(error, match=pattern):
        run_main(tiny(save_dir=str(save), **overrides))
    assert not save.exists()


def test_missing_dataset_names_layout_and_downloads_nothing(tiny, tmp_path):
    root, save = tmp_path / "empty-root", tmp_path / "run"
    root.mkdir()
    argv = tiny(save_dir=str(save), **{"data.root": str(root), "data.sources": "[market1501]",
                                       "data.targets": "[market1501]"})
    with pytest.raises(DatasetNotFound, match=r"market1501.*Market-1501-v15\.09\.15/\{bounding_box_train"):
        run_main(argv)
    assert os.listdir(root) == [] and not save.exists()


def test_pretrained_weights_offline_says_where_to_put_them(tiny, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    argv = tiny(save_dir=str(tmp_path / "run"), **{"model.name": "resnet50", "model.pretrained": True})
    with pytest.raises(cli.PretrainedWeightsUnavailable,
                       match=r"torch-home/hub/checkpoints/resnet50-19c8e357\.pth.*model\.pretrained False"):
        run_main(argv)


def test_real_market1501_loader_on_generated_files_and_unreadable_image(tiny, tmp_path):
    """Torchreid's own Market1501 class reads a Market tree made here; a corrupt file is named."""
    root = tmp_path / "root"
    market = root / "market1501" / "Market-1501-v15.09.15"
    counts = generate(str(market), SynthSpec(num_train_ids=8, num_test_ids=8, num_distractors=4,
                                             num_junk=2, seed=3))
    opts = {"data.root": str(root), "data.sources": "[market1501]", "data.targets": "[market1501]",
            "train.batch_size": 8}
    cfg, _ = cli.load_run_config(tiny(save_dir=str(tmp_path / "run"), **opts))
    dm = cli.build_datamanager(cfg)
    assert dm.num_train_pids == 8
    assert len(dm.test_dataset["market1501"]["query"]) == counts["query"]
    bad = sorted(glob.glob(str(market / "bounding_box_train" / "*.jpg")))[3]
    open(bad, "wb").write(b"this is not a jpeg")
    with pytest.raises(UnreadableImageError, match=osp.basename(bad)):
        run_main(tiny(save_dir=str(tmp_path / "run2"), **opts))


def test_torchreid_dataset_reader_raises_instead_of_looping(tmp_path):
    from torchreid_ext.adapter import torchreid

    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(UnreadableImageError, match="0001_c1s1_000001_00.jpg"):
        torchreid().dataset_base.read_image(str(bad))


def test_scripts_main_accepts_upstream_arguments(data_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: osnet_x0_25\n  pretrained: False\n")
    save = str(tmp_path / "run")
    opts = ["data.height", "64", "data.width", "32", "data.workers", "0", "data.save_dir", save,
            "train.max_epoch", "1", "train.batch_size", "16", "test.batch_size", "64"]
    ok = subprocess.run(main_cmd(["--config-file", str(cfg), "-s", "synthreid_small", "-t", "synthreid_small",
                                  "--transforms", "random_flip", "random_crop", "--root", data_root] + opts),
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Rank-1" in ok.stdout
    bad = subprocess.run(main_cmd(["--config", str(cfg), "train.lrr", "0.1"]), capture_output=True, text=True,
                         cwd=tmp_path)
    assert bad.returncode == 2
    assert "error: Unknown config key 'train.lrr' on the command line; did you mean 'train.lr'?" in bad.stderr
    # overrides swallowed by a multi-value option are caught, not silently ignored
    swallowed = subprocess.run(main_cmd(["--config", str(cfg), "--transforms", "random_flip", "train.lr", "0.1"]),
                               capture_output=True, text=True, cwd=tmp_path)
    assert swallowed.returncode == 2 and "unknown entries ['train.lr', '0.1']" in swallowed.stderr
    assert os.listdir(tmp_path) == ["c.yaml", "run"]


def test_build_engine_from_python(tiny, tmp_path):
    cfg, _ = cli.load_run_config(tiny(save_dir=str(tmp_path / "run"), **{"loss.name": "triplet",
                                                                         "loss.triplet.weight_x": 0.5}))
    dm = cli.build_datamanager(cfg)
    model = cli.build_model(cfg, dm.num_train_pids)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = build_engine(cfg, dm, model, opt)
    assert isinstance(engine, ImageMetricEngine)
    assert engine.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.weight_x == 0.5 and list(engine.metric_losses) == ["triplet"]
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert {"loss", "loss_x", "loss_t", "acc"} <= set(summary)
    assert summary["loss"] == pytest.approx(0.5 * summary["loss_x"] + summary["loss_t"], rel=1e-5)


def test_fast_and_torchreid_evaluators_agree_inside_the_engine(tiny, tmp_path):
    save = str(tmp_path / "run")
    run_main(tiny(save_dir=save, **{"train.max_epoch": 1}))
    weights = osp.join(save, "model", "model.pth.tar-1")
    out = {}
    for evaluator in ("fast", "torchreid"):
        for metric in ("euclidean", "cosine"):
            res = run_main(tiny(save_dir=save, **{"test.evaluate": True, "model.load_weights": weights,
                                                  "test.evaluator": evaluator, "test.dist_metric": metric}))
            out[evaluator, metric] = res["synthreid_small"]
    for metric in ("euclidean", "cosine"):
        fast, ref = out["fast", metric], out["torchreid", metric]
        assert fast["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
        assert fast["cmc"] == pytest.approx(ref["cmc"], abs=1e-6)
        assert fast["mINP"] is not None and ref["mINP"] is None
    # evaluation-only runs write their own record and leave the training record alone
    assert json.load(open(osp.join(save, "metrics.json")))["evaluations"][0]["epoch"] == 1
    assert osp.exists(osp.join(save, "metrics-test.json"))


def test_evaluate_with_an_upstream_torchreid_checkpoint(tiny, tmp_path):
    """Torchreid's own save_checkpoint pickles numpy scalars; ``model.load_weights`` loads it
    through the safe loader's allowlist (Torchreid's loader would need weights_only=False)."""
    import numpy as np

    from torchreid_ext.adapter import torchreid

    save = str(tmp_path / "run")
    trained = run_main(tiny(save_dir=save, **{"train.max_epoch": 1}))["synthreid_small"]
    state = load_checkpoint(osp.join(save, "model", "model.pth.tar-1"))["state_dict"]
    upstream = tmp_path / "upstream"
    torchreid().utils.save_checkpoint({"state_dict": state, "epoch": 1, "rank1": np.float64(0.25)}, str(upstream))
    res = run_main(tiny(save_dir=str(tmp_path / "eval"), **{
        "test.evaluate": True, "model.load_weights": str(upstream / "model.pth.tar-1")}))["synthreid_small"]
    assert res["mAP"] == pytest.approx(trained["mAP"], abs=1e-9)
