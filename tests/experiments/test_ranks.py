"""Rank-list images from a trained tiny run: one per query, borders green iff same identity."""
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from torchreid_ext import cli
from torchreid_ext.config import load_config
from torchreid_ext.experiments.ranks import main as ranks_main
from torchreid_ext.experiments.ranks import ranked_lists, visualize_ranks

GRID, QUERY_EXTRA = 10, 90  # Torchreid's reidtools layout constants


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    from conftest import tiny_opts

    save = str(tmp_path_factory.mktemp("vis") / "run")
    opts = tiny_opts(data_root, save, **{"train.max_epoch": 1})
    cfg, args = cli.load_run_config(opts)
    cli.run(cfg, args.config)
    return opts, save


def test_rank_images_have_correct_borders(trained, tmp_path):
    opts, save = trained
    cfg = load_config(None, opts)
    out = str(tmp_path / "ranks")
    lists = visualize_ranks(cfg, out, num_queries=4, topk=5)
    assert len(lists) == 4 and len({item["query"] for item in lists}) == 4
    w, h = cfg.data.width, cfg.data.height
    for item in lists:
        assert len(item["gallery"]) == 5 and item["distances"] == sorted(item["distances"])
        im = np.asarray(Image.open(item["image"]).convert("RGB")).astype(int)
        assert im.shape == (h, 6 * w + 5 * GRID + QUERY_EXTRA, 3)
        for rank, matched in enumerate(item["matched"], 1):
            left = rank * w + rank * GRID + QUERY_EXTRA
            border = im[h // 4: 3 * h // 4, left: left + 2].reshape(-1, 3).mean(0)  # left border strip
            green, red = border[1] - border[0], border[0] - border[1]
            assert (green if matched else red) > 100, (item["image"], rank, matched, border)


def test_ranked_lists_skip_junk_and_follow_distances():
    query = [("q.jpg", 1, 0)]
    gallery = [("a.jpg", 1, 0), ("b.jpg", 2, 1), ("c.jpg", 1, 2), ("d.jpg", 3, 0)]
    distmat = np.array([[0.1, 0.5, 0.3, 0.2]])
    (item,) = ranked_lists(distmat, query, gallery, [0], topk=2)
    assert item["gallery"] == [3, 2]  # a.jpg: same identity and camera (junk) is skipped
    assert item["matched"] == [False, True] and item["distances"] == [0.2, 0.3]


def test_script_from_config_and_bad_input(trained, tmp_path, capsys):
    opts, save = trained
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model:\n  name: osnet_x0_25\n")
    script = osp.join(REPO, "scripts", "visualize_ranks.py")
    ok = subprocess.run([sys.executable, script, "--config", str(cfg_path), "--num-queries", "2", "--topk", "3",
                         "--out", str(tmp_path / "o"), "--opts", *opts], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "o").glob("*.jpg"))) == 2 and "top-3 matches" in ok.stdout
    # bad input: the script's main (the script above only passes its status to sys.exit), in this process
    capsys.readouterr()
    assert ranks_main(["--config", str(cfg_path), "--topk", "0", "--opts", *opts]) == 2
    assert "topk = 0" in capsys.readouterr().err
    empty = opts[:opts.index("data.save_dir") + 1] + [str(tmp_path / "none")] + opts[opts.index("data.save_dir") + 2:]
    assert ranks_main(["--config", str(cfg_path), "--opts", *empty]) == 2
    assert "no checkpoint" in capsys.readouterr().err
