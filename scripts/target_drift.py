"""Does a distilled set's learned-target drift point where augmentation averaging would take it?

    python scripts/target_drift.py RUN [--teacher FILE] [--views 64] [--padding 4]

drift = Y_s - g(X_s), the learned targets minus the teacher's representations of the final images;
aug shift = E_aug[g(crop_flip(X_s))] - g(X_s), over random crop (zero padding in normalised units) + flip views.
Prints the drift's size relative to the spread of g(X_s), the cosine between drift and aug shift over all entries
(with a control that pairs each image with another's shift), the per-image cosines and the two sizes' ratio.
A cosine well above the control says the targets drift towards an average over augmented views.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from krrst.augment import apply_crop_flip, sample_crop_flip
from krrst.distilled import DistilledSet
from krrst.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a krrst run folder (distill/distilled.safetensors, teacher/teacher.safetensors)")
    parser.add_argument("--teacher", default=None, help="the teacher file (default: RUN/teacher/teacher.safetensors)")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--padding", type=int, default=4)
    args = parser.parse_args()
    result = DistilledSet.load(f"{args.run}/distill/distilled.safetensors")
    teacher = load_teacher(args.teacher or f"{args.run}/teacher/teacher.safetensors")
    images, targets = result.images.float(), result.targets.float()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        plain = teacher(images)
        views = [teacher(apply_crop_flip(images, sample_crop_flip(len(images), args.padding, generator, "cpu"),
                                         args.padding)) for _ in range(args.views)]
        shift = torch.stack(views).mean(0) - plain
    drift = targets - plain
    cosine = F.cosine_similarity(drift.flatten(), shift.flatten(), dim=0)
    control = F.cosine_similarity(drift.flatten(), shift[torch.randperm(len(images), generator=generator)].flatten(),
                                  dim=0)
    per_image = F.cosine_similarity(drift, shift, dim=1)
    relative = drift.pow(2).mean() / (plain - plain.mean(0)).pow(2).mean()
    print(f"{args.run}: relative drift {relative:.3f}; cosine(drift, aug shift) {cosine:.3f} (shuffled control "
          f"{control:.3f}); per image median {per_image.median():.3f}, > 0 for {int((per_image > 0).sum())}/"
          f"{len(images)}; |aug shift| / |drift| {shift.norm() / drift.norm():.2f}")


if __name__ == "__main__":
    main()
