"""Comparison report: one row per (run, target dataset) -> results.csv, results.md, results.png.

Metric values in the CSV are exactly those of the run's ``metrics.json`` (fractions in
[0, 1]); the Markdown table and the plot show percentages. Published numbers
(:mod:`.published`) stand beside ours where they exist.
"""
from __future__ import annotations

import csv
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence

from .published import method_label, published_for
from .runs import HarnessError, Run, final_epoch, load_metrics

__all__ = ["COLUMNS", "collect_rows", "write_csv", "write_markdown", "write_plot", "write_report"]

COLUMNS = ("name", "config", "method", "dataset", "epoch", "rank1", "rank5", "mAP", "mINP",
           "params", "macs", "train_seconds", "images_per_second", "paper_rank1", "paper_mAP",
           "paper_source", "save_dir")


def _final_evaluation(run: Run, metrics: Dict[str, Any]) -> Dict[str, Any]:
    evaluations = metrics.get("evaluations") or []
    epoch = final_epoch(run, metrics)
    if epoch is not None:
        evaluations = [e for e in evaluations if e["epoch"] == epoch]
    if not evaluations:
        raise HarnessError(f"run '{run.name}' ({run.save_dir}) has no final evaluation in metrics.json")
    return evaluations[-1]


def _is_variant(run: Run) -> bool:
    """True when MSFL switches differ from the defaults (an ablation, not a Table IV row)."""
    if run.cfg is None:
        return False
    from ..config import get_default_config

    return run.cfg.model.msfl != get_default_config().model.msfl


def collect_rows(runs: Sequence[Run]) -> List[Dict[str, Any]]:
    """Rows of the final evaluation of every run, in input order."""
    rows = []
    for run in runs:
        metrics = load_metrics(run)
        if metrics is None:
            raise HarnessError(f"run '{run.name}' has no metrics.json in '{run.save_dir}'")
        final = _final_evaluation(run, metrics)
        msgr = bool((metrics.get("msgr") or {}).get("enabled", False))
        label = method_label(metrics.get("model", "?"), metrics.get("loss", "?"), msgr, _is_variant(run))
        detected_new = run.cfg is not None and not run.cfg.cuhk03.labeled_images and not run.cfg.cuhk03.classic_split
        for dataset, res in final["results"].items():
            paper = published_for(label, dataset, detected_new)
            rows.append({
                "name": run.name, "config": run.config or metrics.get("config", ""), "method": label,
                "dataset": dataset, "epoch": final["epoch"], "rank1": res["rank1"], "rank5": res.get("rank5"),
                "mAP": res["mAP"], "mINP": res.get("mINP"), "params": metrics.get("params"),
                "macs": metrics.get("macs"), "train_seconds": metrics.get("train_seconds"),
                "images_per_second": metrics.get("images_per_second"),
                "paper_rank1": paper.rank1 if paper else None, "paper_mAP": paper.mAP if paper else None,
                "paper_source": paper.source if paper else "", "save_dir": run.save_dir,
            })
    return rows


def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Paper columns are percentages as published; ours are fractions, as in metrics.json."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _paper(row: Dict[str, Any]) -> str:
    if row["paper_mAP"] is None:
        return ""
    r1 = "–" if row["paper_rank1"] is None else f"{row['paper_rank1']:g}"
    return f"{r1} / {row['paper_mAP']:g}"


def write_markdown(rows: Sequence[Dict[str, Any]], path: str) -> None:
    lines = [
        "| dataset | method | config | epochs | rank-1 | mAP | mINP | params (M) | GMACs | train time | paper rank-1 / mAP |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: r["dataset"]):  # stable: input order within a dataset
        params = "–" if r["params"] is None else f"{r['params'] / 1e6:.2f}"
        macs = "–" if r["macs"] is None else f"{r['macs'] / 1e9:.2f}"
        lines.append(
            f"| {r['dataset']} | {r['method']} | `{osp.basename(r['config']) or r['name']}` | {r['epoch']} "
            f"| {_pct(r['rank1'])} | {_pct(r['mAP'])} | {_pct(r['mINP'])} | {params} | {macs} "
            f"| {_duration(r['train_seconds'])} | {_paper(r)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Grouped bars of rank-1 and mAP (%) per method; one panel per dataset; paper values as ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if not datasets:
        raise HarnessError("nothing to plot: no results")
    widest = max(sum(r["dataset"] == d for r in rows) for d in datasets)
    fig = Figure(figsize=(max(4.0, 1.1 * widest + 1.5) * len(datasets), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    width = 0.38
    for ax, dataset in zip(axes, datasets):
        sub = [r for r in rows if r["dataset"] == dataset]
        xs = range(len(sub))
        for offset, key, colour in ((-width / 2, "rank1", "tab:blue"), (width / 2, "mAP", "tab:orange")):
            values = [100 * r[key] for r in sub]
            bars = ax.bar([x + offset for x in xs], values, width, label=key if key == "mAP" else "rank-1",
                          color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
            paper = [(x + offset, r[f"paper_{key}"]) for x, r in zip(xs, sub) if r[f"paper_{key}"] is not None]
            if paper:
                ax.scatter(*zip(*paper), marker="_", s=300, color="black", zorder=3,
                           label="paper" if key == "rank1" else None)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["method"] for r in sub], rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(f"{dataset} (epoch {sub[0]['epoch']})" if len({r['epoch'] for r in sub}) == 1 else dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(rows: Sequence[Dict[str, Any]], out_dir: str) -> Dict[str, str]:
    """Write results.csv, results.md and results.png into ``out_dir``; return their paths."""
    paths = {ext: osp.join(out_dir, f"results.{ext}") for ext in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    write_markdown(rows, paths["md"])
    write_plot(rows, paths["png"])
    return paths
