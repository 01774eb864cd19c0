"""Benchmark of data-parallel distillation: outer steps/s with 1 and N processes (gloo on CPU, NCCL on GPUs).

    python benchmarks/bench_distributed.py                    # 1 and 2 CPU processes, one thread each
    python benchmarks/bench_distributed.py --procs 1,2,4 --device cuda

Each run spawns its processes (`torch.multiprocessing`, a process group as
torchrun would set up) and times `distill` on random uint8 images with a
narrow ConvNet-3 (m and the global real batch are options; the batch stays
global, so N processes each take batch / N real images). The rate is taken
from rank 0's `loss.csv` between step `--skip` and the last step. The
all-reduce per step moves the gradients of the whole set (m x C x H x W +
m x d floats, printed) however many processes there are; the work that is
split is the real batch's share (teacher and network forwards on it), so the
replicated work (m images forward + backward, the m x m solve, the pool step)
bounds the speed-up (Amdahl).
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from krrst.data import ImageSet
    from krrst.distill import DistillConfig, ModelPool, distill
    from krrst.infra.distributed import cleanup, init_distributed
    from krrst.models import create_model

    ModelPool.warm_up = lambda self, *a, **k: None  # set-up, not per-step cost
    context = init_distributed(args.device)
    images = torch.randint(0, 256, (max(4 * args.batch, 2 * args.m), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    source = ImageSet(images, None, [], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "random")
    torch.manual_seed(0)
    teacher = create_model(args.teacher) if args.teacher == "resnet18" else create_model("convnet3", widths=(32, 64, 128))
    config = DistillConfig(num_images=args.m, batch_size=args.batch, widths=(32, 64, 128), steps=args.skip + args.steps,
                           pool_size=10, pool_steps=1000, log_every=1, validate_every=0, checkpoint_every=10**9)
    try:
        distill(source, teacher, config, out_dir=out_dir, device=context.device, progress=False, distributed=context)
    finally:
        cleanup()


def measure(world_size: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        if world_size == 1:
            _worker(0, 1, _free_port(), args, out_dir)
        else:
            mp.spawn(_worker, args=(world_size, _free_port(), args, out_dir), nprocs=world_size, join=True)
        with open(Path(out_dir) / "loss.csv") as handle:
            elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(handle) if r["loss"]}
    last = max(elapsed)
    return (last - args.skip) / (elapsed[last] - elapsed[args.skip])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--m", type=int, default=250)
    parser.add_argument("--batch", type=int, default=256, help="global real batch")
    parser.add_argument("--teacher", default="resnet18", help="resnet18 or convnet3 (narrow)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    gradient_floats = args.m * 3 * 32 * 32 + args.m * (512 if args.teacher == "resnet18" else 2048)
    rows = [(int(n), measure(int(n), args)) for n in args.procs.split(",")]
    print(f"m={args.m}, global batch {args.batch}, ConvNet-3 32-64-128, teacher {args.teacher}, "
          f"{args.threads} thread(s) per process, device {args.device}; all-reduce per step: "
          f"{gradient_floats:,} floats ({4 * gradient_floats / 2**20:.1f} MiB)", file=sys.stderr)
    print("| processes | steps/s | speed-up |")
    print("|---|---|---|")
    for processes, rate in rows:
        print(f"| {processes} | {rate:.3f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
