"""Benchmark of KRR-ST distillation: the reference path against the fast path, side by side.

    python benchmarks/bench_distill.py --grid cpu                 # this CPU: narrow networks
    python benchmarks/bench_distill.py --grid paper --steps 3     # the paper's CIFAR-100 step
    python benchmarks/bench_distill.py --grid teachers --teacher-cache 2   # ConvNet / ResNet-18 / ResNet-50 teachers
    python benchmarks/bench_distill.py --grid gpu --device cuda   # m 250..4000, batch 256/1024, 32/64 px
    python benchmarks/bench_distill.py --grid gpu --device cuda --compile

For every setting it runs the **reference path** (`reference_config`: float32,
contiguous memory, a teacher forward every step, no compilation: the
straightforward implementation the tests hold the fast path to) and the
**fast path** (the defaults: bf16 autocast on CUDA, channels_last, fused
AdamW on CUDA, no host sync inside the step, plus the teacher-target cache of
`--teacher-cache K` views and, with `--compile`, `torch.compile` of the step),
and prints steps/s of both, their ratio, peak memory, the FLOPs of one step
and, on a GPU with a known peak, the model-FLOPs utilisation (MFU = FLOPs per
step x steps/s / the device's dense bf16 peak).

Each path of each setting runs in a subprocess of its own, one after the
other, so that the peak memory printed is that path's alone: on CPU the peak
resident set size of the process (torch included), on CUDA
`torch.cuda.max_memory_allocated`.

Timing: `distill` logs every `--skip` steps (a log row synchronises the
host); steps/s is measured from the row at step `--skip` (after allocation,
cuDNN autotuning, compilation) to the last. The pool warm-up (up to T steps
per model) is set-up, not per-step cost, and is skipped; T = 1,000 as in the
paper, so the pool's picks train (not re-initialise) in the timed steps. The
teacher cache's one-off build time is printed, not counted in the rate.
Random uint8 images serve as the source: the rate does not depend on pixels.

FLOPs of one step are counted with `torch.utils.flop_counter.FlopCounterMode`
on meta tensors: features of m synthetic images forward + backward, features
of the real batch forward, the teacher forward on the real batch (reference
path and uncached fast path only) and one pool training step on the m images.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; MFU is printed where the name matches.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

NARROW3, FULL3, FULL4 = (32, 64, 128), (128, 256, 512), (64, 128, 256, 512)


def grid(name: str) -> list[dict]:
    """The settings of a grid: m, real batch, image size, distillation network, teacher."""
    if name == "paper":
        return [dict(m=1000, batch=1024, size=32, arch="convnet3", widths=FULL3, teacher="resnet18")]
    if name == "tinyimagenet":
        return [dict(m=2000, batch=1024, size=64, arch="convnet4", widths=FULL4, teacher="resnet18")]
    if name == "gpu":
        return [dict(m=m, batch=batch, size=size, arch="convnet3" if size == 32 else "convnet4",
                     widths=FULL3 if size == 32 else FULL4, teacher="resnet18")
                for size in (32, 64) for batch in (256, 1024) for m in (250, 500, 1000, 2000, 4000)]
    if name == "cpu":
        settings = [dict(m=m, batch=batch, size=32, arch="convnet3", widths=NARROW3, teacher="resnet18")
                    for batch in (256, 1024) for m in (250, 1000, 4000)]
        return settings + [dict(m=500, batch=256, size=64, arch="convnet3", widths=NARROW3, teacher="resnet18")]
    if name == "teachers":  # what the teacher costs per outer step: a ConvNet, the CIFAR ResNet-18, a 224 px ResNet-50
        return [dict(m=100, batch=64, size=32, arch="convnet3", widths=NARROW3, teacher=teacher)
                for teacher in ("convnet3", "resnet18", "torchvision:resnet50")]
    raise SystemExit(f"unknown grid {name!r}; expected cpu, gpu, paper, tinyimagenet or teachers")


def _teacher(name: str, size: int):
    from krrst.models import create_model

    torch.manual_seed(0)
    if name.startswith(("torchvision:", "timm:")):  # at its own input size (224 px), as `distill` feeds it
        from krrst.formats import library_backbone

        return library_backbone(name)
    return create_model(name, image_size=size) if name.startswith("convnet") else create_model(name)  # ResNet-18
    # (CIFAR stem, global pooling) takes any image size


def _config(setting: dict, path: str, steps: int, log_every: int, teacher_cache: int, compile_step: bool):
    from krrst.distill import DistillConfig, reference_config

    config = DistillConfig(
        num_images=setting["m"], batch_size=setting["batch"], image_size=setting["size"], arch=setting["arch"],
        widths=setting["widths"], steps=steps, pool_size=10, pool_steps=1000, log_every=log_every,
        checkpoint_every=10**9, validate_every=0, teacher_cache_views=teacher_cache, compile=compile_step,
    )
    return reference_config(config) if path == "reference" else config


def step_flops(setting: dict, with_teacher: bool) -> int:
    """FLOPs of one outer step (see the module docstring), counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from krrst.distill import network_options
    from krrst.models import fresh_model

    config = _config(setting, "reference", 1, 1, 0, False)
    from krrst.formats import fit_to_source

    with torch.device("meta"):
        teacher = fit_to_source(_teacher(setting["teacher"], setting["size"]), (0.5,) * 3, (0.25,) * 3,
                                setting["size"]).eval()
        feature_dim = teacher(torch.empty(2, 3, setting["size"], setting["size"])).shape[1]
        model = fresh_model(config.arch, feature_dim, 0, **network_options(config))
        synthetic = torch.empty(setting["m"], 3, setting["size"], setting["size"], requires_grad=True)
        real = torch.empty(setting["batch"], 3, setting["size"], setting["size"])
        counter = FlopCounterMode(display=False)
        with counter:
            model.eval()
            model.forward_features(synthetic).sum().backward()
            with torch.no_grad():
                model.forward_features(real)
                if with_teacher:
                    teacher(real)
            model.train()
            model(synthetic.detach()).sum().backward()
    return counter.get_total_flops()


def run_one(setting: dict, path: str, steps: int, skip: int, device_name: str, teacher_cache: int,
            compile_step: bool) -> dict:
    """Time one path of one setting in this process; return its measurements."""
    from krrst.infra.config import resolve_device
    from krrst.data import ImageSet

    device = resolve_device(device_name)
    size = setting["size"]
    images = torch.randint(0, 256, (max(4 * setting["batch"], 2 * setting["m"]), 3, size, size),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = ImageSet(images, None, [], (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "random")
    cache = teacher_cache if path == "fast" else 0
    config = _config(setting, path, skip + steps, skip, cache, compile_step and path == "fast")

    teacher = _teacher(setting["teacher"], size)
    measured = time_distill(source, teacher, config, setting["teacher"], device)
    if device.type != "cuda":  # this process ran this path alone: its peak resident set is the path's
        measured["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {**setting, "path": path, "teacher_cache": cache, "compile": config.compile, **measured}


def time_distill(source, teacher, config, teacher_name: str, device: torch.device) -> dict:
    """steps/s, CUDA peak memory (None on CPU), cache build time, FLOPs per step and MFU of `distill()` with `config`.

    steps/s runs from the log row at step `config.log_every` (after allocation, autotuning, compilation) to the
    last; the pool warm-up is skipped (set-up, not per-step cost) and the teacher cache's build is timed apart.
    The patches are undone on return, so nothing else in the process sees them.
    """
    import krrst.distill as distill_module

    build_seconds = []
    build_teacher_cache = distill_module.build_teacher_cache

    def timed_build(*args, **kwargs):
        started = time.perf_counter()
        cache = build_teacher_cache(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        build_seconds.append(time.perf_counter() - started)
        return cache

    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(distill_module.ModelPool, "warm_up", lambda self, *args, **kwargs: None), \
            mock.patch.object(distill_module, "build_teacher_cache", timed_build):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        distill_module.distill(source, teacher, config, out_dir=tmp, device=device, progress=False)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        with open(Path(tmp) / distill_module.LOSS_CSV_NAME) as handle:
            elapsed = {int(row["step"]): float(row["elapsed_s"]) for row in csv.DictReader(handle) if row["loss"]}
    first, last = config.log_every, max(elapsed)
    steps_per_s = (last - first) / (elapsed[last] - elapsed[first])
    setting = dict(m=config.num_images, batch=config.batch_size, size=config.image_size, arch=config.arch,
                   widths=config.widths, teacher=teacher_name)
    flops = step_flops(setting, with_teacher=config.teacher_cache_views == 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak_flops = next((value for key, value in PEAK_BF16.items() if key in where), None)
    return {"device": where, "timed_steps": last - first, "steps_per_s": steps_per_s, "peak_gib": peak,
            "cache_build_s": build_seconds[0] if build_seconds else None, "gflop_per_step": flops / 1e9,
            "mfu": flops * steps_per_s / peak_flops if peak_flops else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="cpu", help="cpu, gpu, paper or tinyimagenet (see grid())")
    parser.add_argument("--only", default=None, help="comma-separated setting numbers of the grid (0-based)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path (default: 2 on CPU, 30 on CUDA)")
    parser.add_argument("--skip", type=int, default=None, help="untimed first steps (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--teacher-cache", type=int, default=8, metavar="K",
                        help="teacher-target cache views of the fast path (0: off; default 8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path's step")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one path of one setting
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    steps = args.steps or (30 if on_cuda else 2)
    skip = args.skip or (5 if on_cuda else 1)

    if args.one:
        setting, path = json.loads(args.one)
        print(json.dumps(run_one(setting, path, steps, skip, args.device, args.teacher_cache, args.compile)))
        return

    settings = grid(args.grid)
    if args.only:
        settings = [settings[int(i)] for i in args.only.split(",")]
    rows = []
    for setting in settings:
        for path in ("reference", "fast"):
            command = [sys.executable, __file__, "--one", json.dumps([setting, path]), "--steps", str(steps),
                       "--skip", str(skip), "--device", args.device, "--teacher-cache", str(args.teacher_cache)]
            command += ["--threads", str(args.threads)] if args.threads else []
            command += ["--compile"] if args.compile else []
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                print(finished.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"setting {setting} ({path}) failed")
            rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
            print(f"done: m={setting['m']} batch={setting['batch']} {setting['size']}px {path}: "
                  f"{rows[-1]['steps_per_s']:.3f} steps/s", file=sys.stderr, flush=True)

    print(f"device: {rows[0]['device']}; fast path: teacher cache K={args.teacher_cache}, "
          f"compile={'on' if args.compile else 'off'}; {steps} timed steps after {skip}")
    print("| m | batch | px | network | ref steps/s | fast steps/s | fast / ref | ref peak GiB | fast peak GiB "
          "| GFLOP/step ref / fast | MFU ref / fast | 160k steps (fast) | cache build |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for reference, fast in zip(rows[0::2], rows[1::2]):
        mfu = (f"{reference['mfu']:.1%} / {fast['mfu']:.1%}" if fast["mfu"] is not None else "-")
        build = f"{fast['cache_build_s']:.1f} s" if fast["cache_build_s"] is not None else "-"
        hours = 160_000 / fast["steps_per_s"] / 3600
        print(f"| {fast['m']} | {fast['batch']} | {fast['size']} | {fast['arch']} {'-'.join(map(str, fast['widths']))} "
              f"| {reference['steps_per_s']:.3f} | {fast['steps_per_s']:.3f} "
              f"| {fast['steps_per_s'] / reference['steps_per_s']:.2f} | {reference['peak_gib']:.2f} "
              f"| {fast['peak_gib']:.2f} | {reference['gflop_per_step']:.0f} / {fast['gflop_per_step']:.0f} | {mfu} "
              f"| {hours:.1f} h | {build} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
