"""Which validation signal predicts accuracy? Both signals of every set in some `krrst run` folders, against accuracy.

    python scripts/validation_signal.py runs/a runs/b ... [--train-steps 10] [--protocol linear] [--root .]

For each run folder, each of its sets (the distilled set and the baselines' subsets) is scored by the distillation's
validation signal (`krrst.distill.ValidationSignal`: held-out KRR loss, relative to the mean predictor's) with
freshly initialised networks (`validation_train_steps=0`, what `distill` logs by default) and with networks first
trained `--train-steps` steps on the set as the pool trains its models. The held-out images and the teacher are the
run's own (its config's `run.heldout_images` split and `teacher/teacher.safetensors` or `run.teacher_path`). Each
set's accuracy is its mean over seeds on `--protocol` in the run's results.csv. It prints one row per set and the
Spearman rank correlation of each signal with accuracy (a lower loss should mean a higher accuracy: a useful signal
has a negative correlation), over all sets and within each run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from krrst.augment import normalize
from krrst.distill import DistillConfig, ValidationSignal
from krrst.distilled import DistilledSet
from krrst.features import batched_features
from krrst.infra.config import config_from_dict
from krrst.pipeline import RunConfig, load_source
from krrst.teacher import load_teacher


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    position = 0
    while position < len(order):  # ties share the mean of their ranks
        end = position
        while end + 1 < len(order) and values[order[end + 1]] == values[order[position]]:
            end += 1
        for index in order[position : end + 1]:
            result[index] = (position + end) / 2
        position = end + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    return statistics.correlation(ra, rb) if len(a) > 2 else float("nan")


def accuracies(run: Path, protocol: str) -> dict[str, float]:
    per_method: dict[str, list[float]] = {}
    with open(run / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["protocol"] == protocol:
                per_method.setdefault(row["method"], []).append(100 * float(row["accuracy"]))
    return {method: statistics.mean(values) for method, values in per_method.items()}


def run_sets(run: Path) -> dict[str, Path]:
    sets = {"krr-st": run / "distill" / "distilled.safetensors"}
    sets.update({path.stem: path for path in sorted((run / "baselines").glob("*.safetensors"))})
    return {method: path for method, path in sets.items() if path.is_file()}


def score_run(run: Path, root: Path, train_steps: int, protocol: str) -> list[dict]:
    config = json.loads((run / "config.json").read_text())
    run_config = config_from_dict(RunConfig, config["run"])
    distill_config = config_from_dict(DistillConfig, config["distill"])
    teacher_path = run / "teacher" / "teacher.safetensors"
    teacher = load_teacher(teacher_path if teacher_path.is_file() else run_config.teacher_path).eval()
    _, heldout = load_source(run_config, root)
    images = normalize(heldout.images, heldout.mean, heldout.std)
    targets = batched_features(teacher, images)
    signals = {
        steps: ValidationSignal(dataclasses.replace(distill_config, validation_train_steps=steps), images, targets,
                                seed=distill_config.seed)
        for steps in (0, train_steps)
    }
    accuracy = accuracies(run, protocol)
    rows = []
    for method, path in run_sets(run).items():
        distilled = DistilledSet.load(path)
        row = {"run": run.name, "method": method, "accuracy": accuracy.get(method, float("nan"))}
        for steps, signal in signals.items():
            row[f"val@{steps}"] = signal(distilled.images, distilled.targets.float()) / signal.reference
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--protocol", default="linear")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for run in args.runs for row in score_run(run, args.root, args.train_steps, args.protocol)]
    keys = ("val@0", f"val@{args.train_steps}")
    print(f"{'run':10s} {'method':8s} {args.protocol:>8s} " + " ".join(f"{key:>9s}" for key in keys))
    for row in rows:
        print(f"{row['run']:10s} {row['method']:8s} {row['accuracy']:8.2f} " + " ".join(f"{row[k]:9.4f}" for k in keys))
    print(f"\nSpearman correlation with {args.protocol} accuracy (negative: lower loss, higher accuracy)")
    for key in keys:
        overall = spearman([row[key] for row in rows], [row["accuracy"] for row in rows])
        print(f"  {key}: all {len(rows)} sets {overall:+.2f}")


if __name__ == "__main__":
    main()
