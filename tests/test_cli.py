"""scripts/main.py end to end: training, outputs, kill-and-resume, and every bad input."""
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

from conftest import REPO, model_for, tiny_opts
from readonly import read_only
from torchreid_ext import builders, cli
from torchreid_ext.checkpoint import load_checkpoint
from torchreid_ext.config import ConfigError
from torchreid_ext.data import SynthSpec, generate
from torchreid_ext.data.checks import DatasetNotFound, UnreadableImageError
from torchreid_ext.engines import ImageMetricEngine
from torchreid_ext.run_options import RunOptions


def run_main(argv):
    cfg, args = cli.load_run_config(argv)
    return cli.run(cfg, args.config)


def scalars(save_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(save_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


FINISHED = {"train.max_epoch": 3, "data.workers": 1, "train.deterministic": True, "model.resume": "auto",
            "test.eval_freq": 2}


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """A finished deterministic 3-epoch run, evaluated after epochs 2 and 3: (save_dir, results,
    console output). Tests that change it work on a copy (:func:`copy_run`)."""
    save = str(tmp_path_factory.mktemp("finished") / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = run_main(tiny_opts(data_root, save, **FINISHED))
    return save, results, out.getvalue()


def copy_run(finished, dst):
    shutil.copytree(finished[0], str(dst))
    return str(dst)


def test_train_and_evaluate_writes_all_outputs(finished):
    save, results, out = finished
    res = results["synthreid_small"]
    assert 0.0 <= res["rank1"] <= 1.0 and 0.0 <= res["mAP"] <= 1.0
    for line in ("Rank-1  :", "Rank-5  :", "Rank-10 :", "mAP:"):
        assert line in out
    # one evaluation after epoch 2 (test.eval_freq), the final one after epoch 3
    metrics = json.load(open(osp.join(save, "metrics.json")))
    assert [e["epoch"] for e in metrics["evaluations"]] == [2, 3]
    assert metrics["evaluations"][-1]["results"]["synthreid_small"]["mAP"] == pytest.approx(res["mAP"])
    assert metrics["model"] == "osnet_x0_25" and metrics["train_seconds"] > 0
    assert metrics["max_epoch"] == 3
    tags = scalars(save)
    assert len(tags["Test/synthreid_small/mAP"]) == 2 and "Train/loss" in tags
    assert len(tags["Test/synthreid_small/mINP"]) == 2 and "mINP:" in out
    ckpt = load_checkpoint(osp.join(save, "model", "model.pth.tar-3"))
    assert ckpt["epoch"] == 3 and isinstance(ckpt["rank1"], float)
    # epoch 1's rolling checkpoint was replaced; evaluation epochs keep theirs
    assert sorted(os.listdir(osp.join(save, "model"))) == ["model.pth.tar-2", "model.pth.tar-3"]
    assert glob.glob(osp.join(save, "train.log-*"))
    log = open(glob.glob(osp.join(save, "train.log-*"))[0]).read()
    # our logger's lines, Torchreid's prints and the results: on the console and in the log
    for line in ("Show configuration", "torchreid layout 'pypi'", "Building model: osnet_x0_25", "=> Loading train",
                 "Checked 377 image files: all opened (query and gallery decoded)", "Rank-1  :", "mAP:"):
        assert line in out and line in log, line
    assert sorted(os.listdir(save)) == sorted(["model", "metrics.json", osp.basename(glob.glob(
        osp.join(save, "train.log-*"))[0]), osp.basename(glob.glob(osp.join(save, "events.out.tfevents.*"))[0])])


def final_weights(save_dir, epoch):
    return load_checkpoint(osp.join(save_dir, "model", f"model.pth.tar-{epoch}"))["state_dict"]


def main_cmd(opts):
    return [sys.executable, osp.join(REPO, "scripts", "main.py")] + opts


def test_killed_and_resumed_run_equals_uninterrupted_run(tiny, finished, tmp_path):
    """SIGKILL a 3-epoch run after its epoch-2 checkpoint, resume: same final weights as the
    uninterrupted run (``finished``, same settings)."""
    common = FINISHED
    straight, killed = finished[0], str(tmp_path / "killed")

    # bit-exact equality needs the same thread count as the in-process run (``finished``)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(main_cmd(tiny(save_dir=killed, **common)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt2 = osp.join(killed, "model", "model.pth.tar-2")
    deadline = time.time() + 1800  # a generous bound: the machine may be busy
    while not osp.exists(ckpt2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert osp.exists(ckpt2)
    assert not osp.exists(osp.join(killed, "model", "model.pth.tar-3")), "killed too late"

    # the resume runs in this process, as ``finished`` did (same thread count)
    run_main(tiny(save_dir=killed, **common))
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


def test_existing_checkpoints_are_never_overwritten(tiny, finished, tmp_path):
    save = copy_run(finished, tmp_path / "run")
    before = digest(save)
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*model\.resume auto"):
        run_main(tiny(save_dir=save, **{"train.max_epoch": 3}))
    assert digest(save) == before


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"model.name": "resnet5O"}, ConfigError,
         r"model\.name = 'resnet5O' is unknown; choose one of \[.*'osnet_x1_0'"),
        ({"loss.name": "arcface"}, ConfigError, r"arcface.*softmax.*triplet"),
        ({"data.sources": "[marked1501]"}, KeyError,
         r"data\.sources = 'marked1501' is unknown; choose one of \[.*'market1501'"),
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
    with pytest.raises(builders.PretrainedWeightsUnavailable,
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
    dm = builders.build_datamanager(RunOptions(cfg))
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


def test_scripts_main_accepts_upstream_arguments(data_root, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: osnet_x0_25\n  pretrained: False\n")
    save = str(tmp_path / "run")
    # evaluation only: what is tested is that upstream's arguments reach the run
    opts = ["data.height", "64", "data.width", "32", "data.workers", "0", "data.save_dir", save,
            "train.max_epoch", "1", "train.batch_size", "16", "test.batch_size", "64", "test.evaluate", "True"]
    # scripts/main.py's main, in this process (the script only passes its status to sys.exit; other
    # tests start it: test_killed_and_resumed_run_equals_uninterrupted_run, tests/test_checkpoint.py)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = cli.main(["--config-file", str(cfg), "-s", "synthreid_small", "-t", "synthreid_small",
                     "--transforms", "random_flip", "random_crop", "--root", data_root] + opts)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "Rank-1" in printed.out
    # bad input
    code, err = cli_exit(["--config", str(cfg), "train.lrr", "0.1"], capsys)
    assert code == 2
    assert "error: Unknown config key 'train.lrr' on the command line; did you mean 'train.lr'?" in err
    # overrides swallowed by a multi-value option are caught, not silently ignored
    code, err = cli_exit(["--config", str(cfg), "--transforms", "random_flip", "train.lr", "0.1"], capsys)
    assert code == 2 and "unknown entries ['train.lr', '0.1']" in err
    assert os.listdir(tmp_path) == ["c.yaml", "run"]


def test_build_engine_from_python(tiny, tmp_path):
    cfg, _ = cli.load_run_config(tiny(save_dir=str(tmp_path / "run"), **{"loss.name": "triplet",
                                                                         "loss.triplet.weight_x": 0.5}))
    dm = builders.build_datamanager(RunOptions(cfg))
    model = model_for(cfg, dm.num_train_pids)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = builders.build_engine(cfg, dm, model, opt)
    assert isinstance(engine, ImageMetricEngine)
    assert engine.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.weight_x == 0.5 and list(engine.metric_losses) == ["triplet"]
    summary = engine.forward_backward(next(iter(dm.train_loader)))
    assert {"loss", "loss_x", "loss_t", "acc"} <= set(summary)
    assert summary["loss"] == pytest.approx(0.5 * summary["loss_x"] + summary["loss_t"], rel=1e-5)


def test_fast_and_torchreid_evaluators_agree_inside_the_engine(tiny, finished, tmp_path):
    save = copy_run(finished, tmp_path / "run")
    weights = osp.join(save, "model", "model.pth.tar-3")
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
    assert json.load(open(osp.join(save, "metrics.json")))["evaluations"][0]["epoch"] == 2
    assert osp.exists(osp.join(save, "metrics-test.json"))


def test_evaluate_with_an_upstream_torchreid_checkpoint(tiny, finished, tmp_path):
    """Torchreid's own save_checkpoint pickles numpy scalars; ``model.load_weights`` loads it
    through the safe loader's allowlist (Torchreid's loader would need weights_only=False)."""
    import numpy as np

    from torchreid_ext.adapter import torchreid

    trained = finished[1]["synthreid_small"]
    state = load_checkpoint(osp.join(finished[0], "model", "model.pth.tar-3"))["state_dict"]
    upstream = tmp_path / "upstream"
    torchreid().utils.save_checkpoint({"state_dict": state, "epoch": 1, "rank1": np.float64(0.25)}, str(upstream))
    res = run_main(tiny(save_dir=str(tmp_path / "eval"), **{
        "test.evaluate": True, "model.load_weights": str(upstream / "model.pth.tar-1")}))["synthreid_small"]
    assert res["mAP"] == pytest.approx(trained["mAP"], abs=1e-9)



# ------------------------------------------------------------------ save dir, resume, pre-training checks


def cli_exit(argv, capsys):
    """Run ``cli.main``; return its exit status (0 when it returns) and stderr."""
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def the_log(save, kind="train"):
    logs = glob.glob(osp.join(save, f"{kind}.log-*"))
    assert len(logs) == 1, logs
    return open(logs[0]).read()


def test_resuming_a_finished_run_with_a_smaller_max_epoch_is_refused(tiny, finished, tmp_path, capsys):
    save = copy_run(finished, tmp_path / "copy")
    before = digest(save)
    code, err = cli_exit(tiny(save_dir=save, **{"train.max_epoch": 1, "model.resume": "auto"}), capsys)
    assert code == 2
    assert "the run already finished at epoch 3" in err and "train.max_epoch = 1" in err
    assert "`test.evaluate True`" in err
    assert digest(save) == before


def test_resuming_a_finished_run_with_its_max_epoch_re_evaluates(tiny, finished, tmp_path, capsys):
    """As the quick start says: running a finished config again evaluates it, trains nothing."""
    save = copy_run(finished, tmp_path / "copy")
    weights = final_weights(save, 3)
    res = run_main(tiny(save_dir=save, **{"train.max_epoch": 3, "model.resume": "auto"}))["synthreid_small"]
    out = capsys.readouterr().out
    assert res["mAP"] == pytest.approx(finished[1]["synthreid_small"]["mAP"], abs=1e-9)
    assert "Epoch: [" not in out and "=> Final test" in out
    assert not osp.exists(osp.join(save, "model", "model.pth.tar-4"))
    after = final_weights(save, 3)
    assert all(torch.equal(weights[k], after[k]) for k in weights)


HOLD_LOCK = """
import sys
from torchreid_ext.savedir import SaveDirLock
SaveDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_run_in_a_locked_save_dir_refuses_and_a_dead_runs_lock_is_taken_over(tiny, finished, tmp_path,
                                                                                      capsys):
    """Two processes: one holds the save dir's lock, a run there exits 2 naming its pid. Once
    the holder is killed (-9), a run takes the lock over and removes the temporary files of
    dead processes (only those)."""
    save = copy_run(finished, tmp_path / "copy")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, save], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digest(save)
        argv = tiny(save_dir=save, **{"test.evaluate": True})
        code, err = cli_exit(argv, capsys)  # in this process: the lock is the holder's, another process
        assert code == 2, err[-2000:]
        assert f"is in use by another run (pid {holder.pid} on host" in err
        assert digest(save) == before
    finally:
        holder.kill()
        holder.wait()
    dead_tmp = osp.join(save, "model", f"model.pth.tar-3.tmp-{holder.pid}")
    live_tmp = osp.join(save, "model", f"model.pth.tar-4.tmp-{os.getpid()}")
    for path in (dead_tmp, live_tmp):
        open(path, "w").write("partial")
    assert json.load(open(osp.join(save, "run.lock")))["pid"] == holder.pid  # left behind by the kill
    assert cli_exit(argv, capsys)[0] == 0
    log = the_log(save, "test")
    assert f"Took over the lock in '{save}' left by pid {holder.pid}" in log
    assert f"model.pth.tar-3.tmp-{holder.pid}" in log
    assert not osp.exists(dead_tmp) and osp.exists(live_tmp)
    assert not osp.exists(osp.join(save, "run.lock"))  # released


def test_silencing_the_package_logger_quiets_the_console_not_the_log_file(tiny, tmp_path, capsys):
    save = str(tmp_path / "run")
    logger = logging.getLogger("torchreid_ext")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        run_main(tiny(save_dir=save, **{"test.evaluate": True}))
    finally:
        logger.setLevel(level)
    out, log = capsys.readouterr().out, the_log(save, "test")
    ours = ("Show configuration", "torchreid layout 'pypi'", "Checked ", "Building model", "** Results **",
            "mAP:", "Rank-1  :")
    for line in ours:  # our lines, the results block among them: off the console, in the log file
        assert line not in out and line in log, line
    assert "=> Loading train" in out and "=> Loading train" in log  # Torchreid's own prints: both


def test_a_failed_runs_log_records_the_error(tiny, tmp_path, capsys, monkeypatch):
    """Bad input found once the run has started (here: while training) is the same one line in the
    log file; a bug is its traceback there. Weights that do not fit are found before the log opens
    (tests/test_cli_defects.py): no save dir is left."""
    from torchreid_ext.engines.base import ReIDEngine
    from torchreid_ext.errors import DatasetError

    def bad_input(self, *args, **kwargs):
        raise DatasetError("image 'x.jpg' became unreadable during training")

    monkeypatch.setattr(ReIDEngine, "run", bad_input)
    save = str(tmp_path / "run")
    code, err = cli_exit(tiny(save_dir=save), capsys)
    line = err.strip().replace(" (set TORCHREID_EXT_TRACEBACK=1 for the traceback)", "")
    assert code == 2 and line == "error: image 'x.jpg' became unreadable during training"
    log = the_log(save)
    assert line + "\n" in log and "Traceback" not in log  # the same one line, in the log file too

    def boom(*args, **kwargs):
        raise RuntimeError("boom in the engine")

    monkeypatch.setattr(ReIDEngine, "run", boom)
    save = str(tmp_path / "run2")
    with pytest.raises(RuntimeError, match="boom"):
        cli.train(tiny(save_dir=save))
    log = the_log(save)
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom in the engine" in log


def test_a_full_disk_during_training_is_one_line_and_keeps_earlier_checkpoints(tiny, tmp_path, capsys, monkeypatch):
    """The epoch-2 checkpoint meets a full disk: exit 2, "no space left on device" with the path,
    in the log file too; epoch 1's checkpoint survives and no temp file is left."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = str(tmp_path / "run")
    code, err = cli_exit(tiny(save_dir=run, **{"train.max_epoch": 3}), capsys)
    line = err.strip().replace(" (set TORCHREID_EXT_TRACEBACK=1 for the traceback)", "")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"no space left on device: could not write '.*model\.pth\.tar-2", line), line
    assert line + "\n" in the_log(run) and "Traceback" not in the_log(run)
    assert os.listdir(osp.join(run, "model")) == ["model.pth.tar-1"]
    assert load_checkpoint(osp.join(run, "model", "model.pth.tar-1"))["epoch"] == 1


def test_config_that_is_a_folder(tmp_path, capsys):
    code, err = cli_exit(["--config", str(tmp_path)], capsys)
    assert code == 2 and f"Config file '{tmp_path}' is a folder, not a YAML file" in err


def test_unknown_msgr_stage_fails_before_data_loading(tiny, tmp_path, capsys):
    root, save = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    argv = tiny(save_dir=str(save), **{"data.root": str(root), "msgr.enabled": True, "msgr.stages": "[layer9]"})
    code, err = cli_exit(argv, capsys)
    assert code == 2
    assert "msgr.stages = ['layer9']: MSGR stage 'layer9' is not a submodule of OSNet" in err and "'conv5'" in err
    assert os.listdir(root) == [] and not save.exists()  # synthreid_small was not even generated


@pytest.mark.parametrize("make", ["file", "read_only", "read_only_model"])
def test_unwritable_save_dir_fails_before_anything(tiny, tmp_path, capsys, make):
    save = tmp_path / "run"
    if make == "file":
        save.write_text("not a folder")
        code, err = cli_exit(tiny(save_dir=str(save)), capsys)
        assert code == 2 and "is a file, not a folder" in err
        assert save.read_text() == "not a folder"
        return
    target = save if make == "read_only" else save / "model"
    target.mkdir(parents=True)
    with read_only(target):
        code, err = cli_exit(tiny(save_dir=str(save)), capsys)
    assert code == 2 and f"'{target}' is not writable" in err
    assert os.listdir(save) == ([] if make == "read_only" else ["model"])
    assert make == "read_only" or os.listdir(save / "model") == []


@pytest.fixture(scope="module")
def market_src(tmp_path_factory):
    """A Market-1501 tree under ``<root>/market1501/Market-1501-v15.09.15`` to copy and break."""
    root = tmp_path_factory.mktemp("market-cli")
    generate(str(root / "market1501" / "Market-1501-v15.09.15"),
             SynthSpec(num_train_ids=8, num_test_ids=8, num_distractors=4, num_junk=2, seed=3))
    return root


def files(data_dir, split):
    return sorted(glob.glob(osp.join(data_dir, split, "*.jpg")))


def pid_of(path):
    return int(osp.basename(path).split("_")[0])


def break_empty(d):
    for path in files(d, "query"):
        os.remove(path)
    return f"the split folder '{d}/query' holds no .jpg images"


def break_name(d):
    os.rename(files(d, "bounding_box_test")[5], osp.join(d, "bounding_box_test", "IMG_0042.jpg"))
    return f"the image name '{d}/bounding_box_test/IMG_0042.jpg' does not fit the pattern <pid>_c<camera>"


def break_one_identity(d):
    keep = pid_of(files(d, "bounding_box_train")[0])
    for path in files(d, "bounding_box_train"):
        if pid_of(path) != keep:
            os.remove(path)
    return ("the training set ('market1501' has 1) has 1 identity; training needs at least 2 "
            "for RandomIdentitySampler: train.batch_size / sampler.num_instances = 8 / 4 = 2 identities per batch")


def break_queries(d):
    query_pids = {pid_of(p) for p in files(d, "query")}
    for path in files(d, "bounding_box_test"):
        if pid_of(path) in query_pids:
            os.remove(path)
    return "target dataset 'market1501': none of its 16 queries has a gallery image of the same identity"


def break_gallery_jpeg(d):
    path = files(d, "bounding_box_test")[3]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return f"cannot read image file '{path}': image file is truncated"


@pytest.mark.parametrize("breaker", [break_empty, break_name, break_one_identity, break_queries,
                                     break_gallery_jpeg])
def test_dataset_defects_are_one_line_errors_before_training(tiny, market_src, tmp_path, capsys, breaker):
    root, save = tmp_path / "root", tmp_path / "run"
    shutil.copytree(market_src, root)
    message = breaker(str(root / "market1501" / "Market-1501-v15.09.15"))
    argv = tiny(save_dir=str(save), **{"data.root": str(root), "data.sources": "[market1501]",
                                       "data.targets": "[market1501]", "train.batch_size": 8})
    code, err = cli_exit(argv, capsys)
    assert code == 2 and message in err, err
    assert not save.exists()


def test_header_only_image_check_lets_a_truncated_gallery_jpeg_through(tiny, market_src, tmp_path):
    """``data.image_check header`` is today's check: the truncated file passes it (and would
    fail at the final test); the default decodes query and gallery (test above)."""
    root = tmp_path / "root"
    shutil.copytree(market_src, root)
    break_gallery_jpeg(str(root / "market1501" / "Market-1501-v15.09.15"))
    opts = {"data.root": str(root), "data.sources": "[market1501]", "data.targets": "[market1501]",
            "train.batch_size": 8}
    cfg, _ = cli.load_run_config(tiny(**opts, **{"data.image_check": "header"}))
    assert builders.build_datamanager(RunOptions(cfg)).num_train_pids == 8
    cfg, _ = cli.load_run_config(tiny(**opts))
    with pytest.raises(UnreadableImageError, match="image file is truncated"):
        builders.build_datamanager(RunOptions(cfg))
