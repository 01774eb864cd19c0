"""The whole pipeline in one call: presets, run directories, resume, stage by stage.

`run(config, out_dir)` chains teacher -> distil -> baselines -> evaluate -> report. Each stage writes its outputs under
the run directory and a `done.json` holding the fingerprint of the config it was run with; a stage whose fingerprint
matches is skipped, so a killed run resumes where it stopped and a changed evaluation config re-runs only the
evaluation. Inside a stage, the teacher and the distillation resume from their own checkpoints and the evaluation skips
every (method, target, arch, protocol, seed) row already in `results.csv`.

A `PipelineConfig` groups one dataclass per stage; presets are dicts of overrides on top of the defaults (the paper's
CIFAR-100 setting).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from krrst.baselines import high_loss_subset, kmeans_coreset, random_subset_of
from krrst.data import FINE_GRAINED, evaluation_split, load_images
from krrst.distill import CHECKPOINT_NAME as DISTILL_CHECKPOINT
from krrst.distill import DISTILLED_NAME, DistillConfig, distill, initial_indices, network_options, unused_fields
from krrst.distill import RESUMABLE_CHANGES as RESUMABLE_DISTILL_CHANGES
from krrst.distilled import DistilledSet
from krrst.evaluate import (
    KD_TEACHER_ARCH,
    FinetuneConfig,
    KDConfig,
    LinearProbeConfig,
    PretrainConfig,
    class_count,
    evaluate_set,
    load_kd_teacher,
    pretrain,
    train_kd_teacher,
)
from krrst.formats import is_library_arch
from krrst.infra.config import apply_overrides, config_to_dict, did_you_mean_key, resolve_device
from krrst.infra.distributed import DistributedContext, barrier, current_context, run_on_main
from krrst.infra.errors import KrrstError
from krrst.infra.io import LOCK_NAME, capture_env, check_output_dir, load_tensors, read_json, save_tensors, write_json
from krrst.infra.progress import stopped_loops
from krrst.infra.registry import Registry
from krrst.mkdt import CHECKPOINT_NAME as MKDT_CHECKPOINT
from krrst.mkdt import TRAJECTORIES_NAME, MKDTConfig, mkdt_distill
from krrst.models import MODELS, create_model, model_options
from krrst.report import format_bytes, report_text, write_report
from krrst.results import SETS_NAME, append_results, check_provenance, has_result, read_results, remove_results
from krrst.teacher import CHECKPOINT_FILE as TEACHER_CHECKPOINT
from krrst.teacher import (
    HEALTH_FILE,
    TEACHER_FILE,
    TeacherConfig,
    build_backbone,
    knn_accuracy,
    load_teacher,
    train_teacher,
)

SAMPLE_ROOT = "@sample"

# What `run.methods` names, by kind: "distilled" (a stage of the run learns the set), "subset" (real source images
# picked by a baseline, with the teacher's targets), "reference" (no set: a fresh network, or the teacher itself).
METHODS: Registry[str] = Registry("method")
METHODS.register("krr-st", "distilled")
METHODS.register("mkdt", "distilled")
METHODS.register("random", "subset")
METHODS.register("kmeans", "subset")
METHODS.register("high-loss", "subset")
METHODS.register("none", "reference")
METHODS.register("full-ssl", "reference")
SUBSET_METHODS = METHODS.select(lambda kind: kind == "subset")  # also distill.init's choices
DEFAULT_METHODS = ("krr-st", "random", "kmeans", "none", "full-ssl")

# The protocols a row is evaluated with (`run.protocols`, `krrst evaluate --protocol`), optionally @P% of the labels.
BASE_PROTOCOLS: Registry[str] = Registry("protocol")
BASE_PROTOCOLS.register("finetune", "fine-tune every weight on the target")
BASE_PROTOCOLS.register("linear", "a linear classifier on frozen features")
BASE_PROTOCOLS.register("kd", "target-data-free knowledge distillation of a target classifier (no label fraction)")

# The two published evaluation protocols, as overrides (`krrst run/evaluate --protocol NAME`); `--set` wins over them.
PROTOCOL_SUITES: Registry[dict[str, Any]] = Registry("protocol")
# KRR-ST (Lee et al., ICLR 2024): 1,000 pre-training epochs, then full fine-tuning.
PROTOCOL_SUITES.register("krrst", {"pretrain.epochs": 1000, "run.protocols": ("finetune",)})
# MKDT (Joshi et al., ICLR 2025): 20 pre-training epochs, then a frozen-feature linear probe fitted with L-BFGS on
# 1 / 5 / 10 / 50% of the labels.
PROTOCOL_SUITES.register("mkdt", {"pretrain.epochs": 20, "linear.solver": "lbfgs",
                                  "run.protocols": ("linear@1%", "linear@5%", "linear@10%", "linear@50%")})


def sample_path() -> Path:
    """The real CIFAR-10 sample shipped in the package (see scripts/make_demo_sample.py)."""
    return Path(__file__).resolve().parent / "assets" / "cifar10-sample.zip"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the pipeline runs: the data, the methods, the protocols and the seeds.

    Paths are relative to `--root`; `@sample` is the CIFAR-10 sample shipped in the package.
    """

    # the source dataset's name (`krrst datasets`); its labels are never read
    source: str = "cifar100"
    # its folder, archive or list under --root (@sample: the package's CIFAR-10 sample)
    source_root: str = "."
    # the split of the source that is distilled
    source_split: str = "train"
    # keep the first K images of each source class (quick runs); None: every image
    source_per_class: int | None = None
    # source images held out of distillation for its validation signal and the teacher's health (0: none)
    heldout_images: int = 1000
    # the side every source and target image is brought to (run.resize)
    image_size: int = 32
    # the labelled target datasets: `name` (read from --root) or `name=path`
    targets: tuple[str, ...] = ("cifar100", "cifar10", *FINE_GRAINED)
    # keep the first K training images of each target class (few-shot or quick runs); None: every image
    target_train_per_class: int | None = None
    # the same for the target's test split
    target_test_per_class: int | None = None
    # fine-tuning iterations on the fine-grained targets (the paper's 5,000; finetune.iterations for the others)
    finegrained_iterations: int = 5000
    # the sets evaluated (METHODS): distilled, subset baselines, and the references none / full-ssl
    methods: tuple[str, ...] = DEFAULT_METHODS
    # finetune, linear, either @P% of the labels (e.g. linear@1%), or kd (target-data-free KD, `KDConfig`)
    protocols: tuple[str, ...] = ("finetune",)
    # the evaluation architectures (`krrst models`)
    archs: tuple[str, ...] = ("convnet3",)
    # narrower ConvNet evaluation networks for CPU runs, e.g. (32, 64, 128); empty: the architecture's own
    eval_widths: tuple[int, ...] = ()
    # evaluation seeds, from `seed` on, paired across methods (same initialisation, label subset, batch order)
    seeds: int = 3
    # the first evaluation seed, and the seed of the held-out draw
    seed: int = 0
    # a teacher file under --root, or "pretrained" (the library's weights of teacher_arch); empty: train one
    teacher_path: str = ""
    # the teacher file's architecture when the file does not say: a registered model, torchvision:NAME, timm:NAME
    teacher_arch: str = ""
    # the input size the teacher was trained at (0: its own; torchvision/timm declare theirs, e.g. 224)
    teacher_input_size: int = 0
    # fetch a missing cifar10 / cifar100 / aircraft / flowers with torchvision (the data read is the same either way)
    download: bool = False
    # how images of another size reach image_size: crop (short side, then the centre) or stretch (krrst.data)
    resize: str = "crop"
    # skip image files that cannot be decoded (reported with a count) instead of stopping at the first
    skip_corrupt: bool = False
    # the test share of a labelled folder / HF dataset with no test split (seeded, stratified; in the target's name)
    test_fraction: float = 0.2
    # keep what finished stages wrote only to resume (teacher/distill/mkdt checkpoints, MKDT's expert trajectories);
    # by default it is removed once the stage's output is written (done.json marks the stage finished without it)
    keep_checkpoints: bool = False
    # a sentence shown at the top of report.html and results.md: what the run is for, or what it can and cannot show
    note: str = ""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One config dataclass per stage; `--set stage.field=value` reaches any field."""

    run: RunConfig = RunConfig()  # the data, methods, protocols and seeds
    teacher: TeacherConfig = TeacherConfig()  # the SSL teacher, when the run trains one
    distill: DistillConfig = DistillConfig()  # KRR-ST (also sizes and seeds the subset baselines)
    mkdt: MKDTConfig = MKDTConfig()  # the MKDT comparator, when run.methods has mkdt
    pretrain: PretrainConfig = PretrainConfig()  # pre-training on each set
    finetune: FinetuneConfig = FinetuneConfig()  # protocol finetune
    linear: LinearProbeConfig = LinearProbeConfig()  # protocol linear
    kd: KDConfig = KDConfig()  # protocol kd

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {stage: _jsonable(config_to_dict(getattr(self, stage))) for stage in STAGE_CONFIGS}


# stage name -> its config class, in PipelineConfig's order
STAGE_CONFIGS: dict[str, type] = {field.name: type(field.default) for field in dataclasses.fields(PipelineConfig)}


# ----------------------------------------------------------------------------- presets

# Short CPU teachers: the recipe's LARS at lr 0.3 scores below a random network within minutes; AdamW 1e-3 does
# not (k-NN on CIFAR-10 after 10 minutes: 60.9% against 48.0% for the random init; benchmarks/bench_teacher.py).
_CPU_TEACHER = {"arch": "convnet3", "convnet_widths": (32, 64, 128), "optimizer": "adamw", "lr": 1e-3,
                "weight_decay": 1e-4, "warmup_epochs": 0.5, "projector_dims": (1024, 1024, 1024), "batch_size": 128}

# A preset: overrides per stage on top of the defaults (the paper's CIFAR-100 setting); `--set` wins over them.
PRESETS: Registry[dict[str, dict[str, Any]]] = Registry("preset")
PRESETS.register("cifar100", {})
# The 64 x 64 sources, with the public code's distillation settings for them.
PRESETS.register("tinyimagenet", {
    "run": {"source": "tinyimagenet", "image_size": 64, "archs": ("convnet4",),
            "targets": ("tinyimagenet", "cifar10", *FINE_GRAINED)},
    "distill": {"num_images": 2000, "arch": "convnet4", "widths": (64, 128, 256, 512), "image_size": 64,
                "image_lr": 1e-5, "target_lr": 1e-5},
})
PRESETS.register("imagenet64", {
    "run": {"source": "imagenet64", "image_size": 64, "archs": ("convnet4",),
            "targets": ("cifar10", "cifar100", *FINE_GRAINED)},
    "distill": {"num_images": 1000, "arch": "convnet4", "widths": (64, 128, 256, 512), "image_size": 64,
                "image_lr": 1e-5, "target_lr": 1e-5},
})
# What the demo can and cannot show, on its page: measured over distillation and evaluation seeds (docs/results.md).
DEMO_NOTE = ("At this scale (100 images distilled in 200 steps by narrow networks on a CPU) KRR-ST is level with the "
             "random real images it starts from, over several distillations: the demo shows every stage working, not "
             "the method's gain; the cpu-mini preset is the CPU measurement.")
PRESETS.register("demo", {
    "run": {"note": DEMO_NOTE, "source": "imagefolder", "source_root": SAMPLE_ROOT, "heldout_images": 200,
            "targets": (f"imagefolder={SAMPLE_ROOT}",), "target_train_per_class": 100,
            "methods": ("krr-st", "random", "kmeans", "none"), "protocols": ("finetune", "linear"),
            "eval_widths": (32, 64, 128), "seeds": 3},
    "teacher": {**_CPU_TEACHER, "steps": 250, "checkpoint_every": 50},
    "distill": {"num_images": 100, "widths": (32, 64, 128), "steps": 200, "batch_size": 128, "image_lr": 2.5e-3,
                "target_lr": 1e-2, "pool_size": 4, "pool_steps": 20, "log_every": 10, "checkpoint_every": 50,
                "validate_every": 25, "validation_models": 2, "validation_images": 200},
    # used when run.methods includes mkdt: a CPU-sized MKDT (the authors' defaults take GPU-days)
    "mkdt": {"num_images": 100, "widths": (32, 64, 128), "experts": 3, "expert_epochs": 5, "syn_steps": 10,
             "max_start_epoch": 3, "steps": 50, "batch_syn": 100, "log_every": 5},
    "pretrain": {"epochs": 100, "batch_size": 128},
    "finetune": {"iterations": 100, "batch_size": 128},
    "linear": {"iterations": 300, "batch_size": 256},
    # used with --protocol kd: a narrow ConvNet teacher (run.eval_widths) and shorter schedules on CPU
    "kd": {"epochs": 200, "teacher_arch": "convnet3", "teacher_epochs": 30},
})
# The real-data CPU protocol: CIFAR-10 train images without labels as the source, CIFAR-10 labels
# (1%, 10%, 100%) as the target, the full 10,000 test images, 3 paired seeds; about 55 minutes on one core.
PRESETS.register("cpu-mini", {
    "run": {"source": "imagefolder", "source_root": "cifar10-jpeg.zip", "heldout_images": 1000,
            "targets": ("imagefolder=cifar10-jpeg.zip",),
            "methods": ("krr-st", "random", "kmeans", "none", "full-ssl"),
            "protocols": ("linear@1%", "linear@10%", "finetune@1%", "finetune@10%", "finetune"),
            "eval_widths": (32, 64, 128), "seeds": 3},
    "teacher": {**_CPU_TEACHER, "steps": 3000, "checkpoint_every": 250},
    # final_targets=teacher and 600 pre-training epochs: the follow-ups in docs/results.md (the learned targets
    # drift from the teacher's and cost accuracy at this scale, with a pooled teacher, a tied lr and 4x the steps as
    # well; 120 epochs are only 120 SGD steps on 200 images). The flattened teacher: a pooled one's pre-training made
    # fine-tuning worse than none. One lr for X_s and Y_s, as the paper's one AdamW group: 4x for Y_s cost the
    # learned targets 0.46 points on linear@1% and gained nothing with the teacher's.
    "distill": {"num_images": 200, "widths": (32, 64, 128), "steps": 500, "batch_size": 256, "image_lr": 2.5e-3,
                "target_lr": 2.5e-3, "pool_size": 5, "pool_steps": 50, "log_every": 10, "checkpoint_every": 50,
                "validate_every": 50, "validation_models": 2, "validation_images": 1000, "final_targets": "teacher"},
    "mkdt": {"num_images": 200, "widths": (32, 64, 128), "experts": 2, "expert_epochs": 3, "syn_steps": 10,
             "max_start_epoch": 2, "steps": 100, "batch_syn": 200, "log_every": 10},
    "pretrain": {"epochs": 600, "batch_size": 256},
    "finetune": {"iterations": 100, "batch_size": 64},
    "linear": {"iterations": 1000, "batch_size": 512},
    "kd": {"epochs": 300, "teacher_arch": "convnet3", "teacher_epochs": 5},
})
# The authors' public code on CIFAR-100 (github.com/db-Lee/selfsup_dd), its quirks included; the other presets
# follow the paper as written.
PRESETS.register("authors", {
    # their teacher is a ResNet-18 whose stem convolution has padding 2 (the usual CIFAR stem has 1)
    "teacher": {"arch": "resnet18_pad2"},
    # their pool never resets a model's step counter: past T steps every pick is a freshly initialised network
    "distill": {"pool_counter_reset": False},
    # their fine-tuning batch; the paper's protocol says 256
    "finetune": {"batch_size": 128},
})


def all_keys() -> list[str]:
    """Every `stage.field` key that `--set` and `--config` reach."""
    return [f"{stage}.{field.name}" for stage, cls in STAGE_CONFIGS.items() for field in dataclasses.fields(cls)]


def resolve_config(preset: str = "cifar100", overrides: Mapping[str, Any] | None = None,
                   protocol: str | None = None) -> PipelineConfig:
    """The preset's config, then the `protocol` suite's overrides (`PROTOCOL_SUITES`), then `overrides`.

    `overrides` are `{"distill.steps": "100", ...}`. Unknown presets, protocol
    suites, stages, keys and ill-typed values are one-line `KrrstError`s.
    """
    preset_values = PRESETS.get(preset)
    if protocol is not None:
        overrides = {**PROTOCOL_SUITES.get(protocol, what="--protocol"), **(overrides or {})}
    per_stage: dict[str, dict[str, Any]] = {stage: dict(values) for stage, values in preset_values.items()}
    for key, value in (overrides or {}).items():
        stage, dot, field = key.partition(".")
        if not dot or stage not in STAGE_CONFIGS:
            raise KrrstError(f"--set key {key!r} must be stage.field with stage one of {', '.join(STAGE_CONFIGS)} "
                             f"(e.g. distill.steps=100){did_you_mean_key(key, all_keys())}")
        per_stage.setdefault(stage, {})[field] = value
    config = PipelineConfig(**{stage: apply_overrides(cls(), per_stage.get(stage, {}), stage)
                               for stage, cls in STAGE_CONFIGS.items()})
    _check_config(config)
    return config


def preset_config(name: str) -> dict[str, dict[str, Any]]:
    """The preset's resolved config as plain values, stage by stage: what the report diffs a run's config against."""
    return resolve_config(name).to_dict()


def _check_config(config: PipelineConfig) -> None:
    """The names and sizes the run will use, checked before any stage starts (not hours into one)."""
    run = config.run
    for method in run.methods:
        if method not in METHODS:
            raise KrrstError(f"run.methods: {METHODS.unknown(method)}")
    for protocol in run.protocols:
        parse_protocol(protocol)
    if run.seeds < 1:
        raise KrrstError(f"run.seeds must be at least 1, got {run.seeds}")
    if not run.targets:
        raise KrrstError("run.targets is empty; name at least one target dataset")
    named = [("teacher.arch", config.teacher.arch), ("distill.arch", config.distill.arch),
             ("mkdt.arch", config.mkdt.arch), *(("run.archs", arch) for arch in run.archs)]
    if config.kd.teacher_arch and not (config.kd.teacher_path and is_library_arch(config.kd.teacher_arch)):
        named.append(("kd.teacher_arch", config.kd.teacher_arch))  # a library classifier comes from a file
    for option, arch in named:
        if arch not in MODELS:
            raise KrrstError(f"{option}: {MODELS.unknown(arch)}")
    # A kd teacher file is one target's classifier: a run of several targets would apply it to all.
    if _wants_kd(run) and config.kd.teacher_path and len(run.targets) > 1:
        raise KrrstError(f"kd.teacher_path (--kd-teacher) is the classifier of one target, but run.targets names "
                         f"{len(run.targets)} ({', '.join(run.targets)}); keep one target, or leave "
                         "kd.teacher_path empty to have krrst train one per target")
    for method, stage, size, why in (("mkdt", "mkdt", config.mkdt.image_size, ""),
                                     ("krr-st", "distill", config.distill.image_size,
                                      " (the size the source is loaded at)")):
        if method in run.methods and size != run.image_size:
            raise KrrstError(f"{stage}.image_size={size} differs from run.image_size={run.image_size}{why}; "
                             "set both to the same value")


def _wants_kd(run: RunConfig) -> bool:
    return any(parse_protocol(protocol)[0] == "kd" for protocol in run.protocols)


def parse_protocol(protocol: str) -> tuple[str, float]:
    """`"linear@10%"` -> `("linear", 0.1)`; `"finetune"` -> `("finetune", 1.0)`; `"kd"` -> `("kd", 1.0)`.

    `kd` takes no label fraction: it uses no target label.
    """
    name, at, percent = protocol.partition("@")
    if name not in BASE_PROTOCOLS:
        raise KrrstError(f"protocol {protocol!r} is not valid; expected finetune or linear, optionally @P% (e.g. "
                         "linear@1%), or kd")
    if not at:
        return name, 1.0
    if name == "kd":
        raise KrrstError(f"protocol {protocol!r}: kd (knowledge distillation) uses no target labels, so it takes no "
                         "label fraction; write kd")
    try:
        fraction = float(percent.rstrip("%")) / 100
    except ValueError:
        raise KrrstError(f"protocol {protocol!r}: {percent!r} is not a percentage (e.g. linear@10%)") from None
    if not 0 < fraction <= 1:
        raise KrrstError(f"protocol {protocol!r}: the label fraction must be in (0%, 100%]")
    return name, fraction


# ----------------------------------------------------------------------------- run directory


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(parts), sort_keys=True).encode()).hexdigest()[:16]


def _without(config: Any, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a stage's result depends on: the config's fields that differ from their defaults, minus `fields`.

    `fields` are those that do not change the result (logging, checkpoint cadence). Leaving out fields at their default
    keeps a fingerprint stable when a later version adds a field (at a default that keeps the old behaviour), so
    finished stages of older run directories are not re-run.
    """
    defaults = config_to_dict(type(config)())
    return {key: value for key, value in config_to_dict(config).items()
            if key not in fields and _jsonable(value) != _jsonable(defaults[key])}


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`stage.field` keys whose values differ.

    A field missing from `old` (added since) counts as its default; a stage missing from `old` (added since) counts as
    no change: that version could not have run it, and the stage fingerprints decide what runs.
    """
    keys = []
    for stage in sorted(old):
        defaults = _jsonable(config_to_dict(STAGE_CONFIGS[stage]())) if stage in STAGE_CONFIGS else {}
        old_stage, new_stage = {**defaults, **old[stage]}, new.get(stage, {})
        for field in sorted(set(old_stage) | set(new_stage)):
            if old_stage.get(field) != new_stage.get(field):
                keys.append(f"{stage}.{field}")
    return keys


STAGE_DIRS = ("teacher", "distill", "mkdt", "baselines", "eval")
# Per stage: its final output, and what it writes only to resume itself (dead weight once that output exists:
# a changed config changes the stage's fingerprint, which clears the folder, so nothing would resume from them).
STAGE_CHECKPOINTS = {
    "teacher": (TEACHER_FILE, (TEACHER_CHECKPOINT,)),
    "distill": (DISTILLED_NAME, (DISTILL_CHECKPOINT,)),
    "mkdt": (DISTILLED_NAME, (MKDT_CHECKPOINT, TRAJECTORIES_NAME)),
}
# `stage.field` keys that decide what a run folder keeps, never a result: changing one needs no --force.
# `run.download` only says whether a missing dataset may be fetched: the data read is the same either way.
HOUSEKEEPING_KEYS = ("run.keep_checkpoints", "run.download", "run.note")


def _run_started(out_dir: Path) -> bool:
    """Whether anything was computed in `out_dir`: a run that stopped before (a wrong data path, a
    mistyped option) has nothing a changed config could mix with, so the corrected one is taken."""
    if any((out_dir / name).exists() for name in ("results.csv", "sets.json")):
        return True
    return any(path.name != "fingerprint.json" for name in STAGE_DIRS if (out_dir / name).is_dir()
               for path in (out_dir / name).iterdir())


REPORT_FILES = ("results.csv", "results.json", "results.md", "results.png", "report.html")


def check_output_paths(out_dir: str | Path, option: str = "--out") -> Path:
    """Refuse an output folder that cannot take a run's files, in one line naming the path, before any work.

    An existing regular file, a path inside a file, a folder that is not writable (`io.check_output_dir`), or a folder
    where a results or report file should go.
    """
    out = check_output_dir(out_dir, option)
    for name in REPORT_FILES:
        if (out / name).is_dir():
            raise KrrstError(f"{option} {out}: {out / name} is a folder; the results and report are files there")
    return out


def prepare_run_dir(out_dir: Path, config: PipelineConfig, preset: str, force: bool) -> None:
    """Create the run directory or check that it holds a run of this config (else refuse unless `force`)."""
    resolved = {"preset": preset, **config.to_dict()}
    config_path = out_dir / "config.json"
    if config_path.exists():
        previous = read_json(config_path, "run config")
        differing = [key for key in _diff_keys({k: v for k, v in previous.items() if k != "preset"}, config.to_dict())
                     if key not in HOUSEKEEPING_KEYS]
        if differing and _run_started(out_dir) and not force:
            shown = ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
            raise KrrstError(f"run directory {out_dir} holds a run of another config (differs in {shown}); "
                             "pass --force to re-run the stages that changed, or choose another --out")
    elif out_dir.exists() and any(path.name != LOCK_NAME for path in out_dir.iterdir()):
        raise KrrstError(f"--out {out_dir} exists and is not a krrst run directory (no config.json); choose another "
                         "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(config_path, resolved)


def file_identity(path: str | Path | None) -> list[Any] | None:
    """Path, size and modification time of a file: what says it is still the same file."""
    if not path:
        return None
    path = Path(path)
    stat = path.stat() if path.exists() else None
    return [str(path.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]


def set_provenance(path: str | Path) -> str:
    """`sha256:<first 16 hex digits>` of a file's bytes (read in 1 MiB chunks): the provenance of its rows."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def baseline_provenance(baseline: str, **options: Any) -> str:
    """`baseline:<fingerprint>` of what defines a baseline set (its kind, size, seed, source, teacher)."""
    return "baseline:" + _fingerprint(baseline, options)


def claim_evaluation(out_dir: str | Path, method: str, identity: Mapping[str, Any], provenance: str = "") -> None:
    """Record what `method`'s rows in `out_dir` come from; refuse rows of another set or config there.

    `provenance` (`set_provenance`, `baseline_provenance`) is checked first: rows of `method` from another set are
    refused naming both provenances. `identity` maps a name (an option, e.g. "--target") to what it was. A claim with no
    rows and no pre-trained network of `method` behind it (a start that failed early, e.g. on a mistyped option)
    protects nothing and is replaced.
    """
    out_dir = Path(out_dir)
    if provenance:
        check_provenance(out_dir, {method: provenance})
    path = out_dir / "eval" / f"{method}.fingerprint.json"
    fingerprint = _fingerprint(list(identity.values()))  # the values alone: claims of older versions still match
    previous = read_json(path) if path.exists() else {}
    if previous and previous.get("fingerprint") != fingerprint:
        has_rows = any(row["method"] == method for row in read_results(out_dir))
        network_name = re.compile(rf"{re.escape(method)}-[^-]+-seed\d+\.safetensors")
        pretrained = out_dir / "eval" / "pretrained"
        has_networks = pretrained.is_dir() and any(network_name.fullmatch(p.name) for p in pretrained.iterdir())
        if has_rows or has_networks:
            old = previous.get("identity", {})
            differing = [name for name in identity if _jsonable(old.get(name)) != _jsonable(identity[name])]
            raise KrrstError(
                f"{out_dir} already holds '{method}' results of another set or config"
                + (f" (differs in {', '.join(differing)})" if old and differing else "")
                + "; choose another --out (or delete that run directory) to evaluate this one"
            )
    write_json(path, {"fingerprint": fingerprint, "identity": _jsonable(dict(identity))})


def _recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint a `done.json` or `fingerprint.json` holds; None when the file is absent or unreadable."""
    try:
        return read_json(marker).get("fingerprint") if marker.exists() else None
    except KrrstError:
        return None


def _stage_done(stage_dir: Path, fingerprint: str) -> bool:
    return _recorded_fingerprint(stage_dir / "done.json") == fingerprint


def _mark_done(stage_dir: Path, fingerprint: str) -> None:
    write_json(stage_dir / "done.json", {"fingerprint": fingerprint})


def _drop_checkpoints(stage_dir: Path, log) -> None:
    """Remove the resume-only files of a finished stage (`STAGE_CHECKPOINTS`), if its final output exists."""
    final, resume_only = STAGE_CHECKPOINTS[stage_dir.name]
    if not (stage_dir / final).is_file():
        return
    freed = 0
    for path in (stage_dir / name for name in resume_only):
        if path.is_file() and not path.is_symlink():
            freed += path.stat().st_size
            path.unlink()
    if freed:
        log(f"[{stage_dir.name}] removed its checkpoints ({format_bytes(freed)}; --set run.keep_checkpoints=true "
            "keeps them)")


def _start_stage(stage_dir: Path, fingerprint: str) -> None:
    """Clear outputs written under another fingerprint, so nothing stale is resumed."""
    marker = stage_dir / "fingerprint.json"
    if marker.exists() and _recorded_fingerprint(marker) != fingerprint:
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})


def _add_timing(path: Path, stage: str, seconds: float) -> None:
    timings = read_json(path) if path.exists() else {}
    timings[stage] = round(timings.get(stage, 0.0) + seconds, 2)
    write_json(path, timings)


# ----------------------------------------------------------------------------- data


def dataset_path(root: Path, path: str) -> Path:
    """Resolve a dataset path of a config: `@sample`, absolute, or relative to `--root`."""
    if path == SAMPLE_ROOT:
        return sample_path()
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(root).expanduser() / candidate


def _existing_dataset_path(root: Path, path: str, option: str, download: bool, reader: str = "") -> Path | str:
    """`dataset_path`, or a one-line error naming the config option and `--root` when nothing is there.

    For the `hf` reader a path that is not there is a Hugging Face hub name (`user/dataset`), passed on as it is.
    """
    location = dataset_path(root, path)
    if reader == "hf" and not location.exists():
        return path
    if not location.exists() and not download:
        raise KrrstError(
            f"{option}: {location} does not exist"
            + ("" if Path(path).expanduser().is_absolute() else f" (the config's {path!r} under --root {str(root)!r}; "
               "pass --root DIR for the folder that holds it)")
            + "; for cifar10/cifar100/aircraft/flowers --set run.download=true fetches the dataset"
        )
    return location


def parse_target(spec: str) -> tuple[str, str]:
    """`"cifar10"` -> `("cifar10", ".")`; `"imagefolder=cifar10-jpeg.zip"` -> `("imagefolder", "cifar10-jpeg.zip")`."""
    name, eq, path = spec.partition("=")
    return name.strip(), (path.strip() if eq else ".")


def load_source(run: RunConfig, root: Path):
    """The unlabelled source split and `run.heldout_images` held-out images (never distilled on)."""
    location = _existing_dataset_path(root, run.source_root, "run.source_root", run.download, run.source)
    source = load_images(run.source, location, run.source_split, image_size=run.image_size, download=run.download,
                         max_per_class=run.source_per_class, resize=run.resize, skip_corrupt=run.skip_corrupt,
                         test_fraction=run.test_fraction)
    source = dataclasses.replace(source, labels=None)  # the source is used without labels
    return split_heldout(source, run.heldout_images, run.seed)


def split_heldout(images, count: int, seed: int):
    """`(rest, heldout)`: `count` images drawn by `seed` are held out (never distilled on); `count=0` holds none."""
    if count <= 0:
        return images, None
    if count >= len(images):
        raise KrrstError(f"holding out {count} images (--heldout, run.heldout_images) leaves none to distil (the "
                         f"source has {len(images)}); hold out fewer, or 0 for no validation signal")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[count:].sort().values), images.subset(order[:count])


def load_target(spec: str, run: RunConfig, root: Path):
    """`(train, test)` labelled splits of one target, resized to the source resolution."""
    name, path = parse_target(spec)
    location = _existing_dataset_path(root, path, f"run.targets entry {spec!r}", run.download, name)
    common = {"image_size": run.image_size, "download": run.download, "resize": run.resize,
              "skip_corrupt": run.skip_corrupt, "test_fraction": run.test_fraction}
    train = load_images(name, location, "train", max_per_class=run.target_train_per_class, **common)
    test = load_images(name, location, evaluation_split(name), max_per_class=run.target_test_per_class, **common)
    if train.labels is None or test.labels is None:
        raise KrrstError(f"target {spec!r} has no labels; a target dataset must be labelled")
    return train, test


# ----------------------------------------------------------------------------- stages


def eval_overrides(arch: str, eval_widths: tuple[int, ...], image_size: int | None) -> dict[str, Any]:
    """Options for a fresh evaluation network: ConvNet widths, and the resolution ConvNets are built for."""
    options = model_options(arch)
    wanted = {"widths": tuple(eval_widths), "image_size": image_size}
    return {key: value for key, value in wanted.items() if value and key in options}


def run(config: PipelineConfig, out_dir: str | Path, *, root: str | Path = ".", preset: str = "custom",
        force: bool = False, device: str | torch.device | None = None, progress: bool = True, log=print,
        distributed: DistributedContext | None = None) -> list[dict[str, Any]]:
    """Run every stage of `config` into `out_dir`, skipping what is already done; returns the results rows.

    Layout of `out_dir`: `config.json`, `env.json`, `timings.json`, `teacher/`, `distill/`, `mkdt/`, `baselines/`,
    `eval/`, `results.{csv,json,md,png}` and `report.html`.

    Under `torchrun` (`distributed`, default: the current process group) the teacher and the distillation run
    data-parallel over the ranks, the baselines and MKDT run alike on every rank, the evaluation jobs (method x arch x
    seed) are spread over the ranks, and rank 0 alone writes files; the run directory must be on a file system every
    rank sees. A second process started on the same `out_dir` is refused (`io.exclusive_lock`).
    """
    context = distributed or current_context(resolve_device(device))
    check_output_paths(out_dir)
    out_dir, log = Path(out_dir), context.quiet_elsewhere(log)
    with context.lock(out_dir):  # held by rank 0 from here on: each stage in turn, each skipped when done
        state = _Run(config, out_dir, Path(root), context, context.only_on_main(progress), log)
        run_on_main(lambda: prepare_run_dir(out_dir, config, preset, force))
        context.on_main(lambda: write_json(out_dir / "env.json",
                                           capture_env(seed=config.run.seed, device=context.device)))
        _load_data(state)
        teacher, teacher_fp = _teacher_stage(state)
        distill_fp, mkdt_fp = _distill_stages(state, teacher, teacher_fp)
        baselines_fp = _baselines_stage(state, teacher, teacher_fp)
        sets = _load_sets(state)
        if "full-ssl" in config.run.methods:
            sets["full-ssl"] = teacher
        # Each row names the stage fingerprint that built its set, as `krrst evaluate` names a set file's hash.
        provenance = {"krr-st": f"distill:{distill_fp}", "mkdt": f"mkdt:{mkdt_fp}",
                      "full-ssl": f"teacher:{teacher_fp}", "none": baseline_provenance("none"),
                      **{method: f"baselines:{baselines_fp}" for method in SUBSET_METHODS}}
        _evaluate_stage(state, sets, provenance, (distill_fp, baselines_fp, mkdt_fp))

        def report() -> None:
            write_report(out_dir, preset_config=preset_config)
            log(report_text(out_dir))

        context.on_main(report)
        return run_on_main(lambda: read_results(out_dir))


@dataclasses.dataclass
class _Run:
    """What every stage of one run shares: the config, the folders, the process group, the loaded data."""

    config: PipelineConfig
    out_dir: Path
    root: Path
    context: DistributedContext
    progress: bool  # progress bars (rank 0 only)
    log: Any  # print-like (a no-op on other ranks)
    source: Any = None  # the unlabelled source split, held-out images removed (ImageSet)
    heldout: Any = None  # `run.heldout_images` images never distilled on (ImageSet or None)
    targets: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # spec -> (train, test)
    source_fp: str = ""  # what the source images depend on

    def stage(self, name: str, fingerprint: str, wanted: bool, work: Callable[[Path], Any]) -> Path:
        """`work(out_dir/name)`, timed, unless not `wanted` or done under `fingerprint`; returns the stage's folder.

        `done.json` marks it finished; its checkpoints are then removed (unless `run.keep_checkpoints`).
        """
        stage_dir = self.out_dir / name
        if wanted and not run_on_main(lambda: _stage_done(stage_dir, fingerprint)):
            run_on_main(lambda: _start_stage(stage_dir, fingerprint))
            with self.timed(name):
                work(stage_dir)
            run_on_main(lambda: _mark_done(stage_dir, fingerprint))  # also a barrier: rank 0's files are written
        # after that barrier (no rank reads them any more); also for a stage found finished, so a run stopped
        # between done.json and this, or one kept before, ends up as the setting says
        if not self.config.run.keep_checkpoints:
            self.context.on_main(lambda: _stage_done(stage_dir, fingerprint) and _drop_checkpoints(stage_dir, self.log))
        return stage_dir

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the stage's wall time to `timings.json` (accumulated across resumes; written by rank 0)."""
        started = time.perf_counter()
        self.log(f"[{stage}] started")
        finished = False
        try:
            yield
            finished = True
        finally:
            elapsed = time.perf_counter() - started
            self.context.on_main(lambda: _add_timing(self.out_dir / "timings.json", stage, elapsed))
            # an interrupted stage must not read as done: a re-run resumes it
            if finished:
                self.log(f"[{stage}] finished in {elapsed:.1f} s")
            else:
                where = stopped_loops(clear=False)  # the CLI reports them too
                self.log(f"[{stage}] stopped after {elapsed:.1f} s" + (f" ({where[-1]})" if where else "")
                         + "; re-running the same command resumes it")


def _load_data(run: _Run) -> None:
    """The source (and its held-out images) and every target, loaded once for every stage."""
    run_config = run.config.run
    run.source_fp = _fingerprint({k: v for k, v in config_to_dict(run_config).items()
                                  if k.startswith("source") or k in ("image_size", "heldout_images", "seed")})
    run.source, run.heldout = load_source(run_config, run.root)
    run.targets = {spec: load_target(spec, run_config, run.root) for spec in run_config.targets}
    heldout = len(run.heldout) if run.heldout is not None else 0
    run.log(f"source {run.source.name}: {len(run.source)} images ({heldout} held out); "
            + "; ".join(f"target {train.name}: {len(train)} train / {len(test)} test"
                        for train, test in run.targets.values()))


def _teacher_stage(run: _Run) -> tuple[torch.nn.Module, str]:
    """`(teacher, fingerprint)`: the library's weights, a file (`run.teacher_path`), or one trained in `teacher/`."""
    run_config, device = run.config.run, run.context.device
    if run_config.teacher_path == "pretrained":  # the library's own weights of run.teacher_arch (online)
        teacher = load_teacher(None, arch=run_config.teacher_arch or None, device=device,
                               input_size=run_config.teacher_input_size or None)
        teacher_fp = _fingerprint("pretrained", run_config.teacher_arch, run_config.teacher_input_size)
    elif run_config.teacher_path:
        teacher_file = dataset_path(run.root, run_config.teacher_path)
        teacher = load_teacher(teacher_file, arch=run_config.teacher_arch or None, device=device,
                               input_size=run_config.teacher_input_size or None)
        # The file's size and modification time: replacing the teacher invalidates what was distilled from it.
        teacher_fp = _fingerprint(str(teacher_file), run_config.teacher_arch, teacher_file.stat().st_size,
                                  teacher_file.stat().st_mtime_ns, *([run_config.teacher_input_size]
                                                                     if run_config.teacher_input_size else []))
    else:
        teacher_fp = _fingerprint(run.source_fp, _without(run.config.teacher, ("checkpoint_every", "log_every")))
        labelled = next(iter(run.targets.values()))  # (train, test) of the first target: the teacher's k-NN check
        teacher_dir = run.stage("teacher", teacher_fp, True, lambda stage_dir: train_teacher(
            run.source, run.config.teacher, out_dir=stage_dir, resume=True, device=device, heldout=run.heldout,
            labelled=labelled, progress=run.progress, distributed=run.context))
        teacher = load_teacher(teacher_dir / TEACHER_FILE, device=device)
        run.context.on_main(lambda: _add_random_network_knn(teacher_dir / HEALTH_FILE, run.config.teacher,
                                                            run_config.image_size, labelled, device))
    return teacher.to(device).eval(), teacher_fp


def _distill_stages(run: _Run, teacher: torch.nn.Module, teacher_fp: str) -> tuple[str, str]:
    """KRR-ST into `distill/` and the MKDT comparator into `mkdt/`, each when `run.methods` has it; returns the two
    stages' fingerprints."""
    config, methods, device = run.config, run.config.run.methods, run.context.device
    distill_fp = _fingerprint(teacher_fp, run.source_fp,
                              _without(config.distill, RESUMABLE_DISTILL_CHANGES + unused_fields(config.distill)))
    run.stage("distill", distill_fp, "krr-st" in methods, lambda stage_dir: distill(
        run.source, teacher, config.distill, out_dir=stage_dir, resume=True, device=device, heldout=run.heldout,
        progress=run.progress, distributed=run.context))
    mkdt_fp = _fingerprint(teacher_fp, run.source_fp, _without(config.mkdt, ("log_every", "checkpoint_every")))
    # not data-parallel: every rank computes the same set from the same files (resuming alike), rank 0 writes
    run.stage("mkdt", mkdt_fp, "mkdt" in methods, lambda stage_dir: mkdt_distill(
        run.source, teacher, config.mkdt, out_dir=stage_dir, resume=True, distributed=run.context, device=device,
        progress=run.progress))
    return distill_fp, mkdt_fp


def _subset(method: str, source, teacher: torch.nn.Module, config: DistillConfig, device: torch.device,
            progress: bool):
    """The `DistilledSet` of one subset baseline, sized and seeded as the distillation (`config`)."""
    if method == "random":
        # The same real images KRR-ST started from, with the teacher's targets: the pair differs only in what
        # distillation did to them.
        return random_subset_of(source, initial_indices(len(source), config), teacher, device=device)
    if method == "kmeans":
        return kmeans_coreset(source, config.num_images, teacher, seed=config.seed, device=device, progress=progress)
    assert method == "high-loss", method
    # MKDT's initialisation as a subset baseline: students of the distillation architecture, trained briefly to
    # regress the teacher, score every source image.
    return high_loss_subset(source, teacher, config.num_images, seed=config.seed, arch=config.arch,
                            arch_options=network_options(config), device=device, progress=progress)


def _baselines_stage(run: _Run, teacher: torch.nn.Module, teacher_fp: str) -> str:
    """The subset baselines `run.methods` asks for, into `baselines/<method>.safetensors`; returns the fingerprint."""
    config = run.config.distill
    baselines_dir = run.out_dir / "baselines"
    baselines_fp = _fingerprint(teacher_fp, run.source_fp, config.num_images, config.seed, config.arch, config.widths)
    wanted = [method for method in SUBSET_METHODS if method in run.config.run.methods]  # in the order they are built
    missing = []
    if wanted:  # clears sets built for another teacher, source or m
        run_on_main(lambda: _start_stage(baselines_dir, baselines_fp))
        missing = run_on_main(lambda: [m for m in wanted if not (baselines_dir / f"{m}.safetensors").exists()])
    if missing:
        with run.timed("baselines"):
            for method in missing:
                distilled = _subset(method, run.source, teacher, config, run.context.device, run.progress)
                # every rank built the same set (no rank waits idle on another's long k-means)
                run.context.on_main(lambda: distilled.save(baselines_dir / f"{method}.safetensors"))
    barrier()
    return baselines_fp


def _load_sets(run: _Run) -> dict[str, Any]:
    """Every set `run.methods` evaluates (`none`: None), as the stages wrote them; rank 0 writes `sets.json`."""
    files = {"krr-st": run.out_dir / "distill" / DISTILLED_NAME, "mkdt": run.out_dir / "mkdt" / DISTILLED_NAME,
             **{method: run.out_dir / "baselines" / f"{method}.safetensors" for method in SUBSET_METHODS}}
    sets: dict[str, DistilledSet | None] = {"none": None}
    sets.update({method: DistilledSet.load(path) for method, path in files.items() if method in run.config.run.methods})
    run.context.on_main(lambda: write_json(run.out_dir / SETS_NAME, {  # what each set costs: the "same storage" table
        method: {"images": len(distilled), "storage_bytes": distilled.storage_bytes(),
                 "parameterization": _parameterization_label(distilled)}
        for method, distilled in sets.items() if distilled is not None
    }))
    return sets


def _evaluate_stage(run: _Run, sets: Mapping[str, Any], provenance: Mapping[str, str],
                    set_fps: tuple[str, str, str]) -> None:
    """Every method x target x arch x protocol x seed into `results.csv`, under `eval/`.

    `set_fps` are the distill, baselines and mkdt fingerprints. A changed evaluation config starts the table
    afresh, a changed kd config only the kd rows.
    """
    config, run_config, out_dir = run.config, run.config.run, run.out_dir
    eval_dir = out_dir / "eval"
    wants_kd = _wants_kd(run_config)
    # kd.teacher_path is under --root, like every path of a run config; None when krrst trains the kd teacher
    kd_teacher_file = dataset_path(run.root, config.kd.teacher_path) if wants_kd and config.kd.teacher_path else None
    if kd_teacher_file and not kd_teacher_file.is_file():
        raise KrrstError(f"kd.teacher_path (--kd-teacher): {kd_teacher_file} is not a file (relative paths are under "
                         f"--root {str(run.root)!r})")
    # Which methods, protocols, archs and how many seeds are left out: adding one adds rows, it does not
    # invalidate the others (rows are keyed by method, target, arch, protocol and seed).
    eval_fp = _fingerprint(*set_fps, _without(config.pretrain), _without(config.finetune), _without(config.linear),
                           _without(run_config, ("methods", "protocols", "archs", "seeds", "download",
                                                 "keep_checkpoints", "note")))
    # The kd rows depend on the kd settings and teacher file too; those govern the kd rows only, so that adding the
    # kd protocol (whose settings the CPU presets shorten) or changing them keeps every other row. Nothing is added
    # when kd is not evaluated or runs at the defaults with a trained teacher, so such runs keep their fingerprint.
    kd_settings = _without(config.kd, ("eval_batch_size",)) if wants_kd else {}
    kd_fp = _fingerprint(eval_fp, *([kd_settings, file_identity(kd_teacher_file)]
                                    if kd_settings or kd_teacher_file else []))
    marker, kd_marker = eval_dir / "fingerprint.json", eval_dir / "kd-fingerprint.json"

    def start_evaluation() -> None:
        if marker.exists() and read_json(marker).get("fingerprint") != eval_fp:
            # Rows computed under another evaluation config are not comparable: start the table afresh.
            for name in ("results.csv", "results.json"):
                (out_dir / name).unlink(missing_ok=True)
        _start_stage(eval_dir, eval_fp)
        if wants_kd:
            if kd_marker.exists() and read_json(kd_marker).get("fingerprint") != kd_fp:
                remove_results(out_dir, lambda row: parse_protocol(row["protocol"])[0] == "kd")
            write_json(kd_marker, {"fingerprint": kd_fp})

    run_on_main(start_evaluation)
    with run.timed("evaluate"):
        evaluate_methods(
            out_dir, {method: sets[method] for method in run_config.methods},
            [(parse_target(spec)[0], *run.targets[spec]) for spec in run_config.targets],
            source_name=run.source.name, archs=run_config.archs,
            seeds=range(run_config.seed, run_config.seed + run_config.seeds),
            protocols=run_config.protocols, pretrain_config=config.pretrain, finetune_config=config.finetune,
            linear_config=config.linear, eval_widths=run_config.eval_widths, image_size=run_config.image_size,
            finegrained_iterations=run_config.finegrained_iterations, device=run.context.device,
            progress=run.progress, log=run.log, distributed=run.context, provenance=provenance, kd_config=config.kd,
            kd_teacher_path=kd_teacher_file, kd_noise_images=config.distill.num_images,
        )
    run_on_main(lambda: _mark_done(eval_dir, eval_fp))


def _add_random_network_knn(health_path: Path, teacher_config: TeacherConfig, image_size: int, labelled,
                            device: torch.device) -> None:
    """Add to the teacher's `health.json` the k-NN accuracy of an untrained network of its architecture.

    The teacher's k-NN accuracy means little alone: a random ConvNet already scores well above chance on CIFAR. Computed
    once (a re-run finds it there).
    """
    health = read_json(health_path, "teacher health") if health_path.is_file() else {}
    if "knn_accuracy" not in health or "random_knn_accuracy" in health:
        return
    with torch.random.fork_rng(devices=[]):  # the same random network every time, the run's generators untouched
        torch.manual_seed(0)
        network = build_backbone(teacher_config, image_size).to(device).eval()
    health["random_knn_accuracy"] = knn_accuracy(network, *labelled, k=int(health.get("knn_k", 20)), device=device)
    write_json(health_path, health)


def kd_teacher_from_file(path: str | Path, config: KDConfig, train, test, image_size: int | None,
                         device: str | torch.device | None = None) -> torch.nn.Module:
    """A target's classifier for protocol `kd` from a file (`krrst.evaluate.load_kd_teacher`), frozen: architecture
    `config.teacher_arch` unless the file names its own, a ConvNet built for `image_size`."""
    named = config.teacher_arch or None  # None: the file's own, else KD_TEACHER_ARCH
    options = {} if is_library_arch(named) else eval_overrides(named or KD_TEACHER_ARCH, (), image_size)
    return load_kd_teacher(path, class_count(train, test), named, arch_options=options, target=f"target {test.name!r}",
                           device=device)


def _parameterization_label(distilled: DistilledSet) -> str:
    """e.g. "pixels", "basis", "pixels, 4 fixed views" (the set then holds every view of its images)."""
    synthetic = distilled.config.get("synthetic", {})
    views = synthetic.get("views") or ["identity"]
    kind = synthetic.get("kind", "pixels")
    return kind if len(views) == 1 else f"{kind}, {len(views)} fixed views"


def evaluate_methods(
    out_dir: str | Path, sets: Mapping[str, Any], targets: list[tuple[str, Any, Any]], *, source_name: str,
    archs: tuple[str, ...] | list[str], seeds: Any, protocols: tuple[str, ...] | list[str],
    pretrain_config: PretrainConfig, finetune_config: FinetuneConfig, linear_config: LinearProbeConfig,
    eval_widths: tuple[int, ...] = (), image_size: int | None = None, finegrained_iterations: int = 5000,
    device: str | torch.device | None = None, progress: bool = True, log=print,
    distributed: DistributedContext | None = None, provenance: Mapping[str, str] | None = None,
    kd_config: KDConfig | None = None, kd_teacher_path: str | Path | None = None, kd_noise_images: int = 1000,
) -> list[dict[str, Any]]:
    """Evaluate every method x arch x seed x target x protocol, appending rows to `out_dir/results.csv`.

    `sets` maps a method name to a `DistilledSet` (pre-trained on, once per arch and seed, the network cached under
    `eval/pretrained/`), to a network used as it is (`full-ssl`: the teacher), or to None (`none`: a fresh network).
    `provenance` maps a method to what its set came from, written on its rows; a method whose rows in `results.csv`
    carry another is refused before any work. `targets` are `(dataset_name, train, test)` triples. Rows already in
    `results.csv` are skipped, so an interrupted evaluation resumes at the first missing one. Seeds are paired: seed s
    gives every method the same initialisation, label subset and batch order.

    Protocol `kd` distils each target's classifier (the file `kd_teacher_path`, else one trained once per target and
    cached) into the pre-trained network through its set's images; `none` learns from `kd_noise_images` Gaussian-noise
    images; a network used as it is (`full-ssl`) has no images and gets no kd rows.

    Under `torchrun` the jobs (method x arch x seed) are dealt round-robin to the ranks, one per device; rank 0 appends
    its rows as they come and the others' when every rank is done (a kill loses those, not the networks they
    pre-trained, which are cached).
    """
    out_dir = Path(out_dir)
    context = distributed or current_context(resolve_device(device))
    provenance = {method: value for method, value in (provenance or {}).items() if method in sets and value}
    run_on_main(lambda: check_provenance(out_dir, provenance))
    rows = run_on_main(lambda: read_results(out_dir))
    jobs = [(arch, seed, method) for arch in archs for seed in seeds for method in sets]
    evaluation = _Evaluation(out_dir, source_name, tuple(protocols), pretrain_config, finetune_config, linear_config,
                             tuple(eval_widths), image_size, finegrained_iterations, context, progress, log,
                             provenance, kd_config, kd_teacher_path, kd_noise_images)
    known = len(rows)
    for index, (arch, seed, method) in context.my_jobs(list(enumerate(jobs, 1))):
        evaluation.job(f"{index}/{len(jobs)}", method, sets[method], arch, seed, targets, rows)
    others = context.gather_on_main(rows[known:])  # rank 0 appended its own rows as they came
    if others:
        append_results(out_dir, others)
        rows.extend(others)
    return rows


@dataclasses.dataclass
class _Evaluation:
    """What every job of `evaluate_methods` shares (its arguments), and the kd teachers built so far."""

    out_dir: Path
    source_name: str
    protocols: tuple[str, ...]
    pretrain_config: PretrainConfig
    finetune_config: FinetuneConfig
    linear_config: LinearProbeConfig
    eval_widths: tuple[int, ...]
    image_size: int | None
    finegrained_iterations: int
    context: DistributedContext
    progress: bool
    log: Any
    provenance: Mapping[str, str]
    kd_config: KDConfig | None
    kd_teacher_path: str | Path | None
    kd_noise_images: int
    kd_teachers: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)  # target name -> classifier

    def job(self, label: str, method: str, network: Any, arch: str, seed: int, targets: list[tuple[str, Any, Any]],
            rows: list[dict[str, Any]]) -> None:
        """One (method, arch, seed): pre-train once, then every target x protocol row missing from `rows`
        (appended to it, and to `results.csv` by rank 0)."""
        is_network = isinstance(network, torch.nn.Module)
        model_arch = getattr(network, "spec", {}).get("arch", arch) if is_network else arch
        # kd distils through a set's images (none: noise); a network used as it is has neither
        method_protocols = [p for p in self.protocols if not (is_network and parse_protocol(p)[0] == "kd")]
        pending = [(dataset, train, test, protocol) for dataset, train, test in targets for protocol in method_protocols
                   if not has_result(rows, method=method, source=self.source_name, target=test.name, arch=model_arch,
                                     protocol=protocol, seed=seed)]
        if not pending:
            return
        self.log(f"[evaluate] job {label}: {method} on {model_arch}, seed {seed} ({len(pending)} evaluations)")
        overrides = eval_overrides(arch, self.eval_widths, self.image_size)
        pretrained = network if is_network else self.pretrained(method, network, arch, seed, overrides)
        for dataset, train, test, protocol in pending:
            protocol_kind, fraction = parse_protocol(protocol)
            finetune = self.finetune_config
            if dataset in FINE_GRAINED:
                finetune = dataclasses.replace(self.finetune_config, iterations=self.finegrained_iterations)
            row = evaluate_set(
                None, arch, train, test, protocol=protocol_kind, label_fraction=fraction, seed=seed,
                pretrained=pretrained, method=method, source=self.source_name, target=test.name,
                finetune_config=finetune, linear_config=self.linear_config, image_size=self.image_size,
                device=self.context.device, progress=self.progress,
                arch_options=None if pretrained is not None else overrides, kd_config=self.kd_config,
                kd_teacher=self.kd_teacher(train, test) if protocol_kind == "kd" else None,
                kd_images=None if is_network else network, kd_noise_images=self.kd_noise_images,
            )
            row.update(protocol=protocol, provenance=self.provenance.get(method, ""))
            self.context.on_main(lambda: append_results(self.out_dir, [row]))
            rows.append(row)
            self.log(f"[evaluate]   {method:<8} {test.name} {protocol:<13} seed {seed}: {100 * row['accuracy']:.1f}%")

    def pretrained(self, method: str, distilled: Any, arch: str, seed: int,
                   overrides: dict[str, Any]) -> torch.nn.Module | None:
        """The network pre-trained on `distilled` (None for `none`), cached in
        `eval/pretrained/<method>-<arch>-seed<s>.safetensors`."""
        if distilled is None:
            return None
        cached = self.out_dir / "eval" / "pretrained" / f"{method}-{arch}-seed{seed}.safetensors"
        if cached.exists():
            tensors, metadata = load_tensors(cached, "pre-trained model")
            network = create_model(**metadata["spec"])
            network.load_state_dict(tensors)
            return network.to(self.context.device).eval()
        config = dataclasses.replace(self.pretrain_config, seed=seed)
        network = pretrain(distilled, arch, config, device=self.context.device, progress=self.progress, **overrides)
        save_tensors(cached, network.state_dict(), {"spec": network.spec})
        return network

    def kd_teacher(self, train, test) -> torch.nn.Module:
        """The target's classifier for protocol `kd`, frozen, built once per target: from `kd_teacher_path`
        (`kd_teacher_from_file`), else trained (`trained_kd_teacher`)."""
        if test.name not in self.kd_teachers:
            config = self.kd_config or KDConfig()
            self.kd_teachers[test.name] = (
                kd_teacher_from_file(self.kd_teacher_path, config, train, test, self.image_size, self.context.device)
                if self.kd_teacher_path is not None else self.trained_kd_teacher(config, train, test))
        return self.kd_teachers[test.name]

    def trained_kd_teacher(self, config: KDConfig, train, test) -> torch.nn.Module:
        """A `kd.teacher_arch` network trained on the target's train split (`train_kd_teacher`, ConvNets narrowed to
        `eval_widths`), cached as `eval/kd-teacher/<target>-<arch>-<recipe>.safetensors` so that every method and
        seed, and a resumed run, reuse it (every rank trains the same one, seeded; rank 0 saves it)."""
        arch, device = config.teacher_arch or KD_TEACHER_ARCH, self.context.device
        options = eval_overrides(arch, self.eval_widths, self.image_size)
        recipe = {key: value for key, value in config_to_dict(config).items()
                  if key.startswith("teacher_") and key != "teacher_path" or key == "padding"}
        key = _fingerprint(test.name, len(train), len(test), self.image_size, options, recipe)[:10]
        safe = lambda name: re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # noqa: E731
        path = self.out_dir / "eval" / "kd-teacher" / f"{safe(test.name)}-{safe(arch)}-{key}.safetensors"
        if path.is_file():
            return load_kd_teacher(path, class_count(train, test), arch, target=f"target {test.name!r}", device=device,
                                   option="cached kd teacher")
        classifier, metrics = train_kd_teacher(train, test, config, arch_options=options, image_size=self.image_size,
                                               device=device, progress=self.progress)
        self.context.on_main(lambda: save_tensors(path, classifier.state_dict(), {
            "spec": classifier.spec, "target": test.name, "test_accuracy": metrics["accuracy"]}))
        self.log(f"[evaluate] kd teacher {arch} trained on {test.name}: {100 * metrics['accuracy']:.1f}% test "
                 f"accuracy ({path})")
        return classifier.to(device).eval()
