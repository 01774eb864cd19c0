"""The GPU check: one run that measures what needs a GPU, printed as one table.

    python benchmarks/gpu_check.py --out gpu_check.json        # one GPU: under 8 minutes (the section budgets)
    python benchmarks/gpu_check.py --only compile --budget 400  # rerun one section with more time
    python benchmarks/gpu_check.py --smoke                       # tiny sizes on a CPU: proves the script runs

Sections, in the order they run (`--only` takes a comma-separated subset):

  step          the `cifar100` preset's distillation step (m=1000, ConvNet-3
                128-256-512, real batch 1024, 32 px): reference path, fast path,
                fast path with the teacher-target cache (`--teacher-cache K`)
  tinyimagenet  the `tinyimagenet` preset's step (m=2000, ConvNet-4, 64 px):
                reference and fast path, above all their peak memory
  demo          `krrst run --preset demo --set distill.steps=300` in a subprocess:
                wall time, exit status, the loss and results it wrote
  compile       the `cifar100` step with `compile=True`, then also with
                `compile_mode=reduce-overhead` (CUDA graphs)

Every step row holds two measurements:

- the loss and the update direction of the variant's step
  (`krrst.distill.make_step_loss`) on the same inputs as the reference path
  (`reference_config`): a pool model trained a few steps on the set, the set
  and a real batch with the teacher's targets. `loss rel diff` is
  |loss - reference loss| / |reference loss|; `grad cos` the cosine between the
  gradients of the loss w.r.t. (X_s, Y_s) of both paths. The reference row
  compares a second reference computation with the first: the noise floor of
  the device's nondeterministic kernels. `--dtype float64` runs this
  comparison in float64 (kernel solve included), a check of the arithmetic
  the CPU can make;
- the speed of the real loop: `distill()` for `--skip` + `--steps` steps on
  random uint8 images with a randomly initialised teacher of the preset's
  architecture (pool warm-up not run: it is set-up, not per-step cost);
  steps/s from the log row at step `--skip` to the last, FLOPs per step and
  MFU as `bench_distill.py` counts them (FLOPs per step x steps/s / the
  device's dense bf16 peak), and `torch.cuda.max_memory_allocated` during that
  loop (CPU: not measured).

Each section has a time budget (`--budget`, or the defaults in `BUDGETS`
plus what earlier sections left unused); an error or a spent budget becomes
the status of its row and the next section runs. The JSON file of `--out` is
rewritten after every section, so an interrupted check keeps what it measured.

`--smoke` shrinks everything for a CPU: m=16, real batch 32, distillation
widths 8-16-32 (8-16-32-64), 1 + 2 timed steps, a pool of 2, a teacher cache
of at most 2 views, the teacher ConvNet-3 / ConvNet-4 at their registered
widths (ResNet-18 is too slow for it), and a 20-step demo run with every
other stage shortened.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import gc
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import time_distill  # noqa: E402  timing, FLOPs and MFU as the distillation benchmark counts them

from krrst import distill as distill_module  # noqa: E402
from krrst.infra import io  # noqa: E402
from krrst.augment import normalize  # noqa: E402
from krrst.infra.config import apply_overrides, resolve_device  # noqa: E402
from krrst.data import ImageSet  # noqa: E402
from krrst.distill import (  # noqa: E402
    DistillConfig, ModelPool, SpeedSettings, make_step_loss, reference_config,
)
from krrst.infra.errors import KrrstError  # noqa: E402
from krrst.models import create_model, model_options  # noqa: E402
from krrst.pipeline import resolve_config  # noqa: E402
from krrst.results import read_results  # noqa: E402

SECTIONS = ("step", "tinyimagenet", "demo", "compile")
# Seconds per section on one H100; time a section leaves unused passes to the next (compile, last, needs it most).
# They sum to 7.6 minutes: with start-up, a full check ends within 8.
BUDGETS = {"step": 60, "tinyimagenet": 45, "demo": 170, "compile": 180}
CIFAR100_STATS = ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))
SMOKE_SIZES = {
    "cifar100": {"num_images": 16, "batch_size": 32, "widths": (8, 16, 32), "pool_size": 2},
    "tinyimagenet": {"num_images": 16, "batch_size": 32, "widths": (8, 16, 32, 64), "pool_size": 2},
}
SMOKE_TEACHERS = {32: "convnet3", 64: "convnet4"}  # registered widths, built as bench_distill.step_flops counts them
POOL_STEPS_BEFORE_COMPARISON = 5  # a partly trained pool model, the state a real run picks
DEMO_STEPS, SMOKE_DEMO = 300, {
    "distill.steps": 20, "distill.num_images": 20, "distill.batch_size": 64, "distill.pool_size": 2,
    "distill.pool_steps": 5, "distill.validate_every": 10, "teacher.steps": 10, "run.seeds": 1,
    "run.source_per_class": 50, "run.heldout_images": 100, "run.target_train_per_class": 20,
    "run.target_test_per_class": 20, "pretrain.epochs": 5, "finetune.iterations": 10, "linear.iterations": 20,
}
COLUMNS = (  # (JSON key, table header, format)
    ("section", "section", "{}"), ("variant", "variant", "{}"), ("status", "status", "{}"),
    ("loss", "loss", "{:.6g}"), ("loss_rel_diff", "loss rel diff", "{:.1e}"), ("grad_cosine", "grad cos", "{:.6f}"),
    ("steps_per_s", "steps/s", "{:.3g}"), ("gflop_per_step", "GFLOP/step", "{:.0f}"), ("mfu", "MFU", "{:.1%}"),
    ("peak_gib", "peak GiB", "{:.2f}"), ("wall_s", "wall s", "{:.0f}"), ("note", "note", "{}"),
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big and how long: the full check or the CPU smoke run."""

    smoke: bool
    steps: int  # timed outer steps per variant
    skip: int  # untimed first steps (allocation, autotuning, compilation)
    dtype: torch.dtype  # of the loss / gradient comparison
    teacher_cache: int  # K views of the cached fast-path row (0: no such row)


class BudgetSpent(Exception):
    """A section ran past its time budget."""


@contextlib.contextmanager
def budget(seconds: float):
    """Raise `BudgetSpent` in this (main) thread after `seconds`; where no SIGALRM exists, only sections check it."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def spent(signum, frame):
        raise BudgetSpent(f"section budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, spent)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]


def _free(device: torch.device) -> None:
    """Return the cached CUDA memory of the last variant, so the next one's peak is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the distillation step


def section_config(preset: str, scale: Scale) -> DistillConfig:
    """The preset's distillation settings (shrunk for --smoke), logging every `skip` steps for the timing."""
    overrides = dict(SMOKE_SIZES[preset]) if scale.smoke else {}
    return apply_overrides(resolve_config(preset).distill, {**overrides, "steps": scale.skip + scale.steps,
                                                            "log_every": scale.skip, "checkpoint_every": 10**9,
                                                            "validate_every": 0}, "distill")


def teacher_arch(preset: str, scale: Scale, image_size: int) -> str:
    """The pipeline preset's teacher architecture (a CPU-sized one for --smoke)."""
    return SMOKE_TEACHERS[image_size] if scale.smoke else resolve_config(preset).teacher.arch


def random_source(config: DistillConfig) -> ImageSet:
    """Random uint8 images: the step's cost and arithmetic do not depend on the pixels."""
    count = max(4 * config.batch_size, 2 * config.num_images)
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return ImageSet(images, None, [], *CIFAR100_STATS, "random")


@torch.no_grad()
def _features(net: torch.nn.Module, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return torch.cat([net(part) for part in images.split(chunk)])


def comparison_inputs(config: DistillConfig, teacher, source: ImageSet, device: torch.device, dtype: torch.dtype):
    """(pool model, X_s, Y_s, real batch, its teacher targets) in `dtype`; the model on `device`, tensors on CPU."""
    mean, std = source.mean, source.std
    order = torch.randperm(len(source.images), generator=torch.Generator().manual_seed(1))
    with default_dtype(dtype):
        net = copy.deepcopy(teacher).to(device, dtype).eval()
        synthetic = normalize(source.images[: config.num_images], mean, std).to(device, dtype)
        real = normalize(source.images[order[: config.batch_size]], mean, std).to(device, dtype)
        synthetic_targets, real_targets = _features(net, synthetic), _features(net, real)
        options = {"widths": config.widths, "image_size": config.image_size, "norm": config.norm}
        accepted = model_options(config.arch)
        pool = ModelPool(
            config.arch, synthetic_targets.shape[1], {k: v for k, v in options.items() if k in accepted}, 1,
            config.pool_steps, lr=config.pool_lr, momentum=config.pool_momentum,
            weight_decay=config.pool_weight_decay, seed=config.seed, device=device,
            speed=SpeedSettings.resolve(reference_config(config), device),
        )
        for _ in range(POOL_STEPS_BEFORE_COMPARISON):
            pool.train_step(0, synthetic, synthetic_targets)
    tensors = tuple(t.cpu() for t in (synthetic, synthetic_targets, real, real_targets))
    return pool.models[0].eval(), tensors


def loss_and_gradient(config: DistillConfig, model, tensors, device: torch.device, dtype: torch.dtype):
    """The step loss of `config`'s path and its gradient w.r.t. (X_s, Y_s), flattened, float64 on CPU."""
    if dtype == torch.float64:
        config = dataclasses.replace(config, kernel_dtype="float64")
    speed = SpeedSettings.resolve(config, device)
    model = copy.deepcopy(model).to(device, memory_format=speed.memory_format)
    synthetic, synthetic_targets, real, real_targets = (t.to(device, copy=True) for t in tensors)
    synthetic.requires_grad_(True)
    synthetic_targets.requires_grad_(True)
    with default_dtype(dtype):
        loss, info = make_step_loss(config, speed, model)(model, synthetic, synthetic_targets, real, real_targets)
        gradients = torch.autograd.grad(loss, [synthetic, synthetic_targets])
    gradient = torch.cat([g.flatten() for g in gradients]).double().cpu()
    return float(loss.detach()), int(info), gradient


def _speed_label(config: DistillConfig, device: torch.device) -> str:
    speed = SpeedSettings.resolve(config, device)
    parts = [str(speed.autocast_dtype).removeprefix("torch.") if speed.autocast_dtype else "float32",
             "channels_last" if speed.memory_format == torch.channels_last else "contiguous"]
    if config.teacher_cache_views:
        parts.append(f"teacher cache K={config.teacher_cache_views}")
    if speed.compile:
        parts.append(f"compile {speed.compile_mode}")
    return ", ".join(parts)


def step_rows(section: str, preset: str, variants, scale: Scale, device: torch.device, deadline: float,
              rows: list[dict]) -> None:
    """Append one row per (name, config-maker) of `variants`, each compared with the reference path and timed."""
    config = section_config(preset, scale)
    name = teacher_arch(preset, scale, config.image_size)
    torch.manual_seed(0)
    teacher = create_model(name)
    source = random_source(config)
    model, tensors = comparison_inputs(config, teacher, source, device, scale.dtype)
    reference_loss, _, reference_gradient = loss_and_gradient(
        reference_config(config), model, tensors, device, scale.dtype)
    setting = f"m={config.num_images}, batch {config.batch_size}, {config.image_size} px, {config.arch} " \
              f"{'-'.join(map(str, config.widths))}, teacher {name}"
    for variant, make in variants:
        variant_config = make(config)
        row = {"section": section, "variant": variant, "status": "ok", "setting": setting,
               "speed": _speed_label(variant_config, device)}
        rows.append(row)
        if time.monotonic() > deadline:
            row["status"] = "skipped: section budget spent"
            continue
        started = time.perf_counter()
        try:
            loss, info, gradient = loss_and_gradient(variant_config, model, tensors, device, scale.dtype)
            row.update(loss=loss, loss_rel_diff=abs(loss - reference_loss) / abs(reference_loss),
                       grad_cosine=float(F.cosine_similarity(gradient, reference_gradient, dim=0)))
            row["note"] = row["speed"] + ("; Cholesky failed" if info else "")
            _free(device)
            row.update(time_distill(source, teacher, variant_config, name, device))
            if row["cache_build_s"] is not None:
                row["note"] += f"; cache build {row['cache_build_s']:.1f} s"
        except Exception as exc:  # the row says what failed; the next variant runs
            row["status"] = _error(exc)
        row["wall_s"] = time.perf_counter() - started
        _free(device)
        print(f"gpu_check: {section} / {variant}: {row['status']} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)


def section_step(scale, device, deadline, rows):
    variants = [("reference", reference_config), ("fast", lambda config: config)]
    if scale.teacher_cache:
        variants.append((f"fast + cache K={scale.teacher_cache}",
                         lambda config: dataclasses.replace(config, teacher_cache_views=scale.teacher_cache)))
    step_rows("step", "cifar100", variants, scale, device, deadline, rows)


def section_tinyimagenet(scale, device, deadline, rows):
    step_rows("tinyimagenet", "tinyimagenet", [("reference", reference_config), ("fast", lambda c: c)],
              scale, device, deadline, rows)


def section_compile(scale, device, deadline, rows):
    variants = [
        ("compile", lambda config: dataclasses.replace(config, compile=True)),
        ("compile reduce-overhead",
         lambda config: dataclasses.replace(config, compile=True, compile_mode="reduce-overhead")),
    ]
    step_rows("compile", "cifar100", variants, scale, device, deadline, rows)


# --------------------------------------------------------------------------- the demo pipeline


def _demo_summary(run_dir: Path) -> dict:
    """The last logged loss and loop rate of the distillation, stage timings and mean accuracy per method."""
    summary: dict = {}
    with open(run_dir / "distill" / distill_module.LOSS_CSV_NAME) as handle:
        logged = [row for row in csv.DictReader(handle) if row["loss"]]
    if logged:
        summary["loss"] = float(logged[-1]["loss"])
        summary["steps_per_s"] = int(logged[-1]["step"]) / float(logged[-1]["elapsed_s"])
    summary["timings"] = io.read_json(run_dir / "timings.json")
    accuracy: dict[str, dict[str, list[float]]] = {}
    for row in read_results(run_dir):
        accuracy.setdefault(row["method"], {}).setdefault(row["protocol"], []).append(row["accuracy"])
    summary["accuracy"] = {method: {protocol: sum(values) / len(values) for protocol, values in protocols.items()}
                           for method, protocols in accuracy.items()}
    summary["result_rows"] = sum(len(values) for protocols in accuracy.values() for values in protocols.values())
    return summary


def section_demo(scale, device, deadline, rows):
    overrides = SMOKE_DEMO if scale.smoke else {"distill.steps": DEMO_STEPS}
    row = {"section": "demo", "variant": f"krrst run --preset demo, {overrides['distill.steps']} distill steps",
           "status": "ok"}
    rows.append(row)
    started = time.perf_counter()
    try:
        _run_demo(row, overrides, device, deadline)
    except Exception as exc:  # the row says what failed, the budget's end included
        row["status"] = _error(exc)
    row["wall_s"] = time.perf_counter() - started
    print(f"gpu_check: demo: {row['status']} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)


def _run_demo(row: dict, overrides: dict, device: torch.device, deadline: float) -> None:
    """`krrst run --preset demo` with `overrides` in a subprocess (killed at the deadline); its results into `row`."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "krrst.cli", "run", "--preset", "demo", "--out", str(run_dir),
                   "--no-progress", "--device", str(device)]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        # subprocess.run kills the run on any exception: its timeout, or the budget's alarm
        finished = subprocess.run(command, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        row["rc"] = finished.returncode
        if finished.returncode != 0:
            last = (finished.stderr.strip().splitlines() or ["(no output)"])[-1]
            row["status"] = f"error: rc={finished.returncode}: {last}"[:240]
            return
        row.update(_demo_summary(run_dir))
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in row["timings"].items())
    accuracy = "; ".join(f"{method} " + " / ".join(f"{protocol} {value:.1%}" for protocol, value in protocols.items())
                         for method, protocols in row["accuracy"].items())
    row["note"] = f"rc 0; {row['result_rows']} result rows; {timings}; mean accuracy: {accuracy}"


SECTION_FUNCTIONS = {"step": section_step, "tinyimagenet": section_tinyimagenet, "demo": section_demo,
                     "compile": section_compile}


# --------------------------------------------------------------------------- the table


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, spec in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else spec.format(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per section (default: " + ", ".join(f"{k} {v}" for k, v in BUDGETS.items())
                        + ", plus what the sections before left unused; 0: no limit)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU: shows the script runs end to end")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20; smoke: 2)")
    parser.add_argument("--skip", type=int, default=None, help="untimed first steps (default: 5; smoke: 1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the loss / gradient comparison (float64: an exact check, e.g. on a CPU)")
    parser.add_argument("--teacher-cache", type=int, default=8, metavar="K",
                        help="views of the step section's cached fast-path row (0: no such row; default 8)")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--only {args.only!r}: expected sections among {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen sections, print the table (and write --out); return the rows."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        out = io.check_output_file(args.out, "--out") if args.out else None
    except KrrstError as exc:
        raise SystemExit(f"gpu_check: error: {exc}") from None
    if device.type == "cpu" and not args.smoke and args.device == "auto":
        raise SystemExit("gpu_check: error: no CUDA device; the full-size check takes hours on a CPU: "
                         "pass --smoke for the tiny CPU run (or --device cpu to insist)")
    scale = Scale(smoke=args.smoke, steps=args.steps or (2 if args.smoke else 20),
                  skip=args.skip or (1 if args.smoke else 5), dtype=getattr(torch, args.dtype),
                  teacher_cache=args.teacher_cache if not args.smoke else min(args.teacher_cache, 2))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    meta = {"device": where, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "smoke": args.smoke, "comparison_dtype": args.dtype, "timed_steps": scale.steps,
            "skipped_steps": scale.skip,
            "command": " ".join(sys.argv if argv is None else ["gpu_check.py", *argv])}
    rows: list[dict] = []
    leftover = 0.0
    for section in args.sections:
        seconds = BUDGETS[section] + leftover if args.budget is None else args.budget
        deadline = time.monotonic() + (seconds if seconds > 0 else math.inf)
        started = len(rows)
        try:
            with budget(seconds):
                SECTION_FUNCTIONS[section](scale, device, deadline, rows)
        except Exception as exc:  # set-up failed or the budget ran out between rows: one row says so
            rows.append({"section": section, "variant": "-", "status": _error(exc)})
        if len(rows) == started:
            rows.append({"section": section, "variant": "-", "status": "error: no row"})
        _free(device)
        leftover = max(0.0, deadline - time.monotonic()) if seconds > 0 else 0.0
        if out is not None:
            io.write_json(out, {"meta": meta, "rows": rows})
    print(f"gpu_check on {where}, torch {meta['torch']}, {meta['date']}; "
          f"{'smoke sizes' if args.smoke else 'preset sizes'}, comparison in {args.dtype}, "
          f"{scale.steps} timed steps after {scale.skip}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
