#!/usr/bin/env python
"""Params (classifier excluded) and MACs of every torchreid_ext model, as a Markdown table.

    python scripts/model_stats.py [--height 256 --width 128] [osnet_x1_0 resnet50 ...]
                                  [--config configs/ablation/topdown_k3.yaml ...]

Rows: every registered torchreid_ext model (default options), then the names given (ours
or Torchreid's), then one row per ``--config`` (its model with the file's options).
docs/methods.md M5 compares these with the paper's Table II.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.config import load_config
from torchreid_ext.models import MODELS, ModelOptions, build_model, build_model_from_options
from torchreid_ext.models.complexity import count_macs, count_params

# Paper Table II (params M, GFLOPs at 256x128; its "flops" are MACs).
PAPER = {"resnet50_bnfc512": "24.56 M / 2.6 G", "msfl_resnet50": "27 M / 5.9 G"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="extra model names (ours or Torchreid's)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=751, help="classifier size (not counted)")
    p.add_argument("--config", action="append", default=[], help="config file; repeatable")
    return p


def stats_rows(args: argparse.Namespace) -> List[Sequence[str]]:
    rows = []
    names = list(MODELS) + [n for n in args.names if n not in MODELS]
    for name in names:
        model = build_model(name, args.num_classes, loss="softmax", pretrained=False, use_gpu=False)
        rows.append(_row(name, model, args, PAPER.get(name, "")))
    for path in args.config:
        cfg = load_config(path, ["model.pretrained", "False"])
        model = build_model_from_options(ModelOptions.from_config(cfg), args.num_classes, use_gpu=cfg.use_gpu)
        rows.append(_row(f"{cfg.model.name} ({osp.basename(path)})", model, args, ""))
    return rows


def _row(label: str, model, args: argparse.Namespace, paper: str) -> Sequence[str]:
    params = count_params(model)
    macs = count_macs(model, args.height, args.width)
    return (label, f"{params:,}", f"{params / 1e6:.2f}", f"{macs / 1e9:.2f}", paper)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    header = ("model", "params", "params (M)", f"GMACs @ {args.height}x{args.width}",
              "paper Table II")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in stats_rows(args):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
