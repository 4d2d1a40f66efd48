"""``scripts/compare.py``: run what is not finished, then write the comparison report.

    python scripts/compare.py configs/a.yaml configs/b.yaml [SAVE_DIR ...] --out log/compare \
        --opts train.max_epoch 2 data.sources "['synthreid']"

Every input is checked (configs load with the overrides, datasets present, one evaluation
protocol) before the first run starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from .report import collect_rows, write_report
from .runs import HarnessError, is_finished, launch, plan_runs

__all__ = ["build_parser", "compare", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train/evaluate configs in one harness and compare them (CSV, Markdown, PNG)")
    p.add_argument("inputs", nargs="+", help="config files (.yaml) and/or finished save dirs")
    p.add_argument("--out", default="log/compare", help="output folder: runs/<name>/ and results.*")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE overrides applied to every run (must come last)")
    return p


def compare(inputs: Sequence[str], out_dir: str, overrides: Sequence[str] = ()) -> Dict[str, str]:
    """Run every unfinished input, then write results.{csv,md,png} in ``out_dir``."""
    runs = plan_runs(inputs, out_dir, overrides)
    os.makedirs(out_dir, exist_ok=True)
    n = len(runs)
    for i, run in enumerate(runs, 1):
        if is_finished(run):
            print(f"[compare] {i}/{n} {run.name}: finished, not rerun ({run.save_dir})", flush=True)
            continue
        print(f"[compare] {i}/{n} {run.name}: running {run.config} -> {run.save_dir}", flush=True)
        t0 = time.time()
        launch(run)
        print(f"[compare] {i}/{n} {run.name}: done in {time.time() - t0:.0f} s", flush=True)
    paths = write_report(collect_rows(runs), out_dir)
    print(f"[compare] wrote {', '.join(paths.values())}", flush=True)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        compare(args.inputs, args.out, args.opts or [])
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
