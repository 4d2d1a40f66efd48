"""scripts/compare.py: runs in one harness, report equal to metrics.json, no retraining, bad input."""
import contextlib
import csv
import glob
import io
import json
import os
import os.path as osp
import re

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from conftest import REPO, tiny_opts
from torchreid_ext.config import load_config
from torchreid_ext.experiments import HarnessError, method_label, plan_runs, published_for
from torchreid_ext.experiments import compare as compare_mod
from torchreid_ext.experiments.compare import compare
from torchreid_ext.experiments.published import METHOD_LABELS, ROWS, render_table, render_tables

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


@pytest.fixture(scope="module", autouse=True)
def one_thread_children():
    """Runs the harness starts use one thread each (no oversubscription on 2 cores); the
    variable is restored after this module, so later tests' subprocesses are unaffected."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("compare")
    configs = [write(d / "a.yaml", A), write(d / "b.yaml", B)]
    out = str(d / "out")
    paths = compare(configs, out, harness_opts(data_root))
    return configs, out, paths


def read_csv(path, kind="run"):
    """Rows of one kind ('run': one per run and dataset; None: all rows)."""
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if kind is None or r["kind"] == kind]


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
    assert read_csv(again["csv"], None) == read_csv(paths["csv"], None)


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


def test_script_prints_one_line_error_and_exit_status_2(tmp_path, capsys):
    # scripts/compare.py's main (the script, run by the seeded tests below, passes its status to sys.exit)
    capsys.readouterr()
    assert compare_mod.main([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: input") and "nope.yaml" in err


def test_published_numbers_and_labels():
    assert method_label("msfl_resnet50", "softmax", True) == "+MSGR (MSFL+MSGR)"
    assert published_for("+MSGR (MSFL+MSGR)", "market1501")[:2] == (93.7, 83.6)
    assert published_for("R50", "msmt17")[:2] == (None, 38.9)
    assert published_for("R50+MSGR", "market1501") == (91.7, 80.1, "MSFL paper Table III")
    assert published_for("R50", "cuhk03", cuhk03_detected_new=False) is None
    assert published_for("R50+DRSL", "market1501") is None  # our formulation: nothing published
    # an MSFL ablation variant is not the Table IV row of its model
    assert method_label("resnet50_bnfc512", "softmax", False, variant=True) != "R50"
    # every label of a comparison table with a published row names exactly one row per source
    labelled = [r for r in ROWS if r.label is not None]
    assert {r.label for r in labelled} <= set(METHOD_LABELS.values())
    assert len({(r.label, r.source) for r in labelled}) == len(labelled)


def test_published_tables_in_the_docs_are_generated_from_the_one_table():
    """docs/methods.md carries every published table as ``render_table`` writes it, and stating a
    number anywhere else in the page's tables would have to go through published.py."""
    page = open(osp.join(REPO, "docs", "methods.md"), encoding="utf-8").read()
    assert render_tables(page) == page, "docs/methods.md is stale: run python tools/published_tables.py"
    blocks = re.findall(r"<!-- published: ([^>]+?) -->", page)
    assert sorted(blocks) == sorted({r.source for r in ROWS})
    # a changed number changes the page: the check can fail
    table = render_table("MSFL paper Table IV")
    assert "| +MSGR (= MSFL+MSGR) | 93.7 / 83.6 | 86.8 / 76.9 | 67.7 / 63.3 | 71.3 / 45.3 |" in table
    assert "| ResNet-50 (BN-FC(512)-ReLU) | 90.4 / 78.3 | 82.9 / 70.6 | 63.4 / 58.3 | - / 38.9 |" in table
    assert render_table("SN paper (single query)").splitlines()[3] == "| SN loss | 88.27 | 73.43 |"
    with pytest.raises(KeyError, match="no published table 'Table V'"):
        render_table("Table V")


NUMBER_PAIR = re.compile(r"\d+\.\d+ */ *\d+\.\d+|mAP \d+\.\d+")


def test_configs_name_their_published_row_and_quote_no_number():
    """Published numbers live only in published.py: a config's comments point to docs/methods.md,
    and a per-dataset leaf says 'published numbers' exactly when the table has a row for it."""
    for path in sorted(glob.glob(osp.join(REPO, "configs", "**", "*.yaml"), recursive=True)):
        comments = "".join(line for line in open(path) if line.lstrip().startswith("#"))
        assert not NUMBER_PAIR.search(comments), path
    for dataset in ("dukemtmcreid", "msmt17", "cuhk03"):
        for path in sorted(glob.glob(osp.join(REPO, "configs", dataset, "*.yaml"))):
            first = open(path).readline()
            cfg = load_config(path)
            assert list(cfg.data.targets) == [dataset]
            label = method_label(cfg.model.name, cfg.loss.name, cfg.msgr.enabled)
            paper = published_for(label, dataset, not cfg.cuhk03.labeled_images and not cfg.cuhk03.classic_split)
            if "published numbers" in first:
                assert paper is not None and "docs/methods.md R" in first, path
            else:
                assert "no published number" in first and paper is None, path


def test_readme_shows_existing_comparison_pngs():
    """Every plot the README shows from docs/ exists and is an image (a comparison plot is one)."""
    readme = open(osp.join(REPO, "README.md")).read()
    links = [x for x in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme) if x.startswith("docs/")]
    assert links
    for link in links:
        with Image.open(osp.join(REPO, link)) as im:
            im.load()
            assert im.width >= 300 and im.height >= 300, link


# ------------------------------------------------------------------ seeds and a baseline

SEEDS = (1, 2)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, data_root):
    """scripts/compare.py a b --seeds 1 2 --baseline a (four runs), through the script's main in this
    process (its runs are scripts/main.py subprocesses, as always; tests/losses/test_loss_registry.py
    starts the script itself)."""
    d = tmp_path_factory.mktemp("seeded")
    configs = [write(d / "a.yaml", A), write(d / "b.yaml", B)]
    out = str(d / "out")
    argv = [configs[1], "--out", out, "--seeds", *map(str, SEEDS), "--baseline", configs[0],
            "--opts", *harness_opts(data_root)]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(REPO)
        status = compare_mod.main(argv)
    assert status == 0, printed.getvalue()[-3000:]
    paths = {ext: osp.join(out, f"results.{ext}") for ext in ("csv", "md", "png")}
    return configs, out, paths, printed.getvalue()


def reference(values):
    """Mean and sample std computed here with numpy (independent of experiments.stats)."""
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), values.std(ddof=1)


def reference_interval(x, b):
    """Paired mean difference and 95% Student t interval, n - 1 dof, computed here."""
    d = np.subtract(x, b, dtype=np.float64)
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_seeded_rows_equal_each_runs_metrics_json(seeded):
    configs, out, paths, printed = seeded
    rows = read_csv(paths["csv"])
    # the baseline comes first (added to the inputs), every config once per seed
    assert [(r["config"], int(r["seed"])) for r in rows] == [(c, s) for c in configs for s in SEEDS]
    assert len({r["save_dir"] for r in rows}) == 4
    for row in rows:
        assert row["name"] == f"{row['group']}-seed{row['seed']}"
        assert row["save_dir"] == osp.join(out, "runs", row["name"])
        metrics, results = final_results(row["save_dir"])
        assert metrics["seed"] == int(row["seed"])  # the run trained with the seed its row names
        spec = json.load(open(osp.join(row["save_dir"], "run.json")))
        assert spec["overrides"][-2:] == ["train.seed", row["seed"]]
        for key in ("rank1", "rank5", "mAP", "mINP"):
            assert float(row[key]) == results["synthreid_small"][key], key
    # seed by seed: both configs at seed 1 before either at seed 2
    order = re.findall(r"\[compare\] \d/4 (\S+): running", printed)
    assert [n.rsplit("-seed", 1)[1] for n in order] == ["1", "1", "2", "2"]
    # seeds change the runs (otherwise the intervals below would be degenerate)
    a1, a2 = (float(r["mAP"]) for r in rows[:2])
    assert a1 != a2


def test_seeded_summary_and_intervals_equal_a_reference(seeded):
    configs, out, paths, _ = seeded
    runs = read_csv(paths["csv"])
    groups = list(dict.fromkeys(r["group"] for r in runs))
    base, other = groups
    md = open(paths["md"]).read()
    value = {(r["group"], int(r["seed"])): r for r in runs}
    for kind in ("mean", "std"):
        assert [r["group"] for r in read_csv(paths["csv"], kind)] == groups
    for group in groups:
        mean_row = next(r for r in read_csv(paths["csv"], "mean") if r["group"] == group)
        std_row = next(r for r in read_csv(paths["csv"], "std") if r["group"] == group)
        assert int(mean_row["n"]) == 2 and mean_row["seed"] == "1 2"
        line = next(ln for ln in md.splitlines() if f"`{osp.basename(value[group, 1]['config'])}`" in ln)
        cells = []
        for key in ("rank1", "rank5", "mAP", "mINP"):
            m, s = reference([float(value[group, seed][key]) for seed in SEEDS])
            assert float(mean_row[key]) == pytest.approx(m, rel=1e-12, abs=1e-15), (group, key)
            assert float(std_row[key]) == pytest.approx(s, rel=1e-12, abs=1e-15), (group, key)
            if key != "rank5":
                cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        assert f"| 2 | 1, 2 | {' | '.join(cells)} |" in line
    (diff,) = read_csv(paths["csv"], "diff")
    (low,) = read_csv(paths["csv"], "ci95_low")
    (high,) = read_csv(paths["csv"], "ci95_high")
    (verdict,) = read_csv(paths["csv"], "verdict")
    assert diff["group"] == other and diff["baseline"] == base and int(diff["n"]) == 2
    pair_line = next(ln for ln in md.splitlines() if ln.startswith("| synthreid_small") and "[" in ln)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        m, lo, hi = reference_interval([float(value[other, s][key]) for s in SEEDS],
                                       [float(value[base, s][key]) for s in SEEDS])
        assert float(diff[key]) == pytest.approx(m, rel=1e-12, abs=1e-15), key
        assert float(low[key]) == pytest.approx(lo, rel=1e-9, abs=1e-15), key
        assert float(high[key]) == pytest.approx(hi, rel=1e-9, abs=1e-15), key
        expected = "gain" if lo > 0 else "loss" if hi < 0 else "no detectable difference"
        assert verdict[key] == expected, key
        if key != "rank5":
            assert f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {expected}" in pair_line, key
    assert f"Paired difference to `{osp.basename(configs[0])}`" in md


def test_seeded_plot_carries_error_bars(seeded, data_root):
    from matplotlib.container import BarContainer

    from torchreid_ext.experiments.plot import make_figure
    from torchreid_ext.experiments.report import collect_rows
    from torchreid_ext.experiments.summary import paired_comparisons, summarize_groups

    configs, out, paths, _ = seeded
    runs = plan_runs(configs, out, harness_opts(data_root), seeds=list(SEEDS))  # finished: nothing runs
    groups = summarize_groups(collect_rows(runs))
    pairs = paired_comparisons(groups, groups[0].group)
    fig = make_figure(groups, pairs)
    with Image.open(paths["png"]) as im:  # the PNG is this figure: two rows of panels
        assert im.size == (round(fig.get_figwidth() * 110), round(fig.get_figheight() * 110))
    top, bottom = fig.axes
    value = {(r["group"], int(r["seed"])): r for r in read_csv(paths["csv"])}
    names = [g.group for g in groups]

    def bars(ax):
        found = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(found) == 2 and all(c.errorbar is not None for c in found)
        return found

    for container, key in zip(bars(top), ("rank1", "mAP")):
        (segments,) = [lc.get_segments() for lc in container.errorbar.lines[2]]
        heights = [p.get_height() for p in container.patches]
        for name, seg, height in zip(names, segments, heights):
            m, s = reference([float(value[name, seed][key]) for seed in SEEDS])
            assert height == pytest.approx(100 * m) and seg[0][1] == pytest.approx(100 * (m - s))
            assert seg[1][1] == pytest.approx(100 * (m + s))
    assert "±1 std" in top.get_title() and "n = 2" in top.get_title()
    for container, key in zip(bars(bottom), ("rank1", "mAP")):
        (segments,) = [lc.get_segments() for lc in container.errorbar.lines[2]]
        (seg,) = segments
        m, lo, hi = reference_interval([float(value[names[1], s][key]) for s in SEEDS],
                                       [float(value[names[0], s][key]) for s in SEEDS])
        assert container.patches[0].get_height() == pytest.approx(100 * m)
        assert (seg[0][1], seg[1][1]) == (pytest.approx(100 * lo), pytest.approx(100 * hi))
    assert "95% t-interval" in bottom.get_title()
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["osnet_x0_25 drsl"]


def test_seeded_rerun_reuses_every_run(seeded, data_root, monkeypatch, capsys):
    configs, out, paths, _ = seeded
    before = open(paths["csv"]).read()

    def no_launch(run):
        raise AssertionError(f"finished run {run.name} was launched again")

    monkeypatch.setattr(compare_mod, "launch", no_launch)
    compare([configs[1]], out, harness_opts(data_root), seeds=list(SEEDS), baseline=configs[0])
    assert capsys.readouterr().out.count("finished, not rerun") == 4
    assert open(paths["csv"]).read() == before


def test_one_seed_with_a_baseline_says_n_1(compared, data_root, tmp_path):
    """Without --seeds each config runs once (as before); the pair has n = 1 and no interval."""
    configs, out, paths = compared
    save_dirs = [r["save_dir"] for r in read_csv(paths["csv"])]  # finished: nothing trains again
    new = compare(save_dirs[1:], str(tmp_path / "again"), baseline=save_dirs[0])
    md = open(new["md"]).read()
    means = [ln for ln in md.split("Paired")[0].splitlines() if ln.startswith("| synthreid_small")]
    assert len(means) == 2 and not any("±" in ln for ln in means) and all("| 1 | 1 |" in ln for ln in means)
    assert "n = 1: no interval" in md
    (verdict,) = read_csv(new["csv"], "verdict")
    assert verdict["mAP"] == "n = 1: no interval" and verdict["n"] == "1"
    (std,) = [r for r in read_csv(new["csv"], "std") if r["group"] == verdict["group"]]
    assert std["mAP"] == ""  # one seed: no spread


@pytest.mark.parametrize("seeds, overrides, baseline, pattern", [
    ([1, 1], [], None, r"seeds \[1\] are given more than once"),
    ([], [], None, r"--seeds needs at least one"),
    ([1, 2], ["train.seed", "3"], None, r"train\.seed' conflicts with --seeds"),
    ([1], [], "missing.yaml", r"--baseline '.*missing\.yaml' does not exist"),
    ([1], [], "SAVE_DIR", r"is a save dir .*with --seeds give config files"),
])
def test_bad_seed_input_fails_before_any_run(seeds, overrides, baseline, pattern, tmp_path, compared):
    a = write(tmp_path / "a.yaml", A)
    if baseline == "SAVE_DIR":
        baseline = read_csv(compared[2]["csv"])[0]["save_dir"]
    elif baseline:
        baseline = str(tmp_path / baseline)
    out = tmp_path / "out"
    with pytest.raises(HarnessError, match=pattern):
        compare([a], str(out), overrides + ["data.root", str(tmp_path / "root")], seeds=seeds, baseline=baseline)
    assert not out.exists()


def test_report_stem_puts_the_report_elsewhere(compared, tmp_path):
    configs, out, paths = compared
    save_dirs = [r["save_dir"] for r in read_csv(paths["csv"])]
    stem = tmp_path / "docs" / "bench"
    new = compare(save_dirs, str(tmp_path / "out"), report=str(stem))
    assert new == {ext: f"{stem}.{ext}" for ext in ("csv", "md", "png")}
    assert all(osp.isfile(p) for p in new.values()) and not (tmp_path / "out" / "results.csv").exists()
    assert read_csv(new["csv"]) == read_csv(paths["csv"])
    with pytest.raises(HarnessError, match=r"--report '.*docs' is a folder"):
        compare(save_dirs, str(tmp_path / "out2"), report=str(tmp_path / "docs"))
    assert not (tmp_path / "out2").exists()


def test_a_run_trained_with_another_seed_is_refused(tmp_path):
    from torchreid_ext.experiments.report import collect_rows
    from torchreid_ext.experiments.runs import Run

    metrics = {"seed": 1, "max_epoch": 1, "model": "osnet_x0_25", "loss": "softmax",
               "evaluations": [{"epoch": 1, "results": {"synthreid": {"rank1": 0.5, "mAP": 0.4}}}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert collect_rows([Run(name="r", save_dir=str(tmp_path), seed=1)])[0]["seed"] == 1
    with pytest.raises(HarnessError, match=r"trained with seed 1, not the seed 2"):
        collect_rows([Run(name="r", save_dir=str(tmp_path), seed=2)])


def test_test_time_rows_evaluate_the_baselines_final_checkpoint(compared, data_root, tmp_path, monkeypatch):
    configs, out, paths = compared
    noop = write(tmp_path / "noop.yaml", "test:\n  flip: False\n")
    rerank = write(tmp_path / "rerank.yaml", "test:\n  rerank: True\n  rerank_k1: 6\n  rerank_k2: 2\n")
    launched = []
    real_launch = compare_mod.launch
    monkeypatch.setattr(compare_mod, "launch", lambda run: (launched.append(run.name), real_launch(run)))
    report = compare(configs, out, harness_opts(data_root), baseline=configs[0], test_time=[noop, rerank],
                     report=str(tmp_path / "tt"))
    assert [name.split("+")[1] for name in launched] == ["noop", "rerank"]  # trained runs reused
    rows = {r["name"]: r for r in read_csv(report["csv"])}
    base = rows[read_csv(paths["csv"])[0]["name"]]
    same, reranked = (rows[n] for n in launched)
    assert same["method"] == base["method"] + " + noop (test time)"
    for key in ("rank1", "mAP", "mINP"):  # same checkpoint, same options: the baseline's numbers
        assert same[key] == base[key], key
    assert reranked["mAP"] != base["mAP"]
    saved = json.load(open(osp.join(reranked["save_dir"], "run.json")))["overrides"]
    assert saved[saved.index("model.load_weights") + 1] == osp.join(base["save_dir"], "model", "model.pth.tar-1")
    assert "test.rerank" in saved and not osp.exists(osp.join(reranked["save_dir"], "model"))
    paired = [r for r in read_csv(report["csv"], "diff") if r["group"] == reranked["name"]]
    assert len(paired) == 1 and float(paired[0]["mAP"]) == pytest.approx(float(reranked["mAP"]) - float(base["mAP"]))


@pytest.mark.parametrize("text, message", [
    ("test:\n  rerank: True\ntrain:\n  lr: 0.1\n", "must hold only a test: section"),
    ("[1, 2]\n", "must hold only a test: section"),
])
def test_a_test_time_config_changes_evaluation_only(compared, data_root, tmp_path, text, message):
    configs, out, _ = compared
    bad = write(tmp_path / "bad.yaml", text)
    with pytest.raises(HarnessError, match=message):
        plan_runs(configs, out, harness_opts(data_root), test_time=[bad], test_time_of=configs[0])
    with pytest.raises(HarnessError, match="give --baseline too"):
        plan_runs(configs, out, harness_opts(data_root),
                  test_time=[write(tmp_path / "ok.yaml", "test:\n  flip: True\n")])
