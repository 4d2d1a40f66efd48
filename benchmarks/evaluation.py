"""Benchmark: torchreid_ext.metrics vs Torchreid's Python and compiled (Cython) rank evaluators (E5).

Shapes (METHOD.md E5): Market-1501 (3368 queries x 15913 gallery, 750 identities, 6 cameras, 2798 pid-0
distractors) and MSMT17 (11659 x 82161, 3060 identities, 15 cameras). Synthetic unit-norm features:
identity centre + camera offset + noise with a log-normal per-image scale (most images easy, a few
hard), the noise set per shape so the scores look like a trained model's: Market rank-1 ~0.98, mAP
~0.84, mINP ~0.37; MSMT17 rank-1 ~0.85, mAP ~0.5, mINP ~0.02. mINP (how deep the hardest positive
lies) is what our evaluator's speed depends on; these are at or below the published levels (FastReID
BoT-R50: Market mINP 0.59, MSMT17 ~0.1), i.e. not flattering to us.

Every method runs in its own subprocess, which reports its own peak RSS (``ru_maxrss``), so peaks never
mix. Methods:

* ``ours-matrix``: ``evaluate_rank`` on the full float32 distance matrix (time excludes computing it);
* ``ours-features``: ``evaluate_features`` (time INCLUDES the chunked distance computation);
* ``torchreid-python``: Torchreid's ``evaluate_rank(..., use_cython=False)``;
* ``torchreid-cython``: Torchreid's compiled ``evaluate_cy``, from the ``pyppbox-torchreid`` wheel, pip-
  installed into a temporary directory for this run only (``--no-deps --target``) and loaded by file
  path, since that package's ``__init__`` imports all of Torchreid.

Torchreid's evaluators build argsort / match matrices of the full size (~25-29 bytes per matrix element:
~25 GB at the MSMT17 shape). When the estimate does not fit in the available memory they run on the
first N queries (N chosen to fit, or ``--baseline-queries``) and their time is scaled by Q / N (their
cost is linear in the number of queries); such rows are marked ``~``. The Python evaluator at the
MSMT17 shape (~15 min) is skipped unless ``--python-on-msmt17``. Each baseline subprocess also runs our
evaluator on the same matrix (untimed) and reports the largest difference of CMC@1..max_rank and mAP.

Usage: ``python benchmarks/evaluation.py [--shapes market msmt17] [--repeats 3] [--dim 512]``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

SHAPES = {
    # name: queries, gallery, identities, cameras, pid-0 distractors in the gallery, feature noise
    "market": dict(num_q=3368, num_g=15913, ids=750, cams=6, distractors=2798, noise=1.5),
    "msmt17": dict(num_q=11659, num_g=82161, ids=3060, cams=15, distractors=0, noise=2.2),
}
BYTES_PER_ELEMENT = {"torchreid-cython": 29, "torchreid-python": 25}  # dist + argsort + matches (+ temps)
METHODS = ["ours-matrix", "ours-features", "torchreid-cython", "torchreid-python"]


# ------------------------------------------------------------------------------------------------
# data


def make_data(shape: str, dim: int, seed: int, num_q: Optional[int] = None):
    """Synthetic features and labels of a dataset shape; the first ``num_q`` queries if given."""
    s = SHAPES[shape]
    rng = np.random.RandomState(seed)
    ids, cams = s["ids"], s["cams"]
    centers = rng.randn(ids + 1, dim).astype(np.float32) / np.sqrt(dim)
    cam_bias = rng.randn(cams, dim).astype(np.float32) * (0.4 / np.sqrt(dim))
    # each identity is seen by 2..cams cameras
    n_cams = rng.randint(2, cams + 1, size=ids + 1)
    cam_sets = np.argsort(rng.rand(ids + 1, cams), axis=1)

    def sample(n):
        pid = rng.randint(1, ids + 1, size=n)
        cam = cam_sets[pid, (rng.rand(n) * n_cams[pid]).astype(np.int64)]
        # per-image difficulty (log-normal noise scale): most images clean, a few hard, as in real data
        scale = s["noise"] * np.exp(0.5 * rng.randn(n, 1)).astype(np.float32) / np.sqrt(dim)
        noise = rng.randn(n, dim).astype(np.float32) * scale
        f = centers[pid] + cam_bias[cam] + noise
        return f / np.linalg.norm(f, axis=1, keepdims=True), pid, cam  # unit norm, like trained embeddings

    qf, q_pids, q_cams = sample(s["num_q"])
    nd = s["distractors"]
    gf, g_pids, g_cams = sample(s["num_g"] - nd)
    if nd:
        junk = rng.randn(nd, dim).astype(np.float32)
        gf = np.concatenate([gf, junk / np.linalg.norm(junk, axis=1, keepdims=True)])
        g_pids = np.concatenate([g_pids, np.zeros(nd, np.int64)])
        g_cams = np.concatenate([g_cams, rng.randint(0, cams, nd)])
    if num_q is not None:
        qf, q_pids, q_cams = qf[:num_q], q_pids[:num_q], q_cams[:num_q]
    qf, gf = np.ascontiguousarray(qf, dtype=np.float32), np.ascontiguousarray(gf, dtype=np.float32)
    return qf, gf, q_pids.astype(np.int64), g_pids.astype(np.int64), q_cams.astype(np.int64), g_cams.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# child: one method, one shape


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _summary(cmc, mAP, mINP=None) -> Dict:
    cmc = np.asarray(cmc, dtype=np.float64)
    return {"cmc": cmc.tolist(), "mAP": float(mAP), "mINP": None if mINP is None else float(mINP)}


def _diff(a: Dict, b: Dict) -> float:
    k = min(len(a["cmc"]), len(b["cmc"]))
    return float(max(np.max(np.abs(np.subtract(a["cmc"][:k], b["cmc"][:k]))), abs(a["mAP"] - b["mAP"])))


def run_child(args) -> Dict:
    import torch

    from torchreid_ext.metrics import compute_distance_matrix, evaluate_features, evaluate_rank

    qf, gf, qp, gp, qc, gc = make_data(args.shape, args.dim, args.seed, args.num_queries)
    labels = (qp, gp, qc, gc)
    out: Dict = {"method": args.child, "shape": args.shape, "num_q": len(qp), "num_g": len(gp)}
    times: List[float] = []
    reps = args.repeats if args.child in ("ours-matrix", "torchreid-cython") else args.slow_repeats

    if args.child == "ours-features":
        out["rss_before"] = _rss()
        for _ in range(reps):
            t = time.perf_counter()
            res = evaluate_features(qf, gf, *labels, max_rank=args.max_rank)
            times.append(time.perf_counter() - t)
        out["result"] = _summary(res.cmc, res.mAP, res.mINP)
    else:
        t = time.perf_counter()
        distmat = compute_distance_matrix(torch.from_numpy(qf), torch.from_numpy(gf))
        out["distance_s"] = time.perf_counter() - t
        dist_np = distmat.numpy()
        out["rss_before"] = _rss()
        if args.child == "ours-matrix":
            for _ in range(reps):
                t = time.perf_counter()
                res = evaluate_rank(dist_np, *labels, max_rank=args.max_rank)
                times.append(time.perf_counter() - t)
            out["result"] = _summary(res.cmc, res.mAP, res.mINP)
            out["paths"] = res.extras
        else:
            if args.child == "torchreid-cython":
                import importlib.util

                spec = importlib.util.spec_from_file_location("rank_cy", args.cython_so)
                rank_cy = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(rank_cy)
                fn = lambda: rank_cy.evaluate_cy(dist_np, qp, gp, qc, gc, args.max_rank, False)  # noqa: E731
            else:
                from torchreid_ext.adapter import torchreid

                tr = torchreid()
                fn = lambda: tr.metrics.evaluate_rank(  # noqa: E731
                    dist_np, qp, gp, qc, gc, max_rank=args.max_rank, use_cython=False)
            for _ in range(reps):
                t = time.perf_counter()
                cmc, mAP = fn()
                times.append(time.perf_counter() - t)
            out["result"] = _summary(cmc, mAP)
            out["peak_rss"] = _peak()  # before running ours for the agreement check
            ours = evaluate_rank(dist_np, *labels, max_rank=args.max_rank)
            out["diff_vs_ours"] = _diff(out["result"], _summary(ours.cmc, ours.mAP))
    out["times"] = times
    out.setdefault("peak_rss", _peak())
    return out


# ------------------------------------------------------------------------------------------------
# parent


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def install_cython_evaluator(tmp: str) -> Optional[str]:
    """pip-install pyppbox-torchreid into ``tmp`` (this run only); the path of its rank_cy module."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", tmp, "pyppbox-torchreid"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(os.path.join(tmp, "pyppbox_torchreid", "metrics", "rank_cylib", "rank_cy*.so"))
    if proc.returncode != 0 or not found:
        print(f"[cython baseline unavailable] {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return found[0]


def launch(method: str, shape: str, args, num_queries: Optional[int], cython_so: Optional[str]) -> Optional[Dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--shapes", shape,
           "--dim", str(args.dim), "--seed", str(args.seed), "--repeats", str(args.repeats),
           "--slow-repeats", str(args.slow_repeats), "--max-rank", str(args.max_rank)]
    if num_queries is not None:
        cmd += ["--num-queries", str(num_queries)]
    if cython_so:
        cmd += ["--cython-so", cython_so]
    print(f"  running {method} on {shape}" + (f" (first {num_queries} queries)" if num_queries else "") + " ...",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_queries(method: str, shape: str, args) -> Optional[int]:
    """None (all queries) if the baseline's estimated memory fits, else how many queries fit."""
    s = SHAPES[shape]
    if args.baseline_queries:
        return min(args.baseline_queries, s["num_q"])
    budget = 0.5 * _mem_available() - 1.5e9  # the machine is shared: leave half of what is free
    need = s["num_q"] * s["num_g"] * BYTES_PER_ELEMENT[method]
    if need <= budget:
        return None
    return max(100, int(budget / (s["num_g"] * BYTES_PER_ELEMENT[method])))


def fmt_table(rows: List[Dict]) -> str:
    head = ["shape", "method", "queries", "time [s]", "peak RSS [GB]", "+eval [GB]", "x vs Cython", "x vs Python",
            "R1", "mAP", "mINP", "max|diff|"]
    lines = [head]
    for r in rows:
        lines.append([
            r["shape"], r["method"], f"{r['num_q']}", ("~" if r["scaled"] else "") + f"{r['time']:.3f}",
            "-" if r["scaled"] else f"{r['peak_rss'] / 1e9:.2f}",
            "-" if r["scaled"] else f"{(r['peak_rss'] - r['rss_before']) / 1e9:.2f}",
            r["vs_cython"], r["vs_python"],
            f"{r['result']['cmc'][0]:.4f}", f"{r['result']['mAP']:.4f}",
            "-" if r["result"]["mINP"] is None else f"{r['result']['mINP']:.4f}",
            "-" if r.get("diff") is None else f"{r['diff']:.1e}",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append(" | ".join(str(c).rjust(w) for c, w in zip(line, widths)))
        if j == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["market", "msmt17"], choices=sorted(SHAPES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours-matrix and Cython (best is kept)")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed runs of ours-features and Python")
    p.add_argument("--dim", type=int, default=512, help="feature dimension (512: our MSFL embedding, M4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rank", type=int, default=50)
    p.add_argument("--python-on-msmt17", action="store_true", help="also run the ~15 min Python baseline there")
    p.add_argument("--baseline-queries", type=int, default=None,
                   help="run Torchreid's evaluators on the first N queries only (time scaled to all)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-queries", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cython-so", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        args.shape = args.shapes[0]
        print(json.dumps(run_child(args)))
        return 0

    import torch

    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}, "
          f"{_mem_available() / 1e9:.1f} GB available, dim {args.dim}", flush=True)
    tmp = tempfile.mkdtemp(prefix="torchreid_cython_")
    rows: List[Dict] = []
    try:
        cython_so = install_cython_evaluator(tmp) if "torchreid-cython" in args.methods else None
        for shape in args.shapes:
            results: Dict[str, Dict] = {}
            for method in args.methods:
                nq = None
                if method.startswith("torchreid"):
                    if method == "torchreid-cython" and not cython_so:
                        continue
                    if method == "torchreid-python" and shape == "msmt17" and not args.python_on_msmt17:
                        print("  torchreid-python on msmt17 skipped (about 15 min; --python-on-msmt17)",
                              file=sys.stderr)
                        continue
                    nq = baseline_queries(method, shape, args)
                r = launch(method, shape, args, nq, cython_so)
                if r is None:
                    continue
                full_q = SHAPES[shape]["num_q"]
                r["scaled"] = r["num_q"] < full_q
                r["time"] = min(r["times"]) * full_q / r["num_q"]
                r["diff"] = r.get("diff_vs_ours")
                results[method] = r
            if "ours-features" in results and "ours-matrix" in results:
                results["ours-features"]["diff"] = _diff(results["ours-features"]["result"],
                                                         results["ours-matrix"]["result"])
            for r in results.values():
                for base, key in (("torchreid-cython", "vs_cython"), ("torchreid-python", "vs_python")):
                    r[key] = f"{results[base]['time'] / r['time']:.1f}" if base in results else "-"
                rows.append(r)
            if "ours-matrix" in results:
                m = results["ours-matrix"]
                print(f"  {shape}: distance matrix took {m['distance_s']:.2f} s (not in ours-matrix time); "
                      f"ours-matrix paths: {m['paths']}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(fmt_table(rows))
    print("time: best of the timed runs; ours-features includes computing the distances. ~: measured on the "
          "first N queries and scaled to all (memory); peak RSS is then not comparable and shown as -. "
          "+eval: peak minus RSS before the timed call. x vs: baseline time / this time. max|diff|: largest "
          "|CMC@k| or |mAP| difference to our evaluator on the same matrix (features: to ours-matrix); "
          f"float32 ties may differ (tie rule). Load average at end: {os.getloadavg()[0]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
