"""Benchmark of the evaluation protocol: one pre-train epoch and 1,000 fine-tuning iterations.

Times the library's own `krrst.evaluate.pretrain` and `finetune` (not a copy
of their loops) at 32x32 on synthetic uint8 images (speed does not depend on
the pixels), for ConvNet-3 (full width 128-256-512 and narrow 32-64-128) and
ResNet-18, on the CPU and, when present, on CUDA.

Method: a call with zero epochs / iterations measures the fixed cost (model
build, data transfer, the final test pass); a call with k epochs / n
iterations minus that fixed cost gives the cost of the loop. On the CPU only a
few iterations are timed and the figure is extrapolated to 1,000 (the table
says how many were measured). One warm-up call per configuration comes first.

    python benchmarks/bench_evaluate.py                  # CPU (and CUDA if available)
    python benchmarks/bench_evaluate.py --devices cpu --threads 2
    python benchmarks/bench_evaluate.py --devices cpu --threads 1 --configs 1 --m 256 --batch 64

Every network is measured twice, each time in a subprocess of its own (so
that the peak memory printed is that run's alone: peak resident set size of
the process on CPU, `torch.cuda.max_memory_allocated` on CUDA): the
**reference path** (`krrst.infra.speed.reference_speed` on every config: float32,
contiguous) and the **fast path** (the defaults: channels_last, bf16 autocast
on CUDA, fused SGD on CUDA). The first table is the defaults' (the fast
path); the second puts both side by side: pre-train steps/s, fine-tune
iterations/s and the linear probe's feature extraction in images/s
(`extract_features` under `LinearProbeConfig`'s settings, best of three
passes over the 4 x batch train images), their ratios, peak
memory and, on a GPU listed in bench_distill's `PEAK_BF16`, the model-FLOPs
utilisation of each (FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`
on meta tensors: forward + backward of a batch for the two training loops,
forward for the features).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch
from bench_distill import PEAK_BF16  # this folder is the script's: the one peak table of the benchmarks

from krrst import evaluate as E
from krrst.data import ImageSet
from krrst.distilled import DistilledSet
from krrst.models import fresh_model
from krrst.infra.speed import SpeedSettings, reference_speed

CONFIGS = (
    # (label, arch, options, CPU fine-tune iterations timed, CPU pre-train epochs timed)
    ("convnet3 (128-256-512)", "convnet3", {}, 10, 1),
    ("convnet3 narrow (32-64-128)", "convnet3", {"widths": (32, 64, 128)}, 20, 1),
    ("resnet18", "resnet18", {}, 4, 1),
)
M = 1000
FEATURE_DIM = 512
BATCH = 256


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _data(seed: int = 0) -> tuple[DistilledSet, ImageSet, ImageSet]:
    generator = torch.Generator().manual_seed(seed)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    distilled = DistilledSet(
        images=torch.randn(M, 3, 32, 32, generator=generator),
        targets=torch.randn(M, FEATURE_DIM, generator=generator),
        mean=mean,
        std=std,
        method="bench",
    )

    def image_set(n: int, name: str) -> ImageSet:
        return ImageSet(
            images=torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8),
            labels=torch.arange(n) % 10,
            class_names=[str(c) for c in range(10)],
            mean=mean,
            std=std,
            name=name,
        )

    return distilled, image_set(4 * BATCH, "bench-train"), image_set(BATCH, "bench-test")


def step_flops(arch: str, options: dict, num_classes: int) -> tuple[int, int, int]:
    """FLOPs of a pre-train step and a fine-tune step (forward + backward of a batch) and of one image's features."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    with torch.device("meta"):
        for outputs, backward, batch in ((FEATURE_DIM, True, BATCH), (num_classes, True, BATCH), (None, False, 1)):
            model = fresh_model(arch, outputs, 0, **options)
            images = torch.empty(batch, 3, 32, 32)
            counter = FlopCounterMode(display=False)
            with counter:
                if backward:
                    model(images).sum().backward()
                else:
                    with torch.no_grad():
                        model.forward_features(images)
            counts.append(counter.get_total_flops())
    return tuple(counts)


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_one(device: torch.device, scale: float, index: int, path: str) -> dict:
    """Time one path of one network of `CONFIGS` in this process; return its measurements."""
    distilled, train, test = _data()
    label, arch, options, cpu_iterations, cpu_epochs = CONFIGS[index]
    iterations = max(1, int(round(cpu_iterations * scale))) if device.type == "cpu" else 200
    epochs = cpu_epochs if device.type == "cpu" else 10
    speed_off = reference_speed if path == "reference" else (lambda config: config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_pretrain(k: int) -> None:
        config = speed_off(E.PretrainConfig(epochs=k, batch_size=BATCH))
        E.pretrain(distilled, arch, config, device=device, progress=False, **options)

    model = fresh_model(arch, None, 0, **options)

    def run_finetune(n: int) -> None:
        config = speed_off(E.FinetuneConfig(iterations=n, batch_size=BATCH))
        E.finetune(model, train, test, config, device=device, progress=False)

    # the linear probe's feature extraction, as `linear_probe` runs it
    speed = SpeedSettings.resolve(speed_off(E.LinearProbeConfig()), device)
    network = copy.deepcopy(model).to(device, memory_format=speed.memory_format)
    feature_images = train.images.to(device)

    def run_features() -> None:
        E.extract_features(network, feature_images, train.mean, train.std, BATCH, speed)

    run_pretrain(1)  # warm-up: allocator, kernels, cuDNN autotuning
    run_finetune(2)
    run_features()
    pretrain_fixed = _timed(lambda: run_pretrain(0))
    pretrain_total = _timed(lambda: run_pretrain(epochs))
    epoch_s = max(0.0, pretrain_total - pretrain_fixed) / epochs
    finetune_fixed = _timed(lambda: run_finetune(0))
    finetune_total = _timed(lambda: run_finetune(iterations))
    per_1000_s = max(0.0, finetune_total - finetune_fixed) / iterations * 1000
    features_s = min(_timed(run_features) for _ in range(3))  # short: the best of three
    steps_per_epoch = len(E._epoch_batches(M, BATCH, torch.Generator(), torch.device("cpu")))
    pretrain_flops, finetune_flops, feature_flops = step_flops(arch, options, 10)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_flops = next((value for key, value in PEAK_BF16.items() if key in where), None)
    rates = {"pretrain_steps_per_s": steps_per_epoch / epoch_s if epoch_s else float("inf"),
             "finetune_it_per_s": 1000 / per_1000_s if per_1000_s else float("inf"),
             "features_images_per_s": len(feature_images) / features_s}
    mfu = None
    if peak_flops:
        mfu = [rates["pretrain_steps_per_s"] * pretrain_flops / peak_flops,
               rates["finetune_it_per_s"] * finetune_flops / peak_flops,
               rates["features_images_per_s"] * feature_flops / peak_flops]
    return {"label": label, "path": path, "epochs": epochs, "epoch_s": epoch_s, "iterations": iterations,
            "per_1000_s": per_1000_s, **rates, "peak_gib": _peak(device), "mfu": mfu}


def bench(device: torch.device, scale: float, indices: list[int], threads: int | None) -> list[dict]:
    """Both paths of every chosen network, each in a subprocess; rows in pairs (reference, fast)."""
    rows = []
    for index in indices:
        for path in ("reference", "fast"):
            command = [sys.executable, __file__, "--devices", device.type, "--scale", str(scale), "--m", str(M),
                       "--batch", str(BATCH), "--one", json.dumps([index, path])]
            command += ["--threads", str(threads)] if threads else []
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                print(finished.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{CONFIGS[index][0]} ({path}) on {device} failed")
            rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    return rows


def _format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    global M, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the CPU iteration counts timed")
    parser.add_argument("--configs", default=None, help="comma-separated indices of CONFIGS (default: all)")
    parser.add_argument("--m", type=int, default=M, help=f"distilled images (default {M})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size of both loops (default {BATCH})")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one path of one network
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    M, BATCH = args.m, args.batch
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.one:
        index, path = json.loads(args.one)
        print(json.dumps(bench_one(torch.device(devices[0]), args.scale, index, path)))
        return
    indices = [int(i) for i in args.configs.split(",")] if args.configs else list(range(len(CONFIGS)))
    steps = len(E._epoch_batches(M, BATCH, torch.Generator(), torch.device("cpu")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; m = {M} images, batch {BATCH}, 32x32, "
          f"MSE to {FEATURE_DIM}-d targets (pre-train), 10 classes (fine-tune)")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        rows = bench(device, args.scale, indices, args.threads)
        print(f"\n### {label}\n")
        print(f"| network | 1 pre-train epoch ({steps} steps) | 1,000 fine-tune iterations | measured | "
              "extrapolated: pre-train 1,000 epochs + fine-tune 10,000 it |")
        print("|---|---|---|---|---|")
        for row in rows[1::2]:  # the defaults: the fast path
            whole = 1000 * row["epoch_s"] + 10 * row["per_1000_s"]
            print(f"| {row['label']} | {row['epoch_s']:.2f} s | {_format_duration(row['per_1000_s'])} | "
                  f"{row['epochs']} epoch(s), {row['iterations']} iterations | {_format_duration(whole)} |")
        print("\nreference path (float32, contiguous) against the fast path (defaults: channels_last, bf16 autocast "
              "and fused SGD on CUDA); features: the linear probe's extraction\n")
        print("| network | pre-train steps/s ref / fast (x) | fine-tune it/s ref / fast (x) "
              "| features images/s ref / fast (x) | peak GiB ref / fast | MFU pre-train / fine-tune / features, ref; fast |")
        print("|---|---|---|---|---|---|")
        for reference, fast in zip(rows[0::2], rows[1::2]):
            cells = []
            for key in ("pretrain_steps_per_s", "finetune_it_per_s", "features_images_per_s"):
                digits = 0 if key == "features_images_per_s" else 2
                cells.append(f"{reference[key]:.{digits}f} / {fast[key]:.{digits}f} ({fast[key] / reference[key]:.2f})")
            mfu = "-"
            if fast["mfu"] is not None:
                mfu = "; ".join(" / ".join(f"{value:.1%}" for value in row["mfu"]) for row in (reference, fast))
            print(f"| {fast['label']} | {' | '.join(cells)} | {reference['peak_gib']:.2f} / {fast['peak_gib']:.2f} "
                  f"| {mfu} |")


if __name__ == "__main__":
    main()
