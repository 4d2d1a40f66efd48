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
can also be written as a YAML file and named in ``data.custom_datasets`` (each key's value is
checked when the file is read; a name another dataset has is refused). Reading a spec
(:func:`load_items`) is also the check run before training: every error names the file (and
the line of a list file) and what is allowed. A list names each image once (by real path), inside
the folder unless ``allow_outside``; ids fit in int64; list and dataset files are UTF-8 (a BOM is
accepted).
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
from ..files import missing_file_reason, read_text
from .checks import DatasetError, FolderScan

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_SPLITS",
    "ImageItem",
    "ImageListSpec",
    "DatasetItems",
    "load_items",
    "read_list",
    "scan_folder",
    "spec_class",
    "register_image_dataset",
    "register_dataset_files",
    "scan_image_list",
    "load_spec_file",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LIST_SPLITS = ("train", "query", "gallery", "test")  # the split of a listed image ("test": query or gallery by camera)


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
    allow_outside: bool = False  # a list may name images outside ``folder`` (``../``, absolute paths)

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
            if split and split not in LIST_SPLITS:
                raise ValueError(f"dataset '{self.name}': split {split!r} (for {text!r}) is not one of "
                                 f"{list(LIST_SPLITS)}")

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


# pids and camids become int64 tensors and arrays (Torchreid's loaders, the evaluation): a larger
# number would pass the list and fail only at the first evaluation, after training
ID_MIN, ID_MAX = -2 ** 63, 2 ** 63 - 1


def _int(value: str, what: str, where: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise DatasetError(f"{where}: {what} {str(value)!r} is not an integer") from None
    if not ID_MIN <= number <= ID_MAX:
        raise DatasetError(f"{where}: {what} {number} is outside the int64 range [-2**63, 2**63 - 1] that "
                           "pids and camids must fit in")
    return number


def _item(spec: ImageListSpec, folder: str, rel: str, pid: str, camid: Optional[str], split: Optional[str],
          where: str) -> ImageItem:
    """Check and convert one row / file name."""
    if camid is None or str(camid).strip() == "":
        raise DatasetError(f"{where}: camid is missing for image '{rel}'; every image needs a camera id")
    camid = str(camid).strip()
    cam = spec.camid_map[camid] if camid in spec.camid_map else _int(camid, "camid", where)
    split = (split or "").strip()
    split = spec.split_map.get(split, split) or spec.default_split
    if split not in LIST_SPLITS:
        shown = f"split {split!r}" if split else "no split"
        raise DatasetError(f"{where}: image '{rel}' has {shown}; choose one of {list(LIST_SPLITS)} (or give the "
                           "dataset a default_split)")
    path = osp.normpath(rel if osp.isabs(rel) else osp.join(folder, rel))
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
    text = read_text(path, "list file", DatasetError)  # UTF-8; an Excel CSV's byte-order mark is dropped
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


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, as written (``..`` resolved, links not followed:
    a dataset folder of symlinks is the user's own arrangement)."""
    path, folder = osp.normpath(osp.abspath(path)), osp.normpath(osp.abspath(folder))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _repeated(first: ImageItem, again: ImageItem, rel: str) -> str:
    """Why a list may not name one image twice, naming both rows."""
    if first.split != again.split:
        return (f"{again.where}: the image '{rel}' is in {again.split} (pid {again.pid}) here and in "
                f"{first.split} (pid {first.pid}) at {first.where}; an image belongs to one split (a training "
                "image in the test set inflates the results)")
    if first.pid != again.pid:
        return (f"{again.where}: the image '{rel}' is listed under pid {again.pid} here and under pid {first.pid} "
                f"at {first.where}; an image shows one identity")
    return f"{again.where}: the image '{rel}' repeats the row at {first.where}; list each image once"


def read_list(spec: ImageListSpec, folder: str) -> List[ImageItem]:
    """The images of ``spec.list_file``; each must exist, lie inside ``folder`` (unless
    ``spec.allow_outside``) and be listed once (compared by real path, so a second name for the
    same file counts)."""
    path = spec.list_file if osp.isabs(spec.list_file) else osp.join(folder, spec.list_file)
    if not osp.isfile(path):
        raise DatasetError(f"dataset '{spec.name}': the list file '{path}' {missing_file_reason(path)}")
    items = []
    seen: Dict[str, ImageItem] = {}
    for line, row in _list_rows(path):
        where = f"{path}:{line}"
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DatasetError(f"{where}: path is missing")
        if row.get("pid") is None or not str(row["pid"]).strip():
            raise DatasetError(f"{where}: pid is missing for image '{rel}'")
        item = _item(spec, folder, rel, row["pid"], row.get("camid"), row.get("split"), where)
        if not spec.allow_outside and not _inside(item.path, folder):
            raise DatasetError(f"{where}: the image '{rel}' is outside the dataset folder '{folder}'; a list names "
                               "images inside it (write allow_outside: true in the dataset file to allow this)")
        if not osp.isfile(item.path):
            raise DatasetError(f"{where}: the image '{item.path}' {missing_file_reason(item.path)}")
        key = osp.realpath(item.path)
        if key in seen:
            raise DatasetError(_repeated(seen[key], item, rel))
        seen[key] = item
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
        state = "is a file, not a folder" if osp.exists(folder) else "does not exist"
        raise DatasetError(f"dataset '{spec.name}': the folder '{folder}' {state} (data.root "
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
              "independent_ids", "allow_outside", "description"}

# what each key of a dataset file takes, for the message refusing a bad value
_ALLOWED = {
    "name": "a non-empty string (the name data.sources and data.targets use)",
    "folder": "a non-empty string: the dataset folder, under data.root unless absolute",
    "pattern": "a string: a regular expression with the named groups pid and camid",
    "list": "a string: a CSV or YAML list file, relative to the folder unless absolute",
    "camid_map": "a mapping of the camera text a rule or list captures to an integer camera id, e.g. {a: 0, b: 1}",
    "split_map": f"a mapping of the split text a rule or list captures to one of {list(LIST_SPLITS)}, "
                 "e.g. {val: test}",
    "default_split": f"one of {list(LIST_SPLITS)}",
    "query_cameras": "a list of integer camera ids, e.g. [0]",
    "independent_ids": "true or false",
    "allow_outside": "true or false",
    "description": "a string",
}


def _as_int(value) -> Optional[int]:
    """``value`` as an id (an integer, or a string of one, in the int64 range), else None."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool) and ID_MIN <= value <= ID_MAX:
        return value
    return None


def _spec_fields(path: str, data: dict) -> dict:
    """The :class:`ImageListSpec` fields of a dataset file's mapping; a value of the wrong kind is a
    DatasetError naming the file, the key, the value and what the key takes."""

    def bad(key: str, value) -> DatasetError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return DatasetError(f"dataset file '{path}': {key}: {shown} is not allowed; {key} is {_ALLOWED[key]}")

    fields = {}
    for key, value in data.items():
        if key in ("name", "folder"):
            if not isinstance(value, str) or not value.strip():
                raise bad(key, value)
        elif key in ("pattern", "list", "description"):
            value = "" if value is None else value
            if not isinstance(value, str):
                raise bad(key, value)
        elif key == "default_split":
            value = "" if value is None else value
            if not isinstance(value, str) or (value and value not in LIST_SPLITS):
                raise bad(key, value)
        elif key in ("independent_ids", "allow_outside"):
            if not isinstance(value, bool):
                raise bad(key, value)
        elif key in ("camid_map", "split_map"):
            value = {} if value is None else value
            if not isinstance(value, dict) or not all(isinstance(k, (str, int)) and not isinstance(k, bool)
                                                      for k in value):
                raise bad(key, value)
            if key == "camid_map" and any(_as_int(v) is None for v in value.values()):
                raise bad(key, value)
            if key == "split_map" and not all(isinstance(v, str) and v in LIST_SPLITS for v in value.values()):
                raise bad(key, value)
            value = {str(k): (_as_int(v) if key == "camid_map" else v) for k, v in value.items()}
        elif key == "query_cameras":
            value = [] if value is None else value
            if not isinstance(value, list) or any(_as_int(c) is None for c in value):
                raise bad(key, value)
            value = tuple(_as_int(c) for c in value)
        fields["list_file" if key == "list" else key] = value
    return fields


def load_spec_file(path: str) -> ImageListSpec:
    """An :class:`ImageListSpec` from a YAML file (keys as the fields; ``list`` for ``list_file``).
    A relative ``folder`` stays relative to data.root; errors name the file and the key."""
    if not osp.isfile(path):
        raise DatasetError(f"dataset file '{path}' {missing_file_reason(path)}")
    text = read_text(path, "dataset file", DatasetError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a dataset file holds a mapping with keys {sorted(_SPEC_KEYS)}")
    unknown = sorted((k for k in data if k not in _SPEC_KEYS), key=str)
    if unknown or "name" not in data or "folder" not in data:
        what = f"unknown key {unknown[0]!r}" if unknown else "name and folder are required"
        raise DatasetError(f"{path}: {what}; a dataset file has the keys {sorted(_SPEC_KEYS)}")
    try:
        return ImageListSpec(**_spec_fields(path, data))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: {exc}") from None


# dataset name -> the dataset file it was registered from, in this process
_FROM_FILES: Dict[str, str] = {}


def _check_name_free(spec: ImageListSpec, path: str) -> None:
    """Refuse a dataset file whose name another dataset has (Torchreid's, ours, or another file's
    registered earlier in this process); registering the same spec again is harmless."""
    from .catalog import DATASETS

    current = torchreid().image_datasets().get(spec.name)
    if current is None and spec.name in DATASETS:
        current = DATASETS[spec.name]
    if current is None or getattr(current, "spec", None) == spec:
        return
    if spec.name in _FROM_FILES:
        owner = f"the dataset of '{_FROM_FILES[spec.name]}', registered earlier in this process with other keys"
    else:
        owner = f"an existing dataset ({current.__module__}.{current.__qualname__})"
    raise DatasetError(f"dataset file '{path}': name: '{spec.name}' is taken by {owner}; choose another name")


def register_dataset_files(paths: Sequence[str]) -> None:
    """Register every dataset file of ``paths`` (``data.custom_datasets``; harmless if done before).
    Two files naming one dataset, or a file taking a built-in dataset's name, are refused."""
    specs: Dict[str, Tuple[str, ImageListSpec]] = {}
    for path in paths:
        spec = load_spec_file(path)
        if spec.name in specs:
            first = specs[spec.name][0]
            if osp.realpath(first) == osp.realpath(path):
                continue
            raise DatasetError(f"data.custom_datasets: the dataset files '{first}' and '{path}' both have "
                               f"name: '{spec.name}'; give each dataset its own name")
        _check_name_free(spec, path)
        specs[spec.name] = (path, spec)
    for path, spec in specs.values():
        register_image_dataset(spec)
        _FROM_FILES.setdefault(spec.name, path)


def scan_image_list(spec: ImageListSpec, root: str) -> FolderScan:
    """The identities of each split of ``spec`` (checked by :func:`load_items`), as the other
    datasets' pre-training checks see them."""
    items = load_items(spec, root)
    pids = {split: frozenset(item[1] for item in found)
            for split, found in (("train", items.train), ("query", items.query), ("gallery", items.gallery))}
    return FolderScan(spec.name, spec.resolve(root), pids)


def __getattr__(name: str):
    """The per-spec classes (``ImageList_<name>``) and ``ImageListDataset``, for pickling."""
    if name == "ImageListDataset":
        return _base_class()
    for cls in _CLASSES.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
