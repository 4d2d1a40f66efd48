"""Benchmark: k-NN backends (``knn.backend``) for search, and re-ranking with approximate neighbours.

Every method runs in its own subprocess; time is wall clock, memory the child's peak RSS from
``/proc/self`` (``benchmarks/memory.py``; the peak mark is reset once the inputs are loaded, so "+work"
is the method's own memory, its index included). Ratios are against ``exact``, measured in the same run.

* ``search``: a synthetic clustered, unit-norm ``--dim``-d gallery of ``--gallery`` items (default
  1,000,000: 2 GB of float32, about 4.5 GB with faiss's copy of it, under 8 GB) and ``--queries``
  queries (1,000) from the same clusters: build time, queries per second and recall@10 against the
  exact backend's own result, for each of ``--backends``;
* ``rerank``: ``evaluate_features(..., rerank=True, knn=...)``, i.e. re-ranking plus CMC / mAP / mINP
  (``test.rerank True`` in the engine), on the synthetic features of ``benchmarks/evaluation.py`` at
  ``--rerank-shape`` (default ``msmt17``: 11,659 queries x 82,161 gallery): time including evaluation,
  peak RSS, mAP and rank-1 and their difference from exact re-ranking, for ``exact`` and each of
  ``--rerank-backends`` (default ``faiss-hnsw`` and ``faiss-ivf``);
* ``real``: the same on real features: CUHK03 camera pair 1 (its test split) extracted with the
  MSMT17 OSNet-x0.25 model-zoo weights, where ``--real-data`` (default ``$TORCHREID_EXT_REAL_DATA``,
  the tests' variable) has them; skipped with the reason otherwise. Features are extracted once into the work folder.

Goals (issue 29): approximate re-ranking at the MSMT17 shape under 15 s including evaluation; mAP within
0.1 (percentage points) of exact re-ranking on the real set. The summary says which are met.
``--knn KEY=VALUE`` sets the approximate backends' parameters (``hnsw_m=16``, ``ivf_nprobe=8`` ...).

Usage: ``python benchmarks/knn.py [--parts search rerank real] [--gallery N] [--queries Q]
[--rerank-shape msmt17] [--json F]``. A quick end-to-end check at small sizes:
``python benchmarks/knn.py --gallery 20000 --queries 200 --rerank-shape tiny --json /tmp/knn.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from evaluation import SHAPES, make_data  # benchmarks/evaluation.py
from memory import current_rss, peak_rss, reset_peak  # benchmarks/memory.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
K = 10
MAX_RANK = 50
GOAL_SECONDS = 15.0  # approximate re-ranking at the MSMT17 shape, evaluation included
GOAL_MAP_POINTS = 0.1  # |mAP - exact mAP| on the real set, in percentage points


# ------------------------------------------------------------------------------------------------
# data


def make_search_data(path: str, n: int, num_q: int, dim: int, seed: int) -> None:
    """Gallery (``path``) and queries (``path`` with ``-queries``): clusters of about 20 items, unit norm,
    written in chunks (the gallery is never held twice)."""
    rng = np.random.RandomState(seed)
    clusters = max(1, n // 20)
    centres = rng.randn(clusters, dim).astype(np.float32)
    gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, 65536):
        b = min(a + 65536, n)
        x = centres[rng.randint(0, clusters, b - a)] + 0.6 * rng.randn(b - a, dim).astype(np.float32)
        gallery[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    gallery.flush()
    del gallery
    q = centres[rng.randint(0, clusters, num_q)] + 0.6 * rng.randn(num_q, dim).astype(np.float32)
    np.save(path.replace(".npy", "-queries.npy"), q / np.linalg.norm(q, axis=1, keepdims=True))


def extract_real(root: str, workdir: str) -> Dict[str, str]:
    """CUHK03 pair 1 query / gallery features of the MSMT17 OSNet weights (the project's extract command)."""
    weights = os.path.join(root, "weights", "osnet_x0_25_msmt17.pth")
    files = {}
    for split in ("query", "gallery"):
        files[split] = os.path.join(workdir, f"cuhk03-{split}.h5")
        if os.path.exists(files[split]):
            continue
        code = ("import sys; from torchreid_ext.deploy.commands import extract_main; "
                "sys.exit(extract_main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, "--config", os.path.join(REPO, "configs", "real", "zero_shot.yaml"),
               "--weights", weights, "--dataset", "cuhk03_pair1", "--split", split, "--out", files[split],
               "data.root", root, "data.workers", "0", "use_gpu", "False"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"extraction failed: {proc.stderr.strip().splitlines()[-1:]}")
    return files


# ------------------------------------------------------------------------------------------------
# children


def _knn_options(backend: str, pairs: List[str]):
    from torchreid_ext.metrics.knn_index import KNNOptions

    values = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        values[key] = int(value)
    return KNNOptions(backend=backend, **values)


def _timed(out: Dict, fn):
    out["rss_before"] = current_rss()
    out["peak_reset"] = reset_peak()
    t = time.perf_counter()
    result = fn()
    out["seconds"] = time.perf_counter() - t
    out["peak"] = peak_rss()
    return result


def child_search(args) -> Dict:
    import torch

    from torchreid_ext.metrics.knn_index import build_index

    gallery = np.load(args.data)
    queries = np.load(args.data.replace(".npy", "-queries.npy"))
    out: Dict = {"part": "search", "method": args.method, "gallery": len(gallery), "queries": len(queries),
                 "dim": gallery.shape[1], "torch_threads": torch.get_num_threads()}
    options = _knn_options(args.method, args.knn)
    out["rss_before"] = current_rss()
    out["peak_reset"] = reset_peak()
    t = time.perf_counter()
    index = build_index(torch.from_numpy(gallery), options, "euclidean")
    out["build_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    _, idx = index.search(torch.from_numpy(queries), K)
    out["search_seconds"] = time.perf_counter() - t
    out["peak"] = peak_rss()
    out["queries_per_second"] = len(queries) / out["search_seconds"]
    np.save(os.path.join(args.workdir, f"search-{args.method}.npy"), idx.numpy())
    return out


def child_rerank(args) -> Dict:
    import torch

    from torchreid_ext.metrics import evaluate_features

    if args.part == "real":
        from torchreid_ext.deploy import load_features

        q, g = load_features(args.data), load_features(args.data2)
        qf, gf = q.features, g.features
        labels = (q.pids, g.pids, q.camids, g.camids)
    else:
        with np.load(args.data) as z:
            data = {k: z[k] for k in z.files}
        qf, gf = data["qf"], data["gf"]
        labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    out: Dict = {"part": args.part, "method": args.method, "num_q": len(qf), "num_g": len(gf),
                 "torch_threads": torch.get_num_threads()}
    q, g = torch.from_numpy(np.ascontiguousarray(qf)), torch.from_numpy(np.ascontiguousarray(gf))
    knn = _knn_options(args.method, args.knn)
    res = _timed(out, lambda: evaluate_features(q, g, *labels, max_rank=MAX_RANK, rerank=True, knn=knn))
    out.update(mAP=float(res.mAP), rank1=float(res.cmc[0]), mINP=float(res.mINP))
    if args.method == "exact":
        t = time.perf_counter()
        plain = evaluate_features(q, g, *labels, max_rank=MAX_RANK)
        out["plain_seconds"] = time.perf_counter() - t
        out.update(plain_mAP=float(plain.mAP), plain_rank1=float(plain.cmc[0]))
    return out


# ------------------------------------------------------------------------------------------------
# parent


def _child(part: str, method: str, data: str, args, data2: str = "") -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--method", method, "--data", data,
           "--data2", data2, "--workdir", args.workdir]
    for pair in args.knn:
        cmd += ["--knn", pair]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"part": part, "method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"# {part} {method}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items() if k not in ("part", "method")), flush=True)
    return row


def _gb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def run_search(args, rows: List[Dict]) -> None:
    path = os.path.join(args.workdir, "gallery.npy")
    make_search_data(path, args.gallery, args.queries, args.dim, args.seed)
    results = [_child("search", m, path, args) for m in ["exact"] + [b for b in args.backends if b != "exact"]]
    ref_path = os.path.join(args.workdir, "search-exact.npy")
    ref = np.load(ref_path) if os.path.exists(ref_path) else None
    base = results[0] if "error" not in results[0] else None
    print("\n| search | gallery | build [s] | queries/s | speed-up vs exact | recall@10 | peak RSS [GB] | +work [GB] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | failed: {' '.join(r['error'])} | | | | | | |")
            rows.append(r)
            continue
        if ref is not None:
            got = np.load(os.path.join(args.workdir, f"search-{r['method']}.npy"))
            r["recall_at_10"] = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(got, ref)]))
        if base is not None:
            r["speedup_vs_exact"] = r["queries_per_second"] / base["queries_per_second"]
        print(f"| {r['method']} | {r['gallery']:,} | {r['build_seconds']:.2f} | {r['queries_per_second']:.0f} | "
              f"{r.get('speedup_vs_exact', float('nan')):.1f}x | {r.get('recall_at_10', float('nan')):.4f} | "
              f"{_gb(r['peak'])} | {_gb(r['peak'] - r['rss_before'])} |")
        rows.append(r)


def _rerank_table(title: str, results: List[Dict], rows: List[Dict]) -> None:
    base = next((r for r in results if r["method"] == "exact" and "error" not in r), None)
    print(f"\n| {title} | time incl. evaluation [s] | speed-up vs exact | peak RSS [GB] | +work [GB] | mAP | "
          "rank-1 | mAP - exact [points] | rank-1 - exact [points] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | failed: {' '.join(r['error'])} | | | | | | | |")
            rows.append(r)
            continue
        if base is not None:
            r["speedup_vs_exact"] = base["seconds"] / r["seconds"]
            r["mAP_diff_points"] = 100 * (r["mAP"] - base["mAP"])
            r["rank1_diff_points"] = 100 * (r["rank1"] - base["rank1"])
        note = f" (plain evaluation {r['plain_seconds']:.1f})" if "plain_seconds" in r else ""
        print(f"| {r['method']} | {r['seconds']:.1f}{note} | {r.get('speedup_vs_exact', float('nan')):.1f}x | "
              f"{_gb(r['peak'])} | {_gb(r['peak'] - r['rss_before'])} | {r['mAP']:.2%} | {r['rank1']:.2%} | "
              f"{r.get('mAP_diff_points', float('nan')):+.2f} | {r.get('rank1_diff_points', float('nan')):+.2f} |")
        rows.append(r)


def run_rerank(args, rows: List[Dict]) -> None:
    path = os.path.join(args.workdir, f"{args.rerank_shape}.npz")
    np.savez(path, **make_data(args.rerank_shape, args.dim, args.seed))
    methods = ["exact"] + [b for b in args.rerank_backends if b != "exact"]
    results = [dict(_child("rerank", m, path, args), shape=args.rerank_shape) for m in methods]
    _rerank_table(f"re-ranking, {args.rerank_shape} shape", results, rows)


def run_real(args, rows: List[Dict]) -> None:
    root = args.real_data
    if not root or not os.path.isfile(os.path.join(root, "weights", "osnet_x0_25_msmt17.pth")) or \
            not os.path.isdir(os.path.join(root, "cuhk03_pair1")):
        reason = (f"real data or MSMT17 weights not found under '{root}'" if root
                  else "no --real-data given (nor TORCHREID_EXT_REAL_DATA)")
        print(f"\n# real: skipped ({reason})")
        rows.append({"part": "real", "skipped": reason})
        return
    files = extract_real(root, args.features_dir or args.workdir)
    methods = ["exact"] + [b for b in args.rerank_backends if b != "exact"]
    results = [_child("real", m, files["query"], args, files["gallery"]) for m in methods]
    _rerank_table("re-ranking, CUHK03 pair 1 (MSMT17 weights)", results, rows)


def summary(rows: List[Dict], rerank_shape: str) -> List[str]:
    lines = []
    for r in rows:
        if r.get("part") == "rerank" and r.get("method") != "exact" and "error" not in r:
            met = r["seconds"] < GOAL_SECONDS
            lines.append(f"{r['method']} re-ranking at the {rerank_shape} shape: {r['seconds']:.1f} s incl. evaluation "
                         f"({'meets' if met else 'misses'} the goal of {GOAL_SECONDS:.0f} s"
                         f"{'' if rerank_shape == 'msmt17' else ', which is set for the msmt17 shape'})")
        if r.get("part") == "real" and r.get("method") != "exact" and "mAP_diff_points" in r:
            met = abs(r["mAP_diff_points"]) <= GOAL_MAP_POINTS
            lines.append(f"{r['method']} on CUHK03 pair 1: mAP {r['mAP_diff_points']:+.2f} points from exact "
                         f"({'meets' if met else 'misses'} the goal of {GOAL_MAP_POINTS} points)")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["search", "rerank", "real"], choices=["search", "rerank", "real"])
    p.add_argument("--gallery", type=int, default=1_000_000, help="search: gallery size")
    p.add_argument("--queries", type=int, default=1000, help="search: queries")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--backends", nargs="+", default=BACKENDS[1:], choices=BACKENDS, help="search: compared with exact")
    p.add_argument("--rerank-shape", default="msmt17", choices=sorted(SHAPES))
    p.add_argument("--rerank-backends", nargs="+", default=["faiss-hnsw", "faiss-ivf"], choices=BACKENDS)
    p.add_argument("--knn", action="append", default=[], metavar="KEY=VALUE",
                   help="a knn option of the approximate backends (repeatable), e.g. hnsw_m=16")
    p.add_argument("--real-data", default=os.environ.get("TORCHREID_EXT_REAL_DATA", ""),
                   help="real: the data root holding cuhk03_pair1 and weights/ (default $TORCHREID_EXT_REAL_DATA)")
    p.add_argument("--features-dir", default="", help="real: keep the extracted features here (default: temporary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--child", choices=["search", "rerank", "real"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--data2", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.part = args.child
        print(json.dumps(child_search(args) if args.child == "search" else child_rerank(args)))
        return

    args.workdir = tempfile.mkdtemp(prefix="knn-bench-")
    rows: List[Dict] = []
    try:
        if "search" in args.parts:
            run_search(args, rows)
        if "rerank" in args.parts:
            run_rerank(args, rows)
        if "real" in args.parts:
            run_real(args, rows)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    lines = summary(rows, args.rerank_shape)
    if lines:
        print("\n" + "\n".join(lines))
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    print(f"\ntorch threads: {threads}; Python {sys.version.split()[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": lines, "args": {k: v for k, v in vars(args).items()
                                                               if k not in ("child", "method", "data", "data2")}},
                      f, indent=1)


if __name__ == "__main__":
    main()
