"""Group the run rows of a comparison by config and summarise them over seeds.

A group is one config's runs over seeds on one target dataset (a save dir given alone is a
group of one). :func:`summarize_groups` gives each metric's mean and sample std
(:mod:`.stats`); :func:`paired_comparisons` pairs every group with the baseline's group on
the same dataset, seed by seed, and gives the mean difference with its t interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .runs import HarnessError
from .stats import PairedDifference, Summary, paired_difference, summarize

__all__ = ["METRICS", "GroupSummary", "PairedComparison", "summarize_groups", "paired_comparisons"]

METRICS = ("rank1", "rank5", "mAP", "mINP")  # fractions, as in metrics.json


@dataclass
class GroupSummary:
    group: str
    dataset: str
    runs: List[Dict[str, Any]]  # the run rows (report.collect_rows), in input (seed) order
    stats: Dict[str, Optional[Summary]]  # per metric; None where a run lacks the metric

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> List[Optional[int]]:
        return [r["seed"] for r in self.runs]

    def first(self, key: str) -> Any:
        """A value every run of the group shares (config, method, epoch, params ...)."""
        return self.runs[0][key]

    def mean_of(self, key: str) -> Optional[float]:
        values = [r[key] for r in self.runs]
        return None if any(v is None for v in values) else sum(values) / len(values)


@dataclass
class PairedComparison:
    group: GroupSummary
    baseline: GroupSummary
    seeds: List[int]  # the seeds both groups ran, in the group's order
    diffs: Dict[str, Optional[PairedDifference]]  # None: no common seed or a metric missing


def summarize_groups(rows: Sequence[Dict[str, Any]]) -> List[GroupSummary]:
    """One summary per (group, dataset), in the order the groups first appear."""
    by_key: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["group"], row["dataset"]), []).append(row)
    groups = []
    for (group, dataset), runs in by_key.items():
        seeds = [r["seed"] for r in runs if r["seed"] is not None]
        if len(set(seeds)) != len(seeds):
            raise HarnessError(f"group '{group}' on {dataset} has runs with the same seed: {seeds}")
        stats = {}
        for key in METRICS:
            values = [r[key] for r in runs]
            stats[key] = None if any(v is None for v in values) else summarize(values)
        groups.append(GroupSummary(group, dataset, runs, stats))
    return groups


def _value_by_seed(group: GroupSummary, key: str) -> Dict[int, Optional[float]]:
    return {r["seed"]: r[key] for r in group.runs if r["seed"] is not None}


def paired_comparisons(groups: Sequence[GroupSummary], baseline: str,
                       level: float = 0.95) -> List[PairedComparison]:
    """Each non-baseline group against ``baseline``'s group on the same dataset, same seeds."""
    if not any(g.group == baseline for g in groups):
        raise HarnessError(f"baseline '{baseline}' is not among the runs {sorted({g.group for g in groups})}")
    base = {g.dataset: g for g in groups if g.group == baseline}
    out = []
    for g in groups:
        if g.group == baseline or g.dataset not in base:
            continue
        b = base[g.dataset]
        common = [s for s in g.seeds if s is not None and s in set(b.seeds)]
        diffs: Dict[str, Optional[PairedDifference]] = {}
        for key in METRICS:
            x, y = _value_by_seed(g, key), _value_by_seed(b, key)
            values = [x[s] for s in common]
            base_values = [y[s] for s in common]
            usable = common and not any(v is None for v in values + base_values)
            diffs[key] = paired_difference(values, base_values, level) if usable else None
        out.append(PairedComparison(g, b, common, diffs))
    return out
