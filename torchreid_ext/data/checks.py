"""Fail-fast checks on data, run before any long work.

Torchreid, given a missing dataset folder, tries to download from a URL that is dead
(leaving an empty folder behind), and given an unreadable image, retries it forever.
These checks turn both into one clear error.
"""
from __future__ import annotations

import os.path as osp
from typing import Iterable, Optional

from PIL import Image

from ..adapter import torchreid

__all__ = [
    "DatasetNotFound",
    "UnreadableImageError",
    "EXPECTED_LAYOUTS",
    "check_dataset_present",
    "read_image",
    "check_images",
]


class DatasetNotFound(FileNotFoundError):
    pass


class UnreadableImageError(OSError):
    pass


# What each common dataset must look like under data.root (Torchreid's readers).
EXPECTED_LAYOUTS = {
    "market1501": ("market1501/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/*.jpg",
                   [("Market-1501-v15.09.15/bounding_box_train", "bounding_box_train")]),
    "dukemtmcreid": ("dukemtmc-reid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/*.jpg",
                     [("DukeMTMC-reID/bounding_box_train",)]),
    "msmt17": ("msmt17/MSMT17_V1/{train,test,list_train.txt,list_val.txt,list_query.txt,list_gallery.txt}"
               " (or MSMT17_V2 with mask_train_v2/mask_test_v2)",
               [("MSMT17_V1/train", "MSMT17_V2/mask_train_v2")]),
    "cuhk03": ("cuhk03/cuhk03_release/cuhk-03.mat plus the new-protocol split files "
               "cuhk03_new_protocol_config_{detected,labeled}.mat in cuhk03/",
               [("cuhk03_release/cuhk-03.mat",)]),
}


def check_dataset_present(name: str, root: str) -> None:
    """Raise DatasetNotFound unless dataset ``name`` looks present under ``root``.

    Generated datasets (no download URL and a ``generated`` flag) always pass; unknown
    datasets are checked for their top folder only.
    """
    registry = torchreid().image_datasets()
    if name not in registry:
        raise KeyError(f"Unknown dataset '{name}'. Available datasets: {', '.join(sorted(registry))}")
    cls = registry[name]
    if getattr(cls, "generated", False):
        return
    root = osp.abspath(osp.expanduser(root))
    top = osp.join(root, getattr(cls, "dataset_dir", name))
    layout, alternatives = EXPECTED_LAYOUTS.get(name, (f"{osp.basename(top)}/...", []))
    if osp.isdir(top) and all(
        any(osp.exists(osp.join(top, option)) for option in group) for group in alternatives
    ):
        return
    state = "is empty or incomplete" if osp.isdir(top) else "does not exist"
    raise DatasetNotFound(
        f"Dataset '{name}' not found: '{top}' {state}. Expected layout under data.root "
        f"('{root}'): {layout}. Download it manually (this machine may be offline; "
        f"torchreid_ext does not start Torchreid's automatic download), or set data.root."
    )


def read_image(path: str) -> Image.Image:
    """Open an image as RGB, or raise UnreadableImageError naming the file (no retry loop)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"cannot read image file '{path}': {exc}") from exc


def check_images(paths: Iterable[str], limit: Optional[int] = None) -> int:
    """Open every image header (cheap: no decoding); raise on the first bad file."""
    count = 0
    for path in paths:
        if limit is not None and count >= limit:
            break
        try:
            with Image.open(path) as img:
                img.size  # header parsed
        except (OSError, ValueError, SyntaxError) as exc:
            raise UnreadableImageError(f"cannot read image file '{path}': {exc}") from exc
        count += 1
    return count
