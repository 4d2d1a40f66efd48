"""Gallery features kept between searches: a folder is extracted once, then only what changed.

An entry holds the features of one gallery folder under one extraction setting, its key: the model
name, the weights file's SHA-256, the input size, flip, normalisation and precision, and the folder.
Beside the features it keeps each file's path, size and modification time (ns). A search reuses the
rows of files whose size and modification time are unchanged, extracts the rest (new or changed
files) and drops files that are gone (:meth:`GalleryCache.plan`).

Entries are ``.npz`` files read with ``allow_pickle=False`` (no code can run from them), written
atomically (:func:`torchreid_ext.files.atomic_output`), with a SHA-256 of their content. An entry
that cannot be read, is inconsistent or fails its checksum is ignored with a warning and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import os.path as osp
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..files import atomic_output, nearest_existing, probe_writable
from .errors import DeployInputError

__all__ = ["CACHE_FORMAT", "default_cache_dir", "file_stats", "CacheEntry", "CachePlan", "GalleryCache"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_dir() -> str:
    """``$TORCHREID_EXT_CACHE/search``, else ``$XDG_CACHE_HOME/torchreid_ext/search`` (``~/.cache/...``)."""
    base = os.environ.get("TORCHREID_EXT_CACHE") or osp.join(
        os.environ.get("XDG_CACHE_HOME") or osp.expanduser("~/.cache"), "torchreid_ext")
    return osp.join(base, "search")


def file_stats(paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """int64 sizes (bytes) and modification times (ns) of ``paths``."""
    stats = [os.stat(p) for p in paths]
    return (np.array([s.st_size for s in stats], dtype=np.int64),
            np.array([s.st_mtime_ns for s in stats], dtype=np.int64))


@dataclass
class CacheEntry:
    """Features of files as they were when extracted (rows in ``paths`` order)."""

    paths: List[str]
    sizes: np.ndarray  # int64
    mtimes: np.ndarray  # int64, ns
    features: np.ndarray  # float32, N x D


@dataclass
class CachePlan:
    """How the current files relate to an entry: ``rows[i]`` is file i's row in the entry, or -1
    when it must be extracted (not in the entry, or ``changed``: its size or modification time
    differs); ``removed`` counts the entry's files that are gone."""

    rows: np.ndarray  # int64
    changed: List[str]
    removed: int


def _digest(key_json: str, entry: CacheEntry) -> str:
    h = hashlib.sha256(key_json.encode())
    h.update("\n".join(entry.paths).encode())
    for array in (entry.sizes, entry.mtimes, entry.features):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class GalleryCache:
    """The cache entry of one gallery folder under one extraction setting (``key``) in ``folder``.

    The folder is checked at construction: it, or the nearest folder above it that exists, must be
    writable (it is created when the first entry is saved).
    """

    def __init__(self, folder: str, key: Dict[str, Any]):
        self.folder = osp.abspath(osp.expanduser(folder))
        self.key_json = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True)
        self.path = osp.join(self.folder, hashlib.sha256(self.key_json.encode()).hexdigest()[:24] + ".npz")
        self._check_writable()

    def _check_writable(self) -> None:
        existing = nearest_existing(self.folder)
        if not osp.isdir(existing):
            raise DeployInputError(f"cache folder '{self.folder}' cannot be created: '{existing}' is a file; "
                                   "choose another with --cache-dir, or --no-cache")
        problem = probe_writable(existing)
        if problem:
            what = "cannot be written" if existing == self.folder else f"cannot be created in '{existing}'"
            raise DeployInputError(f"cache folder '{self.folder}' {what} ({problem}); choose another with "
                                   "--cache-dir, or --no-cache")

    def load(self) -> Optional[CacheEntry]:
        """The entry, or None when there is none or it is damaged (then with a warning)."""
        if not osp.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                entry = CacheEntry(paths=[str(p) for p in z["paths"]], sizes=z["sizes"].astype(np.int64),
                                   mtimes=z["mtimes"].astype(np.int64), features=z["features"])
                stored_key, stored_digest = str(z["key"]), str(z["sha256"])
            problem = self._problem(entry, stored_key, stored_digest)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            problem = f"it cannot be read ({type(exc).__name__}: {exc})"
        if problem:
            logger.warning("Gallery cache entry '%s' is damaged: %s; it is ignored and rebuilt", self.path, problem)
            return None
        return entry

    def _problem(self, entry: CacheEntry, stored_key: str, stored_digest: str) -> Optional[str]:
        n = len(entry.paths)
        if entry.features.dtype != np.float32 or entry.features.ndim != 2 or entry.features.shape[0] != n:
            return f"its features have shape {entry.features.shape} ({entry.features.dtype}) for {n} files"
        if entry.sizes.shape != (n,) or entry.mtimes.shape != (n,):
            return f"{n} files with {entry.sizes.shape[0]} sizes and {entry.mtimes.shape[0]} times"
        if stored_key != self.key_json:
            return "it belongs to another extraction setting"
        if _digest(self.key_json, entry) != stored_digest:
            return "its checksum does not match its content"
        return None

    def plan(self, entry: Optional[CacheEntry], paths: Sequence[str], sizes: np.ndarray,
             mtimes: np.ndarray) -> CachePlan:
        """Which of the current files (``paths`` with their ``sizes`` and ``mtimes``) ``entry`` holds."""
        known = {} if entry is None else {p: i for i, p in enumerate(entry.paths)}
        rows = np.full(len(paths), -1, dtype=np.int64)
        changed = []
        for i, p in enumerate(paths):
            row = known.get(p)
            if row is None:
                continue
            if entry.sizes[row] != sizes[i] or entry.mtimes[row] != mtimes[i]:
                changed.append(p)
            else:
                rows[i] = row
        removed = 0 if entry is None else len(set(known) - set(paths))
        return CachePlan(rows, changed, removed)

    def save(self, entry: CacheEntry) -> None:
        """Write ``entry`` atomically (the previous one stays whole until it is replaced)."""
        digest = _digest(self.key_json, entry)
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, paths=np.array(entry.paths, dtype=str), sizes=entry.sizes, mtimes=entry.mtimes,
                     features=np.ascontiguousarray(entry.features, dtype=np.float32),
                     key=np.array(self.key_json), sha256=np.array(digest))
