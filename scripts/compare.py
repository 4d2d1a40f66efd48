#!/usr/bin/env python
"""Compare configs in one harness (logic: :mod:`torchreid_ext.experiments.compare`).

    python scripts/compare.py CONFIG_OR_SAVE_DIR ... --out DIR [--seeds 1 2 3] [--baseline CONFIG] [--report STEM] \
        --opts KEY VALUE ...
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
