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
"""

from __future__ import annotations

import argparse
import time

import torch

from krrst import evaluate as E
from krrst.data import ImageSet
from krrst.distilled import DistilledSet

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


def bench(device: torch.device, scale: float) -> list[tuple[str, int, float, int, float]]:
    distilled, train, test = _data()
    rows = []
    for label, arch, options, cpu_iterations, cpu_epochs in CONFIGS:
        iterations = max(1, int(round(cpu_iterations * scale))) if device.type == "cpu" else 200
        epochs = cpu_epochs if device.type == "cpu" else 10

        def run_pretrain(k: int) -> None:
            E.pretrain(distilled, arch, E.PretrainConfig(epochs=k, batch_size=BATCH), device=device, progress=False, **options)

        model = E.fresh_model(arch, None, 0, **options)

        def run_finetune(n: int) -> None:
            E.finetune(model, train, test, E.FinetuneConfig(iterations=n, batch_size=BATCH), device=device, progress=False)

        run_pretrain(1)  # warm-up: allocator, kernels, cuDNN autotuning
        run_finetune(2)
        pretrain_fixed = _timed(lambda: run_pretrain(0))
        pretrain_total = _timed(lambda: run_pretrain(epochs))
        epoch_s = max(0.0, pretrain_total - pretrain_fixed) / epochs
        finetune_fixed = _timed(lambda: run_finetune(0))
        finetune_total = _timed(lambda: run_finetune(iterations))
        per_1000_s = max(0.0, finetune_total - finetune_fixed) / iterations * 1000
        rows.append((label, epochs, epoch_s, iterations, per_1000_s))
    return rows


def _format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the CPU iteration counts timed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; m = {M} images, batch {BATCH}, 32x32, "
          f"MSE to {FEATURE_DIM}-d targets (pre-train), 10 classes (fine-tune)")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        print(f"\n### {label}\n")
        print("| network | 1 pre-train epoch (4 steps) | 1,000 fine-tune iterations | measured | "
              "extrapolated: pre-train 1,000 epochs + fine-tune 10,000 it |")
        print("|---|---|---|---|---|")
        for arch_label, epochs, epoch_s, iterations, per_1000_s in bench(device, args.scale):
            whole = 1000 * epoch_s + 10 * per_1000_s
            print(f"| {arch_label} | {epoch_s:.2f} s | {_format_duration(per_1000_s)} | "
                  f"{epochs} epoch(s), {iterations} iterations | {_format_duration(whole)} |")


if __name__ == "__main__":
    main()
