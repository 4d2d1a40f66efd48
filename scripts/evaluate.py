#!/usr/bin/env python
"""Evaluate saved query / gallery features (the engine's evaluation) and write metrics.json.

    python scripts/evaluate.py --query Q.h5 --gallery G.h5 [--out DIR] [KEY VALUE ...]
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.deploy.commands import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
