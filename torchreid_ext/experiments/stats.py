"""Statistics of a multi-seed comparison: mean and spread over seeds, paired differences.

A config run with seeds s_1..s_n gives n values of a metric. Its summary is the mean and the
sample standard deviation (n - 1 denominator; undefined for n = 1). Against a baseline run
with the same seeds, the paired differences d_i = x_i - b_i remove the part of the seed
noise both runs share; their mean gets a two-sided Student t interval with n - 1 degrees of
freedom, mean(d) -/+ t_{(1 + level) / 2, n - 1} * sd(d) / sqrt(n). A difference is called a
gain or a loss only when that interval excludes 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Summary", "PairedDifference", "summarize", "paired_difference", "verdict",
           "GAIN", "LOSS", "NO_DIFFERENCE", "NO_INTERVAL"]

GAIN = "gain"
LOSS = "loss"
NO_DIFFERENCE = "no detectable difference"
NO_INTERVAL = "n = 1: no interval"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: Optional[float]  # sample std (ddof 1); None for n = 1


@dataclass(frozen=True)
class PairedDifference:
    n: int  # number of seeds both runs have
    mean: float  # mean of (x - baseline) over those seeds
    std: Optional[float]  # sample std of the differences; None for n = 1
    low: Optional[float]  # interval bounds; None for n = 1
    high: Optional[float]
    level: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def _check_values(values: Sequence[float], what: str) -> list:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what}: no values (need at least one seed)")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: values must be finite, got {bad}")
    return values


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample std of one metric over seeds."""
    values = _check_values(values, "summarize")
    mean, std = _mean_std(values)
    return Summary(len(values), mean, std)


def paired_difference(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of ``values[i] - baseline[i]`` (same seed at the same index) with its t interval."""
    from scipy.stats import t as student_t

    if not 0 < level < 1:
        raise ValueError(f"level = {level} must lie in (0, 1), e.g. 0.95")
    values = _check_values(values, "paired_difference")
    baseline = _check_values(baseline, "paired_difference baseline")
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference needs one baseline value per value; got {len(values)} "
                         f"and {len(baseline)}")
    diffs = [v - b for v, b in zip(values, baseline)]
    n = len(diffs)
    mean, std = _mean_std(diffs)
    if n == 1:
        return PairedDifference(1, mean, None, None, None, level)
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, level)


def verdict(low: Optional[float], high: Optional[float]) -> str:
    """'gain' / 'loss' when the interval [low, high] excludes 0, else 'no detectable difference'."""
    if low is None or high is None:
        return NO_INTERVAL
    if low > 0:
        return GAIN
    if high < 0:
        return LOSS
    return NO_DIFFERENCE
