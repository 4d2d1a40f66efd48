"""Benchmark: a plain training step vs exact vs fast MSGR, and lazy MSGR (docs/methods.md G4, G5, G7).

One step = forward, loss (cross-entropy over 751 identities), backward(s), Adam step, on random
images, model in train mode, MSGR on the outputs of ``layer1`` and ``layer2`` (eps 1e-2, q 2,
grad_of sum; fast mode with its automatic step). Models: ``resnet50_bnfc512`` and
``msfl_resnet50`` (Torchreid's ``resnet50`` stands in for a missing one, and the table says so).

* Time: all modes of a model in ONE process, interleaved (plain, exact, fast, plain, ...) after a
  warm-up step each, so load changes on a shared machine hit every mode alike; the fastest
  (least disturbed) and the median step are reported, and their ratios to the plain step.
* Lazy MSGR (``msgr.interval`` N): a cycle of N steps, the first with R (weight N) and the
  others plain (the engine's choice, ``penalty_due``), timed in the same interleaved loop;
  the amortised step cost is the cycle time / N, reported against the plain step. N = 1 is
  the MSGR step itself (timed again as a cycle of one).
* Memory: one subprocess per (model, mode). CPU: peak RSS (VmHWM) and its rise over
  the RSS after building the model, optimizer and batch ("step memory": activations, graphs,
  gradients, Adam state; the same Adam state in every mode). GPU: ``max_memory_allocated``.

Defaults: CPU B = 16 at 128x64 (docs/methods.md G7 setting); on a GPU B = 64 at 256x128 (the
paper's batch). ``--profile`` prints torch.profiler's top operators for one step per mode.

Usage: ``python benchmarks/msgr.py [--models ...] [--batch 16] [--size 128 64] [--repeats 5]
[--intervals 1 2 4 8] [--lazy-modes exact fast]`` (``--intervals`` with no value: no lazy cycles).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from memory import peak_rss  # benchmarks/memory.py

MODES = ("plain", "exact", "fast")
STAGES = ["layer1", "layer2"]
NUM_CLASSES = 751


def build(name: str, batch: int, size, device: torch.device):
    """(model, optimizer, images, labels, name actually built)."""
    import torchreid_ext  # noqa: F401  (registers our models)
    from torchreid_ext.models import MODELS, build_model

    built = name if name in MODELS else "resnet50"
    torch.manual_seed(0)
    model = build_model(built, num_classes=NUM_CLASSES, loss="softmax", pretrained=False).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return model, opt, x, y, built


def step(mode: str, model, opt, x, y, weight: float = 1.0) -> None:
    from torchreid_ext.msgr import msgr_backward

    opt.zero_grad(set_to_none=True)
    if mode == "plain":
        F.cross_entropy(model(x), y).backward()
    else:
        msgr_backward(model, lambda: model(x), lambda out: F.cross_entropy(out, y), STAGES, 0.01,
                      mode=mode, h=None, weight=weight)
    opt.step()


def lazy_cycle(mode: str, interval: int, model, opt, x, y) -> None:
    """``interval`` steps as MSGREngine takes them with ``msgr.interval`` N = interval: R (weight N)
    on the steps ``penalty_due`` picks (the first of the cycle), plain steps on the others."""
    from torchreid_ext.engines.msgr import penalty_due

    for i in range(interval):
        if penalty_due(0, i, interval, interval):
            step(mode, model, opt, x, y, weight=float(interval))
        else:
            step("plain", model, opt, x, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, args, device: torch.device) -> Dict[str, object]:
    model, opt, x, y, built = build(name, args.batch, args.size, device)
    times: Dict[str, List[float]] = {m: [] for m in args.modes}
    lazy = [(m, n) for m in args.lazy_modes for n in args.intervals]
    lazy_times: Dict[str, List[float]] = {f"{m}/{n}": [] for m, n in lazy}  # per step, amortised
    for m in dict.fromkeys(list(args.modes) + [m for m, _ in lazy]):  # warm-up
        step(m, model, opt, x, y)
    for _ in range(args.repeats):
        for m in args.modes:
            sync(device)
            t0 = time.perf_counter()
            step(m, model, opt, x, y)
            sync(device)
            times[m].append(time.perf_counter() - t0)
        for m, n in lazy:
            sync(device)
            t0 = time.perf_counter()
            lazy_cycle(m, n, model, opt, x, y)
            sync(device)
            lazy_times[f"{m}/{n}"].append((time.perf_counter() - t0) / n)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for m in args.modes:
            with profile(activities=acts) as prof:
                step(m, model, opt, x, y)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n--- profile: {built} {m} ---")
            print(prof.key_averages().table(sort_by=key, row_limit=args.profile))
    return {"built": built, "median_s": {m: statistics.median(v) for m, v in times.items()},
            "min_s": {m: min(v) for m, v in times.items()}, "all_s": times,
            "lazy_median_s": {k: statistics.median(v) for k, v in lazy_times.items()},
            "lazy_min_s": {k: min(v) for k, v in lazy_times.items()}, "lazy_all_s": lazy_times}


def child(args) -> None:
    """Peak memory of one (model, mode): two steps in a fresh process."""
    device = torch.device(args.device)
    model, opt, x, y, built = build(args.child_model, args.batch, args.size, device)
    base = peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    for _ in range(2):
        step(args.child_mode, model, opt, x, y)
    sync(device)
    out = {"built": built, "peak_rss": peak_rss(), "base_rss": base}
    if device.type == "cuda":
        out.update(peak_gpu=torch.cuda.max_memory_allocated(device), base_gpu=base_gpu)
    print("RESULT " + json.dumps(out))


def memory(name: str, mode: str, args) -> Dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-model", name, "--child-mode", mode,
           "--device", args.device, "--batch", str(args.batch), "--size", *map(str, args.size)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"memory run {name}/{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50_bnfc512", "msfl_resnet50"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--intervals", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="lazy MSGR intervals N to time (amortised step cost)")
    p.add_argument("--lazy-modes", nargs="*", default=["exact", "fast"], choices=["exact", "fast"])
    p.add_argument("--profile", type=int, default=0, help="print this many top operators per mode")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--child-model", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-mode", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (64 if gpu else 16)
    args.size = args.size or ([256, 128] if gpu else [128, 64])
    if args.child_model:
        child(args)
        return
    if "plain" not in args.modes:
        args.modes = ["plain"] + args.modes
    if any(n < 1 for n in args.intervals):
        p.error(f"--intervals {args.intervals}: each N must be an integer >= 1")
    device = torch.device(args.device)
    print(f"MSGR benchmark: device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B = {args.batch} at {args.size[0]}x{args.size[1]}, stages {STAGES}, {args.repeats} repeats, "
          f"lazy intervals {args.intervals} for {args.lazy_modes}")
    results = {}
    for name in args.models:
        r = time_model(name, args, device)
        if not args.no_memory:
            r["memory"] = {m: memory(name, m, args) for m in args.modes}
        results[name] = r
    unit = "GPU MiB" if gpu else "RSS MiB"
    if hasattr(os, "getloadavg"):
        print(f"load average during the run: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print(f"\n| model | mode | step s min / median | x plain min / median | peak {unit} | step mem MiB | x plain |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        label = name if r["built"] == name else f"{name} (missing: {r['built']} instead)"
        t0, u0 = r["min_s"]["plain"], r["median_s"]["plain"]
        mem = r.get("memory")
        if mem:
            key, bkey = ("peak_gpu", "base_gpu") if gpu else ("peak_rss", "base_rss")
            d0 = mem["plain"][key] - mem["plain"][bkey]
        for m in args.modes:
            t, u = r["min_s"][m], r["median_s"][m]
            cols = [label, m, f"{t:.3f} / {u:.3f}", f"{t / t0:.2f} / {u / u0:.2f}"]
            if mem:
                d = mem[m][key] - mem[m][bkey]
                cols += [f"{mem[m][key] / 2**20:.0f}", f"{d / 2**20:.0f}", f"{d / d0:.2f}"]
            else:
                cols += ["-", "-", "-"]
            print("| " + " | ".join(cols) + " |")
    if args.intervals and args.lazy_modes:
        print("\nLazy MSGR: amortised step cost (cycle of N steps / N), x plain step, min / median")
        print("| model | mode | " + " | ".join(f"N = {n}" for n in args.intervals) + " |")
        print("|---|---|" + "---|" * len(args.intervals))
        for name, r in results.items():
            label = name if r["built"] == name else f"{name} (missing: {r['built']} instead)"
            t0, u0 = r["min_s"]["plain"], r["median_s"]["plain"]
            for m in args.lazy_modes:
                cols = [f"{r['lazy_min_s'][f'{m}/{n}'] / t0:.2f} / {r['lazy_median_s'][f'{m}/{n}'] / u0:.2f}"
                        for n in args.intervals]
                print(f"| {label} | {m} | " + " | ".join(cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
