"""Saved features: one HDF5 file per image set (``scripts/extract.py`` writes, ``evaluate.py`` reads).

Layout (``format_version`` 1)::

    features   float32  N x D   embeddings as the model returns them (not normalised)
    paths      utf-8    N       image paths, in extraction order
    pids       int64    N       identities   } only when the images come from a dataset
    camids     int64    N       camera ids   }
    config     utf-8    scalar  the full config of the extraction, as YAML
    attrs: format_version, model_name, source ("folder:<path>" | "dataset:<name>/<split>"),
           weights (path or ''), weights_sha256, flip, height, width, torchreid_ext_version

Files are written to a temporary name and renamed into place: an interrupted extraction
leaves no partial file. :func:`check_extraction` refuses features of another model, input size,
flip setting or weights than the caller's (search compares its queries with such a file).
"""
from __future__ import annotations

import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import InputNotFound
from ..files import atomic_output, missing_file_reason
from ..memory import available_memory, gib
from .errors import FeatureFileError, check_output_path

__all__ = ["FORMAT_VERSION", "FEATURES_KIND", "FeatureSet", "is_features_file", "save_features", "load_features",
           "check_extraction"]

FORMAT_VERSION = 1


@dataclass
class FeatureSet:
    """Features of an image set with what is needed to evaluate or reproduce them."""

    features: np.ndarray  # float32, N x D
    paths: List[str]
    pids: Optional[np.ndarray] = None  # int64, N (None: unknown)
    camids: Optional[np.ndarray] = None
    model_name: str = ""
    config: str = ""  # YAML of the config
    meta: Dict[str, Any] = field(default_factory=dict)  # the other attrs (see the module docstring)
    path: str = ""  # the file it was loaded from (not saved)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise FeatureFileError(f"features must be N x D, got shape {self.features.shape}")
        n = self.features.shape[0]
        for name in ("pids", "camids"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.int64)
                setattr(self, name, value)
                if value.shape != (n,):
                    raise FeatureFileError(f"{name} has shape {value.shape}; expected ({n},)")
        if len(self.paths) != n:
            raise FeatureFileError(f"{len(self.paths)} paths for {n} feature rows")

    @property
    def has_labels(self) -> bool:
        return self.pids is not None and self.camids is not None


def is_features_file(path: str) -> bool:
    """Whether ``path`` is an HDF5 file (what :func:`save_features` writes; any other file at an
    output path is left alone unless forced)."""
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


# what extraction writes, for check_output_path
FEATURES_KIND = ("an HDF5 file (features written by extract)", is_features_file)


def save_features(fs: FeatureSet, path: str) -> str:
    """Write ``fs`` to ``path`` (HDF5) atomically; return the absolute path."""
    import h5py

    path = check_output_path(path, "features file")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=fs.features)
        f.create_dataset("paths", data=list(fs.paths), dtype=h5py.string_dtype("utf-8"))
        if fs.pids is not None:
            f.create_dataset("pids", data=fs.pids)
        if fs.camids is not None:
            f.create_dataset("camids", data=fs.camids)
        f.create_dataset("config", data=fs.config, dtype=h5py.string_dtype("utf-8"))
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["model_name"] = fs.model_name
        for key, value in fs.meta.items():
            f.attrs[key] = value
    return path


def load_features(path: str) -> FeatureSet:
    """Read a file written by :func:`save_features`."""
    import h5py

    if not osp.isfile(path):
        raise InputNotFound(f"features file '{path}' {missing_file_reason(path)}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"features file '{path}' is not an HDF5 file ({exc})") from exc
    with f:
        missing = [k for k in ("features", "paths") if k not in f]
        if missing:
            raise FeatureFileError(f"features file '{path}' lacks {missing}; was it written by scripts/extract.py?")
        _check_declared_size(f, path)
        version = int(f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise FeatureFileError(f"features file '{path}' has format_version {version}; this version of "
                                   f"torchreid_ext reads up to {FORMAT_VERSION}")
        meta = {k: _plain(f.attrs[k]) for k in f.attrs if k not in ("format_version", "model_name")}
        return FeatureSet(
            features=f["features"][()],
            paths=list(f["paths"].asstr()[()]),
            pids=f["pids"][()] if "pids" in f else None,
            camids=f["camids"][()] if "camids" in f else None,
            model_name=str(_plain(f.attrs.get("model_name", ""))),
            config=f["config"].asstr()[()] if "config" in f else "",
            meta=meta,
            path=osp.abspath(path),
        )


# bytes a path takes once read (a Python str object and its characters), at least
_PATH_BYTES = 64


def _check_declared_size(f, path: str) -> None:
    """Refuse a file whose datasets, as their headers declare them, need more memory to read than is
    available (a small HDF5 file can declare any shape: its chunks need not be written), before
    anything is read. Each dataset also has to be an array (the paths one-dimensional)."""
    import h5py

    need = 0
    shapes = {}
    for key in ("features", "paths", "pids", "camids"):
        if key not in f:
            continue
        ds = f[key]
        if not isinstance(ds, h5py.Dataset) or ds.shape is None:
            raise FeatureFileError(f"features file '{path}': '{key}' is not an array")
        shapes[key] = ds.shape
        n = int(np.prod(ds.shape, dtype=np.float64))
        # features are read in their stored type and converted to float32
        per = _PATH_BYTES if key == "paths" else ds.dtype.itemsize + (4 if key == "features" else 0)
        need += n * per
    room, where = available_memory()
    if room is not None and need > room:
        declared = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise FeatureFileError(f"features file '{path}' declares {declared}: reading it needs at least {gib(need)}, "
                               f"more than the {gib(room)} {where}; is it damaged, or written for a larger machine?")


def _plain(value: Any) -> Any:
    """HDF5 attribute -> Python value (numpy scalars and bytes unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_extraction(fs: FeatureSet, model_name: str, height: int, width: int, flip: bool,
                     weights: str = "", weights_sha256: str = "") -> None:
    """Raise :class:`FeatureFileError` unless ``fs`` was extracted by ``model_name`` at
    ``height`` x ``width`` with this ``flip`` setting (and, when both are known, these weights):
    features of another extraction are not comparable with the caller's."""
    where = f"features file '{fs.path}'"
    if not fs.model_name or fs.meta.get("height") is None or fs.meta.get("width") is None:
        raise FeatureFileError(f"{where} does not record its model and input size; extract it again with "
                               "scripts/extract.py")
    if fs.model_name != model_name:
        raise FeatureFileError(f"{where} was extracted by model '{fs.model_name}', not model.name = '{model_name}'; "
                               f"set model.name {fs.model_name} (with its weights) or extract the file again")
    size = (int(fs.meta["height"]), int(fs.meta["width"]))
    if size != (int(height), int(width)):
        raise FeatureFileError(f"{where} was extracted at {size[0]}x{size[1]}, not data.height x data.width = "
                               f"{height}x{width}; set data.height {size[0]} data.width {size[1]} or extract "
                               "the file again")
    if bool(fs.meta.get("flip", False)) != bool(flip):
        raise FeatureFileError(f"{where} was extracted with test.flip = {bool(fs.meta.get('flip', False))}, "
                               f"not {bool(flip)}; set test.flip {bool(fs.meta.get('flip', False))}")
    theirs = fs.meta.get("weights_sha256", "")
    if theirs and weights_sha256 and theirs != weights_sha256:
        raise FeatureFileError(f"{where} was extracted with other weights ('{fs.meta.get('weights', '')}', sha256 "
                               f"{theirs[:12]}...) than '{weights}' (sha256 {weights_sha256[:12]}...); use the "
                               "same weights")
