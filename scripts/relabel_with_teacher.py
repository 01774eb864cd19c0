"""Copy a finished run with its distilled images re-labelled by the teacher, to evaluate them apart from their targets.

    python scripts/relabel_with_teacher.py RUN OUT [--teacher FILE]
    krrst run <RUN's options> --set run.methods=krr-st --force --out OUT

What `distill.final_targets=teacher` does at the end of a distillation, done afterwards on a set distilled with the
paper's learned targets: `Y_s` becomes the teacher's representations of the final images `X_s` (pixel sets only).
OUT receives RUN's config.json, env.json, teacher/ and distill/ (the other stages' folders are left out, so the
run above evaluates the re-labelled set only); pairing its rows with RUN's by evaluation seed isolates what the
learned targets cost or gain against the teacher's on the very same images.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from krrst.distilled import DistilledSet
from krrst.report import teacher_representations
from krrst.teacher import load_teacher

DISTILLED = Path("distill") / "distilled.safetensors"


def relabel(distilled: DistilledSet, teacher: torch.nn.Module) -> DistilledSet:
    """The set with the teacher's representations of its images as targets (a library teacher fed its own input)."""
    features = teacher_representations(teacher, distilled)
    return dataclasses.replace(distilled, targets=features.to(distilled.targets.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished krrst run folder (distill/distilled.safetensors)")
    parser.add_argument("out", type=Path, help="the new run folder (must not exist)")
    parser.add_argument("--teacher", default=None, help="the teacher file (default: RUN/teacher/teacher.safetensors)")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    distilled = DistilledSet.load(args.run / DISTILLED)
    synthetic = distilled.config.get("synthetic", {})
    if synthetic.get("kind", "pixels") != "pixels" or len(synthetic.get("views") or ["identity"]) > 1:
        # a basis set keeps a low-rank fit of the teacher's targets, fixed views the predictor's (distill's _finish)
        parser.error(f"{args.run / DISTILLED} is not a plain pixel set; use distill.final_targets=teacher instead")
    teacher = load_teacher(args.teacher or args.run / "teacher" / "teacher.safetensors")
    args.out.mkdir(parents=True)
    for name in ("config.json", "env.json"):
        shutil.copy2(args.run / name, args.out / name)
    for name in ("teacher", "distill"):
        if (args.run / name).is_dir():
            shutil.copytree(args.run / name, args.out / name)
    relabelled = relabel(distilled, teacher)
    relabelled.save(args.out / DISTILLED)
    features = relabelled.targets.float()
    drift = (distilled.targets.float() - features).pow(2).mean() / features.var(0).mean()
    print(f"{args.out / DISTILLED}: {len(features)} images re-labelled by the teacher "
          f"(their learned targets were {drift.item():.3f} relative MSE away)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
