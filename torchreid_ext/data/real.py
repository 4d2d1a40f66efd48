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

import functools
import hashlib
import logging
import os
import os.path as osp
from typing import Dict

import numpy as np

from ..adapter import torchreid
from .image_list import ImageListSpec

__all__ = ["SPLIT_SEED", "REAL_SPECS", "split_cache_dir", "split_classes"]

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


def _seeded_splits(torchreid_cls: type, name: str) -> type:
    """A subclass of Torchreid's ``torchreid_cls`` whose ``prepare_split`` writes to the cache and
    draws with numpy's global generator seeded by :data:`SPLIT_SEED`."""

    def prepare_split(self) -> None:
        key = hashlib.sha1(osp.abspath(self.dataset_dir).encode()).hexdigest()[:12]
        self.split_path = osp.join(split_cache_dir(), f"{name}-seed{SPLIT_SEED}-{key}.json")
        if osp.exists(self.split_path):
            return
        os.makedirs(osp.dirname(self.split_path), exist_ok=True)
        state = np.random.get_state()
        np.random.seed(SPLIT_SEED)
        try:
            torchreid_cls.prepare_split(self)
        finally:
            np.random.set_state(state)
        logger.info("Dataset '%s': Torchreid's 10 random splits drawn with numpy seed %d, written to '%s'",
                    name, SPLIT_SEED, self.split_path)

    cls = type(f"Seeded{torchreid_cls.__name__}", (torchreid_cls,), {
        "prepare_split": prepare_split,
        "__doc__": f"Torchreid's {torchreid_cls.__name__} with deterministic splits in the cache "
                   "(torchreid_ext.data.real)."})
    cls.__module__ = __name__
    return cls


@functools.lru_cache(maxsize=None)
def split_classes() -> Dict[str, type]:
    """``{'viper_10split': ..., 'cuhk01_10split': ...}`` (made on first use)."""
    datasets = torchreid().image_datasets()
    return {"viper_10split": _seeded_splits(datasets["viper"], "viper_10split"),
            "cuhk01_10split": _seeded_splits(datasets["cuhk01"], "cuhk01_10split")}


def __getattr__(name: str):
    """``SeededVIPeR`` / ``SeededCUHK01``, for pickling."""
    for cls in split_classes().values() if name.startswith("Seeded") else ():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
