"""Feature extraction to HDF5: features equal a direct computation; labels, paths, config, flip."""
import os
import os.path as osp
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import yaml
from PIL import Image

from conftest import REPO
from deploy_fixtures import checkpoints, deploy_cfg, one_thread, query_images, reference_model  # noqa: F401
from torchreid_ext.config import get_default_config, merge_dict
from torchreid_ext.deploy import extract_features, load_features
from torchreid_ext.deploy.commands import extract_main

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _direct_features(model, paths, flip=False):
    """One image at a time, with torchvision's transforms: no torchreid_ext code involved."""
    tf = T.Compose([T.Resize((64, 32)), T.ToTensor(), T.Normalize(MEAN, STD)])
    out = []
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            f = model(x)
            if flip:
                f = (f + model(torch.flip(x, dims=[3]))) / 2
            out.append(f)
    return torch.cat(out).numpy()


def _market_labels(path):
    """pid and 0-based camid from a Market-1501 style name PPPP_cC..."""
    name = osp.basename(path)
    return int(name[:4]), int(name.split("_c")[1][0]) - 1


def test_dataset_split_features_labels_paths_and_config(checkpoints, data_root, tmp_path):
    weights = checkpoints("osnet_x0_25")
    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "osnet_x0_25", **{"test.batch_size": 7})
    out = str(tmp_path / "q.h5")
    fs = extract_features(cfg, out, dataset="synthreid_small", split="query", weights=weights)
    saved = load_features(out)
    assert saved.features.dtype == np.float32 and saved.features.shape == (len(saved.paths), 512)
    np.testing.assert_array_equal(saved.features, fs.features)
    direct = _direct_features(reference_model("osnet_x0_25", weights), saved.paths)
    np.testing.assert_allclose(saved.features, direct, rtol=0, atol=1e-5)
    labels = np.array([_market_labels(p) for p in saved.paths])
    np.testing.assert_array_equal(saved.pids, labels[:, 0])
    np.testing.assert_array_equal(saved.camids, labels[:, 1])
    assert all(p.startswith(osp.join(data_root, "synthreid_small", "query")) for p in saved.paths)
    with h5py.File(out, "r") as f:  # the layout a non-Python reader sees
        assert f["features"].dtype == np.float32 and f["pids"].dtype == np.int64
        assert f.attrs["model_name"] == "osnet_x0_25" and f.attrs["source"] == "dataset:synthreid_small/query"
    again = get_default_config()
    merge_dict(again, yaml.safe_load(saved.config))
    assert again == cfg and saved.meta["weights"] == weights and len(saved.meta["weights_sha256"]) == 64


def test_image_folder_recursive_sorted_without_labels(checkpoints, query_images, data_root, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    picked = query_images[:5]
    targets = [folder / "b" / "z.jpg", folder / "a.jpg", folder / "b" / "c.JPG", folder / "m.png", folder / "x.jpeg"]
    for src, dst in zip(picked, targets):
        if dst.suffix == ".png":
            Image.open(src).save(dst)
        else:
            shutil.copy(src, dst)
    (folder / "notes.txt").write_text("not an image")
    weights = checkpoints("osnet_x0_25")
    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "osnet_x0_25", **{"test.batch_size": 2})
    out = str(tmp_path / "f.h5")
    assert extract_main(["--config", osp.join(REPO, "configs", "quickstart.yaml"), "--weights", weights,
                         "--images", str(folder), "--out", out, *_overrides(cfg)]) == 0
    fs = load_features(out)
    assert fs.paths == sorted(str(t) for t in targets)
    assert fs.pids is None and fs.camids is None and not fs.has_labels
    np.testing.assert_allclose(fs.features, _direct_features(reference_model("osnet_x0_25", weights), fs.paths),
                               rtol=0, atol=1e-5)


def _overrides(cfg):
    """KEY VALUE pairs reproducing the tiny config on a command line."""
    keys = ("model.name", "model.pretrained", "data.root", "data.height", "data.width", "data.workers",
            "data.save_dir", "data.sources", "data.targets", "test.batch_size")
    out = []
    for key in keys:
        sec, name = key.split(".")
        value = cfg[sec][name]
        out += [key, f"[{','.join(value)}]" if isinstance(value, list) else str(value)]
    return out


def test_flip_averages_an_image_and_its_mirror(checkpoints, query_images, data_root, tmp_path):
    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "osnet_x0_25")
    if "flip" not in cfg.test:
        pytest.fail("test.flip is not a config key yet (issue 16 adds it)")
    cfg.test.flip = True
    weights = checkpoints("osnet_x0_25")
    fs = extract_features(cfg, None, dataset="synthreid_small", split="query", weights=weights)
    model = reference_model("osnet_x0_25", weights)
    np.testing.assert_allclose(fs.features, _direct_features(model, fs.paths, flip=True), rtol=0, atol=1e-5)
    assert np.abs(fs.features - _direct_features(model, fs.paths)).max() > 1e-4  # flip changed them
    assert fs.meta["flip"] is True


def test_torchreid_checkpoint_with_numpy_scalars_and_module_prefix(checkpoints, data_root, tmp_path):
    """Torchreid saves rank1 as a numpy scalar and DataParallel weights with 'module.'."""
    ours = checkpoints("osnet_x0_25")
    state = reference_model("osnet_x0_25", ours).state_dict()
    theirs = tmp_path / "model.pth.tar-60"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 60,
                "rank1": np.float64(0.93), "optimizer": None}, theirs)
    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "osnet_x0_25")
    a = extract_features(cfg, None, dataset="synthreid_small", split="query", weights=str(theirs))
    b = extract_features(cfg, None, dataset="synthreid_small", split="query", weights=ours)
    np.testing.assert_array_equal(a.features, b.features)


def test_weights_default_to_the_newest_checkpoint_of_the_save_dir(checkpoints, data_root, tmp_path):
    save_dir = tmp_path / "run"
    (save_dir / "model").mkdir(parents=True)
    shutil.copy(checkpoints("osnet_x0_25"), save_dir / "model" / "model.pth.tar-3")
    shutil.copy(checkpoints("osnet_x0_25"), save_dir / "model" / "model.pth.tar-12")
    cfg = deploy_cfg(data_root, str(save_dir), "osnet_x0_25")
    fs = extract_features(cfg, None, dataset="synthreid_small", split="query")
    assert fs.meta["weights"] == str(save_dir / "model" / "model.pth.tar-12")


def test_interrupted_extraction_leaves_no_file(checkpoints, data_root, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = deploy_cfg(data_root, str(tmp_path / "log"), "osnet_x0_25")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(h5py.Group, "create_dataset", broken)  # killed while writing
    with pytest.raises(KeyboardInterrupt):
        extract_features(cfg, str(tmp_path / "out" / "q.h5"), dataset="synthreid_small", split="query",
                         weights=checkpoints("osnet_x0_25"))
    assert os.listdir(tmp_path / "out") == []
