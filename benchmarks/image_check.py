"""Benchmark: what the pre-training image check costs (``data.image_check``: header vs decode).

Lists: SynthReID (the generated ``synthreid``: train + query + gallery, made under a temporary
data root) and a Market-1501-sized list: 12936 train + 3368 query + 19732 gallery = 36036
128x64 JPEGs (Market's size and image size), written to a temporary folder by cycling over
SynthReID's rendered images (decode cost depends on size and content, not on uniqueness).
Files are read once before timing, so both modes read from the page cache (a cold disk adds
the same read time to both, and to training's first epoch anyway).

    python benchmarks/image_check.py [--repeats 3]

Prints seconds per mode and list part (best of the repeats) and decode / header ratios.
"""
import argparse
import glob
import os
import os.path as osp
import shutil
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from torchreid_ext.data import SynthSpec, generate  # noqa: E402
from torchreid_ext.data.checks import check_images  # noqa: E402

MARKET = {"bounding_box_train": 12936, "query": 3368, "bounding_box_test": 19732}


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="image-check-")
    try:
        synth = osp.join(tmp, "synthreid")
        generate(synth, SynthSpec())
        splits = {s: sorted(glob.glob(osp.join(synth, s, "*.jpg"))) for s in MARKET}
        market = {}
        for split, n in MARKET.items():
            os.makedirs(osp.join(tmp, "market", split))
            src = splits[split]
            market[split] = []
            for i in range(n):
                dst = osp.join(tmp, "market", split, f"{i:05d}_{osp.basename(src[i % len(src)])}")
                shutil.copyfile(src[i % len(src)], dst)
                market[split].append(dst)
        print(f"cpus {os.cpu_count()} (machine shared: noisy)")
        print(f"{'list':<28}{'images':>8}{'header [s]':>12}{'decode [s]':>12}{'decode 1 thread [s]':>21}{'ratio':>8}")
        for label, lists in (("synthreid", splits), ("market-sized", market)):
            parts = {"train": lists["bounding_box_train"],
                     "query+gallery": lists["query"] + lists["bounding_box_test"]}
            parts["all"] = parts["train"] + parts["query+gallery"]
            for part, paths in parts.items():  # the lambdas below run before the loop moves on
                check_images(paths)  # page cache
                header = best(lambda: check_images(paths), args.repeats)  # noqa: B023
                decode = best(lambda: check_images(paths, decode=True), args.repeats)  # noqa: B023
                single = best(lambda: check_images(paths, decode=True, workers=1), args.repeats)  # noqa: B023
                print(f"{label + ' ' + part:<28}{len(paths):>8}{header:>12.2f}{decode:>12.2f}{single:>21.2f}"
                      f"{decode / header:>8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
