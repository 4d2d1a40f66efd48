"""experiments.stats and .summary: mean / std over seeds and paired t intervals against numpy / scipy."""
import numpy as np
import pytest
from scipy import stats as sps

from torchreid_ext.experiments.runs import HarnessError
from torchreid_ext.experiments.stats import (
    GAIN,
    LOSS,
    NO_DIFFERENCE,
    NO_INTERVAL,
    paired_difference,
    summarize,
    verdict,
)
from torchreid_ext.experiments.summary import paired_comparisons, summarize_groups


@pytest.mark.parametrize("values", [[0.2], [0.25, 0.31], [0.222, 0.271, 0.244], [0.5, 0.1, 0.9, 0.3, 0.7]])
def test_summary_equals_numpy(values):
    s = summarize(values)
    assert s.n == len(values)
    assert s.mean == pytest.approx(np.mean(values), rel=1e-14)
    if len(values) == 1:
        assert s.std is None  # one seed: no spread
    else:
        assert s.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)


@pytest.mark.parametrize("level", [0.95, 0.9])
@pytest.mark.parametrize("x, b", [
    ([0.222, 0.271, 0.244], [0.236, 0.314, 0.260]),  # issue 14's CE + DRSL vs CE mAP (a loss)
    ([0.30, 0.41], [0.29, 0.35]),
    ([0.5, 0.52, 0.49, 0.55, 0.51], [0.5, 0.5, 0.5, 0.5, 0.5]),
])
def test_paired_interval_equals_scipy_ttest_rel(x, b, level):
    d = paired_difference(x, b, level)
    diffs = np.subtract(x, b)
    ref = sps.ttest_rel(x, b).confidence_interval(level)
    assert d.n == len(x)
    assert d.mean == pytest.approx(diffs.mean(), rel=1e-12)
    assert d.std == pytest.approx(diffs.std(ddof=1), rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(ref.low, rel=1e-10), pytest.approx(ref.high, rel=1e-10))
    expected = GAIN if ref.low > 0 else LOSS if ref.high < 0 else NO_DIFFERENCE
    assert d.verdict == expected


def test_issue_14_numbers_are_no_detectable_difference_at_three_seeds():
    """CE + DRSL - CE mAP = -1.4, -4.3, -1.6 points: lower on every seed, but with 2 dof the
    95% interval (t = 4.30) is about -6.5 .. +1.6 points and includes 0."""
    d = paired_difference([0.222, 0.271, 0.244], [0.236, 0.314, 0.260])
    assert d.mean == pytest.approx(-0.0243, abs=1e-4)
    assert d.low == pytest.approx(-0.0645, abs=5e-4) and d.high == pytest.approx(0.0158, abs=5e-4)
    assert d.verdict == NO_DIFFERENCE


def test_verdict_needs_the_interval_to_exclude_zero():
    assert verdict(0.001, 0.3) == GAIN
    assert verdict(-0.3, -0.001) == LOSS
    assert verdict(-0.1, 0.2) == verdict(0.0, 0.2) == verdict(-0.2, 0.0) == NO_DIFFERENCE
    assert verdict(None, None) == NO_INTERVAL


def test_one_seed_has_no_interval():
    d = paired_difference([0.3], [0.2])
    assert d.n == 1 and d.mean == pytest.approx(0.1) and d.low is d.high is d.std is None
    assert d.verdict == NO_INTERVAL


@pytest.mark.parametrize("call, pattern", [
    (lambda: summarize([]), r"no values"),
    (lambda: summarize([0.1, float("nan")]), r"finite"),
    (lambda: paired_difference([0.1, 0.2], [0.1]), r"one baseline value per value"),
    (lambda: paired_difference([0.1, 0.2], [0.1, 0.2], level=1.5), r"level = 1.5"),
])
def test_bad_values_are_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def row(group, seed, mAP, dataset="d", **extra):
    return {"group": group, "seed": seed, "dataset": dataset, "rank1": mAP + 0.1, "rank5": mAP + 0.2,
            "mAP": mAP, "mINP": None if extra.get("no_minp") else mAP / 2}


def test_groups_pair_by_seed_not_by_position():
    rows = [row("base", 1, 0.20), row("base", 2, 0.30), row("base", 3, 0.25),
            row("new", 3, 0.27), row("new", 1, 0.24), row("new", 4, 0.9),  # seed 4: no baseline run
            row("other", 1, 0.5, dataset="e")]  # another dataset: no baseline there
    groups = summarize_groups(rows)
    assert [(g.group, g.dataset, g.n) for g in groups] == [("base", "d", 3), ("new", "d", 3), ("other", "e", 1)]
    assert groups[1].stats["mAP"].mean == pytest.approx(np.mean([0.27, 0.24, 0.9]))
    (pair,) = paired_comparisons(groups, "base")
    assert pair.group.group == "new" and pair.seeds == [3, 1]
    ref = sps.ttest_rel([0.27, 0.24], [0.25, 0.20]).confidence_interval(0.95)
    assert pair.diffs["mAP"].mean == pytest.approx(0.03)
    assert (pair.diffs["mAP"].low, pair.diffs["mAP"].high) == (pytest.approx(ref.low), pytest.approx(ref.high))


def test_a_missing_metric_gives_no_summary_and_no_difference():
    rows = [row("base", 1, 0.2), row("base", 2, 0.3), row("new", 1, 0.2, no_minp=True), row("new", 2, 0.4)]
    groups = summarize_groups(rows)
    assert groups[1].stats["mINP"] is None and groups[1].stats["mAP"] is not None
    (pair,) = paired_comparisons(groups, "base")
    assert pair.diffs["mINP"] is None and pair.diffs["mAP"].n == 2


def test_unknown_baseline_and_repeated_seeds_are_refused():
    with pytest.raises(HarnessError, match=r"baseline 'nope' is not among the runs \['a'\]"):
        paired_comparisons(summarize_groups([row("a", 1, 0.2)]), "nope")
    with pytest.raises(HarnessError, match=r"group 'a' on d has runs with the same seed"):
        summarize_groups([row("a", 1, 0.2), row("a", 1, 0.3)])
