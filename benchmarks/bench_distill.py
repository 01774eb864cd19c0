"""Benchmark of KRR-ST distillation: outer steps/s and peak memory of `krrst.distill.distill`.

    python benchmarks/bench_distill.py                      # every setting, CPU steps kept small
    python benchmarks/bench_distill.py --settings paper --steps 3 --skip 1
    python benchmarks/bench_distill.py --device cuda --steps 30 --skip 5
    python benchmarks/bench_distill.py --settings narrow-m500-r18 --teacher-cache 8 --steps 4

Settings:
- `paper`: the paper's CIFAR-100 setting: m = 1,000, real batch 1,024,
  ConvNet-3 128-256-512, ResNet-18 teacher (512-d), pool of 10. On a CPU a
  step takes a minute or more, so time only 2-3 steps there.
- `narrow-m100`, `narrow-m500`: a CPU-sized setting: ConvNet-3 32-64-128,
  m = 100 / 500, batch 256, a ConvNet-3 32-64-128 teacher (2,048-d).
- `narrow-m500-r18`: the same with the ResNet-18 teacher, to show its share.

Each setting runs in its own process, so the peak memory is that setting's:
CPU peak resident set size (`resource.getrusage`, the whole process,
torch included; the RSS before `distill` is printed beside it) or, on CUDA,
`torch.cuda.max_memory_allocated`. The rate is read from the run's own
`loss.csv` (`log_every=1`: wall time at the end of every step, after a host
sync), leaving out the first `--skip` steps (allocation, cuDNN autotuning).
`pool_steps=1` skips the pool warm-up (up to T = 1,000 steps per model),
which is set-up, not the per-step cost. Random uint8 images serve as the
source: the rate does not depend on the pixels.

`--teacher-cache K` runs every setting twice, without and with
`DistillConfig.teacher_cache_views = K` (the teacher's features of K views
per source image computed once before the loop), and prints the ratio of
their steps/s and the one-off time to build the cache (not in the rate). The
benchmark's source has max(4 x batch, 2 x m) images; the build time scales
with images x K.
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

import torch

SETTINGS = {
    "paper": dict(num_images=1000, batch_size=1024, widths=(128, 256, 512), teacher="resnet18"),
    "narrow-m100": dict(num_images=100, batch_size=256, widths=(32, 64, 128), teacher="convnet3-narrow"),
    "narrow-m500": dict(num_images=500, batch_size=256, widths=(32, 64, 128), teacher="convnet3-narrow"),
    "narrow-m500-r18": dict(num_images=500, batch_size=256, widths=(32, 64, 128), teacher="resnet18"),
}


def _teacher(name: str):
    from krrst.models import create_model

    torch.manual_seed(0)
    if name == "resnet18":
        return create_model("resnet18")
    return create_model("convnet3", widths=(32, 64, 128))


def run_one(name: str, steps: int, skip: int, device_name: str, teacher_cache: int = 0) -> dict:
    """Run one setting in this process (with `teacher_cache` views cached, 0: none); return its measurements."""
    import krrst.distill as distill_module
    from krrst.config import resolve_device
    from krrst.data import ImageSet
    from krrst.distill import DistillConfig, distill

    setting = SETTINGS[name]
    device = resolve_device(device_name)
    images = torch.randint(0, 256, (max(4 * setting["batch_size"], 2 * setting["num_images"]), 3, 32, 32),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = ImageSet(images, None, [], (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "random")
    config = DistillConfig(
        num_images=setting["num_images"], batch_size=setting["batch_size"], widths=setting["widths"], steps=steps,
        pool_size=10, pool_steps=1, log_every=1, checkpoint_every=10**9, validate_every=0,
        teacher_cache_views=teacher_cache,
    )
    build_seconds = []
    build_cache = distill_module.build_teacher_cache

    def timed_build_cache(*args, **kwargs):
        started = time.perf_counter()
        cache = build_cache(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        build_seconds.append(time.perf_counter() - started)
        return cache

    distill_module.build_teacher_cache = timed_build_cache
    teacher = _teacher(setting["teacher"])
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        distill(source, teacher, config, out_dir=tmp, device=device, progress=False)
        with open(Path(tmp) / "loss.csv") as handle:
            rows = [row for row in csv.DictReader(handle) if row["loss"]]
    elapsed = [float(row["elapsed_s"]) for row in rows]
    seconds_per_step = (elapsed[-1] - elapsed[skip - 1]) / (len(elapsed) - skip) if skip else elapsed[-1] / len(elapsed)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
        where = torch.cuda.get_device_name(device)
    else:
        peak = (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS "
                f"({rss_before_mb / 1024:.2f} before distill)")
        where = f"CPU, {torch.get_num_threads()} threads"
    return {"setting": name, "device": where, "m": setting["num_images"], "batch": setting["batch_size"],
            "convnet": "-".join(map(str, setting["widths"])), "teacher": setting["teacher"],
            "teacher_cache": teacher_cache, "source_images": len(images),
            "cache_build_s": build_seconds[0] if build_seconds else None,
            "timed_steps": len(elapsed) - skip, "steps_per_s": 1 / seconds_per_step,
            "s_per_step": seconds_per_step, "peak_memory": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="outer steps per setting (default: 3 for paper on CPU, else 12)")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--teacher-cache", type=int, default=0, metavar="K",
                        help="also run each setting with teacher_cache_views=K and print the ratio")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.skip, args.device, args.teacher_cache)))
        return

    results = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; expected one of {', '.join(SETTINGS)}")
        on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        steps = args.steps or (3 if name == "paper" and on_cpu else 12)
        for views in sorted({0, args.teacher_cache}):
            command = [sys.executable, __file__, "--one", name, "--steps", str(steps), "--skip", str(args.skip),
                       "--device", args.device, "--teacher-cache", str(views)]
            command += ["--threads", str(args.threads)] if args.threads else []
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                print(finished.stderr, file=sys.stderr)
                raise SystemExit(f"setting {name} (teacher cache {views}) failed")
            results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
            print(f"done: {name}, teacher cache {views}", file=sys.stderr)

    uncached_rate = {r["setting"]: r["steps_per_s"] for r in results if not r["teacher_cache"]}
    print(f"device: {results[0]['device']}")
    print("| setting | m | batch | ConvNet-3 | teacher | teacher cache K | timed steps | steps/s | s/step "
          "| x uncached | cache build | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        build = (f"{r['cache_build_s']:.1f} s ({r['source_images']} x {r['teacher_cache']} views)"
                 if r["cache_build_s"] is not None else "-")
        print(f"| {r['setting']} | {r['m']} | {r['batch']} | {r['convnet']} | {r['teacher']} | "
              f"{r['teacher_cache'] or 'off'} | {r['timed_steps']} | {r['steps_per_s']:.3f} | {r['s_per_step']:.2f} | "
              f"{r['steps_per_s'] / uncached_rate[r['setting']]:.2f} | {build} | {r['peak_memory']} |")


if __name__ == "__main__":
    main()
