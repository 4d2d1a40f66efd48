"""Benchmark: k-reciprocal re-ranking, Torchreid's ``re_ranking`` vs ours (matrix drop-in, features path).

Data: the synthetic trained-looking 512-d features of ``benchmarks/evaluation.py`` (``make_data``) at the
Market-1501 shape (3,368 + 15,913) and the MSMT17 shape (11,659 + 82,161). Every method runs in its own
subprocess; time is wall-clock of one call (best of ``--repeats`` for ours), memory is read from
``/proc/self`` (``benchmarks/memory.py``): "peak" is the process's peak RSS during the timed call, inputs
included (the peak mark is reset once the inputs are in memory), "+work" is that peak minus the RSS just
before (the method's own working memory, its output included). Methods:

* ``torchreid``: Torchreid's ``utils.re_ranking`` on the three float32 matrices its engine builds
  (``metrics.compute_distance_matrix``: query x gallery, query x query, gallery x gallery);
* ``ours-matrix``: ``torchreid_ext.metrics.re_ranking`` on the same three matrices (drop-in);
* ``ours-features``: ``evaluate_features(..., rerank=True)``: distances, re-ranking and CMC / mAP / mINP
  from the features, never holding an N x N or Q x G matrix; its time is distances + re-ranking +
  evaluation. For reference the child also times plain ``evaluate_features`` (no re-ranking).

Agreement: max |difference| of each of our results from Torchreid's re-ranked matrix (ours-features: its
blocks, recomputed untimed), and the largest difference of CMC@1..50 / mAP / mINP (our evaluator on
Torchreid's matrix vs ours). At the MSMT17 shape only ``ours-features`` runs: the matrices alone would
take 27 GB; Torchreid's cost there is estimated, not run: time scaled from the Market run by
(N_msmt / N_market)^2 (its loops and sorts grow at least that fast) and memory as Market's bytes per
element of the (Q + G)^2 matrix times MSMT17's (Q + G)^2.

``--device cuda`` runs ``ours-features`` on the GPU (features moved there before timing; Torchreid's
baseline and the drop-in stay on the CPU, as Torchreid's engine computes them); ``--json PATH``
writes the rows (what ``tools/gpu_check.py`` reads).

Usage: ``python benchmarks/rerank.py [--shapes market msmt17] [--repeats 2] [--device cuda] [--json F]``.
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

METHODS = ["torchreid", "ours-matrix", "ours-features"]
MAX_RANK = 50
# the measurement on this machine (used only if the Market Torchreid child did not run)
TORCHREID_MARKET = {"seconds": 63.6, "peak": 9.35e9}


def _metrics(res) -> Dict:
    return {"cmc": [float(c) for c in res.cmc], "mAP": float(res.mAP), "mINP": float(res.mINP)}


def _metric_diff(a: Dict, b: Dict) -> float:
    return float(max(np.max(np.abs(np.subtract(a["cmc"], b["cmc"]))), abs(a["mAP"] - b["mAP"]),
                     abs(a["mINP"] - b["mINP"])))


def _torchreid_matrices(qf: np.ndarray, gf: np.ndarray):
    import torch

    from torchreid_ext.adapter import torchreid

    tr = torchreid()
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    return tuple(tr.metrics.compute_distance_matrix(a, b).numpy() for a, b in ((q, g), (q, q), (g, g)))


def run_child(args) -> Dict:
    import torch

    from torchreid_ext.metrics import evaluate_features, evaluate_rank, re_ranking, reranked_distance_blocks

    with np.load(args.data) as z:
        data = {k: z[k] for k in z.files}
    qf, gf = data["qf"], data["gf"]
    labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    ref_path = os.path.join(args.workdir, f"{args.shape}-torchreid.npy")
    out: Dict = {"method": args.child, "shape": args.shape, "num_q": len(qf), "num_g": len(gf),
                 "torch_threads": torch.get_num_threads()}

    def timed(fn, repeats):
        out["rss_before"] = current_rss()
        out["peak_reset"] = reset_peak()
        best, result = float("inf"), None
        for _ in range(repeats):
            result = None
            t = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - t)
        out["seconds"], out["peak"] = best, peak_rss()
        return result

    if args.child in ("torchreid", "ours-matrix"):
        t = time.perf_counter()
        mats = _torchreid_matrices(qf, gf)
        out["dist_seconds"] = time.perf_counter() - t
        if args.child == "torchreid":
            from torchreid_ext.adapter import torchreid

            result = timed(lambda: torchreid().utils.re_ranking(*mats), 1)
            np.save(ref_path, result)
        else:
            result = timed(lambda: re_ranking(*mats), args.repeats)
        del mats
        out["metrics"] = _metrics(evaluate_rank(result, *labels, max_rank=MAX_RANK))
        if args.child == "ours-matrix" and os.path.exists(ref_path):
            out["max_abs_diff"] = float(np.max(np.abs(result - np.load(ref_path, mmap_mode="r"))))
        return out

    device = torch.device(args.device)
    q, g = torch.from_numpy(qf).to(device), torch.from_numpy(gf).to(device)  # the engine passes torch tensors
    out["device"] = args.device

    def synced(fn):
        def call():
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result
        return call

    res = timed(synced(lambda: evaluate_features(q, g, *labels, max_rank=MAX_RANK, rerank=True)), args.repeats)
    out["metrics"] = _metrics(res)
    t = time.perf_counter()
    synced(lambda: evaluate_features(q, g, *labels, max_rank=MAX_RANK))()
    out["plain_seconds"] = time.perf_counter() - t
    if os.path.exists(ref_path):
        ref = np.load(ref_path, mmap_mode="r")
        out["max_abs_diff"] = max(float(np.max(np.abs(block.numpy() - ref[a:a + block.shape[0]])))
                                  for a, block in reranked_distance_blocks(q, g))
    return out


# ------------------------------------------------------------------------------------------------
# parent


def _child(method: str, shape: str, data: str, workdir: str, repeats: int, device: str) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--shape", shape, "--data", data,
           "--workdir", workdir, "--repeats", str(repeats), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "shape": shape, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def _row(r: Dict, base: Optional[Dict]) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['method']} | failed: {' '.join(r['error'])} | | | | | | | |"
    work = r["peak"] - r["rss_before"]
    speed = mem = wmem = "-"
    if base is not None and r is not base:
        speed = f"{base['seconds'] / r['seconds']:.0f}x"
        mem = f"1/{base['peak'] / r['peak']:.1f}"
        if "rss_before" in base:
            wmem = f"1/{(base['peak'] - base['rss_before']) / work:.0f}"
    diff = r.get("max_abs_diff")
    mdiff = r.get("metric_diff")
    note = f" (+ {r['plain_seconds']:.1f} s plain evaluation)" if "plain_seconds" in r else ""
    return (f"| {r['shape']} | {r['method']} | {r['seconds']:.1f}{note} | {_gb(r['peak'])} | {_gb(work)} | "
            f"{speed} | {mem} | {wmem} | {'-' if diff is None else f'{diff:.1e}'} | "
            f"{'-' if mdiff is None else f'{mdiff:.1e}'} |")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["market", "msmt17"], choices=sorted(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=2, help="timed calls of our methods (best is reported)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ours-features runs")
    p.add_argument("--json", default="", help="also write the rows here (what tools/gpu_check.py reads)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return

    workdir = tempfile.mkdtemp(prefix="rerank-bench-")
    rows: List[Dict] = []
    try:
        for shape in args.shapes:
            path = os.path.join(workdir, f"{shape}.npz")
            np.savez(path, **make_data(shape, args.dim, args.seed))
            small = shape != "msmt17"  # the matrix methods need (Q + G)^2 floats: 35 GB at MSMT17
            results = {}
            for method in args.methods:
                if method != "ours-features" and not small:
                    continue
                r = _child(method, shape, path, workdir, args.repeats, args.device)
                results[method] = r
                print(f"# {shape} {method}: " + (f"{r['seconds']:.1f} s, peak {_gb(r['peak'])} GB"
                                                   if "error" not in r else f"failed {r['error']}"), flush=True)
            ref = results.get("torchreid")
            for method, r in results.items():
                if ref and "error" not in ref and "error" not in r and method != "torchreid":
                    r["metric_diff"] = _metric_diff(r["metrics"], ref["metrics"])
                rows.append(r)
            if not small:
                market = next((x for x in rows if x["shape"] == "market" and x["method"] == "torchreid"
                               and "error" not in x), None)
                rows.append(_estimate(shape, market))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| shape | method | time [s] | peak RSS [GB] | +work [GB] | speed-up | peak vs Torchreid | "
          "+work vs Torchreid | max abs diff | metrics diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("estimated"):
            print(f"| {r['shape']} | torchreid (estimated, not run) | ~{r['seconds']:.0f} | ~{_gb(r['peak'])} | "
                  f"| | | | | |")
            continue
        base = next((x for x in rows if x["shape"] == r["shape"] and x["method"] == "torchreid"
                     and "error" not in x), None)
        if base is None:
            base = next((x for x in rows if x["shape"] == r["shape"] and x.get("estimated")), None)
        print(_row(r, base))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    threads = {r.get("torch_threads") for r in rows if "torch_threads" in r}
    print(f"\ntorch threads: {sorted(threads)}; Python {sys.version.split()[0]}")


def _estimate(shape: str, market: Optional[Dict]) -> Dict:
    """Torchreid's time and peak at ``shape``, scaled from its Market run by (Q + G)^2."""
    s, m = SHAPES[shape], SHAPES["market"]
    scale = ((s["num_q"] + s["num_g"]) / (m["num_q"] + m["num_g"])) ** 2
    base = TORCHREID_MARKET if market is None else market
    return {"shape": shape, "method": "torchreid", "estimated": True, "seconds": base["seconds"] * scale,
            "peak": base["peak"] * scale}


if __name__ == "__main__":
    main()
