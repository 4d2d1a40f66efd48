#!/usr/bin/env python
"""Rewrite the published-number tables of docs/methods.md from torchreid_ext/experiments/published.py.

    python tools/published_tables.py [--check] [docs/methods.md]

Each ``<!-- published: SOURCE -->`` ... ``<!-- end published -->`` block of the page is replaced by
the table of that source. ``--check`` writes nothing and exits 1 when the page is out of date.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from torchreid_ext.experiments.published import render_tables  # noqa: E402

DEFAULT = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "docs", "methods.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", default=DEFAULT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    old = open(args.page, encoding="utf-8").read()
    new = render_tables(old)
    if args.check:
        print("up to date" if new == old else f"{args.page} is out of date: run {sys.argv[0]}")
        return 0 if new == old else 1
    if new != old:
        with open(args.page, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"wrote {args.page}" if new != old else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
