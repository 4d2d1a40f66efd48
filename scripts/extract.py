#!/usr/bin/env python
"""Extract features of an image folder or a dataset split to HDF5.

    python scripts/extract.py --config C [--weights W] (--images DIR | --dataset NAME --split query|gallery|train) \\
        --out F.h5 [KEY VALUE ...]
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.deploy.commands import extract_main

if __name__ == "__main__":
    sys.exit(extract_main())
