"""Benchmark: training images per second, Torchreid's stock engine vs ours (fp32, bf16, bf16 +
channels-last), same model, same batch, one process.

One step = ``engine.forward_backward(batch)``: forward, cross-entropy with label smoothing,
backward, Adam step (Torchreid's ``ImageSoftmaxEngine`` vs our ``ImageMetricEngine`` with
``loss.name softmax``). Random images and labels already on the device (data loading is not
measured). Every variant trains its own copy of one initial model; variants are interleaved
(round 1: stock, fp32, bf16, bf16+CL; round 2: ...) after warm-up steps, so load changes on a
shared machine hit all alike; the median round is reported, with ratios to the stock engine.

Defaults: on a GPU ``resnet50_bnfc512`` at 256x128, batch 64, 30 steps x 3 rounds (target:
bf16 + channels-last >= 2x stock fp32); on the CPU 64x32, batch 8, 3 steps x 2 rounds (a smoke
run: CPUs without bf16 units gain nothing from bf16).

Usage: ``python benchmarks/throughput.py [--model resnet50_bnfc512] [--size 256 128] [--batch 64]
[--steps 30] [--rounds 3] [--warmup 5] [--device cuda|cpu]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List

import torch

NUM_CLASSES = 751
VARIANTS = ("torchreid fp32", "ours fp32", "ours bf16", "ours bf16+channels_last")


def make_engine(variant: str, model: torch.nn.Module, device: torch.device):
    from torchreid_ext.adapter import torchreid
    from torchreid_ext.engines import ImageMetricEngine

    dm = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=NUM_CLASSES, sources=[])
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    use_gpu = device.type == "cuda"
    if variant == "torchreid fp32":
        return torchreid().engine.ImageSoftmaxEngine(dm, model, opt, use_gpu=use_gpu, label_smooth=True)
    amp = "bf16" if "bf16" in variant else "none"
    return ImageMetricEngine(dm, model, opt, use_gpu=use_gpu, label_smooth=True, amp=amp,
                             channels_last="channels_last" in variant)


def timed(step: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``step`` (device synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t0


def measure(args, device: torch.device) -> Dict[str, List[float]]:
    """Images per second of every variant in every round."""
    from torchreid_ext.models import build_model

    torch.manual_seed(0)
    base = build_model(args.model, num_classes=NUM_CLASSES, loss="softmax", pretrained=False).to(device)
    data = {"img": torch.randn(args.batch, 3, *args.size, device=device),
            "pid": torch.randint(0, NUM_CLASSES, (args.batch,), device=device)}
    engines = {}
    for v in VARIANTS:
        engine = make_engine(v, copy.deepcopy(base).train(), device)
        timed(lambda: engine.forward_backward(data), args.warmup, device)  # noqa: B023  (called at once)
        engines[v] = engine
    ips: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, engine in engines.items():
            seconds = timed(lambda: engine.forward_backward(data), args.steps, device)  # noqa: B023  (called at once)
            ips[v].append(args.steps * args.batch / seconds)
    return ips


def table(ips: Dict[str, List[float]]) -> str:
    stock = statistics.median(ips[VARIANTS[0]])
    lines = [f"{'engine':<26} {'images/s':>10} {'vs torchreid':>13}", "-" * 51]
    for v, values in ips.items():
        med = statistics.median(values)
        lines.append(f"{v:<26} {med:>10.1f} {med / stock:>12.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50_bnfc512")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--json", default="", help="also write the results here (what tools/gpu_check.py reads)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = dict(size=[256, 128] if gpu else [64, 32], batch=64 if gpu else 8, steps=30 if gpu else 3,
                    rounds=3 if gpu else 2, warmup=5 if gpu else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--batch, --steps and --rounds must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if gpu:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.steps} steps x "
          f"{args.rounds} rounds (median), {name}, torch {torch.__version__}")
    ips = measure(args, device)
    print(table(ips))
    if args.json:
        stock = statistics.median(ips[VARIANTS[0]])
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "torch": torch.__version__,
                       "images_per_second": {v: statistics.median(x) for v, x in ips.items()},
                       "vs_torchreid": {v: statistics.median(x) / stock for v, x in ips.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
