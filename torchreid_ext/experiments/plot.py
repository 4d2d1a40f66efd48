"""The comparison plot: mean rank-1 and mAP per config with error bars, one panel per dataset.

Top row: bars are means over seeds, error bars +-1 sample std (none for n = 1), published
numbers as black ticks. With a baseline, a second row shows each config's paired difference
to it (percentage points) with its 95% t interval and a line at 0. :func:`make_figure` returns
the matplotlib figure (tests read its error bars); :func:`write_plot` saves it.
"""
from __future__ import annotations

import os.path as osp
from typing import Dict, List, Optional, Sequence

from .runs import HarnessError
from .summary import GroupSummary, PairedComparison

__all__ = ["display_labels", "make_figure", "write_plot"]

BARS = (("rank1", "rank-1", "tab:blue"), ("mAP", "mAP", "tab:orange"))
WIDTH = 0.38


def display_labels(groups: Sequence[GroupSummary]) -> Dict[str, str]:
    """Short names for groups: the method when unique, else the config's stem, else the group."""
    def stem(g: GroupSummary) -> str:
        return osp.splitext(osp.basename(g.first("config")))[0] or g.group

    names = list(dict.fromkeys(g.group for g in groups))
    by_group = {g.group: g for g in groups}
    for make in (lambda g: g.first("method"), stem, lambda g: g.group):
        labels = {n: make(by_group[n]) for n in names}
        if len(set(labels.values())) == len(labels):
            return labels
    return {n: n for n in names}


def _spread_note(groups: Sequence[GroupSummary]) -> str:
    ns = sorted({g.n for g in groups})
    n = ", ".join(map(str, ns))
    return f"mean over seeds, error bars ±1 std (n = {n})" if ns != [1] else "one seed each (n = 1): no error bars"


def _means_panel(ax, sub: Sequence[GroupSummary], labels: Dict[str, str]) -> None:
    xs = list(range(len(sub)))
    for i, (key, name, colour) in enumerate(BARS):
        offset = (i - 0.5) * WIDTH
        means = [100 * g.stats[key].mean for g in sub]
        errs = [100 * (g.stats[key].std or 0.0) for g in sub]
        bars = ax.bar([x + offset for x in xs], means, WIDTH, yerr=errs, capsize=3, color=colour,
                      error_kw={"elinewidth": 1, "ecolor": "black"}, label=f"{name} (mean ± 1 std)")
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
        paper = [(x + offset, g.first(f"paper_{key}")) for x, g in zip(xs, sub)
                 if g.first(f"paper_{key}") is not None]
        if paper:
            ax.scatter(*zip(*paper), marker="_", s=300, color="black", zorder=3,
                       label="paper" if key == "rank1" else None)
    ax.set_xticks(xs)
    ax.set_xticklabels([labels[g.group] for g in sub], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    epochs = {g.first("epoch") for g in sub}
    title = sub[0].dataset + (f" (epoch {sub[0].first('epoch')})" if len(epochs) == 1 else "")
    ax.set_title(f"{title}\n{_spread_note(sub)}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def _pairs_panel(ax, pairs: Sequence[PairedComparison], labels: Dict[str, str]) -> None:
    xs = list(range(len(pairs)))
    for i, (key, name, colour) in enumerate(BARS):
        offset = (i - 0.5) * WIDTH
        diffs = [p.diffs[key] for p in pairs]
        means = [100 * d.mean if d else 0.0 for d in diffs]
        lows = [100 * (d.mean - d.low) if d and d.low is not None else 0.0 for d in diffs]
        highs = [100 * (d.high - d.mean) if d and d.high is not None else 0.0 for d in diffs]
        bars = ax.bar([x + offset for x in xs], means, WIDTH, yerr=[lows, highs], capsize=3, color=colour,
                      error_kw={"elinewidth": 1, "ecolor": "black"}, label=f"Δ {name} (95% CI)")
        ax.bar_label(bars, labels=[f"{100 * d.mean:+.1f}" if d else "n/a" for d in diffs], fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([labels[p.group.group] for p in pairs], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("percentage points")
    ns = sorted({len(p.seeds) for p in pairs})
    ax.set_title(f"paired difference to {labels[pairs[0].baseline.group]} (same seeds, n = "
                 f"{', '.join(map(str, ns))})\nerror bars: 95% t-interval (Student t, n - 1 dof)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def make_figure(groups: Sequence[GroupSummary], pairs: Optional[Sequence[PairedComparison]] = None):
    """Means with ±1 std error bars per dataset; with ``pairs``, a row of paired differences."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(g.dataset for g in groups))
    if not datasets:
        raise HarnessError("nothing to plot: no results")
    missing = [g.group for g in groups if g.stats["rank1"] is None or g.stats["mAP"] is None]
    if missing:
        raise HarnessError(f"cannot plot runs without rank-1 / mAP: {missing}")
    labels = display_labels(groups)
    widest = max(sum(g.dataset == d for g in groups) for d in datasets)
    rows = 2 if pairs else 1
    fig = Figure(figsize=(max(4.5, 1.1 * widest + 1.5) * len(datasets), 4.4 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(datasets), squeeze=False)
    for col, dataset in enumerate(datasets):
        _means_panel(axes[0][col], [g for g in groups if g.dataset == dataset], labels)
        if pairs:
            sub: List[PairedComparison] = [p for p in pairs if p.group.dataset == dataset]
            if sub:
                _pairs_panel(axes[1][col], sub, labels)
            else:
                axes[1][col].set_axis_off()
    fig.tight_layout()
    return fig


def write_plot(groups: Sequence[GroupSummary], path: str,
               pairs: Optional[Sequence[PairedComparison]] = None) -> None:
    make_figure(groups, pairs).savefig(path, dpi=110)
