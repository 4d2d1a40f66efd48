#!/usr/bin/env python
"""Find the people of query images in a folder of crops: matches.csv, matches.json and report.html.

    python scripts/search.py --config C --weights W --query IMG_OR_DIR [...] --gallery DIR_OR_H5 --out DIR \\
        [-k 10] [--threshold D | --calibration metrics.json [--fpr 0.01]] [KEY VALUE ...]
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.deploy.commands import search_main

if __name__ == "__main__":
    sys.exit(search_main())
