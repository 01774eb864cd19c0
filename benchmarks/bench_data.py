"""Time reading the 50,000 CIFAR-10 train images from the JPEG zip: cold (no cache) and from the decoded cache.

    python benchmarks/bench_data.py [--root ../shared/data/cifar10-jpeg.zip] [--repeats 1]

Prints a Markdown table of wall-clock seconds and images per second. The cold
rows decode every JPEG (cache disabled, then into a fresh temporary cache);
the cached rows memory-map the stored tensor, once as is (pages load on
first use) and once copying it into RAM, which reads every page.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from krrst.data import load_images

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


def timed(function, repeats: int) -> tuple[float, object]:
    """The best wall-clock time of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the CIFAR-10 imagefolder zip")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=1, help="report the best of this many runs per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1

    rows = []
    with tempfile.TemporaryDirectory(prefix="krrst-bench-") as cache_dir:
        def load(**kwargs):
            return load_images("imagefolder", args.root, args.split, **kwargs)

        load(cache_dir=False, max_per_class=1)  # warm-up: the first call imports torchvision's decoders (~2 s)
        for workers in sorted({1, cores}):
            seconds, image_set = timed(lambda: load(cache_dir=False, num_workers=workers), args.repeats)
            rows.append((f"zip, no cache, {workers} thread{'s' * (workers > 1)}", seconds, len(image_set)))
        seconds, image_set = timed(lambda: load(cache_dir=cache_dir), 1)
        rows.append((f"zip -> fresh cache (decode + write), {cores} threads", seconds, len(image_set)))
        seconds, cached = timed(lambda: load(cache_dir=cache_dir), args.repeats)
        rows.append(("cache, memory-mapped", seconds, len(cached)))
        seconds, _ = timed(lambda: load(cache_dir=cache_dir).images.clone(), args.repeats)
        rows.append(("cache, memory-mapped + copied into RAM", seconds, len(cached)))
        assert torch.equal(cached.images, image_set.images), "cache returned different images"

    print(f"{args.root} ({args.split}), {cores} cores, torch threads 1")
    print("| load | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for label, seconds, count in rows:
        print(f"| {label} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} |")


if __name__ == "__main__":
    main()
