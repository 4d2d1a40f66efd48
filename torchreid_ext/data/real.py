"""Real re-ID test protocols: CUHK03 camera pair 1, VIPeR and CUHK01.

Each reads the dataset's original folder layout under ``data.root`` and never writes there
(the folder may be read-only); split files go to :func:`split_cache_dir`.

* ``cuhk03_pair1``: CUHK03's first camera pair, manually labelled boxes, as
  ``cuhk03_pair1/labeled/{train,val}/PPPP_II.jpg``. Train = ``train`` (743 identities),
  test = ``val`` (100 identities, numbered independently of train); image index II 00-04 is one
  camera (the queries), 05-09 the other (the gallery); every image is used; Market-style metric.
* ``viper_full`` / ``cuhk01_full``: every identity is a test identity (no training split):
  VIPeR query = ``cam_a``, gallery = ``cam_b`` (632 + 632 images); CUHK01 query = images
  001-002, gallery = 003-004 of each of 971 identities.
* ``viper_10split`` / ``cuhk01_10split``: Torchreid's own ``viper`` / ``cuhk01`` protocol (10
  random halvings of the identities, each giving two splits, A->B and B->A: ``data.split_id``
  0-19), made deterministic. Torchreid draws the halvings from numpy's global generator
  unseeded and writes them beside the images; here the generator is seeded with
  :data:`SPLIT_SEED` for the draw (and restored after), and the file goes to the cache, named
  after the dataset folder, so every machine with the same files gets the same splits.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import logging
import os
import os.path as osp
from typing import Callable, Dict, Optional

import numpy as np

from ..adapter import torchreid
from ..errors import DatasetError
from ..files import atomic_output, file_lock, probe_writable
from .image_list import ID_MAX, ID_MIN, ImageListSpec

__all__ = ["SPLIT_SEED", "NUM_SPLITS", "REAL_SPECS", "split_cache_dir", "split_problem", "split_classes"]

logger = logging.getLogger(__name__)

SPLIT_SEED = 0

_CUHK03_INDEX_TO_CAMERA = {f"{i:02d}": 0 if i < 5 else 1 for i in range(10)}

REAL_SPECS = (
    ImageListSpec(
        name="cuhk03_pair1",
        folder="cuhk03_pair1",
        pattern=r"labeled/(?P<split>train|val)/(?P<pid>\d+)_(?P<camid>\d\d)\.jpg",
        camid_map=_CUHK03_INDEX_TO_CAMERA,
        split_map={"val": "test"},
        query_cameras=(0,),
        independent_ids=True,
        description="CUHK03 camera pair 1, labelled boxes: train 743 ids; test 100 ids, query = camera a "
                    "(indices 00-04), gallery = camera b (05-09)",
    ),
    ImageListSpec(
        name="viper_full",
        folder="viper",
        pattern=r"VIPeR/cam_(?P<camid>[ab])/(?P<pid>\d+)_\d+\.bmp",
        camid_map={"a": 0, "b": 1},
        default_split="test",
        query_cameras=(0,),
        description="VIPeR, all 632 identities: query = cam_a, gallery = cam_b (test only)",
    ),
    ImageListSpec(
        name="cuhk01_full",
        folder="cuhk01",
        pattern=r"campus/(?P<pid>\d{4})(?P<camid>\d{3})\.png",
        camid_map={"001": 0, "002": 0, "003": 1, "004": 1},
        default_split="test",
        query_cameras=(0,),
        description="CUHK01, all 971 identities: query = images 001-002, gallery = 003-004 (test only)",
    ),
)


def split_cache_dir() -> str:
    """Where split files are written: ``$TORCHREID_EXT_CACHE/splits``, else
    ``$XDG_CACHE_HOME/torchreid_ext/splits`` (``~/.cache/...``)."""
    base = os.environ.get("TORCHREID_EXT_CACHE") or osp.join(
        os.environ.get("XDG_CACHE_HOME") or osp.expanduser("~/.cache"), "torchreid_ext")
    return osp.join(base, "splits")


NUM_SPLITS = 20  # Torchreid's 10 halvings, each as A->B and B->A
_MISSING = "missing"


def _viper_persons(ds) -> Dict[str, object]:
    """Image path -> person of Torchreid's VIPeR: the i-th image of ``cam_a`` and of ``cam_b`` (sorted)
    show person i."""
    cam_a = sorted(glob.glob(osp.join(ds.cam_a_dir, "*.bmp")))
    cam_b = sorted(glob.glob(osp.join(ds.cam_b_dir, "*.bmp")))
    if len(cam_a) != len(cam_b) or not cam_a:
        raise DatasetError(f"dataset 'viper_10split': '{ds.cam_a_dir}' holds {len(cam_a)} .bmp images and "
                           f"'{ds.cam_b_dir}' {len(cam_b)}; Torchreid's VIPeR protocol pairs them one to one")
    return {**{p: i for i, p in enumerate(cam_a)}, **{p: i for i, p in enumerate(cam_b)}}


def _cuhk01_persons(ds) -> Dict[str, object]:
    """Image path -> person of Torchreid's CUHK01: the first four digits of the file name."""
    images = sorted(glob.glob(osp.join(ds.campus_dir, "*.png")))
    if not images:
        raise DatasetError(f"dataset 'cuhk01_10split': '{ds.campus_dir}' holds no .png images")
    return {p: osp.basename(p)[:4] for p in images}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and ID_MIN <= value <= ID_MAX


def split_problem(splits, persons: Dict[str, object]) -> Optional[str]:
    """Why ``splits`` (a split file's content) is not a set of Torchreid's splits of the images
    ``persons`` (path -> person) describes, or None. Each of the :data:`NUM_SPLITS` splits must use
    every image once, in train, query or gallery as ``[path, pid, camid]``; train pids must be
    0..num_train_pids-1; a pid must mean one person (within train, within query + gallery); no
    training person may be a test person; query and gallery hold the same identities, from
    different cameras (0 / 1)."""
    if not isinstance(splits, list) or len(splits) != NUM_SPLITS:
        size = f"{len(splits)} entries" if isinstance(splits, list) else f"a {type(splits).__name__}"
        return f"it holds {size}, not a list of {NUM_SPLITS} splits"
    for k, split in enumerate(splits):
        if not isinstance(split, dict) or not all(isinstance(split.get(part), list)
                                                  for part in ("train", "query", "gallery")):
            return f"split {k} lacks its train, query and gallery lists"
        seen, person_of, cams = set(), {"train": {}, "test": {}}, {}
        for part in ("train", "query", "gallery"):
            group = person_of["train" if part == "train" else "test"]
            cams[part] = set()
            for item in split[part]:
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                        and _is_id(item[1]) and _is_id(item[2])):
                    return f"split {k}: {part} holds {str(item)[:60]}, not [path, pid, camid]"
                path, pid, camid = item
                if path not in persons:
                    return f"split {k}: {part} names '{path}', which is not an image of the dataset"
                if path in seen:
                    return f"split {k}: the image '{path}' is listed twice"
                seen.add(path)
                if group.setdefault(pid, persons[path]) != persons[path]:
                    return f"split {k}: {part} pid {pid} is given to two different persons"
                cams[part].add(camid)
        if len(seen) != len(persons):
            return f"split {k} uses {len(seen)} of the dataset's {len(persons)} images"
        train_pids = set(person_of["train"])
        n = split.get("num_train_pids")
        if not _is_id(n) or len(train_pids) != n or (train_pids and (min(train_pids), max(train_pids)) != (0, n - 1)):
            return f"split {k}: the training pids are not 0..num_train_pids-1 (num_train_pids = {n!r})"
        if len(set(person_of["train"].values())) != len(train_pids) or \
                len(set(person_of["test"].values())) != len(person_of["test"]):
            return f"split {k}: one person has two pids"
        if set(person_of["train"].values()) & set(person_of["test"].values()):
            return f"split {k}: a training person is also in the test set"
        query_pids = {item[1] for item in split["query"]}
        if not query_pids or query_pids != {item[1] for item in split["gallery"]}:
            return f"split {k}: query and gallery do not hold the same identities"
        if not cams["query"] | cams["gallery"] <= {0, 1} or cams["query"] & cams["gallery"]:
            return f"split {k}: query and gallery are not from two different cameras (0 and 1)"
    return None


def _cached_problem(path: str, persons: Dict[str, object]) -> Optional[str]:
    """Why the split file ``path`` cannot be used (:data:`_MISSING` when absent), or None."""
    if not osp.lexists(path):
        return _MISSING
    try:
        with open(path, "rb") as f:
            splits = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"not readable as JSON: {str(exc)[:120]}"
    return split_problem(splits, persons)


def _unwritable(folder: str) -> Optional[str]:
    """Why no split file can be written in ``folder`` (created if missing), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return probe_writable(folder)


def _seeded_splits(torchreid_cls: type, name: str, persons: Callable[[object], Dict[str, object]]) -> type:
    """A subclass of Torchreid's ``torchreid_cls`` whose ``prepare_split`` writes to the cache and
    draws with numpy's global generator seeded by :data:`SPLIT_SEED`. A cached file is checked
    (:func:`split_problem`) before use and drawn again, with a warning, when damaged; it is written
    whole (temporary file, then rename) under a lock, so runs starting together take turns."""

    def __init__(self, root: str = "", split_id: int = 0, **kwargs) -> None:
        if not _is_id(split_id) or not 0 <= split_id < NUM_SPLITS:
            raise DatasetError(f"data.split_id = {split_id!r} is not valid for dataset '{name}': it has "
                               f"{NUM_SPLITS} splits, 0-{NUM_SPLITS - 1}")
        torchreid_cls.__init__(self, root=root, split_id=split_id, **kwargs)

    def prepare_split(self) -> None:
        key = hashlib.sha1(osp.abspath(self.dataset_dir).encode()).hexdigest()[:12]
        path = self.split_path = osp.join(split_cache_dir(), f"{name}-seed{SPLIT_SEED}-{key}.json")
        images = persons(self)
        problem = _cached_problem(path, images)
        if problem is None:
            return
        folder = osp.dirname(path)
        why = _unwritable(folder)
        if why:
            state = "missing" if problem == _MISSING else f"damaged ({problem})"
            raise DatasetError(f"dataset '{name}': its split file '{path}' is {state} and cannot be written: the "
                               f"split cache '{folder}' is not writable ({why}); set TORCHREID_EXT_CACHE to a "
                               "writable folder")
        with file_lock(osp.join(folder, f".{osp.basename(path)}.lock")):
            problem = _cached_problem(path, images)  # another process may have written it meanwhile
            if problem is None:
                return
            if problem != _MISSING:
                logger.warning("Dataset '%s': the split file '%s' is damaged (%s); drawing the splits again",
                               name, path, problem)
            state = np.random.get_state()
            np.random.seed(SPLIT_SEED)
            try:
                with atomic_output(path) as tmp, contextlib.redirect_stdout(io.StringIO()):
                    self.split_path = tmp  # Torchreid writes where split_path points (and prints that path)
                    torchreid_cls.prepare_split(self)
            finally:
                self.split_path = path
                np.random.set_state(state)
            problem = _cached_problem(path, images)
            if problem is not None:
                raise DatasetError(f"dataset '{name}': the splits Torchreid drew into '{path}' are not usable "
                                   f"({problem})")
        logger.info("Dataset '%s': Torchreid's 10 random splits drawn with numpy seed %d, written to '%s'",
                    name, SPLIT_SEED, path)

    cls = type(f"Seeded{torchreid_cls.__name__}", (torchreid_cls,), {
        "__init__": __init__,
        "prepare_split": prepare_split,
        "__doc__": f"Torchreid's {torchreid_cls.__name__} with deterministic splits in the cache "
                   "(torchreid_ext.data.real)."})
    cls.__module__ = __name__
    return cls


@functools.lru_cache(maxsize=None)
def split_classes() -> Dict[str, type]:
    """``{'viper_10split': ..., 'cuhk01_10split': ...}`` (made on first use)."""
    datasets = torchreid().image_datasets()
    return {"viper_10split": _seeded_splits(datasets["viper"], "viper_10split", _viper_persons),
            "cuhk01_10split": _seeded_splits(datasets["cuhk01"], "cuhk01_10split", _cuhk01_persons)}


def __getattr__(name: str):
    """``SeededVIPeR`` / ``SeededCUHK01``, for pickling."""
    for cls in split_classes().values() if name.startswith("Seeded") else ():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
