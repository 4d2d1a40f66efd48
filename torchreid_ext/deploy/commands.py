"""Command lines of ``scripts/extract.py``, ``scripts/evaluate.py``, ``scripts/export.py`` and ``scripts/search.py``.

Each ``*_main(argv)`` returns the exit status (:func:`torchreid_ext.console.run_command`): 0 on
success, 2 for bad input (one line on stderr naming the problem, nothing written; argparse's own
errors exit 2 too), 1 when an exported file fails its check against PyTorch, 130 when interrupted.
Trailing ``KEY VALUE`` pairs override the config as in ``scripts/main.py``.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from ..console import run_command
from .images import DATASET_SPLITS

__all__ = ["extract_main", "evaluate_main", "export_main", "search_main"]


def _opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


def extract_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Extract features of a folder or a dataset split to HDF5")
    p.add_argument("--config", default="", help="YAML config of the model (default: the built-in defaults)")
    p.add_argument("--weights", default="", help="checkpoint (ours or Torchreid's); default: model.load_weights, "
                   "else the newest in <data.save_dir>/model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--dataset", help="registered dataset name (under data.root); needs --split")
    p.add_argument("--split", choices=DATASET_SPLITS, help="split of --dataset")
    p.add_argument("--out", required=True, help="output HDF5 file (its folder must exist)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not an HDF5 file (any regular file)")
    _opts(p)
    args = p.parse_args(argv)
    if args.dataset and not args.split:
        p.error("--dataset needs --split (query, gallery or train)")
    if args.images and args.split:
        p.error("--split goes with --dataset, not --images")

    def step():
        from ..config import load_config
        from .extract import extract_features

        cfg = load_config(args.config, args.opts)
        extract_features(cfg, args.out, images=args.images, dataset=args.dataset, split=args.split,
                         weights=args.weights, force=args.force, config_file=args.config)  # logs what it wrote

    return run_command(step)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate saved query / gallery features (scripts/extract.py output)")
    p.add_argument("--query", required=True, help="query features (HDF5)")
    p.add_argument("--gallery", required=True, help="gallery features (HDF5)")
    p.add_argument("--out", default="", help="folder for metrics.json (default: the query file's folder)")
    p.add_argument("--no-write", action="store_true", help="print only; write no metrics.json")
    _opts(p)
    args = p.parse_args(argv)

    def step():
        from .evaluate import evaluate_files, format_results

        record = evaluate_files(args.query, args.gallery, args.opts, out_dir=args.out or None,
                                write=not args.no_write, progress=True)
        print(f"Evaluated {record['num_query']} query and {record['num_gallery']} gallery features "
              f"of '{record['model']}'")
        print(format_results(record["results"], record["ranks"]))
        if record["metrics_file"]:
            print(f"Metrics written to '{record['metrics_file']}'"
                  + (" (replaced the previous one)" if record["replaced"] else ""))

    return run_command(step)


def export_main(argv: Optional[List[str]] = None) -> int:
    from .export import FORMATS

    p = argparse.ArgumentParser(description="Export the eval-mode model (image -> embedding) and check it")
    p.add_argument("--config", default="", help="YAML config of the model (default: the built-in defaults)")
    p.add_argument("--weights", default="", help="checkpoint (ours or Torchreid's); default: model.load_weights, "
                   "else the newest in <data.save_dir>/model")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output file (its folder must exist)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not an ONNX or TorchScript file (any regular file)")
    p.add_argument("--height", type=int, default=None, help="input height (default: data.height)")
    p.add_argument("--width", type=int, default=None, help="input width (default: data.width)")
    p.add_argument("--check-image", default=None,
                   help="image for the check (default: the first query image of data.targets[0])")
    _opts(p)
    args = p.parse_args(argv)

    def step():
        from ..config import load_config
        from .export import export_model

        cfg = load_config(args.config, args.opts)
        export_model(cfg, args.out, args.format, weights=args.weights, height=args.height, width=args.width,
                     check_image=args.check_image, force=args.force,
                     config_file=args.config)  # logs the check's max |difference|

    return run_command(step)


def search_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="Find the people of query images in a folder of crops (or a features file): the top k "
                    "matches with distances and same / different decisions, in matches.csv, matches.json "
                    "and report.html",
        epilog="KEY VALUE overrides go last, after an option other than --query (it takes several paths)")
    p.add_argument("--config", default="", help="YAML config of the model (default: the built-in defaults)")
    p.add_argument("--weights", default="", help="checkpoint (ours) or Torchreid model-zoo file; default: "
                   "model.load_weights, else the newest in <data.save_dir>/model")
    p.add_argument("--query", nargs="+", required=True, metavar="PATH", help="query images and / or folders")
    p.add_argument("--gallery", required=True, help="folder of crops (searched recursively) or a features file "
                   "written by scripts/extract.py with the same model")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("-k", "--k", type=int, default=10, help="matches per query (default 10)")
    decide = p.add_mutually_exclusive_group()
    decide.add_argument("--threshold", type=float, default=None,
                        help="same person when the distance is at most this")
    decide.add_argument("--calibration", default=None, metavar="METRICS_JSON",
                        help="metrics.json of a labelled evaluation: the threshold at --fpr")
    p.add_argument("--fpr", type=float, default=None, help="false-positive rate of the calibrated threshold "
                   "(default 0.01; with --calibration)")
    p.add_argument("--calibration-target", default=None, metavar="DATASET",
                   help="test set of the calibration run, when it has several")
    p.add_argument("--per-page", type=int, default=20, help="queries per report page (default 20)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", default="", help="gallery feature cache (default: $TORCHREID_EXT_CACHE/search, "
                       "else ~/.cache/torchreid_ext/search)")
    cache.add_argument("--no-cache", action="store_true", help="extract the gallery folder every time")
    _opts(p)
    args = p.parse_args(argv)

    def step():
        from ..config import load_config
        from .search import DECISIONS, search

        cfg = load_config(args.config, args.opts)
        result = search(cfg, args.query, args.gallery, args.out, weights=args.weights, k=args.k,
                        threshold=args.threshold, calibration=args.calibration, fpr=args.fpr,
                        calibration_target=args.calibration_target,
                        cache_dir=None if args.no_cache else args.cache_dir, per_page=args.per_page)
        counts = {d: sum(m.decision == d for m in result.matches) for d in DECISIONS}
        print(f"Searched {result.num_gallery} gallery images for {result.num_query} queries: "
              + ", ".join(f"{n} {d}" for d, n in counts.items() if n))
        print(f"Report: {result.files[2]}")

    return run_command(step)
