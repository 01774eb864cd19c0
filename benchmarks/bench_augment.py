"""Benchmark of krrst.augment: batched crop/flip + normalise, and SSL views.

    python benchmarks/bench_augment.py                 # auto device, 1 CPU thread
    python benchmarks/bench_augment.py --device cpu --threads 2 --repeats 20

Times, on random CIFAR-size uint8 images (the rate does not depend on the
content):

- `crop_flip` + `normalize` on a batch of 1,024 (the distillation's real batch);
- `ssl_views` (solo-learn's CIFAR Barlow Twins view) on 256 and 1,024 images;
- for scale, torchvision's per-image transforms doing the same work in a
  Python loop (`--no-baseline` skips them).

Prints a table of milliseconds per batch (median of `--repeats` runs after one
warm-up) and images per second.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision.transforms.v2 as T

from krrst.augment import SSLAugmentConfig, crop_flip, normalize, ssl_views
from krrst.infra.config import resolve_device

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def time_batch(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-image torchvision loops")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = {
        n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)
        for n in (256, 1024)
    }
    config = SSLAugmentConfig()

    cases: list[tuple[str, int, Callable[[], torch.Tensor]]] = [
        ("crop_flip + normalize", 1024, lambda: normalize(crop_flip(images[1024], 4, generator), MEAN, STD)),
        ("ssl_views", 256, lambda: ssl_views(images[256], MEAN, STD, generator, config)),
        ("ssl_views", 1024, lambda: ssl_views(images[1024], MEAN, STD, generator, config)),
    ]
    if not args.no_baseline:
        crop_flip_loop = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
        view_loop = T.Compose(
            [
                T.RandomResizedCrop(32, scale=config.crop_scale, antialias=True),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomHorizontalFlip(),
            ]
        )
        small = images[256]
        cases += [
            (
                "torchvision loop: crop+flip+normalize",
                256,
                lambda: normalize(torch.stack([crop_flip_loop(im) for im in small]), MEAN, STD),
            ),
            (
                "torchvision loop: SSL view",
                256,
                lambda: normalize(torch.stack([view_loop(im) for im in small]), MEAN, STD),
            ),
        ]

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
    print()
    print(f"| {'operation':<38} | {'batch':>5} | {'ms/batch':>9} | {'img/s':>10} |")
    print(f"|{'-' * 40}|{'-' * 7}|{'-' * 11}|{'-' * 12}|")
    for name, batch, fn in cases:
        seconds = time_batch(fn, device, args.repeats)
        print(f"| {name:<38} | {batch:>5} | {seconds * 1e3:>9.2f} | {batch / seconds:>10,.0f} |")


if __name__ == "__main__":
    main()
