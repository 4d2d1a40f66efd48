"""``scripts/compare.py``: run what is not finished, then write the comparison report.

    python scripts/compare.py configs/a.yaml configs/b.yaml [SAVE_DIR ...] --out log/compare \
        [--seeds 1 2 3] [--baseline configs/a.yaml] [--report docs/a_vs_b] [--test-time t.yaml ...] \
        --opts train.max_epoch 2 data.sources "['synthreid']"

Every input is checked (configs load with the overrides, datasets present, one evaluation
protocol) before the first run starts. With ``--seeds`` every config runs once per seed
(``train.seed``), seed by seed (all configs at the first seed, then the next ...), so an
interrupted comparison has complete pairs early; with ``--baseline`` the report pairs every
other config with the baseline on the same seeds (:mod:`.report`).
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence

from ..console import run_command
from .report import collect_rows, write_report
from .runs import HarnessError, Run, is_finished, launch, plan_runs

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "compare", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train/evaluate configs in one harness and compare them (CSV, Markdown, PNG)")
    p.add_argument("inputs", nargs="+", help="config files (.yaml) and/or finished save dirs")
    p.add_argument("--out", default="log/compare", help="output folder: runs/<name>/ and results.*")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="run every config once per seed (train.seed); default: once, with its own seed")
    p.add_argument("--baseline", default=None, metavar="CONFIG",
                   help="config (or save dir) the others are paired with, seed by seed (95%% t-interval); "
                        "added to the inputs if missing")
    p.add_argument("--report", default=None, metavar="STEM",
                   help="write the report as STEM.csv, STEM.md, STEM.png (default: OUT/results), "
                        "e.g. docs/proxy_benchmark; the runs stay under --out")
    p.add_argument("--test-time", nargs="+", default=[], metavar="CONFIG",
                   help="test-time configs (a test: section only, e.g. test: {rerank: True}): each evaluates "
                        "the baseline's final checkpoints again, seed by seed, as a row paired with it")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE overrides applied to every run (must come last)")
    return p


def _with_baseline(inputs: Sequence[str], baseline: Optional[str]) -> List[str]:
    inputs = list(inputs)
    if baseline is None:
        return inputs
    if not osp.exists(baseline):
        raise HarnessError(f"--baseline '{baseline}' does not exist (expected a config file or a save dir)")
    if not any(osp.abspath(p) == osp.abspath(baseline) for p in inputs):
        inputs.insert(0, baseline)
    return inputs


def _baseline_group(runs: Sequence[Run], baseline: str) -> str:
    path = osp.abspath(baseline)
    for run in runs:
        if osp.abspath(run.save_dir) == path or (osp.isfile(path) and run.config and osp.abspath(run.config) == path):
            return run.group
    raise HarnessError(f"--baseline '{baseline}' matches none of the runs")  # not reached: it is an input


def _launch_order(runs: Sequence[Run]) -> List[Run]:
    """Seed by seed (stable within a seed), so every config has its first seed early."""
    seeds = list(dict.fromkeys(r.seed for r in runs))
    return sorted(runs, key=lambda r: seeds.index(r.seed))


def _report_stem(out_dir: str, report: Optional[str]) -> str:
    if report is None:
        return osp.join(out_dir, "results")
    if report.endswith((os.sep, "/")) or osp.isdir(report):
        raise HarnessError(f"--report '{report}' is a folder; give a path stem such as docs/proxy_benchmark "
                           "(the report is STEM.csv, STEM.md, STEM.png)")
    return osp.splitext(report)[0] if report.endswith((".csv", ".md", ".png")) else report


def compare(inputs: Sequence[str], out_dir: str, overrides: Sequence[str] = (),
            seeds: Optional[Sequence[int]] = None, baseline: Optional[str] = None,
            report: Optional[str] = None, test_time: Sequence[str] = ()) -> Dict[str, str]:
    """Run every unfinished input (once per seed with ``seeds``), then write the report
    (``report``.{csv,md,png}, default ``out_dir``/results.*), pairing each config with
    ``baseline`` when given. ``test_time`` configs re-evaluate the baseline's final checkpoints
    (one row each, paired with the baseline)."""
    stem = _report_stem(out_dir, report)
    inputs = _with_baseline(inputs, baseline)
    runs = plan_runs(inputs, out_dir, overrides, seeds, test_time, baseline)
    base_group = _baseline_group(runs, baseline) if baseline is not None else None
    os.makedirs(out_dir, exist_ok=True)
    n = len(runs)
    for i, run in enumerate(_launch_order(runs), 1):
        if is_finished(run):
            logger.info(f"[compare] {i}/{n} {run.name}: finished, not rerun ({run.save_dir})")
            continue
        logger.info(f"[compare] {i}/{n} {run.name}: running {run.config} -> {run.save_dir}")
        t0 = time.time()
        launch(run)
        logger.info(f"[compare] {i}/{n} {run.name}: done in {time.time() - t0:.0f} s")
    if osp.dirname(stem):
        os.makedirs(osp.dirname(stem), exist_ok=True)
    paths = write_report(collect_rows(runs), stem, base_group)
    logger.info(f"[compare] wrote {', '.join(paths.values())}")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    """``scripts/compare.py`` / ``torchreid-ext-compare``: exit status 0, or 2 on bad input."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        compare(args.inputs, args.out, args.opts or [], args.seeds, args.baseline, args.report, args.test_time)

    return run_command(body)
