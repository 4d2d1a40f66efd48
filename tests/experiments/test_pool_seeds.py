"""tools/pool_seeds.py: runs of two reports pooled seed by seed, paired with the baseline; a run
held by both reports must agree."""
import csv
import importlib.util
import os.path as osp

import pytest
from scipy.stats import t as student_t

from conftest import REPO

spec = importlib.util.spec_from_file_location("pool_seeds", osp.join(REPO, "tools", "pool_seeds.py"))
pool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pool)

FIELDS = ["kind", "group", "name", "seed", "config", "dataset", "rank1", "rank5", "mAP", "mINP"]


def report(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for config, seed, ds, m in rows:
            g = "s__" + osp.basename(config)[:-5]
            w.writerow({"kind": "run", "group": g, "name": f"{g}-seed{seed}", "seed": seed, "config": config,
                        "dataset": ds, "rank1": m, "rank5": m, "mAP": m, "mINP": m})
        w.writerow({"kind": "mean", "group": "s__a", "config": "a.yaml", "dataset": "d", "mAP": 9})  # ignored
    return str(path)


def test_pooled_difference_is_the_paired_t_interval(tmp_path, capsys):
    a = {1: 0.50, 2: 0.52, 3: 0.49, 4: 0.55}
    b = {1: 0.53, 2: 0.56, 3: 0.50, 4: 0.60}
    first = report(tmp_path / "r1.csv", [("a.yaml", s, "d", a[s]) for s in (1, 2)]
                   + [("b.yaml", s, "d", b[s]) for s in (1, 2)]
                   + [("a.yaml", 1, "d", a[1]), ("a.yaml", 2, "d", a[2])])
    second = report(tmp_path / "r2.csv", [("a.yaml", s, "d", a[s]) for s in (2, 3, 4)]
                    + [("b.yaml", s, "d", b[s]) for s in (3, 4)]
                    + [("a.yaml", 9, "d", 0.4), ("a.yaml", 1, "other", 0.1)])
    out = str(tmp_path / "pooled.csv")
    assert pool.main([first, second, "--baseline", "a.yaml", "--datasets", "d", "--csv", out]) == 0
    rows = {r["config"]: r for r in csv.DictReader(open(out))}
    d = [b[s] - a[s] for s in (1, 2, 3, 4)]
    mean = sum(d) / 4
    sd = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5
    half = student_t.ppf(0.975, 3) * sd / 2
    assert rows["b.yaml"]["n"] == "4" and float(rows["b.yaml"]["diff"]) == pytest.approx(mean)
    assert float(rows["b.yaml"]["low"]) == pytest.approx(mean - half)
    assert float(rows["b.yaml"]["high"]) == pytest.approx(mean + half)
    assert rows["a.yaml"]["n"] == "5" and rows["a.yaml"]["seeds"] == "1 2 3 4 9"
    assert "| `b` | 4 |" in capsys.readouterr().out


def test_reports_that_disagree_on_a_run_are_refused(tmp_path):
    first = report(tmp_path / "r1.csv", [("a.yaml", 1, "d", 0.5), ("b.yaml", 1, "d", 0.6)])
    second = report(tmp_path / "r2.csv", [("a.yaml", 1, "d", 0.51), ("b.yaml", 2, "d", 0.6)])
    with pytest.raises(SystemExit, match="a.yaml seed 1 on d differs by 0.010000"):
        pool.main([first, second, "--baseline", "a.yaml"])
