"""Benchmark: what MSFL costs at test time (the paper says "neglectable"), and per training step.

Pairs, each an MSFL model against its base, measured in the same run:

* ``resnet50_bnfc512`` (the paper's R50 baseline) vs ``msfl_resnet50``;
* Torchreid's ``osnet_x0_25`` (the real-data study's baseline) vs ``msfl_osnet_x0_25``, with
  ``osnet_x0_25_bnfc512`` (the study's control: the same backbone and the M4 head) beside them.

For each model: parameters (classifier excluded) and MACs (conv + linear, one image) at every
size; eval-mode inference latency at batch 1 and batch 64 at every size (default 256x128 and
128x64); one training step (forward, cross-entropy, backward, SGD step) at ``--train-batch``.
Each timing is the median of ``--repeats`` runs after ``--warmup`` runs that are not counted;
models are interleaved within each repeat, so a change of load hits every model alike. Ratios
are MSFL / base. The CPU runs on ``torch.get_num_threads()`` threads (printed); pass
``--threads``. Random inputs; data loading is not measured.

Usage: ``python benchmarks/msfl_cost.py [--device cpu|cuda] [--sizes 256x128 128x64]
[--batches 1 64] [--train-batch 32] [--repeats 5] [--warmup 2] [--threads N] [--json OUT]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

PAIRS: Tuple[Tuple[str, str], ...] = (("resnet50_bnfc512", "msfl_resnet50"), ("osnet_x0_25", "msfl_osnet_x0_25"))
EXTRA = ("osnet_x0_25_bnfc512",)
NUM_CLASSES = 751


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync = _sync(device)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def build(names, device: torch.device):
    from torchreid_ext.models import build_model

    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build_model(name, NUM_CLASSES, loss="softmax", pretrained=False, use_gpu=False).to(device)
    return models


def complexity(models, sizes) -> Dict[str, Dict[str, int]]:
    from torchreid_ext.models.complexity import count_macs, count_params

    return {name: {"params": count_params(m), **{f"macs_{h}x{w}": count_macs(m, h, w) for h, w in sizes}}
            for name, m in models.items()}


def timings(models, sizes, batches, train_batch, repeats, warmup, device) -> Dict[str, Dict[str, float]]:
    """Median seconds per model and case; cases are ``infer_b<B>_<H>x<W>`` and ``train_b<B>_<H>x<W>``."""
    cases: List[Tuple[str, Callable]] = []
    for h, w in sizes:
        for b in batches:
            x = torch.randn(b, 3, h, w, device=device)

            def infer(m, x=x):
                with torch.no_grad():
                    m(x)

            cases.append((f"infer_b{b}_{h}x{w}", infer))
        x = torch.randn(train_batch, 3, h, w, device=device)
        y = torch.randint(0, NUM_CLASSES, (train_batch,), device=device)

        def train(m, x=x, y=y):
            opt = m._bench_opt
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        cases.append((f"train_b{train_batch}_{h}x{w}", train))
    for m in models.values():
        m._bench_opt = torch.optim.SGD(m.parameters(), lr=1e-4)
    out: Dict[str, Dict[str, float]] = {name: {} for name in models}
    for case, fn in cases:
        train = case.startswith("train")
        for m in models.values():
            m.train(train)
            for _ in range(warmup):
                fn(m)
        runs: Dict[str, List[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                runs[name].append(_seconds(lambda: fn(m), device))  # noqa: B023  (called at once)
        for name in models:
            out[name][case] = statistics.median(runs[name])
        print(f"  {case}: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in out.items() for s in [s[case]]),
              flush=True)
    for m in models.values():
        del m._bench_opt
    return out


def report(sizes_info, times) -> Dict[str, Dict[str, float]]:
    """MSFL / base ratios of every figure, per pair."""
    ratios = {}
    for base, msfl in PAIRS:
        r = {k: sizes_info[msfl][k] / sizes_info[base][k] for k in sizes_info[base]}
        r.update({k: times[msfl][k] / times[base][k] for k in times[base]})
        ratios[f"{msfl} / {base}"] = r
    return ratios


def table(info, times, ratios) -> str:
    keys = list(next(iter(info.values()))) + list(next(iter(times.values())))
    names = list(info)
    lines = [f"{'':<22}" + "".join(f"{n:>22}" for n in names) + "".join(f"{r.split(' / ')[0] + ' x':>22}"
                                                                        for r in ratios)]
    for k in keys:
        cells = []
        for n in names:
            v = info[n][k] if k in info[n] else times[n][k]
            cells.append(f"{v / 1e6:>21.2f}M" if k.startswith(("params", "macs")) else f"{v * 1e3:>19.1f} ms")
        cells += [f"{r[k]:>21.2f}x" for r in ratios.values()]
        lines.append(f"{k:<22}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", default=["256x128", "128x64"], help="HxW, e.g. 256x128")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--models", nargs="+", default=None, help="a subset of the models (smoke runs)")
    p.add_argument("--json", default="", help="also write the results here (tools/gpu_check.py reads it)")
    args = p.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        assert all(len(s) == 2 and min(s) >= 16 for s in sizes)
    except (ValueError, AssertionError):
        p.error(f"--sizes {args.sizes}: give HxW with both sides >= 16, e.g. 256x128")
    if min(args.batches) < 1 or args.train_batch < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("--batches >= 1, --train-batch >= 2 (BatchNorm), --repeats >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for pair in PAIRS for n in pair] + list(EXTRA)
    if args.models:
        unknown = sorted(set(args.models) - set(names))
        if unknown:
            p.error(f"--models {unknown}: choose from {names}")
        names = [n for n in names if n in args.models]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MSFL cost: {', '.join(names)}; {where}, torch {torch.__version__}; median of {args.repeats} "
          f"after {args.warmup} warm-up runs", flush=True)
    models = build(names, device)
    info = complexity(models, sizes)
    times = timings(models, sizes, args.batches, args.train_batch, args.repeats, args.warmup, device)
    ratios = report(info, times) if all(n in models for pair in PAIRS for n in pair) else {}
    print(table(info, times, ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": where, "torch": torch.__version__, "complexity": info,
                       "median_seconds": times, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
