"""Comparison report: results.csv, results.md and results.png of a (multi-seed) comparison.

results.csv holds one row per (run, target dataset), kind ``run``, with metric values exactly
those of the run's ``metrics.json`` (fractions in [0, 1]), then summary rows per config
(group) and dataset: ``mean`` and ``std`` (sample std over seeds, empty for n = 1) and, with a
baseline, ``diff`` (mean paired difference to the baseline, same seeds), ``ci95_low`` /
``ci95_high`` (Student t interval, n - 1 dof) and ``verdict`` (gain / loss only when the
interval excludes 0, else "no detectable difference"). The Markdown tables and the plot show
percentages. Published numbers (:mod:`.published`) stand beside ours where they exist.
"""
from __future__ import annotations

import csv
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence

from .plot import write_plot
from .published import method_label, published_for
from .runs import HarnessError, Run, final_epoch, load_metrics
from .summary import METRICS, GroupSummary, PairedComparison, paired_comparisons, summarize_groups

__all__ = ["COLUMNS", "collect_rows", "summary_rows", "markdown_lines", "write_csv", "write_markdown",
           "write_report"]

COLUMNS = ("kind", "group", "name", "seed", "n", "config", "method", "dataset", "epoch", "rank1", "rank5",
           "mAP", "mINP", "params", "macs", "train_seconds", "images_per_second", "paper_rank1",
           "paper_mAP", "paper_source", "baseline", "save_dir")
LEVEL = 0.95


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


def _run_seed(run: Run, metrics: Dict[str, Any]) -> Optional[int]:
    """The seed the run trained with (metrics.json), else its config's; None if unknown."""
    recorded = metrics.get("seed")
    if run.seed is not None and recorded is not None and int(recorded) != run.seed:
        raise HarnessError(f"run '{run.name}' ({run.save_dir}) trained with seed {recorded}, "
                           f"not the seed {run.seed} its save dir is for")
    if recorded is not None:
        return int(recorded)
    if run.seed is not None:
        return run.seed
    return int(run.cfg.train.seed) if run.cfg is not None else None


def collect_rows(runs: Sequence[Run]) -> List[Dict[str, Any]]:
    """Rows (kind 'run') of the final evaluation of every run, in input order."""
    rows = []
    for run in runs:
        metrics = load_metrics(run)
        if metrics is None:
            raise HarnessError(f"run '{run.name}' has no metrics.json in '{run.save_dir}'")
        final = _final_evaluation(run, metrics)
        msgr = bool((metrics.get("msgr") or {}).get("enabled", False))
        label = method_label(metrics.get("model", "?"), metrics.get("loss", "?"), msgr, _is_variant(run))
        if run.test_time:
            label += f" + {osp.splitext(osp.basename(run.test_time))[0]} (test time)"
        detected_new = run.cfg is not None and not run.cfg.cuhk03.labeled_images and not run.cfg.cuhk03.classic_split
        seed = _run_seed(run, metrics)
        for dataset, res in final["results"].items():
            paper = published_for(label, dataset, detected_new)
            rows.append({
                "kind": "run", "group": run.group, "seed": seed, "n": 1, "baseline": "",
                "name": run.name, "config": run.config or metrics.get("config", ""), "method": label,
                "dataset": dataset, "epoch": final["epoch"], "rank1": res["rank1"], "rank5": res.get("rank5"),
                "mAP": res["mAP"], "mINP": res.get("mINP"), "params": metrics.get("params"),
                "macs": metrics.get("macs"), "train_seconds": metrics.get("train_seconds"),
                "images_per_second": metrics.get("images_per_second"),
                "paper_rank1": paper.rank1 if paper else None, "paper_mAP": paper.mAP if paper else None,
                "paper_source": paper.source if paper else "", "save_dir": run.save_dir,
            })
    return rows


def _summary_base(g: GroupSummary, kind: str) -> Dict[str, Any]:
    row = {k: None for k in COLUMNS}
    row.update({
        "kind": kind, "group": g.group, "name": g.group, "n": g.n,
        "seed": " ".join("?" if s is None else str(s) for s in g.seeds),
        "config": g.first("config"), "method": g.first("method"), "dataset": g.dataset,
        "epoch": g.first("epoch"), "params": g.first("params"), "macs": g.first("macs"),
        "paper_rank1": g.first("paper_rank1"), "paper_mAP": g.first("paper_mAP"),
        "paper_source": g.first("paper_source"), "baseline": "", "save_dir": "",
    })
    return row


def summary_rows(groups: Sequence[GroupSummary], pairs: Sequence[PairedComparison] = ()) -> List[Dict[str, Any]]:
    """CSV rows of kind mean / std per group, then diff / ci95_low / ci95_high / verdict per pair."""
    rows = []
    for g in groups:
        mean, std = _summary_base(g, "mean"), _summary_base(g, "std")
        for key in METRICS:
            st = g.stats[key]
            mean[key] = None if st is None else st.mean
            std[key] = None if st is None else st.std
        for key in ("train_seconds", "images_per_second"):
            mean[key] = g.mean_of(key)
        rows += [mean, std]
    tag = f"ci{round(100 * LEVEL)}"
    for p in pairs:
        parts = {kind: _summary_base(p.group, kind) for kind in ("diff", f"{tag}_low", f"{tag}_high", "verdict")}
        for row in parts.values():
            row.update({"baseline": p.baseline.group, "n": len(p.seeds),
                        "seed": " ".join(map(str, p.seeds))})
        for key in METRICS:
            d = p.diffs[key]
            parts["diff"][key] = None if d is None else d.mean
            parts[f"{tag}_low"][key] = None if d is None else d.low
            parts[f"{tag}_high"][key] = None if d is None else d.high
            parts["verdict"][key] = "no paired seeds" if d is None else d.verdict
        rows += list(parts.values())
    return rows


def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Paper columns are percentages as published; ours are fractions, as in metrics.json."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


def _mean_std(g: GroupSummary, key: str) -> str:
    st = g.stats[key]
    if st is None:
        return "–"
    return f"{100 * st.mean:.1f}" if st.std is None else f"{100 * st.mean:.1f} ± {100 * st.std:.1f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _paper(g: GroupSummary) -> str:
    if g.first("paper_mAP") is None:
        return ""
    r1 = "–" if g.first("paper_rank1") is None else f"{g.first('paper_rank1'):g}"
    return f"{r1} / {g.first('paper_mAP'):g}"


def _config_names(groups: Sequence[GroupSummary]) -> Dict[str, str]:
    """A group's config basename, or its group name where basenames repeat."""
    base = {g.group: osp.basename(g.first("config")) or g.group for g in groups}
    counts: Dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (v if counts[v] == 1 else k) for k, v in base.items()}


def _seeds(g: GroupSummary) -> str:
    return ", ".join("?" if s is None else str(s) for s in g.seeds)


def _difference(p: PairedComparison, key: str) -> str:
    d = p.diffs[key]
    if d is None:
        return "– (no paired seeds)"
    if d.low is None:
        return f"{100 * d.mean:+.1f} (n = 1: no interval)"
    same = " (equal on every seed: a zero-width interval)" if d.std <= 1e-12 * max(1.0, abs(d.mean)) else ""
    return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] {d.verdict}{same}"


def markdown_lines(groups: Sequence[GroupSummary], pairs: Sequence[PairedComparison] = ()) -> List[str]:
    names = _config_names(groups)
    lines = [
        "Rank-1, mAP, mINP (%): mean ± sample std (n - 1 denominator) over n seeds; "
        "a single value where n = 1. Train time: mean per run.",
        "",
        "| dataset | method | config | epochs | n | seeds | rank-1 | mAP | mINP | params (M) | GMACs "
        "| train time | paper rank-1 / mAP |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for g in sorted(groups, key=lambda g: g.dataset):  # stable: input order within a dataset
        params, macs = g.first("params"), g.first("macs")
        params = "–" if params is None else f"{params / 1e6:.2f}"
        macs = "–" if macs is None else f"{macs / 1e9:.2f}"
        lines.append(
            f"| {g.dataset} | {g.first('method')} | `{names[g.group]}` | {g.first('epoch')} | {g.n} "
            f"| {_seeds(g)} | {_mean_std(g, 'rank1')} | {_mean_std(g, 'mAP')} | {_mean_std(g, 'mINP')} "
            f"| {params} | {macs} | {_duration(g.mean_of('train_seconds'))} | {_paper(g)} |")
    if pairs:
        baseline = names[pairs[0].baseline.group]
        lines += [
            "",
            f"Paired difference to `{baseline}` (same seeds; percentage points): mean "
            f"[{round(100 * LEVEL)}% t-interval, Student t with n - 1 dof]; a gain or a loss only "
            "when the interval excludes 0.",
            "",
            "| dataset | method | config | n | Δ rank-1 | Δ mAP | Δ mINP |",
            "| --- | --- | --- | ---: | --- | --- | --- |",
        ]
        for p in sorted(pairs, key=lambda p: p.group.dataset):
            g = p.group
            lines.append(f"| {g.dataset} | {g.first('method')} | `{names[g.group]}` | {len(p.seeds)} "
                         f"| {_difference(p, 'rank1')} | {_difference(p, 'mAP')} | {_difference(p, 'mINP')} |")
    return lines


def write_markdown(groups: Sequence[GroupSummary], path: str, pairs: Sequence[PairedComparison] = ()) -> None:
    with open(path, "w") as f:
        f.write("\n".join(markdown_lines(groups, pairs)) + "\n")


def write_report(rows: Sequence[Dict[str, Any]], stem: str, baseline: Optional[str] = None) -> Dict[str, str]:
    """Write ``stem``.csv, .md and .png (e.g. ``<out>/results``); return their paths.

    ``rows``: :func:`collect_rows`; ``baseline``: the group the others are paired with.
    """
    groups = summarize_groups(rows)
    pairs = paired_comparisons(groups, baseline, LEVEL) if baseline else []
    paths = {ext: f"{stem}.{ext}" for ext in ("csv", "md", "png")}
    write_csv(list(rows) + summary_rows(groups, pairs), paths["csv"])
    write_markdown(groups, paths["md"], pairs)
    write_plot(groups, paths["png"], pairs)
    return paths
