"""scripts/compare.py: runs in one harness, report equal to metrics.json, no retraining, bad input."""
import csv
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
from PIL import Image

from torchreid_ext.config import load_config
from torchreid_ext.experiments import compare as compare_mod
from torchreid_ext.experiments import HarnessError, method_label, plan_runs, published_for
from torchreid_ext.experiments.compare import compare

from conftest import REPO, tiny_opts

A = "model:\n  name: osnet_x0_25\nloss:\n  name: softmax\n"
B = "model:\n  name: osnet_x0_25\nloss:\n  name: drsl\n"


def harness_opts(root, **overrides):
    """tiny_opts for every run, without the keys the harness sets or each config chooses."""
    opts = tiny_opts(root, "unused", **{"train.max_epoch": 1, **overrides})
    pairs = dict(zip(opts[0::2], opts[1::2]))
    del pairs["data.save_dir"], pairs["model.name"]
    return [x for kv in pairs.items() for x in kv]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("compare")
    configs = [write(d / "a.yaml", A), write(d / "b.yaml", B)]
    out = str(d / "out")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # children: no thread oversubscription on 2 cores
    paths = compare(configs, out, harness_opts(data_root))
    return configs, out, paths


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_results(save_dir):
    metrics = json.load(open(osp.join(save_dir, "metrics.json")))
    final = [e for e in metrics["evaluations"] if e["epoch"] == 1]
    assert len(final) == 1
    return metrics, final[0]["results"]


def test_csv_and_markdown_equal_each_runs_metrics_json(compared):
    configs, out, paths = compared
    rows = read_csv(paths["csv"])
    assert [r["config"] for r in rows] == configs
    assert [r["method"] for r in rows] == ["osnet_x0_25 softmax", "osnet_x0_25 drsl"]
    md = open(paths["md"]).read()
    for row in rows:
        metrics, results = final_results(row["save_dir"])
        res = results[row["dataset"]]
        assert row["dataset"] == "synthreid_small" and int(row["epoch"]) == 1
        for key in ("rank1", "rank5", "mAP", "mINP"):
            assert float(row[key]) == res[key], key
        for key in ("params", "macs"):
            assert int(row[key]) == metrics[key], key
        assert float(row["train_seconds"]) == metrics["train_seconds"] > 0
        assert row["paper_rank1"] == row["paper_mAP"] == ""  # nothing published on synthetic data
        line = next(ln for ln in md.splitlines() if row["method"] in ln)
        assert f"| {100 * res['rank1']:.1f} | {100 * res['mAP']:.1f} | {100 * res['mINP']:.1f} |" in line
    # the two runs are distinct save dirs under the output folder
    assert len({r["save_dir"] for r in rows}) == 2
    assert all(r["save_dir"].startswith(osp.join(out, "runs")) for r in rows)


def test_png_is_a_real_plot(compared):
    path = compared[2]["png"]
    assert osp.getsize(path) > 5000
    with Image.open(path) as im:
        im.load()
        assert im.width >= 300 and im.height >= 300
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # bars, text, axes: not a blank canvas


def test_rerun_does_not_retrain(compared, data_root, monkeypatch, capsys):
    configs, out, paths = compared
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(osp.join(out, "runs", "*", "model", "*"))}
    assert len(before) == 2

    def no_launch(run):
        raise AssertionError(f"finished run {run.name} was launched again")

    monkeypatch.setattr(compare_mod, "launch", no_launch)
    again = compare(configs, out, harness_opts(data_root))
    printed = capsys.readouterr().out
    a, b = (r["name"] for r in read_csv(paths["csv"]))
    assert re.match(r"a-[0-9a-f]{8}$", a)  # config outside the cwd: stem + path hash
    assert f"1/2 {a}: finished, not rerun" in printed and f"2/2 {b}: finished, not rerun" in printed
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert read_csv(again["csv"]) == read_csv(paths["csv"])


def test_finished_save_dir_is_accepted_alone(compared, tmp_path):
    configs, out, paths = compared
    first = read_csv(paths["csv"])[0]
    only = compare([first["save_dir"]], str(tmp_path / "again"))
    row = read_csv(only["csv"])[0]
    for key in ("rank1", "mAP", "mINP", "params", "method"):
        assert row[key] == first[key]


def test_bare_save_dir_uses_the_max_epoch_its_metrics_record(tmp_path):
    """A save dir without run.json is finished only with an evaluation at its recorded max_epoch."""
    from torchreid_ext.experiments.runs import Run, final_epoch, is_finished

    def evaluation(epoch, mAP):
        return {"epoch": epoch, "results": {"synthreid": {"rank1": mAP, "mAP": mAP}}}

    run = Run(name="bare", save_dir=str(tmp_path))
    metrics = {"max_epoch": 3, "evaluations": [evaluation(1, 0.1)]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert final_epoch(run, metrics) == 3 and not is_finished(run)
    metrics["evaluations"].append(evaluation(3, 0.3))
    metrics["evaluations"].append(evaluation(2, 0.2))  # e.g. a later test-only pass at another epoch
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert is_finished(run)
    from torchreid_ext.experiments.report import _final_evaluation
    assert _final_evaluation(run, metrics)["epoch"] == 3


def test_save_dir_made_with_other_overrides_is_refused(compared, data_root):
    configs, out, _ = compared
    with pytest.raises(HarnessError, match=r"holds a run of config .*a\.yaml.*another --out"):
        plan_runs(configs, out, harness_opts(data_root, **{"train.max_epoch": 2}))


def test_run_spec_is_recorded_and_runs_go_through_main_py(compared):
    configs, out, paths = compared
    save_dir = read_csv(paths["csv"])[0]["save_dir"]
    spec = json.load(open(osp.join(save_dir, "run.json")))
    assert spec["config"] == osp.abspath(configs[0])
    assert "train.max_epoch" in spec["overrides"] and "data.save_dir" not in spec["overrides"]
    assert glob.glob(osp.join(save_dir, "train.log-*"))  # written by scripts/main.py
    metrics = json.load(open(osp.join(save_dir, "metrics.json")))
    # the config lies outside the child's cwd (the repo): recorded as an absolute path
    assert metrics["config"] == osp.abspath(configs[0]) and metrics["max_epoch"] == 1


@pytest.mark.parametrize(
    "make, overrides, pattern",
    [
        (lambda d: [str(d / "missing.yaml")], [], r"missing\.yaml' does not exist"),
        (lambda d: [str(d / "empty_dir")], [], r"empty_dir' has no metrics\.json.*pass the config file"),
        (lambda d: [write(d / "notes.txt", "x")], [], r"notes\.txt' is neither a config file"),
        (lambda d: [write(d / "a.yaml", A)], ["train.max_epoch"], r"KEY VALUE pairs"),
        (lambda d: [write(d / "a.yaml", A)], ["data.save_dir", "x"], r"data\.save_dir.*set per run"),
        (lambda d: [write(d / "a.yaml", A)], ["train.max_epoc", "1"], r"a\.yaml.*train\.max_epoc.*train\.max_epoch"),
        (lambda d: [write(d / "a.yaml", A), write(d / "s.yaml", A + "train:\n  seed: 7\n")], [],
         r"runs differ in train\.seed .*add `train\.seed <value>`"),
        (lambda d: [write(d / "a.yaml", A)] * 2, [], r"given twice"),
        (lambda d: [write(d / "m.yaml", A + "data:\n  sources: [market1501]\n  targets: [market1501]\n")],
         [], r"m\.yaml.*market1501"),
    ],
)
def test_bad_input_fails_before_any_run(make, overrides, pattern, tmp_path, data_root):
    (tmp_path / "empty_dir").mkdir()
    inputs = make(tmp_path)
    opts = overrides if overrides and len(overrides) % 2 else overrides + ["data.root", str(tmp_path / "root")]
    out = tmp_path / "out"
    with pytest.raises(HarnessError, match=pattern):
        compare(inputs, str(out), opts)
    assert not out.exists()


def test_script_prints_one_line_error_and_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, osp.join(REPO, "scripts", "compare.py"), str(tmp_path / "nope.yaml"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: input") and "nope.yaml" in proc.stderr


def test_published_numbers_and_labels():
    assert method_label("msfl_resnet50", "softmax", True) == "+MSGR (MSFL+MSGR)"
    assert published_for("+MSGR (MSFL+MSGR)", "market1501")[:2] == (93.7, 83.6)
    assert published_for("R50", "msmt17")[:2] == (None, 38.9)
    assert published_for("R50", "cuhk03", cuhk03_detected_new=False) is None
    assert published_for("R50+DRSL", "market1501") is None  # our formulation: nothing published
    # an MSFL ablation variant is not the Table IV row of its model
    assert method_label("resnet50_bnfc512", "softmax", False, variant=True) != "R50"


@pytest.mark.parametrize("dataset", ["dukemtmcreid", "msmt17", "cuhk03"])
def test_config_comments_match_the_published_table(dataset):
    """Each per-dataset leaf's first line quotes the numbers the table in code holds."""
    for path in sorted(glob.glob(osp.join(REPO, "configs", dataset, "*.yaml"))):
        first = open(path).readline()
        cfg = load_config(path)
        assert list(cfg.data.targets) == [dataset]
        label = method_label(cfg.model.name, cfg.loss.name, cfg.msgr.enabled)
        paper = published_for(label, dataset, not cfg.cuhk03.labeled_images and not cfg.cuhk03.classic_split)
        both = re.search(r"(\d+\.\d+) / (\d+\.\d+)", first)
        only_map = re.search(r"mAP (\d+\.\d+) \(rank-1 not given\)", first)
        if both:
            assert paper[:2] == (float(both[1]), float(both[2])), path
        elif only_map:
            assert paper[:2] == (None, float(only_map[1])), path
        else:
            assert "no published number" in first and paper is None, path


def test_readme_shows_an_existing_comparison_png():
    readme = open(osp.join(REPO, "README.md")).read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    assert "docs/compare_synthreid.png" in links
    with Image.open(osp.join(REPO, "docs", "compare_synthreid.png")) as im:
        im.load()
        assert im.width >= 300 and im.height >= 300
