"""Fail-fast checks on data, run before any long work.

Torchreid, given a missing dataset folder, tries to download from a URL that is dead
(leaving an empty folder behind); given an empty split folder, a file name outside the
dataset's pattern or a one-identity training set, it fails with a bare IndexError,
AttributeError or AssertionError; given an unreadable image, it retries it forever; and a
target whose queries have no match in the gallery, or a truncated JPEG, is found only at
the final test, after training. These checks turn each into one clear error:

* before data loading: :func:`check_dataset_present`, :func:`scan_image_folders` (split
  folders of Market-1501-style datasets: non-empty, names parse, identity count) and
  :func:`check_train_identities`;
* on the lists the data manager built: :func:`check_queries` and :func:`check_images`
  (every file opens; with ``decode`` every pixel decodes, which finds truncated files).

Every image read here (and Torchreid's, through :func:`read_image`, which plugin.py installs)
first compares the size the file's header declares with ``data.max_image_side``
(:func:`open_image`): a 65-byte PNG may declare 60000 x 60000 pixels, and decoding it would
exhaust memory.
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image

from ..adapter import torchreid
from ..errors import DatasetError, DatasetNotFound, UnknownNameError, UnreadableImageError
from ..options import ConfigOptions, positive_int

__all__ = [
    "IMAGE_CHECKS",
    "DataOptions",
    "DatasetNotFound",
    "DatasetError",
    "UnreadableImageError",
    "EXPECTED_LAYOUTS",
    "FolderLayout",
    "FOLDER_LAYOUTS",
    "FolderScan",
    "check_dataset_present",
    "scan_image_folders",
    "check_train_identities",
    "check_queries",
    "set_max_image_side",
    "declared_size",
    "open_image",
    "read_image",
    "check_images",
]

logger = logging.getLogger(__name__)


# data.image_check -> what the check before training does with each image
IMAGE_CHECKS = {"header": "opened", "decode_test": "opened (query and gallery decoded)", "decode_all": "decoded"}


@dataclass(frozen=True)
class DataOptions(ConfigOptions):
    """Our ``data`` keys: ``image_check`` (decode_test: query and gallery decoded fully, training
    images opened; decode_all; header), ``custom_datasets`` (dataset files registered before the
    run, :mod:`torchreid_ext.data.image_list`) and ``max_image_side`` (the largest input height /
    width accepted)."""

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[Dict[str, Sequence[Any]]] = {"image_check": tuple(IMAGE_CHECKS)}
    CHECKS: ClassVar[Dict[str, Callable[[Any], Optional[str]]]] = {"max_image_side": positive_int}

    image_check: str = "decode_test"
    custom_datasets: Tuple[str, ...] = ()
    max_image_side: int = 4096


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
    "cuhk03_pair1": ("cuhk03_pair1/labeled/{train,val}/PPPP_II.jpg (CUHK03 camera pair 1, labelled boxes)",
                     [("labeled/train",), ("labeled/val",)]),
    **{name: ("viper/VIPeR/{cam_a,cam_b}/NNN_AAA.bmp", [("VIPeR/cam_a",), ("VIPeR/cam_b",)])
       for name in ("viper", "viper_full", "viper_10split")},
    **{name: ("cuhk01/campus/PPPPIII.png", [("campus",)]) for name in ("cuhk01", "cuhk01_full", "cuhk01_10split")},
}


@dataclass(frozen=True)
class FolderLayout:
    """A dataset stored as Market-1501's split folders of ``<pid>_c<cam>...jpg`` files, as
    Torchreid's reader for it parses them (pid -1: junk, skipped)."""

    data_dirs: Tuple[str, ...]  # under the dataset dir; the first that exists is used
    max_pid: Optional[int]  # Torchreid asserts 0 <= pid <= max_pid (None: no bound)
    max_cam: int  # and 1 <= camera <= max_cam
    splits: Tuple[str, ...] = ("bounding_box_train", "query", "bounding_box_test")
    pattern: str = r"([-\d]+)_c(\d)"
    example: str = "0002_c1s1_000451_03.jpg"


FOLDER_LAYOUTS: Dict[str, FolderLayout] = {
    "market1501": FolderLayout(("Market-1501-v15.09.15", ""), max_pid=1501, max_cam=6),
    "dukemtmcreid": FolderLayout(("DukeMTMC-reID",), max_pid=None, max_cam=8),
}


@dataclass(frozen=True)
class FolderScan:
    """Identities found in each split folder of one dataset (junk excluded)."""

    name: str
    data_dir: str
    pids: Dict[str, frozenset]  # split -> identities; the training split first

    @property
    def train_pids(self) -> frozenset:
        return next(iter(self.pids.values()))


def check_dataset_present(name: str, root: str, key: str = "dataset") -> None:
    """Raise DatasetNotFound unless dataset ``name`` looks present under ``root``; an unregistered
    name is an :class:`UnknownNameError` naming ``key`` (the config key or argument that gave it).

    Generated datasets (no download URL and a ``generated`` flag) always pass; unknown
    datasets are checked for their top folder only.
    """
    registry = torchreid().image_datasets()
    if name not in registry:
        raise UnknownNameError(f"{key} = {name!r} is unknown; choose one of {sorted(registry)}")
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


def scan_image_folders(name: str, root: str) -> Optional[FolderScan]:
    """For a dataset with a :data:`FOLDER_LAYOUTS` entry: raise DatasetError on an empty
    split folder or a file name Torchreid cannot parse (naming the file and the expected
    pattern), else return the identities of each split. None for other datasets."""
    layout = FOLDER_LAYOUTS.get(name)
    if layout is None:
        return None
    cls = torchreid().image_datasets()[name]
    top = osp.join(osp.abspath(osp.expanduser(root)), getattr(cls, "dataset_dir", name))
    data_dir = next((osp.join(top, d) for d in layout.data_dirs if osp.isdir(osp.join(top, d))), top)
    pattern = re.compile(layout.pattern)
    pid_rule = f"0 <= pid <= {layout.max_pid}" if layout.max_pid is not None else "pid >= -1"
    pids: Dict[str, frozenset] = {}
    for split in layout.splits:
        folder = osp.join(data_dir, split)
        if not osp.isdir(folder):
            raise DatasetNotFound(f"Dataset '{name}': the split folder '{folder}' does not exist")
        files = sorted(glob.glob(osp.join(folder, "*.jpg")))
        if not files:
            raise DatasetError(f"Dataset '{name}': the split folder '{folder}' holds no .jpg images")
        found = set()
        for path in files:
            m = pattern.search(osp.basename(path))
            if m is None:
                raise DatasetError(
                    f"Dataset '{name}': the image name '{path}' does not fit the pattern "
                    f"<pid>_c<camera>... (regex '{layout.pattern}', e.g. '{layout.example}')")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                continue  # junk, skipped by Torchreid
            if (layout.max_pid is not None and not 0 <= pid <= layout.max_pid) or pid < -1 \
                    or not 1 <= cam <= layout.max_cam:
                raise DatasetError(
                    f"Dataset '{name}': the image name '{path}' gives pid {pid} and camera {cam}; "
                    f"Torchreid's reader allows {pid_rule} (-1: junk) and 1 <= camera <= {layout.max_cam}")
            found.add(pid)
        pids[split] = frozenset(found)
    return FolderScan(name, data_dir, pids)


def check_train_identities(scans: Sequence[FolderScan], min_ids: int, why: str = "",
                           combineall: bool = False) -> int:
    """Raise DatasetError unless the training sets of ``scans`` (the sources, summed as
    Torchreid concatenates them) hold at least ``min_ids`` identities; returns the count.
    With ``combineall`` a dataset's query and gallery identities (not 0 / -1) count too."""
    total, parts = 0, []
    for scan in scans:
        ids = set(scan.train_pids)
        if combineall:
            for found in scan.pids.values():
                ids |= {p for p in found if p > 0}
        total += len(ids)
        parts.append(f"'{scan.name}' has {len(ids)}")
    if total < min_ids:
        raise DatasetError(
            f"the training set ({', '.join(parts)}) has {total} identit{'y' if total == 1 else 'ies'}; "
            f"training needs at least {min_ids}{why}")
    return total


def check_queries(name: str, query: Sequence[tuple], gallery: Sequence[tuple], what: str = "") -> int:
    """Raise DatasetError unless some query of target ``name`` is valid (an image of its
    identity from another camera is in the gallery); returns the number of valid queries.
    ``what`` replaces "target dataset '<name>'" in the messages."""
    what = what or f"target dataset '{name}'"
    cams: Dict[int, set] = {}
    for item in gallery:
        cams.setdefault(item[1], set()).add(item[2])
    valid = sum(1 for item in query if cams.get(item[1], set()) - {item[2]})
    if valid == 0:
        raise DatasetError(
            f"{what}: none of its {len(query)} queries has a gallery image of the same "
            "identity from another camera, so rank-1 and mAP are undefined; check its query and gallery "
            "(identity and camera come from the file names or the dataset's list)")
    if valid < len(query):
        logger.warning("%s: %d of %d queries have no gallery image of their identity from another "
                       "camera; the evaluator skips them", what[0].upper() + what[1:], len(query) - valid, len(query))
    return valid


# The largest image side (width or height) an image file may declare; set from each run's
# data.max_image_side (set_max_image_side) and used by every image read below, including the
# reader installed into Torchreid's ImageDataset (plugin.py), which takes the path only.
_MAX_SIDE = [DataOptions.max_image_side]


def set_max_image_side(side: int) -> None:
    """Make ``side`` (``data.max_image_side``) the limit of :func:`read_image` and :func:`check_images`."""
    _MAX_SIDE[0] = int(side)


def declared_size(path: str) -> Optional[Tuple[int, int]]:
    """``(width, height)`` as the image file's header declares it, read by PIL's format plugins
    without decoding a pixel and without PIL's decompression-bomb check (which would raise or warn
    before the size could be compared); None when no plugin recognises the file."""
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            if accept is not None:
                verdict = accept(prefix)  # True, False, or a message saying why not
                if isinstance(verdict, str) or not verdict:
                    continue
            fp.seek(0)
            try:
                return tuple(factory(fp, path).size)
            except (SyntaxError, IndexError, TypeError, ValueError, OSError, EOFError, struct.error):
                continue
    return None


def open_image(path: str, max_side: Optional[int] = None) -> Image.Image:
    """``Image.open(path)`` (the header only), after checking the size the file declares against
    ``max_side`` (default: ``data.max_image_side`` of the run): a tiny file may declare 60000 x
    60000 pixels, gigabytes once decoded. Raises UnreadableImageError naming the file."""
    limit = _MAX_SIDE[0] if max_side is None else int(max_side)
    try:
        size = declared_size(path)
        if size is not None and max(size) > limit:
            raise UnreadableImageError(
                f"image file '{path}' declares {size[0]}x{size[1]} pixels, above data.max_image_side = {limit}; "
                "it is not decoded (a decompression bomb?). Raise data.max_image_side if the image is genuine")
        return Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnreadableImageError):
            raise
        raise UnreadableImageError(f"cannot read image file '{path}': {exc}") from exc


def read_image(path: str, max_side: Optional[int] = None) -> Image.Image:
    """Open an image as RGB, or raise UnreadableImageError naming the file (no retry loop); an
    image declaring a side over ``max_side`` (default ``data.max_image_side``) is not decoded."""
    img = open_image(path, max_side)
    try:
        with img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImageError(f"cannot read image file '{path}': {exc}") from exc


def _image_problem(path: str, decode: bool, max_side: Optional[int] = None) -> Optional[str]:
    try:
        with open_image(path, max_side) as img:
            if decode:
                img.load()  # every pixel: a truncated file fails here
    except UnreadableImageError as exc:
        return str(exc)
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot read image file '{path}': {exc}"
    return None


def check_images(paths: Iterable[str], limit: Optional[int] = None, decode: bool = False,
                 workers: Optional[int] = None, max_side: Optional[int] = None) -> int:
    """Open every image (``decode``: and decode it fully, in ``workers`` threads; PIL decodes
    without the GIL); raise UnreadableImageError on the first bad file in ``paths`` order. A file
    declaring a side over ``max_side`` (default ``data.max_image_side``) is refused unread."""
    todo: List[str] = list(paths)[:limit] if limit is not None else list(paths)
    if decode and len(todo) > 64:
        workers = workers or min(8, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(workers)
        try:
            for problem in pool.map(_image_problem, todo, [True] * len(todo), [max_side] * len(todo)):
                if problem:
                    raise UnreadableImageError(problem)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return len(todo)
    for path in todo:
        problem = _image_problem(path, decode, max_side)
        if problem:
            raise UnreadableImageError(problem)
    return len(todo)
