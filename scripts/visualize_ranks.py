#!/usr/bin/env python
"""Save rank lists (query + top-k gallery, green = same identity, red = not) of a trained run.

    python scripts/visualize_ranks.py --config CONFIG [--weights CKPT] [--out DIR] [--opts KEY VALUE ...]
    python scripts/visualize_ranks.py --save-dir SAVE_DIR      # a scripts/compare.py run (run.json)

The same command is installed as ``torchreid-ext-visualize``.
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.experiments.ranks import main

if __name__ == "__main__":
    sys.exit(main())
