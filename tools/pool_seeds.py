#!/usr/bin/env python
"""Pool the per-seed runs of several scripts/compare.py reports into one table (e.g. seeds 1-5 of
one report and seeds 6-10 of another), paired with a baseline config seed by seed.

    python tools/pool_seeds.py docs/real_study.csv docs/real_study_seeds6_10.csv \
        --baseline configs/real/ce.yaml [--configs configs/real/ce_triplet.yaml ...] [--metric mAP] \
        [--datasets cuhk03_pair1 viper_full] [--csv OUT.csv]

A run is identified by its config file, seed and dataset (the reports' ``run`` rows). A run that
two reports both hold must agree (the same config and seed at two commits: a reproduction
check); the largest difference is printed, and a difference over ``--tolerance`` is an error.
Means, sample standard deviations and paired 95% t-intervals come from
:mod:`torchreid_ext.experiments.stats`, as in compare.py's own reports.
"""
import argparse
import csv
import os.path as osp
import sys
from collections import OrderedDict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.experiments.stats import paired_difference, summarize  # noqa: E402

METRICS = ("rank1", "rank5", "mAP", "mINP")


def read_runs(paths, tolerance):
    """``{(config, dataset): {seed: {metric: value}}}`` and the largest disagreement between reports."""
    runs, worst = OrderedDict(), 0.0
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["kind"] != "run" or "+" in r["group"]:  # test-time rows ('ce+rerank') are left out
                    continue
                key = (r["config"], r["dataset"])
                seed = int(r["seed"])
                values = {m: float(r[m]) for m in METRICS if r.get(m) not in ("", None)}
                seen = runs.setdefault(key, OrderedDict())
                if seed in seen:
                    diff = max(abs(values[m] - seen[seed][m]) for m in values)
                    worst = max(worst, diff)
                    if diff > tolerance:
                        raise SystemExit(f"error: {key[0]} seed {seed} on {key[1]} differs by {diff:.6f} between "
                                         f"reports (tolerance {tolerance}); not one experiment")
                    continue
                seen[seed] = values
    return runs, worst


def pooled_rows(runs, baseline, configs, datasets, metric):
    rows = []
    for config in configs:
        for ds in datasets:
            own = runs.get((config, ds), {})
            if not own:
                continue
            s = summarize([v[metric] for v in own.values()])
            row = {"config": config, "dataset": ds, "n": s.n, "seeds": " ".join(map(str, own)), "mean": s.mean,
                   "std": s.std}
            base = runs.get((baseline, ds), {})
            common = [k for k in own if k in base]
            if config != baseline and len(common) >= 2:
                d = paired_difference([own[k][metric] for k in common], [base[k][metric] for k in common])
                row.update(paired_n=d.n, diff=d.mean, low=d.low, high=d.high, verdict=d.verdict)
            rows.append(row)
    return rows


def markdown(rows, baseline, datasets, metric) -> str:
    name = lambda c: osp.splitext(osp.basename(c))[0]  # noqa: E731
    head = ["config", "n"]
    for ds in datasets:
        head += [f"{ds} {metric}", f"Δ vs {name(baseline)} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = OrderedDict()
    for r in rows:
        by.setdefault(r["config"], {})[r["dataset"]] = r
    for config, per in by.items():
        first = next(iter(per.values()))
        cells = [f"`{name(config)}`", str(first["n"])]
        for ds in datasets:
            r = per.get(ds)
            if r is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{100 * r['mean']:.1f}" + (f" ± {100 * r['std']:.1f}" if r["std"] is not None else ""))
            if config == baseline:
                cells.append("(baseline)")
            elif "diff" in r:
                mark = {"gain": " gain", "loss": " loss"}.get(r["verdict"], "")
                cells.append(f"{100 * r['diff']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]{mark}")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="compare.py report CSVs")
    p.add_argument("--baseline", required=True, help="the config file the others are paired with")
    p.add_argument("--configs", nargs="+", default=None, help="rows, in order (default: every config found)")
    p.add_argument("--metric", default="mAP", choices=METRICS)
    p.add_argument("--datasets", nargs="+", default=None)
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest allowed disagreement between reports")
    p.add_argument("--csv", default="", help="also write the pooled rows here")
    args = p.parse_args(argv)
    for path in args.reports:
        if not osp.isfile(path):
            p.error(f"report '{path}' does not exist")
    runs, worst = read_runs(args.reports, args.tolerance)
    configs = args.configs or list(OrderedDict.fromkeys(c for c, _ in runs))
    datasets = args.datasets or list(OrderedDict.fromkeys(d for _, d in runs))
    missing = [c for c in [args.baseline, *configs] if not any(k[0] == c for k in runs)]
    if missing:
        p.error(f"no runs of {missing} in the reports; configs found: {sorted({c for c, _ in runs})}")
    rows = pooled_rows(runs, args.baseline, configs, datasets, args.metric)
    print(markdown(rows, args.baseline, datasets, args.metric))
    print(f"\nRuns held by more than one report agree to {worst:.2e} ({args.metric} and the other metrics).")
    if args.csv:
        fields = ["config", "dataset", "n", "seeds", "mean", "std", "paired_n", "diff", "low", "high", "verdict"]
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in fields})
    return 0


if __name__ == "__main__":
    sys.exit(main())
