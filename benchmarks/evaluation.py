"""Benchmark: torchreid_ext.metrics vs Torchreid's Python and compiled (Cython) rank evaluators (E5).

Shapes (docs/methods.md E5): Market-1501 (3368 queries x 15913 gallery, 750 identities, 6 cameras, 2798 pid-0
distractors) and MSMT17 (11659 x 82161, 3060 identities, 15 cameras). Synthetic unit-norm 512-d features:
identity centre + camera offset + noise with a log-normal per-image scale (most images easy, a few hard),
so positives are closer on average and the scores look like a trained model's (Market rank-1 ~0.98,
mAP ~0.84, mINP ~0.36; MSMT17 rank-1 ~0.87, mAP ~0.49, mINP ~0.02). Our evaluator's cost grows with how
deep the hardest positive lies (low mINP = deep); these mINP are below published ones (FastReID BoT-R50:
Market 0.59), i.e. not flattering to us. The data of a shape is generated once, in this process, and
saved to a temporary file that every method's subprocess loads.

Every method runs in its own subprocess. Time: best of the timed calls. Memory, read from
``/proc/self/status``: the peak is reset (``/proc/self/clear_refs``) just before the timed calls, once the
inputs are in memory (the features; for the matrix methods also the float32 distance matrix), so
"peak" is the process's peak RSS while evaluating, inputs included, and "+eval" is that peak minus the
RSS just before: the evaluator's own working memory. Methods:

* ``ours-matrix``: ``evaluate_rank`` on the full float32 distance matrix;
* ``ours-features``: ``evaluate_features`` on the features: the distances are computed a block of queries
  at a time inside the timed call, so its time compares with "distances + evaluation" of the others;
* ``torchreid-python``: Torchreid's ``evaluate_rank(..., use_cython=False)``;
* ``torchreid-cython``: Torchreid's compiled ``evaluate_cy``, from the ``pyppbox-torchreid`` wheel,
  pip-installed into a temporary directory for this run only (``--no-deps --target``, removed at the
  end) and loaded from its file path, since that package's ``__init__`` imports all of Torchreid.

The matrix methods compute the matrix with ``compute_distance_matrix`` (Torchreid's formula; reported
as "dist [s]", not part of "eval [s]"). Torchreid's evaluators build argsort and match matrices of the
full size (~25-29 bytes per matrix element: ~25 GB at the MSMT17 shape). When that does not fit in half
the available memory they run on the first N queries (or ``--baseline-queries``) and their time and
"+eval" are scaled by Q / N (both are linear in the number of queries); such rows are marked ``~``. The
Python evaluator at the MSMT17 shape (~15 min) is skipped unless ``--python-on-msmt17``. Agreement: each
baseline subprocess also runs our evaluator on the same matrix (untimed) and reports the largest
difference of CMC@1..max_rank and mAP; ``ours-features`` is compared with ``ours-matrix`` (also mINP).

Usage: ``python benchmarks/evaluation.py [--shapes market msmt17] [--repeats 3] [--methods ...]``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from memory import current_rss, peak_rss, reset_peak  # benchmarks/memory.py

SHAPES = {
    # name: queries, gallery, identities, cameras, pid-0 distractors in the gallery, feature noise
    "market": dict(num_q=3368, num_g=15913, ids=750, cams=6, distractors=2798, noise=1.5),
    "msmt17": dict(num_q=11659, num_g=82161, ids=3060, cams=15, distractors=0, noise=2.2),
    "tiny": dict(num_q=337, num_g=1591, ids=75, cams=6, distractors=280, noise=1.5),  # checks the harness
}
# Torchreid's evaluators: float32 distances + int64 argsort + match matrix (+ its temporaries).
BYTES_PER_ELEMENT = {"torchreid-cython": 29, "torchreid-python": 25}
METHODS = ["ours-matrix", "ours-features", "torchreid-cython", "torchreid-python"]
# Agreement tolerances: Torchreid's Cython accumulates AP and CMC in float32.
TOLERANCE = {"torchreid-python": 1e-6, "torchreid-cython": 1e-5, "ours-features": 1e-9}


# ------------------------------------------------------------------------------------------------
# data


def make_data(shape: str, dim: int, seed: int):
    """Synthetic float32 unit-norm features and int64 labels of a dataset shape."""
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
    return dict(qf=np.ascontiguousarray(qf, np.float32), gf=np.ascontiguousarray(gf, np.float32),
                q_pids=q_pids.astype(np.int64), g_pids=g_pids.astype(np.int64),
                q_camids=q_cams.astype(np.int64), g_camids=g_cams.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# child: one method, one shape


def _summary(cmc, mAP, mINP=None) -> Dict:
    cmc = np.asarray(cmc, dtype=np.float64)
    return {"cmc": cmc.tolist(), "mAP": float(mAP), "mINP": None if mINP is None else float(mINP)}


def _diff(a: Dict, b: Dict) -> float:
    k = min(len(a["cmc"]), len(b["cmc"]))
    d = max(np.max(np.abs(np.subtract(a["cmc"][:k], b["cmc"][:k]))), abs(a["mAP"] - b["mAP"]))
    if a["mINP"] is not None and b["mINP"] is not None:
        d = max(d, abs(a["mINP"] - b["mINP"]))
    return float(d)


def _load_evaluate_cy(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_cy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate_cy


def run_child(args) -> Dict:
    import torch

    from torchreid_ext.metrics import compute_distance_matrix, evaluate_features, evaluate_rank

    with np.load(args.data) as z:
        data = {k: z[k] for k in z.files}
    nq = args.num_queries or len(data["qf"])
    qf, gf = data["qf"][:nq], data["gf"]
    labels = (data["q_pids"][:nq], data["g_pids"], data["q_camids"][:nq], data["g_camids"])
    out: Dict = {"method": args.child, "shape": args.shape, "num_q": nq, "num_g": len(gf),
                 "torch_threads": torch.get_num_threads()}
    times: List[float] = []
    reps = args.slow_repeats if args.child == "torchreid-python" else args.repeats

    if args.child == "ours-features":
        # the engine passes torch tensors, on its device (--device)
        q, g = torch.from_numpy(qf).to(args.device), torch.from_numpy(gf).to(args.device)
        out["rss_before"] = current_rss()
        reset_ok = reset_peak()
        for _ in range(reps):
            t = time.perf_counter()
            res = evaluate_features(q, g, *labels, max_rank=args.max_rank)
            times.append(time.perf_counter() - t)
        out["peak_rss"] = peak_rss()
        out["result"] = _summary(res.cmc, res.mAP, res.mINP)
    else:
        t = time.perf_counter()
        dist_np = compute_distance_matrix(torch.from_numpy(qf), torch.from_numpy(gf)).numpy()
        out["distance_s"] = time.perf_counter() - t
        if args.child == "ours-matrix":
            dist_in = dist_np if args.device == "cpu" else torch.from_numpy(dist_np).to(args.device)
            fn = lambda: evaluate_rank(dist_in, *labels, max_rank=args.max_rank)  # noqa: E731
        elif args.child == "torchreid-cython":
            evaluate_cy = _load_evaluate_cy(args.cython_so)
            fn = lambda: evaluate_cy(dist_np, *labels, args.max_rank, False)  # noqa: E731
        else:
            from torchreid_ext.adapter import torchreid

            tr = torchreid()
            fn = lambda: tr.metrics.evaluate_rank(  # noqa: E731
                dist_np, *labels, max_rank=args.max_rank, use_cython=False)
        out["rss_before"] = current_rss()
        reset_ok = reset_peak()
        for _ in range(reps):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        out["peak_rss"] = peak_rss()
        if args.child == "ours-matrix":
            out["result"] = _summary(res.cmc, res.mAP, res.mINP)
            out["paths"] = res.extras
        else:
            out["result"] = _summary(*res)
            ours = evaluate_rank(dist_np, *labels, max_rank=args.max_rank)  # untimed: agreement check
            out["ours_on_same"] = _summary(ours.cmc, ours.mAP)
            out["diff"] = _diff(out["result"], out["ours_on_same"])
    out["peak_is_eval_only"] = reset_ok
    out["times"] = times
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
    """pip-install pyppbox-torchreid into ``tmp`` (this run only); the path of its compiled rank_cy."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", tmp, "pyppbox-torchreid"]
    print("  pip install --no-deps --target <tmp> pyppbox-torchreid ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(os.path.join(tmp, "pyppbox_torchreid", "metrics", "rank_cylib", "rank_cy*.so"))
    if proc.returncode != 0 or not found:
        print(f"  [Cython baseline unavailable] {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return found[0]


def launch(method: str, shape: str, data: str, args, num_queries: Optional[int],
           cython_so: Optional[str]) -> Optional[Dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--shapes", shape, "--data", data,
           "--repeats", str(args.repeats), "--slow-repeats", str(args.slow_repeats),
           "--max-rank", str(args.max_rank), "--device", args.device]
    if num_queries is not None:
        cmd += ["--num-queries", str(num_queries)]
    if cython_so:
        cmd += ["--cython-so", cython_so]
    print(f"  {shape}: {method}" + (f" (first {num_queries} queries)" if num_queries else "") + " ...",
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
        return args.baseline_queries if args.baseline_queries < s["num_q"] else None
    budget = 0.5 * _mem_available() - 1.5e9  # the machine is shared: use at most half of what is free
    need = s["num_q"] * s["num_g"] * BYTES_PER_ELEMENT[method]
    if need <= budget:
        return None
    return max(100, int(budget / (s["num_g"] * BYTES_PER_ELEMENT[method])))


def finish_row(r: Dict) -> Dict:
    """Times and memory of one result, scaled to all queries when it ran on a subset."""
    full_q = SHAPES[r["shape"]]["num_q"]
    scale = full_q / r["num_q"]
    r["scaled"] = r["num_q"] < full_q
    r["eval_s"] = min(r["times"]) * scale
    r["dist_s"] = r.get("distance_s", 0.0) * scale
    r["total_s"] = r["eval_s"] + r["dist_s"]  # ours-features: distances are inside eval_s
    r["extra_mem"] = (r["peak_rss"] - r["rss_before"]) * scale
    return r


def ratios(results: Dict[str, Dict]) -> None:
    """Speed-ups vs the baselines: evaluation time for the matrix methods, distances + evaluation for
    ours-features (it computes its own distances)."""
    for r in results.values():
        for base, key in (("torchreid-cython", "vs_cython"), ("torchreid-python", "vs_python")):
            b = results.get(base)
            if b is None:
                r[key] = "-"
            elif r["method"] == "ours-features":
                r[key] = f"{b['total_s'] / r['total_s']:.3g}"
            else:
                r[key] = f"{b['eval_s'] / r['eval_s']:.3g}"


def fmt_table(rows: List[Dict]) -> str:
    head = ["shape", "method", "queries", "eval [s]", "dist [s]", "x vs Cython", "x vs Python", "peak [GB]",
            "+eval [GB]", "R1", "mAP", "mINP", "max|diff|"]
    lines = [head]
    for r in rows:
        sc = "~" if r["scaled"] else ""
        lines.append([
            r["shape"], r["method"], f"{r['num_q']}" + (f"/{SHAPES[r['shape']]['num_q']}" if r["scaled"] else ""),
            f"{sc}{r['eval_s']:.3f}", "(in eval)" if r["method"] == "ours-features" else f"{sc}{r['dist_s']:.2f}",
            r["vs_cython"], r["vs_python"],
            "-" if r["scaled"] else f"{r['peak_rss'] / 1e9:.2f}", f"{sc}{r['extra_mem'] / 1e9:.2f}",
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
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each method but Python (best is kept)")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed calls of the Python baseline")
    p.add_argument("--dim", type=int, default=512, help="feature dimension (512: our MSFL embedding, M4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rank", type=int, default=50)
    p.add_argument("--python-on-msmt17", action="store_true", help="also run the ~15 min Python baseline there")
    p.add_argument("--baseline-queries", type=int, default=None,
                   help="run Torchreid's evaluators on the first N queries only (time scaled to all)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where our evaluator runs (inputs moved there before timing; Torchreid's stay on the CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-queries", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cython-so", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.slow_repeats < 1:
        p.error("--repeats and --slow-repeats must be >= 1")

    if args.child:
        args.shape = args.shapes[0]
        print(json.dumps(run_child(args)))
        return 0

    import torch

    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}, "
          f"{_mem_available() / 1e9:.1f} GB available, dim {args.dim}, seed {args.seed}, ours on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""), flush=True)
    tmp = tempfile.mkdtemp(prefix="torchreid_ext_bench_")
    rows: List[Dict] = []
    notes: List[str] = []
    try:
        cython_so = None
        if "torchreid-cython" in args.methods:
            cython_so = install_cython_evaluator(os.path.join(tmp, "site"))
        for shape in args.shapes:
            data = os.path.join(tmp, f"{shape}.npz")
            np.savez(data, **make_data(shape, args.dim, args.seed))
            results: Dict[str, Dict] = {}
            for method in args.methods:
                nq = None
                if method == "torchreid-cython" and not cython_so:
                    continue
                if method == "torchreid-python" and shape == "msmt17" and not args.python_on_msmt17:
                    notes.append("torchreid-python on msmt17 skipped (about 15 min; --python-on-msmt17 runs it)")
                    continue
                if method.startswith("torchreid"):
                    nq = baseline_queries(method, shape, args)
                r = launch(method, shape, data, args, nq, cython_so)
                if r is not None:
                    results[method] = finish_row(r)
            os.remove(data)
            if "ours-features" in results and "ours-matrix" in results:
                results["ours-features"]["diff"] = _diff(results["ours-features"]["result"],
                                                         results["ours-matrix"]["result"])
            ratios(results)
            rows.extend(results.values())
            m, f = results.get("ours-matrix"), results.get("ours-features")
            if m:
                notes.append(f"{shape}: ours-matrix took the {m['paths']} paths")
            if m and f:
                notes.append(f"{shape}: ours-features {f['eval_s']:.2f} s; for scale, the full matrix took "
                             f"{m['dist_s']:.2f} s and ranking it {m['eval_s']:.2f} s in ours-matrix "
                             "(matrix: one cold call)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(fmt_table(rows))
    print("eval: best timed call; dist: computing the float32 distance matrix (ours-features does it inside "
          "eval). x vs: baseline time / this time, on eval for the matrix methods and on dist + eval for "
          "ours-features. peak: RSS peak while evaluating, inputs included; +eval: peak minus RSS before. "
          "~: run on the first N queries (memory), time and +eval scaled to all queries. max|diff|: largest "
          "|CMC@k| / |mAP| difference to our evaluator on the same matrix (ours-features: to ours-matrix, "
          "mINP too).")
    bad = [f"{r['shape']}/{r['method']} {r['diff']:.1e} > {TOLERANCE[r['method']]:.0e}"
           for r in rows if r.get("diff") is not None and r["diff"] > TOLERANCE[r["method"]]]
    checked = [r for r in rows if r.get("diff") is not None]
    notes.append(f"agreement: {len(checked) - len(bad)}/{len(checked)} within tolerance "
                 f"(Python 1e-6, Cython 1e-5: it sums in float32)" + ("; MISMATCH: " + "; ".join(bad) if bad else ""))
    notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    for n in notes:
        print("# " + n)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
