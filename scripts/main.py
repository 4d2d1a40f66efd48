#!/usr/bin/env python
"""Train and evaluate with Torchreid + torchreid_ext (upstream Torchreid's main.py interface).

    python scripts/main.py --config configs/quickstart.yaml [KEY VALUE ...]

The same command is installed as ``torchreid-ext``.
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
