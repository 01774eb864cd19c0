"""The `krrst` command: argparse sub-commands that parse, call one library function, and print.

User mistakes surface as a `KrrstError` and are printed as one line on stderr with exit status 2; anything else is a bug
and keeps its traceback. A mistyped name (preset, config key, architecture, dataset, protocol) gets "did you mean".
torch is imported inside the handlers only, so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from krrst.infra.config import did_you_mean, parse_assignments, read_config_file
from krrst.infra.errors import KrrstError
from krrst.infra.registry import unknown_name


def _version() -> str:
    """The installed package's version, else (a source checkout) the one pyproject.toml declares."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("krrst")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        if found:
            return found.group(1)
        from krrst import __version__

        return __version__


def _check_arch(arch: str, option: str) -> None:
    from krrst.models import MODELS

    if arch not in MODELS:
        raise MODELS.unknown(arch, what=option, see="krrst models")


def _check_teacher_arch(arch: str | None, option: str = "--teacher-arch") -> None:
    """A registered model, or torchvision:NAME / timm:NAME (those names are checked by the library itself)."""
    from krrst.formats import LIBRARIES

    if arch is None:
        return
    library, colon, _ = arch.partition(":")
    if colon and library not in LIBRARIES:
        raise KrrstError(f"{option} {arch!r}: unknown library {library!r}; expected "
                         f"{' or '.join(name + ':NAME' for name in LIBRARIES)}{did_you_mean(library, LIBRARIES)}")
    if not colon:
        _check_arch(arch, option)


def _check_dataset(name: str, option: str) -> None:
    from krrst.data import DATASETS

    if name not in DATASETS:
        raise KrrstError(f"{option}: {DATASETS.unknown(name, see='krrst datasets')}")


def _check_out(path: str, option: str = "--out") -> None:
    """An output folder that cannot be written (a file, inside a file, read-only) is refused before any work."""
    from krrst.pipeline import check_output_paths

    check_output_paths(path, option)


def _cmd_datasets(args: argparse.Namespace) -> None:
    from krrst.data import describe_datasets

    print(describe_datasets())


def _cmd_models(args: argparse.Namespace) -> None:
    import torch

    from krrst.models import create_model, list_models

    print(f"{'name':<16} {'features':>8} {'params (no head)':>17}")
    for name in list_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<16} {model.feature_dim:>8} {params / 1e6:>16.2f}M")


def _stage_config(cls, stage: str, preset: str | None, overrides: list[str], extra: dict | None = None):
    """A stage's config: the preset's values for that stage, then `extra`, then `--set stage.field=value`."""
    from krrst.infra.config import apply_overrides
    from krrst.pipeline import PRESETS

    values = dict(PRESETS.get(preset, what="--preset").get(stage, {})) if preset else {}
    values.update({key: value for key, value in (extra or {}).items() if value is not None})
    for key, value in parse_assignments(overrides).items():
        prefix, dot, field = key.partition(".")
        if not dot or prefix != stage:
            raise KrrstError(f"--set {key!r}: this command takes {stage}.FIELD=VALUE keys (e.g. {stage}.seed=1)")
        values[field] = value
    return apply_overrides(cls(), values, stage)


def _distributed(args: argparse.Namespace):
    """Join torchrun's process group when launched by it (one process per GPU); else a single process."""
    from krrst.infra.distributed import init_distributed

    return init_distributed(args.device)


def _load_source(args: argparse.Namespace):
    from krrst.data import load_images

    _check_dataset(args.source, "--source")
    return load_images(args.source, args.root, args.split, image_size=args.image_size, download=args.download,
                       max_per_class=args.max_per_class, skip_corrupt=args.skip_corrupt)


def _teacher_arch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-arch", default=None,
                        help="the teacher's architecture when the file does not say: a registered model (.pt default: "
                        "resnet18_pad2, the authors' teacher), torchvision:NAME or timm:NAME (e.g. "
                        "torchvision:resnet50)")
    parser.add_argument("--teacher-input-size", type=int, default=None,
                        help="the input size the teacher was trained at (torchvision/timm: their own, e.g. 224); "
                        "images are resized to it for the teacher only")


def _load_teacher(args: argparse.Namespace):
    from krrst.teacher import load_teacher

    _check_teacher_arch(args.teacher_arch)
    path = None if args.teacher == "pretrained" else args.teacher
    return load_teacher(path, arch=args.teacher_arch, input_size=args.teacher_input_size)


def _cmd_teacher(args: argparse.Namespace) -> None:
    from krrst.teacher import (
        TEACHER_FILE,
        TeacherConfig,
        check_not_collapsed,
        feature_health,
        save_teacher,
        train_teacher,
    )

    if args.teacher and (args.preset or args.overrides):
        raise KrrstError("--preset and --set configure teacher training; they have no effect when importing --teacher")
    _check_out(args.out)
    images = _load_source(args)
    out = Path(args.out)
    if args.teacher:
        teacher = _load_teacher(args)
        health = feature_health(teacher, images.images[:1000], images.mean, images.std, device=args.device)
        check_not_collapsed(health, where=f"teacher {args.teacher}")
        save_teacher(out / TEACHER_FILE, teacher, images.mean, images.std, source=images.name)
        print(f"imported {args.teacher} ({teacher.spec['arch']}, {teacher.feature_dim}-d features, "
              f"median feature std {health['std_median']:.3g}) as {out / TEACHER_FILE}")
        return
    config = _stage_config(TeacherConfig, "teacher", args.preset, args.overrides)
    context = _distributed(args)
    train_teacher(images, config, out_dir=out, resume=True, device=context.device, progress=args.progress,
                  distributed=context)  # its run scaffold shows progress on rank 0 only
    context.say(f"wrote {out / TEACHER_FILE}")


def _cmd_distill(args: argparse.Namespace) -> None:
    from krrst.distill import DistillConfig, distill
    from krrst.mkdt import MKDTConfig, mkdt_distill
    from krrst.pipeline import split_heldout

    _check_out(args.out)
    extra = {"steps": args.steps, "num_images": args.m, "image_size": args.image_size, "init": args.init}
    cls, stage = (MKDTConfig, "mkdt") if args.method == "mkdt" else (DistillConfig, "distill")
    config = _stage_config(cls, stage, args.preset, args.overrides, extra)
    teacher = _load_teacher(args)
    images, heldout = split_heldout(_load_source(args), args.heldout, config.seed)
    context = _distributed(args)
    if args.method == "mkdt":  # not data-parallel: every rank computes the same set, rank 0 writes it
        distilled = mkdt_distill(images, teacher, config, out_dir=args.out, resume=True, device=context.device,
                                 progress=args.progress, distributed=context)
    else:
        distilled = distill(images, teacher, config, out_dir=args.out, resume=True, device=context.device,
                            heldout=heldout, progress=args.progress, distributed=context)
    out = Path(args.out)
    context.say(f"distilled {len(distilled)} images with {distilled.feature_dim}-d targets into "
                f"{out / 'distilled.safetensors'} (preview: {out / 'preview.png'})")


def _protocol_overrides(protocols: list[str]) -> dict[str, Any]:
    """`--protocol` values as config overrides: `run.protocols` (what to evaluate) and the published suites'
    pre-training/probe settings (`PROTOCOL_SUITES`). Two suites that set one field differently are refused."""
    from krrst.pipeline import BASE_PROTOCOLS, PROTOCOL_SUITES, parse_protocol

    chosen: list[str] = []
    settings: dict[str, tuple[Any, str]] = {}  # key -> (value, the suite that set it)
    for protocol in protocols:
        if protocol in PROTOCOL_SUITES:
            suite = dict(PROTOCOL_SUITES.get(protocol))
            items = suite.pop("run.protocols")
            for key, value in suite.items():
                if key in settings and settings[key][0] != value:
                    raise KrrstError(f"--protocol {settings[key][1]} and --protocol {protocol} set {key} differently "
                                     f"({settings[key][0]} and {value}); evaluate them into two --out folders")
                settings[key] = (value, protocol)
        else:
            name = protocol.partition("@")[0]
            if name not in BASE_PROTOCOLS:
                valid = [*PROTOCOL_SUITES, *BASE_PROTOCOLS]
                raise KrrstError(f"--protocol {protocol!r} is not valid; expected {', '.join(valid)}, or "
                                 f"finetune/linear @P% (e.g. linear@1%){did_you_mean(name, valid)}")
            parse_protocol(protocol)
            items = (protocol,)
        chosen += [item for item in items if item not in chosen]
    overrides = {key: value for key, (value, _) in settings.items()}
    return {"run.protocols": tuple(chosen), **overrides} if chosen else overrides


def _set_files(args: argparse.Namespace) -> list[str]:
    """The files that define the evaluated set: `--distilled`, and `y_syn.pt` beside the authors' `x_syn.pt` or
    the `--labels` file of a label set."""
    path = Path(args.distilled)
    if args.labels:
        return [args.distilled, args.labels]
    targets = path.with_name("y" + path.name[1:])
    if path.name.startswith("x_syn") and path.suffix in (".pt", ".pth") and targets.is_file():
        return [args.distilled, str(targets)]
    return [args.distilled]


def _is_krrst_set(path: str) -> bool:
    """A krrst `DistilledSet` file, told by its header alone (another method's set may be a .safetensors too)."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return True  # unreadable: `DistilledSet.load` says so in one line
    return any("krrst.DistilledSet" in value for value in header.values())


def _load_set(args: argparse.Namespace, stats: tuple[tuple[float, ...], tuple[float, ...]] | None):
    """`--distilled` as a `DistilledSet`: a krrst file; the authors' `x_syn.pt` + `y_syn.pt` (raw [0, 1] pixels);
    or another method's label set. Raw pixels of the last two are normalised with `stats` (mean, std); without
    them (a first look, for the image size) with mean 0 and std 1."""
    from krrst.distilled import DistilledSet
    from krrst.formats import load_authors_set, load_label_set

    if _is_krrst_set(args.distilled):
        if args.labels or args.mean or args.std:
            raise KrrstError(f"--labels, --mean and --std are for sets of other formats; {args.distilled} is a krrst "
                             "DistilledSet, which holds its targets and is normalised already")
        return DistilledSet.load(args.distilled)
    mean, std = stats or ((0.0,) * 3, (1.0,) * 3)
    files = _set_files(args)
    if len(files) == 2 and not args.labels:  # the authors' released format
        return load_authors_set(files[0], files[1], mean, std)
    return load_label_set(args.distilled, mean, std, labels_path=args.labels)


def _set_stats(args: argparse.Namespace, target) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """--mean/--std, else the target's: what raw pixels of a set in another format are normalised with."""
    if (args.mean is None) != (args.std is None):
        raise KrrstError("--mean and --std go together: give both (e.g. --mean 0.507,0.487,0.441 --std "
                         "0.267,0.256,0.276)")
    if args.mean is not None:
        return tuple(args.mean), tuple(args.std)
    shown = " / ".join(",".join(f"{float(value):.4f}" for value in values) for values in (target.mean, target.std))
    print(f"normalising {args.distilled} with the target's mean/std {shown} (--mean/--std for its source's)",
          file=sys.stderr)
    return tuple(target.mean), tuple(target.std)


def _evaluation_provenance(args: argparse.Namespace) -> str:
    """What the evaluated set comes from: its files' hash, or a fingerprint of the options that define a baseline."""
    from krrst.pipeline import baseline_provenance, set_provenance

    if args.distilled:
        return "+".join(set_provenance(path) for path in _set_files(args))
    if args.baseline == "none":  # a fresh network: nothing defines it (`krrst run` writes the same)
        return baseline_provenance("none")
    teacher = [set_provenance(args.teacher) if Path(args.teacher).is_file() else args.teacher,
               args.teacher_arch, args.teacher_input_size]
    if args.baseline == "full":
        return baseline_provenance("full", teacher=teacher)
    return baseline_provenance(args.baseline, m=args.m, seed=args.seed, source=args.source, teacher=teacher,
                               source_root=str(Path(args.source_root).resolve()), image_size=args.image_size)


def _evaluation_configs(args: argparse.Namespace, suite: dict[str, Any]) -> dict[str, Any]:
    """The pretrain / finetune / linear / kd configs: a protocol suite's settings and `--kd-teacher-arch`, then
    `--set`."""
    from krrst.infra.config import apply_overrides, did_you_mean_key
    from krrst.pipeline import STAGE_CONFIGS, all_keys

    stages = {stage: STAGE_CONFIGS[stage] for stage in ("pretrain", "finetune", "linear", "kd")}
    keys = [key for key in all_keys() if key.partition(".")[0] in stages]
    values: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    if args.kd_teacher_arch:
        values["kd"]["teacher_arch"] = args.kd_teacher_arch
    for key, value in {**suite, **parse_assignments(args.overrides)}.items():  # an explicit --set wins
        stage, dot, field = key.partition(".")
        if not dot or stage not in stages:
            raise KrrstError(f"--set {key!r}: keys must start with one of {', '.join(stages)}"
                             f"{did_you_mean_key(key, keys)}")
        values[stage][field] = value
    return {stage: apply_overrides(cls(), values[stage], stage) for stage, cls in stages.items()}


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from krrst.data import evaluation_split, load_images
    from krrst.distilled import DistilledSet
    from krrst.pipeline import file_identity

    if (args.distilled is None) == (args.baseline is None):
        raise KrrstError("give exactly one of --distilled PATH or --baseline random|kmeans|high-loss|none|full")
    if args.labels and not args.distilled:
        raise KrrstError("--labels goes with --distilled (the labels file of a label set stored in two files)")
    _check_out(args.out)
    suite = _protocol_overrides(args.protocol or ["finetune"])
    protocols = list(suite.pop("run.protocols"))
    if args.seeds < 1:
        raise KrrstError(f"--seeds must be at least 1, got {args.seeds}")
    _check_arch(args.arch, "--arch")
    _check_dataset(args.target, "--target")
    _check_kd_options(args, protocols)
    configs = _evaluation_configs(args, suite)
    teacher = _load_teacher(args) if args.teacher else None
    if args.distilled is not None:
        network = _load_set(args, None)
        method, source_name = network.method, network.source
    else:
        method, source_name, network = _baseline(args, teacher)
    image_size = args.image_size or (network.image_size if isinstance(network, DistilledSet) else None)
    # Everything that can fail on a mistyped option comes before the claim on --out.
    reading = {"image_size": image_size, "download": args.download, "skip_corrupt": args.skip_corrupt,
               "test_fraction": args.test_fraction}
    train = load_images(args.target, args.root, "train", max_per_class=args.max_per_class, **reading)
    test = load_images(args.target, args.root, evaluation_split(args.target), **reading)
    foreign = args.distilled is not None and not _is_krrst_set(args.distilled)
    if foreign:  # raw pixels: normalised now that the target's statistics are known
        stats = _set_stats(args, train)
        network = _load_set(args, stats)
    # Rows and cached networks are keyed by method: refuse to mix in results of another set or config.
    if args.distilled:
        what = file_identity(args.distilled) if not foreign else [file_identity(path) for path in _set_files(args)]
    else:
        what = [args.baseline, args.m, args.seed, args.source, args.source_root, file_identity(args.teacher)]
    identity = {"--distilled/--baseline": what, "--set": {k: str(v) for k, v in configs.items()},
                "--widths": args.widths, "--image-size": image_size, "--target": args.target,
                "--max-per-class": args.max_per_class}
    if foreign:
        identity["--mean/--std"] = [list(stats[0]), list(stats[1])]
    if "kd" in protocols:
        _check_kd_teacher(args, configs["kd"], train, test, image_size)
        identity["--kd-teacher"] = file_identity(args.kd_teacher)
    provenance = _evaluation_provenance(args)
    _evaluate_into(args, method, network, source_name, (train, test), protocols, configs, image_size,
                   identity, provenance)


def _baseline(args: argparse.Namespace, teacher) -> tuple[str, str, Any]:
    """`(method, source name, set or network)` of `--baseline`: a subset picked from `--source` (with the teacher's
    targets), the teacher itself (`full`, rows named full-ssl), or None (`none`: a fresh network)."""
    from krrst.baselines import high_loss_subset, kmeans_coreset, random_subset
    from krrst.data import load_images
    from krrst.pipeline import SUBSET_METHODS

    baseline = args.baseline
    if baseline == "none":
        return "none", args.source or "", None
    if teacher is None:
        raise KrrstError(f"--baseline {baseline} needs the teacher: pass --teacher PATH")
    if baseline == "full":
        return "full-ssl", args.source or "", teacher
    assert baseline in SUBSET_METHODS, baseline  # argparse's choices
    if not args.source or not args.source_root:
        raise KrrstError(f"--baseline {baseline} needs --source NAME and --source-root PATH to pick images from")
    _check_dataset(args.source, "--source")
    source = load_images(args.source, args.source_root, "train", image_size=args.image_size)
    pick = {"random": random_subset, "kmeans": kmeans_coreset, "high-loss": high_loss_subset}[baseline]
    return baseline, source.name, pick(source, args.m, teacher, seed=args.seed, device=args.device)


def _check_kd_options(args: argparse.Namespace, protocols: list[str]) -> None:
    """--kd-teacher/--kd-teacher-arch go with --protocol kd, which needs a set's images (or none's noise)."""
    if "kd" not in protocols and (args.kd_teacher or args.kd_teacher_arch):
        raise KrrstError("--kd-teacher and --kd-teacher-arch go with --protocol kd")
    if "kd" in protocols and args.baseline == "full":
        raise KrrstError("--protocol kd distils through a set's images, and --baseline full (the teacher used as it "
                         "is) has none; evaluate kd with --distilled or --baseline random|kmeans|high-loss|none")
    if args.kd_teacher_arch:  # with --protocol kd (else refused above)
        _check_teacher_arch(args.kd_teacher_arch, "--kd-teacher-arch")


def _check_kd_teacher(args: argparse.Namespace, config, train, test, image_size: int | None) -> None:
    """Load --kd-teacher once before any work: a wrong architecture or class count is one line naming the file."""
    from krrst.formats import is_library_arch
    from krrst.pipeline import kd_teacher_from_file

    if args.kd_teacher:
        kd_teacher_from_file(args.kd_teacher, config, train, test, image_size)
    elif is_library_arch(config.teacher_arch):
        raise KrrstError(f"--kd-teacher-arch {config.teacher_arch}: krrst trains registered architectures only; "
                         "give that classifier as a file with --kd-teacher")


def _evaluate_into(args, method, network, source_name, target, protocols, configs, image_size, identity, provenance):
    """Claim `--out` for this method, evaluate, and write and print the report."""
    from krrst.infra.distributed import run_on_main
    from krrst.pipeline import claim_evaluation, evaluate_methods, preset_config
    from krrst.report import report_text, write_report

    context = _distributed(args)
    with context.lock(args.out, "evaluation folder"):
        run_on_main(lambda: claim_evaluation(args.out, method, identity, provenance))
        evaluate_methods(
            args.out, {method: network}, [(args.target, *target)], source_name=source_name, archs=[args.arch],
            seeds=range(args.seed, args.seed + args.seeds), protocols=protocols,
            pretrain_config=configs["pretrain"], finetune_config=configs["finetune"], linear_config=configs["linear"],
            eval_widths=tuple(args.widths), image_size=image_size, device=context.device,
            progress=context.only_on_main(args.progress), distributed=context, provenance={method: provenance},
            kd_config=configs["kd"], kd_teacher_path=args.kd_teacher, kd_noise_images=args.m,
            # An explicit --set finetune.iterations holds for fine-grained targets too (default there: 5,000).
            finegrained_iterations=configs["finetune"].iterations
            if any(item.startswith("finetune.iterations=") for item in args.overrides) else 5000,
        )

    def report() -> None:
        write_report(args.out, preset_config=preset_config)
        print(report_text(args.out))

    context.on_main(report)


def _cmd_report(args: argparse.Namespace) -> None:
    from krrst.pipeline import preset_config
    from krrst.report import comparison_text, report_text, write_comparison, write_report

    for run_dir in map(Path, args.run_dirs):
        problem = ("does not exist" if not run_dir.exists() else "is a file" if not run_dir.is_dir()
                   else "holds no results.csv" if not (run_dir / "results.csv").is_file() else "")
        if problem:
            raise KrrstError(f"{run_dir} {problem}; give a run directory of `krrst run` or `krrst evaluate`")
    references = args.ref or ["random", "none"]
    if len(args.run_dirs) == 1 and args.out is None:
        _check_out(args.run_dirs[0], "RUN_DIR")
        paths = write_report(args.run_dirs[0], references, preset_config=preset_config)
        print(report_text(args.run_dirs[0], references))
    else:
        if args.out is None:
            raise KrrstError("several run directories are merged into one page: give --out DIR for it")
        _check_out(args.out)
        paths = write_comparison(args.run_dirs, args.out, references)
        print(comparison_text(args.run_dirs, references))
    print("wrote " + ", ".join(str(path) for path in paths.values()))


def _run_config(args: argparse.Namespace):
    """`(preset, PipelineConfig)`: the preset, then `--config FILE`, then `--protocol`, then the shortcuts
    (`--steps`, `--m`, `--download`), then `--set`: each wins over the ones before."""
    from krrst.pipeline import resolve_config

    preset, from_file = read_config_file(args.config) if args.config else (None, {})
    preset = args.preset or preset
    if preset is None:
        raise KrrstError("give --preset NAME (e.g. --preset demo) or --config FILE (a `--print-config` output)")
    if from_file:
        try:  # a mistake in the file is named with the file
            resolve_config(preset, from_file)
        except KrrstError as exc:
            raise KrrstError(f"--config {args.config}: {exc}") from None
    shortcuts = {"distill.steps": args.steps, "distill.num_images": args.m, "run.download": args.download or None,
                 "kd.teacher_path": args.kd_teacher, "kd.teacher_arch": args.kd_teacher_arch}
    overrides = {**from_file, **_protocol_overrides(args.protocol or []),
                 **{key: value for key, value in shortcuts.items() if value is not None},
                 **parse_assignments(args.overrides)}
    return preset, resolve_config(preset, overrides)


def _cmd_run(args: argparse.Namespace) -> None:
    from krrst.pipeline import run

    preset, config = _run_config(args)
    if args.print_config:
        print(json.dumps({"preset": preset, **config.to_dict()}, indent=2))
        return
    out = args.out or f"runs/{preset}"
    _check_out(out)
    context = _distributed(args)
    run(config, out, root=args.root, preset=preset, force=args.force, device=context.device,
        progress=args.progress, distributed=context, log=context.say)
    context.say(f"run directory: {out} (open {Path(out) / 'report.html'})")


# ----------------------------------------------------------------------------- parser

PROTOCOL_HELP = ("what to evaluate, repeatable: finetune or linear, either @P%% for a fraction of the labels (e.g. "
                 "linear@1%%); kd (target-data-free knowledge distillation of a target classifier through the set's "
                 "images, no label fraction); or a published protocol: krrst (1,000 pre-training epochs, full "
                 "fine-tuning) or mkdt (20 pre-training epochs, L-BFGS linear probe on 1/5/10/50%% of the labels); "
                 "--set wins over a protocol's settings")


class _HelpFormatter(argparse.HelpFormatter):
    """Examples keep their lines; an option shows its default unless it has none or its help already says it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or isinstance(default, bool)
                or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _floats(text: str) -> list[float]:
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(abs(value) < float("inf") for value in values):
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), e.g. 0.5,0.5,0.5; got "
                                         f"{text!r}")
    return values


def _widths(text: str) -> list[int]:
    try:
        widths = [int(value) for value in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 32,64,128; got {text!r}")
    return widths


def _common(parser: argparse.ArgumentParser, stages: str, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help=f"override any config field of {stages} (`krrst run --print-config` lists them); "
                        f"repeatable, e.g. --set {example}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _kd_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--kd-teacher", default=None, metavar="FILE",
                        help=f"--protocol kd: the target's classifier, head included, as a weights-only state dict "
                        f"(.safetensors/.pt/.pth; {default})")
    parser.add_argument("--kd-teacher-arch", default=None, metavar="ARCH",
                        help="its architecture, or the one krrst trains: a registered model, or torchvision:NAME / "
                        "timm:NAME for a file (= --set kd.teacher_arch=ARCH; default: the one a krrst file names, "
                        "else resnet18)")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="source dataset name (see `krrst datasets`); `folder` reads your own images in any layout")
    parser.add_argument("--root", required=True, help="the dataset's folder, .zip, .tar(.gz) or list of image paths "
                        "(the layouts `krrst datasets` lists)")
    parser.add_argument("--split", default="train", help="which split to read (default: train)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to N x N: the short side to N, then the centre (default: as stored)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="skip image files that cannot be decoded (reported with a count) instead of stopping")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="keep the first K images of each class (quick runs)")
    parser.add_argument("--download", action="store_true",
                        help="download cifar10/cifar100/aircraft/flowers when absent")


def _run_args(parser: argparse.ArgumentParser, preset: str | None) -> None:
    if preset is None:
        parser.add_argument("--preset", default=None, help="demo, cpu-mini, cifar100, tinyimagenet, imagenet64 or "
                            "authors (CIFAR-100 as the authors' public code runs it, quirks included; needed unless "
                            "--config names one)")
    else:
        parser.set_defaults(preset=preset)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a JSON config as --print-config prints it (\"preset\" and one object per stage); "
                        "--protocol, --steps, --m, --download and --set win over it")
    parser.add_argument("--root", default=".", help="data root: the config's dataset paths (run.source_root, "
                        "run.targets) are relative to it; cpu-mini needs the folder holding cifar10-jpeg.zip "
                        "(default: the current folder)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<preset>); re-running resumes it")
    parser.add_argument("--force", action="store_true",
                        help="reuse a run directory of another config, re-running only the stages that changed")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.add_argument("--protocol", action="append", default=None,
                        help=PROTOCOL_HELP + " (default: the preset's run.protocols)")
    parser.add_argument("--steps", type=int, default=None, help="KRR-ST's outer steps (= --set distill.steps=N)")
    parser.add_argument("--num-images", "--m", dest="m", type=int, default=None,
                        help="m, the synthetic images (= --set distill.num_images=M); under torchrun write "
                        "--num-images")
    parser.add_argument("--download", action="store_true",
                        help="download cifar10/cifar100/aircraft/flowers when absent (= --set run.download=true)")
    _kd_args(parser, "= --set kd.teacher_path=FILE, relative to --root; one target only; default: krrst trains one "
             "per target, once, cached in OUT/eval/kd-teacher/")
    _common(parser, "run, teacher, distill, mkdt, pretrain, finetune, linear, kd", "distill.steps=200")
    parser.set_defaults(handler=_cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krrst",
        description="Self-supervised dataset distillation (KRR-ST, ICLR 2024): distil an unlabelled image dataset "
        "into a few synthetic images with learned target representations.",
        formatter_class=_HelpFormatter,
        epilog=_examples("krrst demo                            # the whole pipeline offline, about 4 minutes on CPU",
                         "krrst run --preset cpu-mini --root data",
                         "krrst distill --help                  # each command's options and examples"),
    )
    parser.add_argument("--version", action="version", version=f"krrst {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=_examples(*examples),
                              formatter_class=_HelpFormatter)

    for name, handler, text, examples in (
        ("datasets", _cmd_datasets, "list the datasets krrst can load and the folder or archive layout each expects",
         ["krrst datasets",
          "krrst teacher --source folder --root photos.zip --image-size 32 --out runs/teacher"]),
        ("models", _cmd_models, "list the registered architectures (--arch, teacher.arch) with feature size and "
         "parameters",
         ["krrst models",
          "krrst evaluate --baseline none --target cifar10 --root data --arch resnet18 --out runs/eval"]),
    ):
        command(name, text, text[0].upper() + text[1:] + ".", examples).set_defaults(handler=handler)
    parser.commands = sub.choices  # for "did you mean" on a mistyped command

    for add in (_add_teacher, _add_distill, _add_evaluate, _add_report, _add_run):
        add(command)
    return parser


def _add_teacher(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `teacher` command: train an SSL teacher, or import one."""
    teacher = command("teacher", help="train a self-supervised teacher (Barlow Twins) or import your own",
                      examples=["krrst teacher --source cifar100 --root data --download --out runs/teacher",
                                "krrst teacher --source imagefolder --root cifar10-jpeg.zip --preset cpu-mini "
                                "--out runs/teacher",
                                "krrst teacher --source cifar100 --root data --teacher barlow_twins.ckpt "
                                "--teacher-arch resnet18 --out runs/teacher"],
                      description="Train an SSL teacher on the source images (labels unused), or import a "
                      "teacher file with --teacher, check its features, and store it as teacher.safetensors. "
                      "Training defaults: Barlow Twins (--set teacher.method=simclr for SimCLR) on a ResNet-18 "
                      "(--set teacher.arch=convnet3 --set teacher.convnet_widths=32,64,128 for a CPU-sized one); "
                      "`krrst run --print-config` lists every teacher field.")
    _data_args(teacher)
    teacher.add_argument("--out", required=True,
                         help="output folder: teacher.safetensors, checkpoint, loss.csv, health.json")
    teacher.add_argument("--preset", default=None,
                         help="take the teacher settings of a pipeline preset (e.g. cpu-mini)")
    teacher.add_argument("--resume", action="store_true",
                         help="accepted for scripts: re-running the command on its --out always resumes")
    teacher.add_argument("--teacher", default=None,
                         help="import this teacher: a safetensors or .pt/.pth state dict, a solo-learn/lightly .ckpt, "
                         "a TorchScript file, or `pretrained` (the library's weights of --teacher-arch, online)")
    _teacher_arch_args(teacher)
    _common(teacher, "teacher", "teacher.steps=2000")
    teacher.set_defaults(handler=_cmd_teacher)


def _add_distill(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `distill` command: KRR-ST (or MKDT) into a synthetic set."""
    distill = command("distill", help="distil a source dataset into a KRR-ST synthetic set",
                      examples=["krrst distill --source cifar100 --root data --teacher "
                                "runs/teacher/teacher.safetensors --out runs/distill",
                                "krrst distill --source imagefolder --root cifar10-jpeg.zip --teacher "
                                "runs/teacher/teacher.safetensors --preset cpu-mini --steps 200 --m 100 "
                                "--out runs/distill",
                                "krrst distill --source cifar100 --root data --teacher "
                                "runs/teacher/teacher.safetensors --method mkdt --out runs/mkdt"],
                      description="KRR-ST: learn m synthetic images and their target representations so that "
                      "kernel ridge regression on them predicts the teacher's features of real images.")
    _data_args(distill)
    distill.add_argument("--teacher", required=True,
                         help="teacher file (teacher.safetensors from `krrst teacher`, or your own: a state dict, a "
                         "solo-learn/lightly .ckpt, TorchScript), or `pretrained` with a library --teacher-arch")
    _teacher_arch_args(distill)
    distill.add_argument("--out", required=True,
                         help="output folder: distilled.safetensors, checkpoint, loss.csv/png, preview.png")
    distill.add_argument("--method", choices=("krr-st", "mkdt"), default="krr-st",
                         help="krr-st (default; --set distill.FIELD=...) or the MKDT comparator (trajectory matching "
                         "of students regressing the teacher, ICLR 2025; --set mkdt.FIELD=...)")
    distill.add_argument("--init", choices=("random", "kmeans", "high-loss"), default=None,
                         help="the real images the set starts from (krr-st default: random; mkdt: high-loss; "
                         "mkdt takes random or high-loss)")
    distill.add_argument("--preset", default=None,
                         help="settings of a preset: cifar100 (the default values), tinyimagenet, imagenet64, demo, "
                         "cpu-mini, authors (the authors' public code, quirks included)")
    distill.add_argument("--steps", type=int, default=None, help="outer steps (paper: 160,000)")
    distill.add_argument("--num-images", "--m", dest="m", type=int, default=None,
                         help="m, the synthetic images (paper: 1,000 CIFAR-100, 2,000 Tiny-ImageNet); under torchrun "
                         "write --num-images (torchrun takes --m for one of its own options)")
    distill.add_argument("--heldout", type=int, default=1000,
                         help="source images held out for the validation signal (0: none)")
    distill.add_argument("--resume", action="store_true",
                         help="accepted for scripts: re-running the command on its --out always resumes")
    _common(distill, "distill (krr-st) or mkdt", "distill.image_lr=0.001")
    distill.set_defaults(handler=_cmd_distill)


def _add_evaluate(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `evaluate` command: one set or baseline, pre-trained then evaluated on a target."""
    evaluate = command("evaluate", help="pre-train on a distilled set or baseline, then fine-tune / linear-probe",
                       examples=["krrst evaluate --distilled runs/distill/distilled.safetensors --target cifar100 "
                                 "--root data --out runs/eval",
                                 "krrst evaluate --distilled x_syn.pt --target cifar100 --root data --protocol mkdt "
                                 "--out runs/eval        # the authors' set (y_syn.pt beside it)",
                                 "krrst evaluate --baseline random --teacher runs/teacher/teacher.safetensors --source "
                                 "cifar100 --source-root data --target cifar10 --root data --out runs/eval"],
                       description="Pre-train a fresh network on a distilled set (or a baseline), fine-tune or "
                       "linear-probe it on a labelled target, and append rows to OUT/results.csv; finished "
                       "seeds are skipped, so an interrupted evaluation resumes.")
    evaluate.add_argument("--distilled", default=None,
                          help="the set to evaluate: a krrst file (distilled.safetensors), the authors' x_syn.pt (with "
                          "y_syn.pt beside it), or another method's label set (.pt/.npz/.safetensors holding images "
                          "and labels; krrst.formats.load_label_set), read weights-only")
    evaluate.add_argument("--labels", default=None, metavar="FILE",
                          help="the labels file of a label set stored in two files (e.g. MTT's labels_best.pt)")
    evaluate.add_argument("--mean", type=_floats, default=None, metavar="R,G,B",
                          help="the mean that raw pixels of an x_syn.pt or label set are normalised with (with --std; "
                          "default: the target's, e.g. 0.5071,0.4865,0.4409 for CIFAR-100)")
    evaluate.add_argument("--std", type=_floats, default=None, metavar="R,G,B", help="the std that goes with --mean")
    evaluate.add_argument("--baseline", choices=("random", "kmeans", "high-loss", "none", "full"), default=None,
                          help="evaluate a baseline instead: random subset, k-means coreset, high-loss subset (MKDT's "
                          "initialisation), no pre-training, the teacher itself (rows named full-ssl)")
    evaluate.add_argument("--target", required=True, help="target dataset name (see `krrst datasets`)")
    evaluate.add_argument("--root", required=True, help="the target dataset's folder or .zip")
    evaluate.add_argument("--arch", default="convnet3",
                          help="evaluation architecture (default: convnet3; see `krrst models`)")
    evaluate.add_argument("--widths", type=_widths, default=[],
                          help="ConvNet widths, e.g. 32,64,128 for narrow CPU networks")
    evaluate.add_argument("--protocol", action="append", default=None, help=PROTOCOL_HELP + " (default: finetune)")
    evaluate.add_argument("--seeds", type=int, default=3, help="number of seeds (paired across methods)")
    evaluate.add_argument("--seed", type=int, default=0, help="first seed")
    evaluate.add_argument("--out", required=True, help="run directory receiving results.csv/json/md")
    evaluate.add_argument("--teacher", default=None,
                          help="teacher file (needed by --baseline random, kmeans, high-loss and full)")
    _teacher_arch_args(evaluate)
    evaluate.add_argument("--source", default=None, help="source dataset for --baseline random/kmeans/high-loss")
    evaluate.add_argument("--source-root", default=None, help="its folder or .zip")
    evaluate.add_argument("--m", type=int, default=1000, help="subset size for --baseline random/kmeans/high-loss")
    evaluate.add_argument("--image-size", type=int, default=None,
                          help="resize the target (and a baseline's source images) to N x N (default: the set's size)")
    evaluate.add_argument("--max-per-class", type=int, default=None, help="keep the first K training images per class")
    evaluate.add_argument("--download", action="store_true", help="download the target when absent (where possible)")
    evaluate.add_argument("--skip-corrupt", action="store_true",
                          help="skip image files that cannot be decoded (reported with a count) instead of stopping")
    evaluate.add_argument("--test-fraction", type=float, default=0.2,
                          help="the test share of a labelled folder / HF dataset with no test split (seeded, "
                          "stratified; part of the target's name in the rows)")
    _kd_args(evaluate, "default: krrst trains one on the target, once, cached in OUT/eval/kd-teacher/")
    _common(evaluate, "pretrain, finetune, linear, kd", "pretrain.epochs=50")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_report(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `report` command: tables and report.html of run directories."""
    report = command("report", help="print and write the results table and report.html of a run directory",
                     examples=["krrst report runs/demo", "krrst report runs/eval",
                               "krrst report runs/e1 runs/e2 --out runs/e1-vs-e2   # one page comparing two runs",
                               "krrst report runs/e1 runs/e2 --out cmp --ref e1:random"],
                     description="Rebuild results.md/json/png and report.html from RUN_DIR/results.csv and "
                     "print the table (mean ± std over seeds) and the paired differences against the random "
                     "subset and no pre-training (mean, 95% t-interval, wins). Several run directories are "
                     "merged into one page in --out, their methods named RUN:METHOD.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory (holding results.csv)")
    report.add_argument("--out", default=None,
                        help="folder of the merged report.html and results.md (needed with several RUN_DIRs; "
                        "default: the one RUN_DIR itself)")
    report.add_argument("--ref", action="append", default=None, metavar="METHOD",
                        help="a reference the paired differences are taken against, repeatable, in order: each "
                        "method meets the references after it (default: random, then none); with several runs "
                        "RUN:METHOD, or METHOD for the first run that has it")
    report.set_defaults(handler=_cmd_report)


def _add_run(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the `run` and `demo` commands: a preset's whole pipeline."""
    run = command("run", help="run a preset's whole pipeline: teacher, distil, baselines, evaluate, report",
                  examples=["krrst run --preset demo --steps 50 --out runs/quick",
                            "krrst run --preset cpu-mini --root data --protocol mkdt --out runs/cpu-mini",
                            "krrst run --preset cifar100 --root data --download",
                            "krrst run --preset demo --print-config > demo.json && krrst run --config demo.json "
                            "--set distill.steps=100"],
                  description="Run every stage of a preset into a run directory; a re-run skips finished stages "
                  "and resumes an interrupted one.")
    _run_args(run, None)
    demo = command("demo", help="the offline demo on the CIFAR-10 sample shipped in the package (= run --preset demo)",
                   examples=["krrst demo", "krrst demo --steps 50 --out runs/quick-demo", "krrst demo --print-config"],
                   description="Teacher, distillation, baselines and evaluation on 4,000 real CIFAR-10 images "
                   "shipped in the package; about 4 minutes on 2 idle CPU cores.")
    _run_args(demo, "demo")



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in parser.commands:
        parser.error(str(unknown_name("command", argv[0], parser.commands, "valid commands")))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would show the top-level usage; the command's is the one that helps
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.handler(args)
        status = 0
    except KrrstError as exc:
        print(f"krrst {args.command}: error: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        from krrst.infra.progress import stopped_loops

        where = stopped_loops()
        at = f" ({where[-1]})" if where else ""  # the outermost loop: the stage's own count
        print(f"krrst {args.command}: interrupted{at}; the last checkpoint is kept: re-run the same command to resume",
              file=sys.stderr)
        status = 130
    except BrokenPipeError:  # `krrst ... | head` closed stdout early: what was asked for was read, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail again
        status = 0
    from krrst.infra.distributed import cleanup

    cleanup()  # leave torchrun's process group, if any (a bug's traceback keeps its own way out)
    return status


if __name__ == "__main__":
    sys.exit(main())
