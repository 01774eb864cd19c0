"""Benchmark of the SSL teacher: training throughput, and k-NN accuracy after a fixed time budget.

Two parts:

    # images/s of Barlow Twins training at 32x32 (ResNet-18 and a narrow ConvNet),
    # the reference path against the fast path
    python benchmarks/bench_teacher.py throughput --batch-size 128 --steps 6
    python benchmarks/bench_teacher.py --threads 1 throughput --archs convnet3 --batch-size 64 --steps 4

    # a narrow ConvNet teacher trained on CIFAR-10 train for a fixed wall-clock
    # budget, then weighted 20-NN accuracy on the 10,000 test images, against the
    # same network at its random initialisation (the no-training baseline)
    python benchmarks/bench_teacher.py budget --minutes 10

Throughput is read from the run's own `loss.csv` (wall time per step), so it
is the throughput of `krrst.teacher.train_teacher` itself, views and
optimiser included; the first steps (allocation, warm-up) are skipped. Real
CIFAR-10 images from ../shared/data are used when present, random images
otherwise (the rate is the same). Runs on CUDA when available (`--device`).

`throughput` runs every network twice, each run in a subprocess of its own
(so that the peak memory printed is that run's alone: peak resident set size
of the process on CPU, `torch.cuda.max_memory_allocated` on CUDA): the
**reference path** (`krrst.infra.speed.reference_speed`: float32, contiguous) and
the **fast path** (the defaults: channels_last, bf16 autocast on CUDA, fused
SGD/AdamW on CUDA). It prints the images/s of both, their ratio, peak memory,
the FLOPs of one step (`torch.utils.flop_counter.FlopCounterMode` on meta
tensors: both views through backbone and projector, forward and backward) and,
on a GPU listed in bench_distill's `PEAK_BF16`, the model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_distill import PEAK_BF16  # this folder is the script's: the one peak table of the benchmarks

from krrst.infra.config import resolve_device
from krrst.infra.speed import reference_speed
from krrst.teacher import (
    TeacherConfig,
    barlow_twins_loss,
    build_backbone,
    build_projector,
    knn_accuracy,
    read_loss_log,
    train_teacher,
)

ARCHS = {"resnet18": (), "convnet3": (32, 64, 128)}

CIFAR10_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


def _cifar10(split: str, max_per_class: int | None):
    from krrst.data import load_images

    return load_images("imagefolder", CIFAR10_ZIP, split, max_per_class=max_per_class)


def _source(num_images: int):
    """Real CIFAR-10 train images when the archive is present, else random uint8 images."""
    if CIFAR10_ZIP.exists():
        return _cifar10("train", max_per_class=math.ceil(num_images / 10)), "CIFAR-10 train"
    from krrst.data import ImageSet

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageSet(images, None, [], (0.5,) * 3, (0.25,) * 3, "random"), "random images"


def measure_throughput(images, config: TeacherConfig, device: torch.device, skip: int) -> tuple[float, float]:
    """(images/s over the steps after `skip`, seconds per step) of a `train_teacher` run."""
    with tempfile.TemporaryDirectory() as tmp:
        heldout = images.subset(torch.arange(64))
        train_teacher(images, config, out_dir=tmp, device=device, heldout=heldout, progress=False)
        rows = read_loss_log(Path(tmp) / "loss.csv")
    timed = rows[skip:]
    seconds = timed[-1]["elapsed_s"] - rows[skip - 1]["elapsed_s"]
    return len(timed) * config.batch_size / seconds, seconds / len(timed)


def step_flops(config: TeacherConfig, image_size: int) -> int:
    """FLOPs of one training step (two views of a batch, backbone + projector, forward + backward), on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        backbone = build_backbone(config, image_size)
        projector = build_projector(backbone.feature_dim, tuple(config.projector_dims))
        views = [torch.empty(config.batch_size, 3, image_size, image_size) for _ in range(2)]
        counter = FlopCounterMode(display=False)
        with counter:
            barlow_twins_loss(*(projector(backbone(view)) for view in views)).backward()
    return counter.get_total_flops()


def run_one(arch: str, path: str, args: argparse.Namespace) -> dict:
    """Time one path of one network in this process; return its measurements."""
    device = resolve_device(args.device)
    images, what = _source(max(2000, 2 * args.batch_size))
    config = TeacherConfig(arch=arch, convnet_widths=ARCHS[arch], batch_size=args.batch_size, steps=args.steps,
                           checkpoint_every=10**9, log_every=1)
    config = reference_speed(config) if path == "reference" else config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rate, per_step = measure_throughput(images, config, device, args.skip)
    if device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        where = f"CPU, {torch.get_num_threads()} threads"
    flops = step_flops(config, images.image_size)
    peak_flops = next((value for key, value in PEAK_BF16.items() if key in where), None)
    return {"arch": arch, "path": path, "device": where, "source": what, "images_per_s": rate, "s_per_step": per_step,
            "peak_gib": peak, "gflop_per_step": flops / 1e9,
            "mfu": flops / per_step / peak_flops if peak_flops else None}


def run_throughput(args: argparse.Namespace) -> None:
    if args.one:
        print(json.dumps(run_one(*json.loads(args.one), args)))
        return
    archs = args.archs.split(",")
    rows = []
    for arch in archs:
        for path in ("reference", "fast"):
            command = [sys.executable, __file__, "--device", args.device]
            command += ["--threads", str(args.threads)] if args.threads else []
            command += ["throughput", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                        "--skip", str(args.skip), "--one", json.dumps([arch, path])]
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                print(finished.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{arch} ({path}) failed")
            rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    device = resolve_device(args.device)
    hardware = rows[0]["device"] if device.type == "cuda" else f"{args.threads or torch.get_num_threads()} CPU threads"
    print(f"device {device} ({hardware}), {rows[0]['source']}, batch {args.batch_size}, {args.steps} steps "
          f"({args.skip} skipped), Barlow Twins, projector 2048-2048-2048")
    for row in rows[1::2]:  # the defaults: the fast path
        widths = ARCHS[row["arch"]]
        name = row["arch"] + (f" widths {','.join(map(str, widths))}" if widths else "")
        print(f"  {name:<28} {row['images_per_s']:8.1f} images/s  ({row['s_per_step']:.3f} s/step)")
    print("\nreference path (float32, contiguous) against the fast path (defaults: channels_last, bf16 autocast and "
          "fused optimisers on CUDA)")
    print("| network | ref images/s | fast images/s | fast / ref | ref peak GiB | fast peak GiB | GFLOP/step "
          "| MFU ref / fast |")
    print("|---|---|---|---|---|---|---|---|")
    for reference, fast in zip(rows[0::2], rows[1::2]):
        widths = ARCHS[fast["arch"]]
        name = fast["arch"] + (f" {'-'.join(map(str, widths))}" if widths else "")
        mfu = f"{reference['mfu']:.1%} / {fast['mfu']:.1%}" if fast["mfu"] is not None else "-"
        print(f"| {name} | {reference['images_per_s']:.1f} | {fast['images_per_s']:.1f} "
              f"| {fast['images_per_s'] / reference['images_per_s']:.2f} | {reference['peak_gib']:.2f} "
              f"| {fast['peak_gib']:.2f} | {fast['gflop_per_step']:.1f} | {mfu} |")


def run_budget(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    started = time.perf_counter()
    train = _cifar10("train", max_per_class=args.train_per_class)
    test = _cifar10("test", max_per_class=None)
    print(f"loaded {len(train)} train / {len(test)} test CIFAR-10 images in {time.perf_counter() - started:.1f} s")

    base = TeacherConfig(
        arch="convnet3", convnet_widths=widths, batch_size=args.batch_size,
        projector_dims=tuple(int(d) for d in args.projector.split(",")),
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        checkpoint_every=10**9, log_every=20,
    )
    # Calibrate: a short run gives the rate, the rate gives the number of steps
    # that fit in the budget, so the cosine schedule ends when the budget does.
    rate, _ = measure_throughput(train, dataclasses.replace(base, steps=args.calibration_steps), device, skip=3)
    steps = max(1, int(args.minutes * 60 * rate / args.batch_size))
    config = dataclasses.replace(base, steps=steps)
    print(f"Barlow Twins, convnet3 widths {args.widths}, projector {args.projector}, {args.optimizer} lr {args.lr:g} "
          f"wd {args.weight_decay:g}, {torch.get_num_threads()} CPU thread(s) on {device}")
    print(f"calibration: {rate:.1f} images/s -> {steps} steps of {args.batch_size} "
          f"({steps * args.batch_size / len(train):.1f} epochs) for a {args.minutes:g}-minute budget")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        heldout = test.subset(torch.arange(1000))
        teacher = train_teacher(train, config, out_dir=tmp, device=device, heldout=heldout, progress=args.progress)
        train_seconds = time.perf_counter() - started
        rows = read_loss_log(Path(tmp) / "loss.csv")
    print(f"trained {steps} steps in {train_seconds / 60:.2f} min (loop {rows[-1]['elapsed_s'] / 60:.2f} min); "
          f"loss {sum(r['loss'] for r in rows[:20]) / 20:.2f} (first 20 steps) -> "
          f"{sum(r['loss'] for r in rows[-20:]) / 20:.2f} (last 20)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        random_network = build_backbone(config, train.image_size).to(device).eval()
    for name, network in (("random init", random_network), ("trained teacher", teacher)):
        started = time.perf_counter()
        accuracy = knn_accuracy(network, train, test, k=20, device=device)
        print(f"  {name:<16} 20-NN accuracy {100 * accuracy:6.2f}%  "
              f"({len(train)} train -> {len(test)} test; {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="part", required=True)
    throughput = sub.add_parser("throughput")
    throughput.add_argument("--batch-size", type=int, default=128)
    throughput.add_argument("--steps", type=int, default=6)
    throughput.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    throughput.add_argument("--archs", default="resnet18,convnet3", help="comma-separated: resnet18, convnet3")
    throughput.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one path of one network
    budget = sub.add_parser("budget")
    budget.add_argument("--minutes", type=float, default=10.0)
    budget.add_argument("--widths", default="32,64,128")
    budget.add_argument("--projector", default="1024,1024,1024")
    budget.add_argument("--batch-size", type=int, default=128)
    # The 1,000-epoch recipe's LARS (lr 0.3) starts slowly: after under an epoch
    # its features were below random ones in k-NN, while AdamW 1e-3 was above
    # (300 steps of 128 on 2,000 test / 10,000 train images: random 42.9%,
    # LARS 37.1%, AdamW 1e-3 50.6%, 2e-3 49.8%, 4e-3 48.8%, SGD 0.05 40.5%).
    budget.add_argument("--optimizer", default="adamw", choices=("lars", "sgd", "adamw"))
    budget.add_argument("--lr", type=float, default=1e-3)
    budget.add_argument("--weight-decay", type=float, default=1e-4)
    budget.add_argument("--seed", type=int, default=0)
    budget.add_argument("--train-per-class", type=int, default=None, help="default: all 5,000 per class")
    budget.add_argument("--calibration-steps", type=int, default=8)
    budget.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"throughput": run_throughput, "budget": run_budget}[args.part](args)


if __name__ == "__main__":
    main()
