"""Helpers of the search tests: generated crops, and features computed without torchreid_ext."""
import os
import os.path as osp

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_crops(folder, identities=4, per_identity=3, seed=0, size=(80, 40)):
    """Write ``identities x per_identity`` generated person-like crops (a coloured top and bottom
    with noise) under ``folder``, at several depths and in JPEG and PNG; return their paths, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    h, w = size
    for pid in range(identities):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        for i in range(per_identity):
            img = np.empty((h, w, 3), dtype=np.float64)
            img[: h // 2], img[h // 2:] = top, bottom
            img += rng.normal(0, 12, img.shape)
            sub = osp.join(folder, f"cam{i % 2}", *(["deep", "er"] if pid % 2 else []))
            os.makedirs(sub, exist_ok=True)
            ext = ".png" if (pid + i) % 3 == 0 else ".jpg"
            path = osp.join(sub, f"p{pid}_{i}{ext}")
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
            paths.append(path)
    return sorted(paths)


def direct_features(model, paths, height=64, width=32):
    """Features one image at a time with torchvision's transforms: no torchreid_ext code involved."""
    tf = T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(MEAN, STD)])
    with torch.no_grad():
        return torch.cat([model(tf(Image.open(p).convert("RGB")).unsqueeze(0)) for p in paths]).double().numpy()


def brute_force(qf, gf, k, exclude=None):
    """Squared Euclidean distances in float64 and each query's k nearest (stable order), skipping
    ``exclude[q]``."""
    d = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    if exclude is not None:
        for q, g in enumerate(exclude):
            if g >= 0:
                d[q, g] = np.inf
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx
