"""Any folder of person crops as a Torchreid dataset, without writing a class.

A dataset is described by an :class:`ImageListSpec`: a folder plus either

* a **file-name rule**: a regular expression matched against each image's path relative to
  the folder, with named groups ``pid``, ``camid`` and optionally ``split``; or
* a **list file**: CSV (header ``path,pid,camid[,split]``) or YAML (a list of mappings with
  those keys), one image per row, paths relative to the folder.

Captured text can be translated by ``camid_map`` / ``split_map`` (e.g. CUHK03's image index
``00``-``04`` -> camera 0). A split is ``train``, ``query``, ``gallery`` or ``test``; ``test``
images are queries when their camera is in ``query_cameras``, gallery images otherwise.
Training identities are relabelled 0..N-1 (sorted by pid); query and gallery keep their pids.

:func:`register_image_dataset` puts the spec into Torchreid's dataset registry under its name,
so ``data.sources [name]`` and ``torchreid.data.ImageDataManager(sources=name)`` use it; a spec
can also be written as a YAML file and named in ``data.custom_datasets``. Reading a spec
(:func:`load_items`) is also the check run before training: every error names the file (and
the line of a list file) and what is allowed.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..adapter import torchreid
from ..errors import yaml_problem
from .checks import DatasetError, FolderScan

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageItem",
    "ImageListSpec",
    "DatasetItems",
    "load_items",
    "read_list",
    "scan_folder",
    "spec_class",
    "register_image_dataset",
    "register_config_datasets",
    "scan_image_list",
    "load_spec_file",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "query", "gallery", "test")


@dataclass(frozen=True)
class ImageItem:
    """One image: its path, identity, camera and split, and where it was declared."""

    path: str
    pid: int
    camid: int
    split: str
    where: str  # '<file>' or '<list file>:<line>', for messages


@dataclass(frozen=True)
class ImageListSpec:
    """What a folder- or list-defined dataset is (see the module docstring)."""

    name: str
    folder: str  # under data.root unless absolute
    pattern: str = ""  # file-name rule: regex on the path relative to ``folder``
    list_file: str = ""  # or a CSV / YAML list, relative to ``folder`` unless absolute
    camid_map: Mapping[str, int] = field(default_factory=dict)  # captured camid text -> camera
    split_map: Mapping[str, str] = field(default_factory=dict)  # captured split text -> split
    default_split: str = ""  # split of an image whose rule or row gives none
    query_cameras: Tuple[int, ...] = ()  # 'test' images from these cameras are queries
    independent_ids: bool = False  # train and test numbered independently (a pid may be in both)
    description: str = ""

    def __post_init__(self):
        if bool(self.pattern) == bool(self.list_file):
            raise ValueError(f"dataset '{self.name}': give exactly one of pattern (a file-name rule) and "
                             f"list_file (a CSV / YAML list), got pattern={self.pattern!r}, "
                             f"list_file={self.list_file!r}")
        if self.pattern:
            try:
                groups = re.compile(self.pattern).groupindex
            except re.error as exc:
                raise ValueError(f"dataset '{self.name}': pattern {self.pattern!r} is not a valid regular "
                                 f"expression ({exc})") from None
            missing = [g for g in ("pid", "camid") if g not in groups]
            if missing:
                raise ValueError(f"dataset '{self.name}': pattern {self.pattern!r} has no named group "
                                 f"{missing[0]!r}; it needs (?P<pid>...) and (?P<camid>...), and may have "
                                 "(?P<split>...)")
        for text, split in list(self.split_map.items()) + [("default_split", self.default_split)]:
            if split and split not in SPLITS:
                raise ValueError(f"dataset '{self.name}': split {split!r} (for {text!r}) is not one of "
                                 f"{list(SPLITS)}")

    def resolve(self, root: str) -> str:
        """The dataset folder for data root ``root``."""
        return osp.abspath(osp.join(osp.expanduser(root), osp.expanduser(self.folder)))

    @property
    def source(self) -> str:
        """What defines the images: the list file or the file-name rule, for messages."""
        return self.list_file or f"rule {self.pattern!r}"


@dataclass(frozen=True)
class DatasetItems:
    """A loaded dataset: Torchreid's ``(path, pid, camid)`` lists, training pids relabelled."""

    train: List[Tuple[str, int, int]]
    query: List[Tuple[str, int, int]]
    gallery: List[Tuple[str, int, int]]
    num_valid_queries: int


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(f"{where}: {what} {str(value)!r} is not an integer") from None


def _item(spec: ImageListSpec, folder: str, rel: str, pid: str, camid: Optional[str], split: Optional[str],
          where: str) -> ImageItem:
    """Check and convert one row / file name."""
    if camid is None or str(camid).strip() == "":
        raise DatasetError(f"{where}: camid is missing for image '{rel}'; every image needs a camera id")
    camid = str(camid).strip()
    cam = spec.camid_map[camid] if camid in spec.camid_map else _int(camid, "camid", where)
    split = (split or "").strip()
    split = spec.split_map.get(split, split) or spec.default_split
    if split not in SPLITS:
        shown = f"split {split!r}" if split else "no split"
        raise DatasetError(f"{where}: image '{rel}' has {shown}; choose one of {list(SPLITS)} (or give the "
                           "dataset a default_split)")
    path = rel if osp.isabs(rel) else osp.join(folder, rel)
    return ImageItem(path=path, pid=_int(pid, "pid", where), camid=cam, split=split, where=where)


def scan_folder(spec: ImageListSpec, folder: str) -> List[ImageItem]:
    """Images under ``folder`` whose names follow ``spec.pattern`` (sorted by path). An image file
    that does not fit the rule is an error naming it."""
    rule = re.compile(spec.pattern)
    items = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = osp.relpath(osp.join(dirpath, name), folder).replace(os.sep, "/")
            m = rule.fullmatch(rel)
            if m is None:
                raise DatasetError(f"dataset '{spec.name}': the image '{osp.join(folder, rel)}' does not fit the "
                                   f"file-name rule {spec.pattern!r} (matched against its path under '{folder}')")
            groups = m.groupdict()
            items.append(_item(spec, folder, rel, groups["pid"], groups["camid"], groups.get("split"),
                               osp.join(folder, rel)))
    return items


def _list_rows(path: str) -> List[Tuple[int, Dict[str, str]]]:
    """``[(line, {column: text})]`` of a CSV or YAML list file."""
    with open(path, "r", encoding="utf-8", newline="") as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise DatasetError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise DatasetError(f"{path}:{node.start_mark.line + 1}: expected a list of "
                               "{path, pid, camid, split} mappings")
        rows = []
        for child in node.value:
            line = child.start_mark.line + 1
            if not isinstance(child, yaml.MappingNode) or any(
                    not isinstance(k, yaml.ScalarNode) or not isinstance(v, yaml.ScalarNode) for k, v in child.value):
                raise DatasetError(f"{path}:{line}: expected a mapping of path, pid, camid and split to values")
            rows.append((line, {k.value: v.value for k, v in child.value}))
        return rows
    lines = text.splitlines()
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    if "path" not in header or "pid" not in header:
        raise DatasetError(f"{path}:1: the header must name the columns path, pid, camid and optionally split "
                           f"(got {header})")
    rows = []
    for number, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) > len(header):
            raise DatasetError(f"{path}:{number}: {len(values)} values for the {len(header)} columns {header}")
        rows.append((number, dict(zip(header, values))))
    return rows


def read_list(spec: ImageListSpec, folder: str) -> List[ImageItem]:
    """The images of ``spec.list_file``; each must exist."""
    path = spec.list_file if osp.isabs(spec.list_file) else osp.join(folder, spec.list_file)
    if not osp.isfile(path):
        raise DatasetError(f"dataset '{spec.name}': the list file '{path}' does not exist")
    items = []
    for line, row in _list_rows(path):
        where = f"{path}:{line}"
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DatasetError(f"{where}: path is missing")
        if row.get("pid") is None or not str(row["pid"]).strip():
            raise DatasetError(f"{where}: pid is missing for image '{rel}'")
        item = _item(spec, folder, rel, row["pid"], row.get("camid"), row.get("split"), where)
        if not osp.isfile(item.path):
            raise DatasetError(f"{where}: the image '{item.path}' does not exist")
        items.append(item)
    return items


def _valid_queries(query: Sequence[ImageItem], gallery: Sequence[ImageItem]) -> int:
    cams: Dict[int, set] = {}
    for g in gallery:
        cams.setdefault(g.pid, set()).add(g.camid)
    return sum(1 for q in query if cams.get(q.pid, set()) - {q.camid})


def load_items(spec: ImageListSpec, root: str) -> DatasetItems:
    """Read, check and split the images of ``spec`` under data root ``root``.

    Raises :class:`DatasetError` for a missing folder or list file, a bad row (naming the file and
    line), an empty query or gallery split, a pid in both train and test (unless
    ``independent_ids``), or queries none of which has a gallery image of its identity from another
    camera."""
    folder = spec.resolve(root)
    if not osp.isdir(folder):
        raise DatasetError(f"dataset '{spec.name}': the folder '{folder}' does not exist (data.root "
                           f"'{osp.abspath(osp.expanduser(root))}' + '{spec.folder}')")
    items = read_list(spec, folder) if spec.list_file else scan_folder(spec, folder)
    where = spec.list_file and (spec.list_file if osp.isabs(spec.list_file) else osp.join(folder, spec.list_file))
    where = where or f"{folder} ({spec.source})"
    if not items:
        raise DatasetError(f"dataset '{spec.name}': {where} gives no image")
    train = [i for i in items if i.split == "train"]
    query = [i for i in items if i.split == "query" or (i.split == "test" and i.camid in spec.query_cameras)]
    gallery = [i for i in items if i.split == "gallery" or (i.split == "test" and i.camid not in spec.query_cameras)]
    for split, found in (("query", query), ("gallery", gallery)):
        if not found:
            hint = (f" ('test' images from cameras {list(spec.query_cameras)} are queries, the rest gallery)"
                    if any(i.split == "test" for i in items) else "")
            raise DatasetError(f"dataset '{spec.name}': the {split} split is empty in {where}{hint}")
    if not spec.independent_ids and train:
        test_pids = {i.pid for i in query + gallery}
        both = next((i for i in train if i.pid in test_pids), None)
        if both is not None:
            raise DatasetError(f"{both.where}: pid {both.pid} is in both train and test (query / gallery) of "
                               f"dataset '{spec.name}'; a test identity must not be trained on (set "
                               "independent_ids if the two splits are numbered independently)")
    valid = _valid_queries(query, gallery)
    if valid == 0:
        raise DatasetError(f"dataset '{spec.name}': none of its {len(query)} queries has a gallery image of the "
                           f"same identity from another camera ({where}), so rank-1 and mAP are undefined")
    labels = {pid: label for label, pid in enumerate(sorted({i.pid for i in train}))}
    return DatasetItems(
        train=[(i.path, labels[i.pid], i.camid) for i in train],
        query=[(i.path, i.pid, i.camid) for i in query],
        gallery=[(i.path, i.pid, i.camid) for i in gallery],
        num_valid_queries=valid,
    )


# ---------------------------------------------------------------------------
# Torchreid dataset classes
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _base_class() -> type:
    """``ImageListDataset``: Torchreid's ImageDataset built from a spec (made on first use, so
    importing this module does not import Torchreid)."""
    image_dataset = torchreid().dataset_base.ImageDataset

    class ImageListDataset(image_dataset):
        """A Torchreid image dataset whose lists come from :func:`load_items` (``spec``).

        A test-only dataset (no train split: VIPeR's and CUHK01's full protocols) is allowed as a
        target; Torchreid's base class needs a non-empty train list, so it gets the query list and
        the train list is emptied afterwards."""

        spec: ImageListSpec

        def __init__(self, root: str = "", mode: str = "train", combineall: bool = False,
                     verbose: bool = True, **kwargs):
            for key in ("split_id", "cuhk03_labeled", "cuhk03_classic_split", "market1501_500k"):
                kwargs.pop(key, None)
            self.root = osp.abspath(osp.expanduser(root))
            self.dataset_dir = self.spec.resolve(root)
            items = load_items(self.spec, root)
            super().__init__(items.train or items.query, items.query, items.gallery, mode=mode,
                             combineall=False, verbose=False, **kwargs)
            if not items.train:
                self.train, self.num_train_pids, self.num_train_cams = [], 0, 0
            if combineall:
                self.combine_all()
            self.data = {"train": self.train, "query": self.query, "gallery": self.gallery}[mode]
            if verbose:
                self.show_summary()

    ImageListDataset.__module__, ImageListDataset.__qualname__ = __name__, "ImageListDataset"
    return ImageListDataset


def _class_name(name: str) -> str:
    return "ImageList_" + re.sub(r"\W", "_", name)


_CLASSES: Dict[str, type] = {}


def spec_class(spec: ImageListSpec) -> type:
    """The Torchreid dataset class of ``spec`` (made once per name). Another spec under a name
    already taken is an error."""
    cls = _CLASSES.get(spec.name)
    if cls is not None:
        if cls.spec != spec:
            raise ValueError(f"dataset '{spec.name}' is already defined as {cls.spec}")
        return cls
    cls = type(_class_name(spec.name), (_base_class(),), {"spec": spec, "dataset_dir": spec.folder,
                                                          "__doc__": spec.description or None})
    cls.__module__ = __name__  # picklable as torchreid_ext.data.image_list.<ImageList_name>
    _CLASSES[spec.name] = cls
    return cls


def register_image_dataset(spec: ImageListSpec) -> type:
    """Register ``spec`` under ``spec.name`` in torchreid_ext's and Torchreid's dataset registries;
    returns the dataset class. Registering the same spec again is harmless."""
    from .catalog import register_dataset

    return register_dataset(spec.name, spec_class(spec))


_SPEC_KEYS = {"name", "folder", "pattern", "list", "camid_map", "split_map", "default_split", "query_cameras",
              "independent_ids", "description"}


def scan_image_list(spec: ImageListSpec, root: str) -> FolderScan:
    """The identities of each split of ``spec`` (checked by :func:`load_items`), as the other
    datasets' pre-training checks see them."""
    items = load_items(spec, root)
    pids = {split: frozenset(item[1] for item in found)
            for split, found in (("train", items.train), ("query", items.query), ("gallery", items.gallery))}
    return FolderScan(spec.name, spec.resolve(root), pids)


def register_config_datasets(cfg) -> None:
    """Register every dataset file named in ``data.custom_datasets`` (harmless if done before)."""
    for path in cfg.data.custom_datasets:
        register_image_dataset(load_spec_file(path))


def load_spec_file(path: str) -> ImageListSpec:
    """An :class:`ImageListSpec` from a YAML file (keys as the fields; ``list`` for ``list_file``).
    A relative ``folder`` stays relative to data.root; errors name the file."""
    if not osp.isfile(path):
        raise DatasetError(f"dataset file '{path}' does not exist")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise DatasetError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a dataset file holds a mapping with keys {sorted(_SPEC_KEYS)}")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown or "name" not in data or "folder" not in data:
        what = f"unknown key {unknown[0]!r}" if unknown else "name and folder are required"
        raise DatasetError(f"{path}: {what}; a dataset file has the keys {sorted(_SPEC_KEYS)}")
    data = dict(data)
    data["list_file"] = data.pop("list", "") or ""
    data["camid_map"] = {str(k): int(v) for k, v in (data.get("camid_map") or {}).items()}
    data["split_map"] = {str(k): str(v) for k, v in (data.get("split_map") or {}).items()}
    data["query_cameras"] = tuple(int(c) for c in (data.get("query_cameras") or ()))
    try:
        return ImageListSpec(**data)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {exc}") from None


def __getattr__(name: str):
    """The per-spec classes (``ImageList_<name>``) and ``ImageListDataset``, for pickling."""
    if name == "ImageListDataset":
        return _base_class()
    for cls in _CLASSES.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
