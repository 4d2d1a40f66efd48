#!/usr/bin/env python
"""Export the eval-mode model (image -> embedding) to ONNX or TorchScript, checked against PyTorch.

    python scripts/export.py --config C [--weights W] --format onnx|torchscript --out F [--height H --width W] \\
        [--check-image IMG] [KEY VALUE ...]
"""
import os.path as osp
import sys

try:
    import torchreid_ext  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.deploy.commands import export_main

if __name__ == "__main__":
    sys.exit(export_main())
