"""Images to extract features from: a folder, or one split of a registered dataset.

Both give an :class:`ImageSet` (paths, and pids / camids when the dataset knows them). Images
are read as the engine's test loader reads them (``read_image``, Torchreid's test transform:
resize, to tensor, normalise), so features of a dataset split equal the engine's. A file that
cannot be decoded stops the extraction with an error naming it, raised in the main process
(not inside a DataLoader worker's traceback).
"""
from __future__ import annotations

import contextlib
import io
import os
import os.path as osp
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..adapter import torchreid
from ..data.checks import UnreadableImageError, check_dataset_present, check_images, read_image, set_max_image_side
from ..data.image_list import register_dataset_files
from ..errors import InputNotFound
from ..log import without_prints
from .errors import DeployInputError

__all__ = ["IMAGE_EXTENSIONS", "DATASET_SPLITS", "ImageSet", "image_files", "folder_images", "dataset_images",
           "eval_transform", "image_loader", "CheckedBatches", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DATASET_SPLITS = ("query", "gallery", "train")  # the parts of a registered dataset extraction reads


class ImageSet(NamedTuple):
    """Image paths in extraction order; pids / camids (int64) or None for a plain folder."""

    paths: List[str]
    pids: Optional[np.ndarray]
    camids: Optional[np.ndarray]
    source: str  # "folder:<path>" or "dataset:<name>/<split>"


def image_files(folder: str) -> List[str]:
    """Absolute paths of every image file under ``folder`` (recursive, by extension), sorted;
    an empty folder is an error. Files are not opened."""
    if not osp.isdir(folder):
        raise InputNotFound(f"image folder '{folder}' does not exist")
    folder = osp.abspath(folder)
    paths = sorted(
        osp.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise DeployInputError(f"image folder '{folder}' holds no image files "
                               f"(looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return paths


def folder_images(folder: str, max_side: Optional[int] = None) -> ImageSet:
    """Every image file under ``folder`` (:func:`image_files`); headers checked (and each side
    at most ``max_side`` pixels, when given)."""
    paths = image_files(folder)
    check_images(paths, max_side=max_side)
    return ImageSet(paths, None, None, f"folder:{osp.abspath(folder)}")


def dataset_images(cfg, name: str, split: str) -> ImageSet:
    """The ``split`` ('query', 'gallery' or 'train') of registered dataset ``name`` under
    ``data.root``, in the order of Torchreid's loaders; headers checked."""
    if split not in DATASET_SPLITS:
        raise DeployInputError(f"split = '{split}' is not valid; choose one of {list(DATASET_SPLITS)}")
    register_dataset_files(cfg.data.custom_datasets)
    set_max_image_side(cfg.data.max_image_side)
    check_dataset_present(name, cfg.data.root, key="dataset")  # unknown name: KeyError listing the datasets
    with without_prints():  # Torchreid prints dataset statistics; our warnings still show
        dataset = torchreid().datasets.init_image_dataset(
            name, transform=None, mode=split, combineall=cfg.data.combineall, root=cfg.data.root,
            split_id=cfg.data.split_id, cuhk03_labeled=cfg.cuhk03.labeled_images,
            cuhk03_classic_split=cfg.cuhk03.classic_split,
            market1501_500k=cfg.market1501.use_500k_distractors, verbose=False,
        )
    items = getattr(dataset, split)
    if not items:
        raise DeployInputError(f"dataset '{name}' has no {split} images under '{cfg.data.root}'")
    paths = [item[0] for item in items]
    check_images(paths)
    return ImageSet(paths, np.asarray([item[1] for item in items], dtype=np.int64),
                    np.asarray([item[2] for item in items], dtype=np.int64), f"dataset:{name}/{split}")


def eval_transform(height: int, width: int, mean: Iterable[float], std: Iterable[float]) -> Callable:
    """Torchreid's test transform (the engine's): resize to height x width, to tensor, normalise."""
    if height < 1 or width < 1:
        raise DeployInputError(f"image size {height}x{width} is not valid; height and width must be >= 1")
    build = torchreid().submodule("data.transforms").build_transforms
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
        _, transform = build(height, width, transforms=None, norm_mean=list(mean), norm_std=list(std))
    return transform


def load_image(path: str, transform: Callable) -> torch.Tensor:
    """One image as a 1 x 3 x H x W batch."""
    return transform(read_image(path)).unsqueeze(0)


class _ImageList(Dataset):
    """Items ``{img, pid, camid, error}``; a file that cannot be read gives a blank image and
    its error, raised in the main process by :class:`CheckedBatches`."""

    def __init__(self, images: ImageSet, transform: Callable, height: int, width: int):
        self.images, self.transform, self.size = images, transform, (height, width)

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, index: int):
        path = self.images.paths[index]
        error = ""
        try:
            img = self.transform(read_image(path))
        except UnreadableImageError as exc:
            img, error = torch.zeros(3, *self.size), str(exc)
        pid = -1 if self.images.pids is None else int(self.images.pids[index])
        camid = -1 if self.images.camids is None else int(self.images.camids[index])
        return {"img": img, "pid": pid, "camid": camid, "error": error}


def image_loader(images: ImageSet, transform: Callable, height: int, width: int, batch_size: int,
                 workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches in ``images`` order (no shuffling, last batch kept)."""
    return DataLoader(_ImageList(images, transform, height, width), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, drop_last=False)


class CheckedBatches:
    """The loader's batches (with its length, for the progress bar); the first unreadable file
    raises :class:`UnreadableImageError` naming it."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            bad = next((e for e in batch["error"] if e), None)
            if bad:
                raise UnreadableImageError(bad)
            yield batch
