#!/usr/bin/env python
"""A compact Markdown table of a scripts/compare.py report: one row per config, per dataset the
mean ± std of a metric and the paired difference to the report's baseline with its 95% interval.

    python tools/study_table.py docs/real_study.csv [--metric mAP] [--datasets cuhk03_pair1 viper_full]

Every number comes from the report's CSV (its ``mean`` / ``std`` / ``diff`` / ``ci95_*`` rows), so the
table says what the report says, condensed.
"""
import argparse
import csv
import sys
from collections import OrderedDict


def _pct(value: str, signed: bool = False) -> str:
    if value in ("", None):
        return "–"
    x = 100 * float(value)
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def table(path: str, metric: str = "mAP", datasets=None) -> str:
    rows = list(csv.DictReader(open(path, newline="")))
    by = {}
    for r in rows:
        if r["kind"] != "run":
            by[(r["kind"], r["group"], r["dataset"])] = r
    groups = list(OrderedDict.fromkeys(r["group"] for r in rows if r["kind"] == "mean"))
    datasets = datasets or list(OrderedDict.fromkeys(r["dataset"] for r in rows if r["kind"] == "mean"))
    baseline = next((r["baseline"] for r in rows if r["kind"] == "diff"), "")
    head = ["config", "n"]
    for ds in datasets:
        head += [f"{ds} {metric}", f"Δ vs {baseline.split('__')[-1]} [95% CI]" if baseline else "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        first = by.get(("mean", g, datasets[0]))
        cells = [f"`{g.split('__')[-1]}`", first["n"] if first else "–"]
        for ds in datasets:
            mean, std = by.get(("mean", g, ds)), by.get(("std", g, ds))
            cells.append("–" if mean is None else _pct(mean[metric]) + ("" if not std or std[metric] == "" else
                                                                        f" ± {_pct(std[metric])}"))
            diff = by.get(("diff", g, ds))
            if diff is None:
                cells.append("(baseline)" if g == baseline else "–")
            else:
                low, high = by[("ci95_low", g, ds)][metric], by[("ci95_high", g, ds)][metric]
                verdict = by[("verdict", g, ds)][metric]
                mark = {"gain": " gain", "loss": " loss"}.get(verdict, "")
                cells.append(f"{_pct(diff[metric], True)} [{_pct(low, True)}, {_pct(high, True)}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="a compare.py report CSV")
    p.add_argument("--metric", default="mAP", choices=["rank1", "rank5", "mAP", "mINP"])
    p.add_argument("--datasets", nargs="+", default=None)
    args = p.parse_args(argv)
    print(table(args.report, args.metric, args.datasets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
