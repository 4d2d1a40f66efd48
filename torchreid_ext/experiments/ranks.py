"""Rank lists of a trained model: a query and its top-k gallery images, green border = same
identity, red = different (Torchreid's ``visualize_ranked_results``), for a few queries.

Junk gallery items (same identity and camera as the query, docs/methods.md E1) are skipped, as
the evaluator and Torchreid's visualiser do. Features come from
:func:`torchreid_ext.features.extract_loader` (with ``test.flip`` when the config has it), as in
the engine's evaluation.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..adapter import torchreid
from ..checkpoint import latest_checkpoint, load_model_weights
from ..errors import ConfigError, InputNotFound
from ..features import extract_loader

__all__ = ["ranked_lists", "visualize_ranks", "main"]


def ranked_lists(distmat: np.ndarray, query: List[tuple], gallery: List[tuple], rows: List[int],
                 topk: int) -> List[Dict[str, Any]]:
    """For each query row: the top-k non-junk gallery indices, their distances and matches."""
    out = []
    for q in rows:
        _, qpid, qcam = query[q][:3]
        shown = [g for g in np.argsort(distmat[q], kind="stable")
                 if not (gallery[g][1] == qpid and gallery[g][2] == qcam)][:topk]
        out.append({"query": q, "gallery": [int(g) for g in shown],
                    "distances": [float(distmat[q, g]) for g in shown],
                    "matched": [bool(gallery[g][1] == qpid) for g in shown]})
    return out


def visualize_ranks(cfg, out_dir: str, weights: str = "", num_queries: int = 8,
                    topk: int = 10, dataset: Optional[str] = None) -> List[Dict[str, Any]]:
    """Save ``<out_dir>/<query name>.jpg`` for ``num_queries`` evenly spaced queries of
    ``dataset`` (default: the first target); return their ranked lists (with ``image``)."""
    from ..builders import build_datamanager, build_run_model
    from ..metrics import compute_distance_matrix
    from ..run_options import RunOptions

    if num_queries < 1 or topk < 1:
        raise ConfigError(f"num_queries = {num_queries} and topk = {topk}: both must be >= 1")
    options = RunOptions(cfg, use_gpu=False)
    save_dir, targets = options.save_dir, list(options.datamanager_args["targets"])
    weights = weights or latest_checkpoint(osp.join(save_dir, "model")) or ""
    if not osp.isfile(weights):
        raise InputNotFound(
            f"no checkpoint: weights = '{weights}' and none in '{osp.join(save_dir, 'model')}'; "
            "pass --weights or the save dir of a trained run")
    dataset = dataset or targets[0]
    if dataset not in targets:
        raise ConfigError(f"dataset = '{dataset}' is not a target; choose one of {targets}")
    dm = build_datamanager(options, image_check="header")  # the images are read below anyway
    model = build_run_model(options.model, dm.num_train_pids, use_gpu=False)
    load_model_weights(model, weights, strict=True)
    model.eval()
    loaders = dm.test_loader[dataset]
    ev = options.evaluation
    qf = extract_loader(model, loaders["query"], torch.device("cpu"), flip=ev.flip, desc="query features")[0]
    gf = extract_loader(model, loaders["gallery"], torch.device("cpu"), flip=ev.flip, desc="gallery features")[0]
    if ev.normalize_feature:
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    distmat = compute_distance_matrix(qf, gf, ev.dist_metric).cpu().numpy()
    query, gallery = dm.fetch_test_loaders(dataset)
    rows = sorted(set(np.linspace(0, len(query) - 1, min(num_queries, len(query))).round().astype(int).tolist()))
    torchreid().utils.visualize_ranked_results(
        distmat[rows], ([query[q] for q in rows], gallery), "image",
        width=options.datamanager_args["width"], height=options.datamanager_args["height"], save_dir=out_dir,
        topk=topk)
    lists = ranked_lists(distmat, query, gallery, rows, topk)
    for item in lists:
        item["image"] = osp.join(out_dir, osp.splitext(osp.basename(query[item["query"]][0]))[0] + ".jpg")
    return lists


def main(argv: Optional[List[str]] = None) -> int:
    """``scripts/visualize_ranks.py`` / ``torchreid-ext-visualize``: exit status 0, or 2 on bad input."""
    import argparse

    from ..config import load_config
    from ..console import run_command
    from .runs import read_spec

    p = argparse.ArgumentParser(description="Save rank lists (query + top-k gallery, green = same identity, "
                                            "red = not) of a trained run")
    p.add_argument("--config", default="", help="config of the trained run")
    p.add_argument("--save-dir", default="", help="save dir of the run (config from its run.json if no --config)")
    p.add_argument("--weights", default="", help="checkpoint (default: newest in <save_dir>/model)")
    p.add_argument("--out", default="", help="output folder (default: <save_dir>/ranks)")
    p.add_argument("--num-queries", type=int, default=8)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides (last)")
    args = p.parse_args(argv)

    def body() -> None:
        config, opts = args.config, list(args.opts or [])
        if args.save_dir:
            spec = read_spec(args.save_dir)
            if not config and spec is not None:
                config, opts = spec["config"], spec["overrides"] + opts
            if not config:
                raise ConfigError(f"save dir '{args.save_dir}' has no run.json; pass --config too")
            opts += ["data.save_dir", args.save_dir]
        if not config:
            raise ConfigError("give --config or --save-dir")
        cfg = load_config(config, opts)
        out = args.out or osp.join(cfg.data.save_dir, "ranks")
        for item in visualize_ranks(cfg, out, args.weights, args.num_queries, args.topk):
            marks = "".join("+" if m else "-" for m in item["matched"])
            print(f"{item['image']}: top-{len(item['matched'])} matches {marks}")

    return run_command(body)
