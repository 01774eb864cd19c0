"""`DistilledSet`: the one type every synthetic or baseline set takes downstream.

A KRR-ST set, a random subset with teacher targets, a k-means coreset and a
label-based set from another method are all a `DistilledSet`, so they go
through the identical pre-training and fine-tuning code. Images are stored
normalised (the space the networks see); `to_uint8()` undoes it for export.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from krrst.infra.errors import KrrstError
from krrst.infra.finite import check_finite
from krrst.infra.io import atomic_write, load_tensors, save_tensors

TARGET_KINDS = ("representation", "hard_labels", "soft_labels")
FORMAT_VERSION = 1
# the fields a file's metadata holds as they are, beside the format, its version, mean and std
_METADATA_FIELDS = ("target_kind", "method", "source", "teacher_arch", "config", "step")


@dataclasses.dataclass
class DistilledSet:
    """Synthetic images and their targets, with what is needed to use them.

    Attributes:
        images: m x C x H x W float, normalised with `mean`/`std`.
        targets: m x d representations (`target_kind="representation"`, MSE
            pre-training), m class indices (`"hard_labels"`) or m x K
            logits/probabilities (`"soft_labels"`), both pre-trained with
            cross-entropy.
        mean, std: the per-channel normalisation of `images`.
        target_kind: one of `TARGET_KINDS`.
        method: what produced the set (`krr-st`, `random`, `kmeans`, a file name).
        source: the source dataset's name.
        teacher_arch: the teacher's architecture, when targets are its features.
        config: the resolved config that produced the set (JSON-able).
        step: the outer step the set was taken at.
    """

    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_kind: str = "representation"
    method: str = "krr-st"
    source: str = ""
    teacher_arch: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.validate()

    def validate(self, where: str = "distilled set") -> None:
        """Check shapes and kinds; a mismatch is a one-line `KrrstError`."""
        if self.images.dim() != 4:
            raise KrrstError(f"{where}: images must be m x C x H x W, got shape {tuple(self.images.shape)}")
        m, channels = self.images.shape[:2]
        if len(self.mean) != channels or len(self.std) != channels:
            raise KrrstError(f"{where}: mean/std have {len(self.mean)} channels, images have {channels}")
        if not all(math.isfinite(v) and v > 0 for v in self.std) or not all(math.isfinite(v) for v in self.mean):
            raise KrrstError(f"{where}: mean {list(self.mean)} and std {list(self.std)} must be finite, std > 0")
        if self.target_kind not in TARGET_KINDS:
            raise KrrstError(f"{where}: target_kind {self.target_kind!r} is not one of {', '.join(TARGET_KINDS)}")
        if self.targets.shape[0] != m:
            raise KrrstError(f"{where}: {m} images but {self.targets.shape[0]} targets")
        expected_dim = 1 if self.target_kind == "hard_labels" else 2
        if self.targets.dim() != expected_dim:
            raise KrrstError(f"{where}: {self.target_kind} targets must have {expected_dim} dimension(s), "
                             f"got shape {tuple(self.targets.shape)}")
        if self.target_kind == "hard_labels" and (self.targets.dtype.is_floating_point or self.targets.min() < 0):
            raise KrrstError(f"{where}: hard labels must be non-negative integers")

    def __repr__(self) -> str:
        # The dataclass default prints every tensor element: kilobytes for one set.
        shape = "x".join(str(n) for n in self.images.shape[1:])
        targets = "x".join(str(n) for n in self.targets.shape)
        synthetic = self.config.get("synthetic") if isinstance(self.config, dict) else None
        kind = synthetic.get("kind") if isinstance(synthetic, dict) else None
        extra = f", parameterization={kind}" if kind else ""
        teacher = f", teacher={self.teacher_arch}" if self.teacher_arch else ""
        source = f", source={self.source!r}" if self.source else ""
        return (f"DistilledSet(method={self.method!r}, {len(self)} images {shape}, targets {targets} "
                f"({self.target_kind}){source}{teacher}{extra}, step={self.step})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def feature_dim(self) -> int:
        """Size of a representation target, or the number of classes of a label set."""
        return int(self.targets.max()) + 1 if self.target_kind == "hard_labels" else self.targets.shape[1]

    def storage_bytes(self) -> int:
        """Bytes the set takes as stored, for comparisons "at the same storage".

        What its parameterisation recorded (`config["synthetic"]["storage_bytes"]`:
        coefficients and bases of a basis set, a fixed-view predictor), else the
        images as float32 plus the targets as they are held.
        """
        recorded = self.config.get("synthetic", {}).get("storage_bytes") if isinstance(self.config, dict) else None
        if isinstance(recorded, int) and recorded > 0:
            return recorded
        return 4 * self.images.numel() + self.targets.numel() * self.targets.element_size()

    def to(self, device: str | torch.device) -> "DistilledSet":
        return dataclasses.replace(self, images=self.images.to(device), targets=self.targets.to(device))

    def detach(self) -> "DistilledSet":
        return dataclasses.replace(self, images=self.images.detach().clone(), targets=self.targets.detach().clone())

    # -- files ----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write images, targets and metadata to a safetensors file, atomically."""
        metadata = {"format": "krrst.DistilledSet", "version": FORMAT_VERSION, "mean": list(self.mean),
                    "std": list(self.std), **{name: getattr(self, name) for name in _METADATA_FIELDS}}
        save_tensors(path, {"images": self.images.float(), "targets": self.targets}, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "DistilledSet":
        """Read a set written by `save`; a missing field, bad shape or NaN/inf value is a one-line `KrrstError`."""
        tensors, metadata = load_tensors(path, "distilled set")
        where = f"distilled set {path}"
        if metadata.get("format") != "krrst.DistilledSet":
            raise KrrstError(f"{where} is not a krrst DistilledSet file (no 'format' metadata)")
        absent = [f"'{name}' tensor" for name in ("images", "targets") if name not in tensors]
        absent += [f"'{name}' in its metadata" for name in ("mean", "std") if name not in metadata]
        if absent:
            raise KrrstError(f"{where} has no {absent[0]}")
        for name in ("images", "targets"):  # NaN pre-trains without a word into a chance-level result
            check_finite(tensors[name], where, name)
        return cls(images=tensors["images"].to(map_location), targets=tensors["targets"].to(map_location),
                   mean=tuple(metadata["mean"]), std=tuple(metadata["std"]),
                   target_kind=metadata.get("target_kind", "representation"),
                   method=metadata.get("method", Path(path).stem), source=metadata.get("source", ""),
                   teacher_arch=metadata.get("teacher_arch"), config=metadata.get("config", {}),
                   step=int(metadata.get("step", 0)))

    # -- export ---------------------------------------------------------------
    def to_uint8(self) -> torch.Tensor:
        """The images in raw pixels, m x C x H x W uint8 (clamped to [0, 255])."""
        mean = torch.tensor(self.mean, device=self.images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.images.device).view(1, -1, 1, 1)
        pixels = (self.images.detach().float() * std + mean).clamp(0, 1)
        return (pixels * 255).round().to(torch.uint8).cpu()

    def export_imagefolder(self, directory: str | os.PathLike) -> Path:
        """Write every image as `directory/<index>.png`; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        width = len(str(len(self) - 1))
        for index, image in enumerate(self.to_uint8()):
            _write_png(directory / f"{index:0{width}d}.png", image)
        return directory

    def preview(self, path: str | os.PathLike, max_images: int = 100, nrow: int | None = None) -> Path:
        """Write a grid PNG of the first `max_images` images (torchvision's `make_grid`)."""
        from torchvision.utils import make_grid

        images = self.to_uint8()[:max_images]
        nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
        _write_png(path, make_grid(images, nrow=nrow, padding=1, pad_value=255))
        return Path(path)


def _write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """A C x H x W uint8 image as a PNG file, written atomically."""
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
