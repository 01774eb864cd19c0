"""DistilledSet: save/load round trip, shape checks, export, the authors' files."""

import pytest
import torch
from PIL import Image

from krrst import DistilledSet
from krrst.infra.errors import KrrstError
from krrst.infra.io import save_tensors

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make_set(m=6, d=5):
    generator = torch.Generator().manual_seed(0)
    return DistilledSet(
        images=torch.randn(m, 3, 8, 8, generator=generator),
        targets=torch.randn(m, d, generator=generator),
        mean=MEAN,
        std=STD,
        source="toy",
        teacher_arch="resnet18",
        config={"m": m},
        step=42,
    )


def test_save_load_round_trip(tmp_path):
    original = make_set()
    original.save(tmp_path / "set.safetensors")
    loaded = DistilledSet.load(tmp_path / "set.safetensors")
    assert torch.equal(loaded.images, original.images) and torch.equal(loaded.targets, original.targets)
    assert (loaded.mean, loaded.std, loaded.step, loaded.config) == (MEAN, STD, 42, {"m": 6})
    assert loaded.teacher_arch == "resnet18" and loaded.feature_dim == 5 and loaded.image_size == 8


def test_storage_bytes_counts_float32_values_or_what_the_parameterisation_recorded(tmp_path):
    plain = make_set(m=6, d=5)
    assert plain.storage_bytes() == 4 * (6 * 3 * 8 * 8 + 6 * 5)
    labels = DistilledSet(images=plain.images, targets=torch.arange(6), mean=MEAN, std=STD, target_kind="hard_labels")
    assert labels.storage_bytes() == 4 * 6 * 3 * 8 * 8 + 8 * 6  # int64 labels
    basis = DistilledSet(images=plain.images, targets=plain.targets, mean=MEAN, std=STD,
                         config={"synthetic": {"kind": "basis", "storage_bytes": 1234}})
    basis.save(tmp_path / "basis.safetensors")
    assert DistilledSet.load(tmp_path / "basis.safetensors").storage_bytes() == 1234


def test_wrong_shapes_are_one_line_errors(tmp_path):
    with pytest.raises(KrrstError, match="6 images but 4 targets"):
        DistilledSet(images=torch.zeros(6, 3, 8, 8), targets=torch.zeros(4, 5), mean=MEAN, std=STD)
    with pytest.raises(KrrstError, match="m x C x H x W"):
        DistilledSet(images=torch.zeros(6, 8, 8), targets=torch.zeros(6, 5), mean=MEAN, std=STD)
    # A file with the right format tag but a missing tensor / wrong shape.
    save_tensors(tmp_path / "no_targets.safetensors", {"images": torch.zeros(2, 3, 4, 4)},
                 {"format": "krrst.DistilledSet", "mean": list(MEAN), "std": list(STD)})
    with pytest.raises(KrrstError, match="no 'targets' tensor"):
        DistilledSet.load(tmp_path / "no_targets.safetensors")
    save_tensors(tmp_path / "flat.safetensors", {"images": torch.zeros(2, 48), "targets": torch.zeros(2, 5)},
                 {"format": "krrst.DistilledSet", "mean": list(MEAN), "std": list(STD)})
    with pytest.raises(KrrstError, match="m x C x H x W"):
        DistilledSet.load(tmp_path / "flat.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {})
    with pytest.raises(KrrstError, match="not a krrst DistilledSet"):
        DistilledSet.load(tmp_path / "other.safetensors")


def test_to_uint8_inverts_normalisation_and_exports(tmp_path):
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    normalised = (pixels.float() / 255 - mean) / std
    distilled = DistilledSet(images=normalised, targets=torch.zeros(4, 2), mean=MEAN, std=STD)
    assert torch.equal(distilled.to_uint8(), pixels)
    folder = distilled.export_imagefolder(tmp_path / "png")
    files = sorted(folder.glob("*.png"))
    assert len(files) == 4
    assert torch.equal(torch.from_numpy(__import__("numpy").array(Image.open(files[2]))).permute(2, 0, 1), pixels[2])
    grid = Image.open(distilled.preview(tmp_path / "preview.png"))
    assert grid.size == (2 * 9 + 1, 2 * 9 + 1), "2x2 grid of 8px images with 1px padding"


def test_repr_is_a_short_summary_not_the_tensors():
    distilled = DistilledSet(
        images=torch.randn(200, 3, 32, 32),
        targets=torch.randn(200, 2048),
        mean=MEAN,
        std=STD,
        source="cifar10",
        teacher_arch="resnet18_pad2",
        config={"synthetic": {"kind": "basis", "storage_bytes": 1000}},
        step=1000,
    )
    text = repr(distilled)
    assert len(text) < 300 and "tensor(" not in text
    assert text == (
        "DistilledSet(method='krr-st', 200 images 3x32x32, targets 200x2048 (representation), source='cifar10', "
        "teacher=resnet18_pad2, parameterization=basis, step=1000)"
    )
    labels = DistilledSet(torch.randn(10, 3, 8, 8), torch.arange(10), MEAN, STD, target_kind="hard_labels", method="dc")
    assert repr(labels) == "DistilledSet(method='dc', 10 images 3x8x8, targets 10 (hard_labels), step=0)"
