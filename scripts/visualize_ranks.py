#!/usr/bin/env python
"""Save rank lists (query + top-k gallery, green = same identity, red = not) of a trained run.

    python scripts/visualize_ranks.py --config CONFIG [--weights CKPT] [--out DIR] [--opts KEY VALUE ...]
    python scripts/visualize_ranks.py --save-dir SAVE_DIR      # a scripts/compare.py run (run.json)
"""
import argparse
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.checkpoint import CheckpointError
from torchreid_ext.config import ConfigError, load_config
from torchreid_ext.data.checks import UnreadableImageError
from torchreid_ext.experiments.ranks import visualize_ranks
from torchreid_ext.experiments.runs import read_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="", help="config of the trained run")
    p.add_argument("--save-dir", default="", help="save dir of the run (config from its run.json if no --config)")
    p.add_argument("--weights", default="", help="checkpoint (default: newest in <save_dir>/model)")
    p.add_argument("--out", default="", help="output folder (default: <save_dir>/ranks)")
    p.add_argument("--num-queries", type=int, default=8)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides (last)")
    args = p.parse_args(argv)
    try:
        config, opts = args.config, list(args.opts or [])
        if args.save_dir:
            spec = read_spec(args.save_dir)
            if not config and spec is not None:
                config, opts = spec["config"], spec["overrides"] + opts
            if not config:
                raise ConfigError(f"save dir '{args.save_dir}' has no run.json; pass --config too")
            opts += ["data.save_dir", args.save_dir]
        if not config:
            raise ConfigError("give --config or --save-dir")
        cfg = load_config(config, opts)
        out = args.out or osp.join(cfg.data.save_dir, "ranks")
        for item in visualize_ranks(cfg, out, args.weights, args.num_queries, args.topk):
            print(f"{item['image']}: top-{len(item['matched'])} matches {''.join('+' if m else '-' for m in item['matched'])}")
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError, UnreadableImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
