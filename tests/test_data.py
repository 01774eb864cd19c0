"""krrst.data on the real CIFAR-10 / Tiny-ImageNet zips, tiny fakes of every other layout, the cache, bad input."""

from __future__ import annotations

import io
import os
import pickle
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from krrst.data import CIFAR10_CLASSES, ImageSet, cache_file, list_datasets, load_images
from krrst.infra.errors import KrrstError

# ---------------------------------------------------------------------------------------------------------------------
# Helpers that write images and archives in the official layouts.

PALETTE = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250), (250, 10, 250)]


def solid(
    colour: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """An encoded solid-colour image (width x height = size); colours survive JPEG to within a few levels."""
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder.parent).as_posix())
    return zip_path


def mean_colours(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean RGB, N x 3 floats."""
    return images.float().mean(dim=(2, 3))


def assert_colours(image_set: ImageSet, expected: list[tuple[int, int, int]]) -> None:
    got = mean_colours(image_set.images)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=4), (got, expected)


def savemat(path: Path, mapping: dict) -> None:
    from scipy.io import savemat as scipy_savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_savemat(str(path), mapping)


# ---------------------------------------------------------------------------------------------------------------------
# Real data: CIFAR-10 JPEG zip and Tiny-ImageNet zip.


def test_cifar10_zip_small_split_order_shapes_and_pixels(cifar10_small, shared_data):
    train, test = cifar10_small
    assert (len(train), len(test)) == (2000, 1000)
    assert train.images.shape == (2000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.image_size == 32
    assert train.class_names == CIFAR10_CLASSES == test.class_names and train.name == "cifar10-jpeg"
    assert torch.equal(train.labels.bincount(), torch.full((10,), 200))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 100))
    assert train.labels.dtype == torch.int64 and int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    # sorted order: class by class, the first 200 file names of each class
    assert torch.equal(train.labels, torch.arange(10).repeat_interleave(200))
    assert train.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert train.std == pytest.approx((0.2470, 0.2435, 0.2616))
    # image k of class "cat" is member cat/<k>.jpg, decoded as Pillow decodes it (libjpeg variants differ by ~1 level)
    with zipfile.ZipFile(shared_data / "cifar10-jpeg.zip") as archive:
        for k in (0, 137):
            member = f"cifar10-jpeg/train/cat/{k:04d}.jpg"
            reference = torch.from_numpy(np.array(Image.open(io.BytesIO(archive.read(member))).convert("RGB")))
            ours = train.images[3 * 200 + k].permute(1, 2, 0)
            assert (ours.float() - reference.float()).abs().mean() < 1.5


def test_pillow_fallback_agrees_with_fast_decoder(shared_data, monkeypatch):
    import krrst.data

    fast = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "test", max_per_class=3, cache_dir=False)
    monkeypatch.setattr(krrst.data, "_fast_decoder", lambda: None)
    pillow = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "test", max_per_class=3, cache_dir=False)
    assert torch.equal(pillow.labels, fast.labels)
    assert (pillow.images.float() - fast.images.float()).abs().mean() < 1.5


@pytest.fixture(scope="module")
def cifar10_full_cached(shared_data, tmp_path_factory):
    """The whole CIFAR-10 train split, read cold into a fresh cache folder, with the seconds it took."""
    cache_dir = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    train = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "train", cache_dir=cache_dir)
    return train, time.perf_counter() - start, cache_dir


def test_cifar10_zip_full_train_counts_and_pixel_stats(cifar10_full_cached):
    train, _, _ = cifar10_full_cached
    assert train.images.shape == (50000, 3, 32, 32)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 5000))
    pixels = train.images[::10].double() / 255
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.transpose(0, 1).reshape(3, -1).std(dim=1)
    # JPEG re-encoding moves the stats a little away from the published ones
    assert torch.allclose(mean, torch.tensor(train.mean, dtype=torch.float64), atol=0.01)
    assert torch.allclose(std, torch.tensor(train.std, dtype=torch.float64), atol=0.01)


def test_cache_second_load_is_equal_faster_and_memory_mapped(cifar10_full_cached, shared_data):
    train, cold_seconds, cache_dir = cifar10_full_cached
    marker = cache_file("imagefolder", shared_data / "cifar10-jpeg.zip", "train", cache_dir=cache_dir)
    assert marker.is_file() and marker.with_name(marker.name.replace(".json", ".images.npy")).is_file()
    start = time.perf_counter()
    again = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "train", cache_dir=cache_dir)
    warm_seconds = time.perf_counter() - start
    assert warm_seconds < cold_seconds / 3 and warm_seconds < 2.0
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    for field in ("class_names", "mean", "std", "name"):
        assert getattr(again, field) == getattr(train, field)
    # a different max_per_class is a different entry, not a slice of this one
    other = cache_file("imagefolder", shared_data / "cifar10-jpeg.zip", "train", max_per_class=5, cache_dir=cache_dir)
    assert other != marker and not other.exists()


def test_tinyimagenet_zip_train_and_val(shared_data, tmp_path):
    root = shared_data / "tiny-imagenet-200-250pc.zip"
    train = load_images("tinyimagenet", root, "train", max_per_class=2, cache_dir=False)
    assert train.images.shape == (400, 3, 64, 64)
    assert len(train.class_names) == 200 and torch.equal(train.labels, torch.arange(200).repeat_interleave(2))
    with zipfile.ZipFile(root) as archive:
        wnids = archive.read("tiny-imagenet-200/wnids.txt").decode().split()
        words = dict(line.split("\t", 1) for line in archive.read("tiny-imagenet-200/words.txt").decode().splitlines())
    assert train.class_names[0] == words[wnids[0]].split(",")[0].strip()
    assert train.mean == (0.485, 0.456, 0.406) and train.std == (0.229, 0.224, 0.225)

    val = load_images("tinyimagenet", root, "val", cache_dir=False)
    assert val.images.shape == (10000, 3, 64, 64)
    assert torch.equal(val.labels.bincount(minlength=200), torch.full((200,), 50))
    with zipfile.ZipFile(root) as archive:
        first = archive.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()[0].split("\t")
    assert first[0] == "val_0.JPEG" and val.labels[0] == wnids.index(first[1])
    # greyscale JPEGs come out as 3 equal channels
    red, green, blue = val.images.flatten(2).unbind(1)
    grey = ((red == green) & (green == blue)).all(dim=1)
    assert int(grey.sum()) > 0

    small = load_images("tinyimagenet", root, "val", image_size=32, max_per_class=1, cache_dir=False)
    assert small.images.shape == (200, 3, 32, 32)
    # batched antialiased resize equals resizing the native images one by one
    first_of_each_class = [int((val.labels == c).nonzero()[0]) for c in small.labels[:5]]
    expected = torch.stack([F.resize(val.images[i], [32, 32], antialias=True) for i in first_of_each_class])
    assert torch.equal(small.images[:5], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny fakes of the other layouts, read through the same code paths.


def test_imagefolder_folder_with_splits_at_top_level_and_computed_stats(tmp_path):
    root = tmp_path / "shapes"
    colours = {"circle": (200, 40, 40), "square": (40, 200, 90)}
    for name, colour in colours.items():
        for i in range(3):
            write(root / "train" / name / f"{i}.png", solid(colour, (12, 12), "PNG"))
    write(root / "test" / "circle" / "0.png", solid((1, 2, 3), (12, 12), "PNG"))
    write(root / "train" / "square" / "3.bmp", solid((40, 200, 90), (12, 12), "BMP"))  # Pillow decodes BMP
    image_set = load_images("imagefolder", root, "train", cache_dir=False, num_workers=2)
    assert image_set.class_names == ["circle", "square"] and image_set.name == "shapes"
    assert torch.equal(image_set.labels, torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    expected = torch.tensor([[200, 40, 40]] * 3 + [[40, 200, 90]] * 4, dtype=torch.uint8)
    assert torch.equal(image_set.images, expected[:, :, None, None].expand(7, 3, 12, 12))
    pixels = image_set.images.double() / 255
    assert image_set.mean == pytest.approx(tuple(pixels.mean(dim=(0, 2, 3)).tolist()))
    std = pixels.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
    assert image_set.std == pytest.approx(tuple(std.tolist()))
    # the same files zipped with the splits at the top level of the zip
    zipped = tmp_path / "flat.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("train/", "")  # folder entries and macOS junk are not images
        archive.writestr("__MACOSX/train/circle/._0.png", b"junk")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(root).as_posix())
    from_zip = load_images("imagefolder", zipped, "train", cache_dir=False)
    assert torch.equal(from_zip.images, image_set.images) and torch.equal(from_zip.labels, image_set.labels)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    root = tmp_path / "mixed"
    write(root / "train" / "a" / "0.png", solid((10, 20, 30), (8, 8), "PNG"))
    write(root / "train" / "a" / "1.png", solid((10, 20, 30), (16, 12), "PNG"))
    with pytest.raises(KrrstError, match=r"1\.png is 16x12.*image_size"):
        load_images("imagefolder", root, "train", cache_dir=False)
    resized = load_images("imagefolder", root, "train", image_size=8, cache_dir=False)
    assert resized.images.shape == (2, 3, 8, 8) and torch.all(resized.images[1, :, 4, 4] == torch.tensor([10, 20, 30]))


def _write_cifar(root: Path, hundred: bool) -> dict[str, np.ndarray]:
    """The python-pickle CIFAR layout: 6 random images per batch, 3 classes; returns the arrays written."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    written = {}
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    labels_key = "fine_labels" if hundred else "labels"
    for name in names:
        data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
        labels = [0, 1, 2, 0, 1, 2]
        written[name] = data
        batch = {"batch_label": name, labels_key: labels, "data": data, "filenames": [f"{i}.png" for i in range(6)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    if hundred:
        meta = {"fine_label_names": ["apple", "bee", "cup"], "coarse_label_names": ["food", "insect", "thing"]}
    else:
        meta = {"label_names": ["cat", "dog", "emu"], "num_cases_per_batch": 6, "num_vis": 3072}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_python_pickles(tmp_path, hundred):
    """torchvision's CIFAR classes md5-check the files, so the reader reads the official layout itself."""
    name = "cifar100" if hundred else "cifar10"
    written = _write_cifar(tmp_path, hundred)
    train = load_images(name, tmp_path, "train", cache_dir=False)
    train_batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    expected = np.concatenate([written[b] for b in train_batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2] * len(train_batches)
    assert train.class_names == (["apple", "bee", "cup"] if hundred else ["cat", "dog", "emu"])
    assert train.mean == ((0.5071, 0.4865, 0.4409) if hundred else (0.4914, 0.4822, 0.4465))
    test = load_images(name, tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py"), "test",
                       image_size=16, max_per_class=1, cache_dir=False)
    first_three = torch.from_numpy(written["test" if hundred else "test_batch"][:3].reshape(3, 3, 32, 32))
    reference = F.resize(first_three, [16, 16], antialias=True)
    assert torch.equal(test.images, reference) and test.labels.tolist() == [0, 1, 2]


def test_cifar_pickle_refuses_code(tmp_path):
    _write_cifar(tmp_path, False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    refused = r"data_batch_1 is not a readable CIFAR python batch \(UnpicklingError: refusing to load"
    with pytest.raises(KrrstError, match=refused):
        load_images("cifar10", tmp_path, "train", cache_dir=False)


def test_cifar_pickle_damaged_into_any_exception_is_one_line(tmp_path):
    _write_cifar(tmp_path, False)
    # An allowed global called with bad arguments: the unpickler raises LookupError, not UnpicklingError.
    damaged = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00nope\x86R."
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(damaged)
    with pytest.raises(KrrstError, match=r"data_batch_1 is not a readable CIFAR python batch \(LookupError: unknown"):
        load_images("cifar10", tmp_path, "train", cache_dir=False)


def test_cifar_missing_suggests_download(tmp_path):
    with pytest.raises(KrrstError, match=r"does not exist; pass download=True \(--download\)"):
        load_images("cifar10", tmp_path / "nothing", "train", cache_dir=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KrrstError, match=r"no cifar-10-batches-py/batches.meta found.*--download"):
        load_images("cifar10", tmp_path / "empty", "train", cache_dir=False)


def test_cifar_download_goes_through_torchvision_then_the_reader(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, download=False, **kwargs):  # stands in for the network: writes the official layout
        calls.append((root, download))
        if not (Path(root) / "cifar-10-batches-py").exists():
            _write_cifar(Path(root), hundred=False)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    root = tmp_path / "downloads"
    train = load_images("cifar10", root, "train", download=True, cache_dir=tmp_path / "cache")
    assert calls == [(str(root), True)] and len(train) == 30 and train.class_names == ["cat", "dog", "emu"]
    # the entry is keyed after the download, so the next load is a cache hit that does not fetch again
    assert cache_file("cifar10", root, "train", cache_dir=tmp_path / "cache").is_file()
    assert torch.equal(load_images("cifar10", root, "train", download=True, cache_dir=tmp_path / "cache").images,
                       train.images)
    assert len(calls) == 1

    def offline(root, download=False, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(KrrstError, match=r"downloading cifar10 into .*elsewhere failed \(OSError: Temporary failure"):
        load_images("cifar10", tmp_path / "elsewhere", "train", download=True, cache_dir=False)
    with pytest.raises(KrrstError, match=r"krrst cannot download cub; fetch it from its official site"):
        load_images("cub", tmp_path / "no-cub", "train", download=True, cache_dir=False)


def test_aircraft_layout_variable_sizes_resized_to_32(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    write(data / "variants.txt", "707-320\nF/A-18\nA340-500\n")
    write(data / "images_variant_trainval.txt", "0000001 F/A-18\n0000002 707-320\n0000003 A340-500\n0000004 F/A-18\n")
    write(data / "images_variant_test.txt", "0000005 A340-500\n")
    for i, size in enumerate([(50, 40), (33, 61), (40, 50), (32, 32), (90, 70)], start=1):
        write(data / "images" / f"{i:07d}.jpg", solid(PALETTE[i], size))
    train = load_images("aircraft", tmp_path, "train", cache_dir=False)
    assert train.images.shape == (4, 3, 32, 32) and train.class_names == ["707-320", "F/A-18", "A340-500"]
    assert train.labels.tolist() == [1, 0, 2, 1]
    assert_colours(train, PALETTE[1:5])
    test = load_images("aircraft", tmp_path, "test", image_size=8, cache_dir=False)
    assert test.images.shape == (1, 3, 8, 8) and test.labels.tolist() == [2]


def test_flowers_layout_train_is_train_plus_val(tmp_path):
    base = tmp_path / "flowers-102"
    labels = np.array([[1, 2, 1, 3, 2, 3]])  # 1-based, per image id 1..6
    savemat(base / "imagelabels.mat", {"labels": labels})
    savemat(base / "setid.mat", {"trnid": np.array([[4, 1]]), "valid": np.array([[2]]), "tstid": np.array([[3, 5, 6]])})
    for i in range(1, 7):
        write(base / "jpg" / f"image_{i:05d}.jpg", solid(PALETTE[i - 1], (60 + i, 45)))
    train = load_images("flowers", tmp_path, "train", cache_dir=False)
    assert train.labels.tolist() == [0, 1, 2]  # image ids 1, 2, 4
    assert_colours(train, [PALETTE[0], PALETTE[1], PALETTE[3]])
    assert len(train.class_names) == 102 and train.class_names[0] == "pink primrose"
    test = load_images("flowers", base, "test", cache_dir=False)
    assert test.labels.tolist() == [0, 1, 2] and len(test) == 3


def _cars_annotations(entries: list[tuple[str, int]]) -> np.ndarray:
    records = np.zeros((1, len(entries)), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("class", "O"), ("fname", "O")])
    for i, (fname, label) in enumerate(entries):
        records[0, i] = (np.array([[1]]), np.array([[1]]), np.array([[label]], dtype=np.uint8), np.array([fname]))
    return records


def test_cars_layout(tmp_path):
    base = tmp_path / "stanford_cars"
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    train_annotations = _cars_annotations([("00001.jpg", 2), ("00002.jpg", 1)])
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": train_annotations})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _cars_annotations([("00001.jpg", 1)])})
    write(base / "cars_train" / "00001.jpg", solid(PALETTE[0], (70, 40)))
    write(base / "cars_train" / "00002.jpg", solid(PALETTE[1], (40, 70)))
    write(base / "cars_test" / "00001.jpg", solid(PALETTE[2], (50, 50)))
    train = load_images("cars", tmp_path, "train", image_size=16, cache_dir=False)
    assert train.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert train.labels.tolist() == [1, 0] and train.images.shape == (2, 3, 16, 16)
    assert_colours(train, PALETTE[:2])
    test = load_images("cars", base, "test", cache_dir=False)
    assert test.labels.tolist() == [0] and test.image_size == 32
    assert_colours(test, [PALETTE[2]])


def _write_cub(tmp_path: Path) -> Path:
    base = tmp_path / "CUB_200_2011"
    write(base / "classes.txt", "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    files = ["001.Black_footed_Albatross/a.jpg", "001.Black_footed_Albatross/b.jpg", "002.Laysan_Albatross/c.jpg"]
    write(base / "images.txt", "".join(f"{i} {f}\n" for i, f in enumerate(files, start=1)))
    write(base / "image_class_labels.txt", "1 1\n2 1\n3 2\n")
    write(base / "train_test_split.txt", "1 1\n2 0\n3 1\n")
    for i, f in enumerate(files):
        # one greyscale JPEG: it must come out as RGB
        write(base / "images" / f, solid(PALETTE[i], (30 + 10 * i, 40), mode="L" if i == 2 else "RGB"))
    return base


def test_cub_layout_from_folder_and_zip(tmp_path):
    base = _write_cub(tmp_path)
    train = load_images("cub", tmp_path, "train", cache_dir=False)
    assert train.class_names == ["Black_footed_Albatross", "Laysan_Albatross"] and train.labels.tolist() == [0, 1]
    grey_level = Image.new("RGB", (1, 1), PALETTE[2]).convert("L").getpixel((0, 0))
    assert_colours(train, [PALETTE[0], (grey_level,) * 3])
    test = load_images("cub", base, "test", cache_dir=False)
    assert test.labels.tolist() == [0]
    from_zip = load_images("cub", zip_folder(base, tmp_path / "CUB_200_2011.zip"), "train", cache_dir=False)
    assert torch.equal(from_zip.images, train.images) and torch.equal(from_zip.labels, train.labels)


def test_dogs_layout(tmp_path):
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    train_files = [f"{folders[1]}/n02085782_1.jpg", f"{folders[0]}/n02085620_7.jpg"]
    test_files = [f"{folders[0]}/n02085620_9.jpg"]
    for i, f in enumerate(train_files + test_files):
        write(tmp_path / "Images" / f, solid(PALETTE[i], (45, 35 + i)))

    def cell(names: list[str]) -> np.ndarray:
        return np.array([[np.array([n])] for n in names], dtype=object)

    savemat(tmp_path / "lists" / "train_list.mat", {"file_list": cell(train_files), "labels": np.array([[2.0], [1.0]])})
    savemat(tmp_path / "lists" / "test_list.mat", {"file_list": cell(test_files), "labels": np.array([[1.0]])})
    train = load_images("dogs", tmp_path, "train", cache_dir=False)
    assert train.class_names == ["Chihuahua", "Japanese_spaniel"] and train.labels.tolist() == [1, 0]
    assert_colours(train, PALETTE[:2])
    assert load_images("dogs", tmp_path, "test", cache_dir=False).labels.tolist() == [0]


def test_released_layouts_read_from_their_tar_archives(tmp_path):
    """A .tar.gz as downloaded (CIFAR's pickles, read at random) and a .tar (Tiny-ImageNet's images, walked by
    prefix) give the same sets as the extracted folders."""
    _write_cifar(tmp_path / "cifar", hundred=False)
    cifar_tar = tar_folder(tmp_path / "cifar" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz", "w:gz")
    for split in ("train", "test"):
        from_tar = load_images("cifar10", cifar_tar, split, cache_dir=False)
        from_folder = load_images("cifar10", tmp_path / "cifar", split, cache_dir=False)
        assert torch.equal(from_tar.images, from_folder.images) and torch.equal(from_tar.labels, from_folder.labels)
    tiny = tmp_path / "tiny" / "tiny-imagenet-200"
    write(tiny / "wnids.txt", "n02\nn01\n")
    write(tiny / "words.txt", "n01\tgoldfish, Carassius auratus\nn02\tgreat white shark\n")
    for c, wnid in enumerate(("n02", "n01")):
        for i in range(2):
            write(tiny / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", solid(PALETTE[2 * c + i], (8, 8)))
        write(tiny / "train" / wnid / f"{wnid}_boxes.txt", "not an image")
    write(tiny / "val" / "images" / "val_0.JPEG", solid(PALETTE[5], (8, 8)))
    write(tiny / "val" / "val_annotations.txt", "val_0.JPEG\tn01\t0\t0\t8\t8\n")
    tiny_tar = tar_folder(tiny, tmp_path / "tiny.tar", "w")
    for split, labels in (("train", [0, 0, 1, 1]), ("val", [1])):
        from_tar = load_images("tinyimagenet", tiny_tar, split, cache_dir=False)
        assert from_tar.labels.tolist() == labels and from_tar.class_names == ["great white shark", "goldfish"]
        assert torch.equal(from_tar.images, load_images("tinyimagenet", tiny.parent, split, cache_dir=False).images)
    assert_colours(load_images("tinyimagenet", tiny_tar, "train", cache_dir=False), PALETTE[:4])


def test_imagenet64_npz_batches(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    for name, labels in (("train_data_batch_1", [1, 2, 1]), ("train_data_batch_2", [3, 1, 2]), ("val_data", [2, 3])):
        data = rng.integers(0, 256, size=(len(labels), 3 * 64 * 64), dtype=np.uint8)
        np.savez(tmp_path / f"{name}.npz", data=data, labels=np.array(labels), mean=np.zeros(3 * 64 * 64))
        batches[name] = data
    write(tmp_path / "map_clsloc.txt", "n02119789 1 kit_fox\nn02100735 2 English_setter\nn02110185 3 Siberian_husky\n")
    train = load_images("imagenet64", tmp_path, "train", cache_dir=False)
    all_data = np.concatenate([batches["train_data_batch_1"], batches["train_data_batch_2"]]).reshape(-1, 3, 64, 64)
    assert torch.equal(train.images, torch.from_numpy(all_data))
    assert train.labels.tolist() == [0, 1, 0, 2, 0, 1]
    assert train.class_names == ["kit_fox", "English_setter", "Siberian_husky"]
    few = load_images("imagenet64", tmp_path, "train", image_size=32, max_per_class=1, cache_dir=False)
    assert few.labels.tolist() == [0, 1, 2]
    assert torch.equal(few.images, F.resize(torch.from_numpy(all_data[[0, 1, 3]]), [32, 32], antialias=True))
    val = load_images("imagenet64", tmp_path, "val", cache_dir=False)
    assert torch.equal(val.images, torch.from_numpy(batches["val_data"].reshape(-1, 3, 64, 64)))
    assert val.labels.tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Cache behaviour on a fake, and bad input.


def test_cache_keys_on_root_mtime_and_can_be_disabled(tmp_path):
    root = tmp_path / "set"
    write(root / "train" / "a" / "0.png", solid((9, 9, 9), (4, 4), "PNG"))
    cache_dir = tmp_path / "cache"
    load_images("imagefolder", root, "train", cache_dir=False)
    assert not cache_dir.exists()
    first = load_images("imagefolder", root, "train", cache_dir=cache_dir)
    marker = cache_file("imagefolder", root, "train", cache_dir=cache_dir)
    assert marker.is_file()
    # a new class folder changes the root's mtime: the old entry is not reused
    write(root / "train" / "b" / "0.png", solid((99, 99, 99), (4, 4), "PNG"))
    os.utime(root, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = load_images("imagefolder", root, "train", cache_dir=cache_dir)
    assert (len(first), len(second)) == (1, 2)
    assert cache_file("imagefolder", root, "train", cache_dir=cache_dir) != marker
    # a damaged entry is ignored with a warning, and the data is read again (`second` maps the entry's file:
    # keep a copy of its pixels before damaging that file in place)
    expected = second.images.clone()
    entry = cache_file("imagefolder", root, "train", cache_dir=cache_dir)
    Path(str(entry).replace(".json", ".images.npy")).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring unreadable cache entry"):
        again = load_images("imagefolder", root, "train", cache_dir=cache_dir)
    assert torch.equal(again.images, expected)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    root = tmp_path / "set"
    write(root / "train" / "a" / "0.png", solid((9, 9, 9), (4, 4), "PNG"))
    monkeypatch.setenv("KRRST_CACHE", str(tmp_path / "env-cache"))
    load_images("imagefolder", root, "train")
    assert cache_file("imagefolder", root, "train").parent == tmp_path / "env-cache"
    assert cache_file("imagefolder", root, "train").is_file()


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(KrrstError, match=r"unknown dataset 'cifar11'; did you mean 'cifar10' or 'cifar100'\? valid datasets: imagefolder, tinyimagenet, cifar10"):
        load_images("cifar11", tmp_path)
    assert "imagenet64" in list_datasets() and "cub" in list_datasets()
    with pytest.raises(KrrstError, match=r"no split 'validation'; valid splits: train, val"):
        load_images("tinyimagenet", tmp_path, "validation")
    write(tmp_path / "set" / "train" / "a" / "0.png", solid((1, 1, 1), (4, 4), "PNG"))
    write(tmp_path / "set" / "test" / "a" / "0.png", solid((1, 1, 1), (4, 4), "PNG"))
    with pytest.raises(KrrstError, match=r"set: no split folder 'val'; valid splits here: test, train"):
        load_images("imagefolder", tmp_path / "set", "val", cache_dir=False)
    with pytest.raises(KrrstError, match=r"image_size must be a positive integer"):
        load_images("imagefolder", tmp_path / "set", "train", image_size=0, cache_dir=False)


def test_bad_roots(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(KrrstError, match=re.escape(f"dataset root {missing} does not exist")):
        load_images("imagefolder", missing, "train", cache_dir=False)

    not_zip = tmp_path / "notes.zip"
    not_zip.write_text("just some text, not an archive\n")
    with pytest.raises(KrrstError, match=re.escape(str(not_zip)) + r" is not a readable zip archive"):
        load_images("imagefolder", not_zip, "train", cache_dir=False)

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        for i in range(20):
            archive.writestr(f"set/train/a/{i}.jpg", solid(PALETTE[i % 6], (32, 32)))
    assert good.stat().st_size > 1000
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(KrrstError, match=re.escape(str(truncated)) + r" is not a readable zip archive"):
        load_images("imagefolder", truncated, "train", cache_dir=False)

    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as archive:
        archive.writestr("readme.txt", "hello")
        archive.writestr("pictures/cat.jpg", solid((1, 2, 3)))
    expected = f"{wrong}: no <split>/<class>/<image> files; found 1 image not in <split>/<class>/ folders"
    with pytest.raises(KrrstError, match=re.escape(expected) + ".*pass --source folder"):
        load_images("imagefolder", wrong, "train", cache_dir=False)
    expected = f"{wrong}: no wnids.txt found; expected the Tiny-ImageNet-200 layout tiny-imagenet-200/"
    with pytest.raises(KrrstError, match=re.escape(expected)):
        load_images("tinyimagenet", wrong, "train", cache_dir=False)
    expected = f"{tmp_path}: no image_class_labels.txt found; expected the CUB-200-2011 layout"
    with pytest.raises(KrrstError, match=re.escape(expected)):
        load_images("cub", tmp_path, "train", cache_dir=False)


def test_damaged_members(tmp_path):
    root = tmp_path / "set"
    write(root / "train" / "a" / "0.jpg", solid((1, 2, 3)))
    write(root / "train" / "a" / "1.jpg", b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(KrrstError, match=r"cannot decode image set/train/a/1.jpg|cannot decode image train/a/1.jpg"):
        load_images("imagefolder", root, "train", cache_dir=False)
    # a member whose bytes were damaged inside the zip fails its CRC check
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("set/train/a/0.jpg", solid((1, 2, 3)))
    data = bytearray(damaged.read_bytes())
    data[200] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(KrrstError, match=re.escape(str(damaged)) + r": cannot read set/train/a/0.jpg .*damaged"):
        load_images("imagefolder", damaged, "train", cache_dir=False)
    # an annotation naming a file that is not there
    base = _write_cub(tmp_path / "cub")
    (base / "images" / "001.Black_footed_Albatross" / "a.jpg").unlink()
    with pytest.raises(KrrstError, match=r"a.jpg: file is listed by the dataset's annotations but missing"):
        load_images("cub", base, "train", cache_dir=False)


def test_imageset_validation_subset_and_to():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0])
    image_set = ImageSet(images, labels, ["a", "b"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "toy")
    part = image_set.subset([1, 3])
    assert len(part) == 2 and part.labels.tolist() == [1, 0] and part.class_names == ["a", "b"]
    assert image_set.subset(slice(0, 3)).labels.tolist() == [0, 1, 1]
    moved = image_set.to("cpu")
    assert moved.images.device.type == "cpu" and moved.image_size == 8
    with pytest.raises(KrrstError, match="uint8"):
        ImageSet(images.float(), labels, ["a", "b"], (0.5,) * 3, (0.25,) * 3, "toy")
    with pytest.raises(KrrstError, match=r"N x 3 x H x W"):
        ImageSet(images[:, :1], labels, ["a", "b"], (0.5,) * 3, (0.25,) * 3, "toy")
    with pytest.raises(KrrstError, match=r"labels must lie in \[0, 2\)"):
        ImageSet(images, torch.tensor([0, 1, 2, 0]), ["a", "b"], (0.5,) * 3, (0.25,) * 3, "toy")
    with pytest.raises(KrrstError, match=r"3 labels for 4 images"):
        ImageSet(images, labels[:3], ["a", "b"], (0.5,) * 3, (0.25,) * 3, "toy")
    unlabelled = ImageSet(images, None, [], (0.5,) * 3, (0.25,) * 3, "toy")
    assert unlabelled.subset([0]).labels is None


def test_imageset_repr_is_a_short_summary_not_the_tensors():
    images = torch.zeros(500, 3, 32, 32, dtype=torch.uint8)
    labelled = ImageSet(images, torch.arange(500) % 10, CIFAR10_CLASSES, (0.5,) * 3, (0.25,) * 3, "cifar10")
    text = repr(labelled)
    assert len(text) < 300 and "tensor(" not in text and str(labelled) == text
    assert text == "ImageSet(name='cifar10', 500 images 3x32x32 uint8, 10 classes)"
    unlabelled = ImageSet(images[:7], None, [], (0.5,) * 3, (0.25,) * 3, "stl10")
    assert repr(unlabelled) == "ImageSet(name='stl10', 7 images 3x32x32 uint8, unlabelled)"


# ---------------------------------------------------------------------------------------------------------------------
# Your own images: `folder` in any layout, every format, the resize policy, corrupt files, splits, the cache.


def colour_image(colour: tuple[int, int, int], fmt: str, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> bytes:
    """A solid image saved as `fmt` after converting to `mode` (L, P, RGBA, CMYK, ...)."""
    return solid(colour, size, fmt, mode)


def pillow_rgb(data: bytes) -> torch.Tensor:
    """What Pillow decodes `data` to, as RGB 3 x H x W: the reference every format must match."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def tar_folder(folder: Path, tar_path: Path, mode: str) -> Path:
    import tarfile

    with tarfile.open(tar_path, mode) as archive:
        archive.add(folder, arcname=folder.name)
    return tar_path


@pytest.fixture
def photos(tmp_path) -> tuple[Path, list[tuple[int, int, int]]]:
    """~/photos-like flat folder: six PNGs in two sizes' worth of names, one colour each (sorted by name)."""
    root = tmp_path / "photos"
    for i, colour in enumerate(PALETTE):
        write(root / f"img_{i}.png", solid(colour, (12, 12), "PNG"))
    write(root / "notes.txt", "not an image")
    write(root / ".hidden.png", solid((1, 1, 1), (12, 12), "PNG"))
    return root, PALETTE


@pytest.mark.parametrize("layout", ["flat", "nested", "zip", "tar", "tar.gz", "list-relative", "list-absolute"])
def test_folder_reads_every_layout_unlabelled(tmp_path, photos, layout):
    root, colours = photos
    if layout == "nested":  # images at several depths: no classes
        nested = tmp_path / "nested"
        for i, colour in enumerate(colours):
            write(nested / ("a/b" if i % 2 else "c") / f"img_{i}.png", solid(colour, (12, 12), "PNG"))
        root = nested
    elif layout == "zip":
        root = zip_folder(root, tmp_path / "photos.zip")
    elif layout in ("tar", "tar.gz"):
        root = tar_folder(root, tmp_path / f"photos.{layout}", "w" if layout == "tar" else "w:gz")
    elif layout.startswith("list"):
        lines = [str(root / f"img_{i}.png") if layout == "list-absolute" else f"photos/img_{i}.png"
                 for i in range(len(colours))]
        root = tmp_path / "photos.txt"
        root.write_text("# my photos\n" + "\n".join(lines) + "\n\n")
    image_set = load_images("folder", root, cache_dir=False, num_workers=2)
    assert image_set.labels is None and image_set.class_names == [] and len(image_set) == 6
    assert image_set.name in ("photos", "nested")
    # sorted by path: img_0 .. img_5 in the flat layouts; the nested one sorts a/b/ before c/
    order = [1, 3, 5, 0, 2, 4] if layout == "nested" else range(6)
    assert torch.equal(image_set.images, torch.tensor([colours[i] for i in order], dtype=torch.uint8)[:, :, None, None]
                       .expand(6, 3, 12, 12))
    assert load_images("folder", root, "all", cache_dir=False).images.shape == image_set.images.shape


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("PNG", "L"),
                                      ("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "CMYK"), ("JPEG", "L"), ("TIFF", "CMYK")])
def test_every_format_and_mode_becomes_rgb_as_pillow_decodes_it(tmp_path, fmt, mode):
    colours = [(200, 40, 90), (30, 160, 220)]
    root = tmp_path / "formats"
    encoded = [colour_image(colour, fmt, mode) for colour in colours]
    for i, data in enumerate(encoded):
        write(root / f"{i}.{fmt.lower()}", data)
    image_set = load_images("folder", root, cache_dir=False)
    assert image_set.images.shape == (2, 3, 10, 12)
    for ours, data, colour in zip(image_set.images, encoded, colours):
        reference = pillow_rgb(data)
        # libjpeg builds differ by a level or two; lossless formats are exact
        assert (ours.float() - reference.float()).abs().max() <= (3 if fmt == "JPEG" else 0), (fmt, mode)
        if mode in ("RGB", "RGBA", "P", "CMYK"):  # the colour itself survives (greyscale keeps luminance only)
            assert (ours.float().mean(dim=(1, 2)) - torch.tensor(colour)).abs().max() < 6


def test_resize_policy_short_side_then_centre_crop(tmp_path):
    """A 40x20 image, green in its outer 6 columns, red then blue inside: at 10 px the centre crop keeps no green."""
    bands = np.zeros((20, 40, 3), dtype=np.uint8)
    bands[:, :6] = bands[:, 34:] = (0, 255, 0)
    bands[:, 6:20] = (255, 0, 0)
    bands[:, 20:34] = (0, 0, 255)
    root = tmp_path / "mixed"
    buffer = io.BytesIO()
    Image.fromarray(bands).save(buffer, "PNG")
    write(root / "a_wide.png", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(bands.transpose(1, 0, 2).copy()).save(buffer, "PNG")  # the same bands, horizontal, 20x40
    write(root / "b_tall.png", buffer.getvalue())
    write(root / "c_square.png", solid((7, 8, 9), (10, 10), "PNG"))
    image_set = load_images("folder", root, image_size=10, cache_dir=False)
    assert image_set.images.shape == (3, 3, 10, 10) and image_set.resize == "crop"
    wide, tall, square = image_set.images.long()
    # 40x20 -> 20x10, centre 10 columns = resized columns 5..14 = original columns 10..29 (the antialiasing
    # kernel reaches 2 columns further): pure red at the left edge, pure blue at the right, no green anywhere
    assert torch.equal(wide[:, :, 0], torch.tensor([255, 0, 0]).view(3, 1).expand(3, 10))
    assert torch.equal(wide[:, :, 9], torch.tensor([0, 0, 255]).view(3, 1).expand(3, 10))
    assert int(wide[1].max()) == 0  # the green outer bands are cropped away
    assert torch.equal(tall, wide.transpose(1, 2))
    assert torch.equal(square, torch.tensor([7, 8, 9]).view(3, 1, 1).expand(3, 10, 10))
    # "stretch" keeps the whole width (green at the edges): the policy is really applied, and recorded
    stretched = load_images("folder", root, image_size=10, resize="stretch", cache_dir=False)
    assert stretched.resize == "stretch" and int(stretched.images[0, 1, :, 0].min()) > 200
    with pytest.raises(KrrstError, match=r"b_tall.png is 20x40 but earlier images are 40x20; pass image_size"):
        load_images("folder", root, cache_dir=False)
    with pytest.raises(KrrstError, match=r"unknown resize policy 'squash'; valid resize policies: crop, stretch"):
        load_images("folder", root, image_size=10, resize="squash", cache_dir=False)


def test_corrupt_file_stops_with_its_name_or_is_skipped_and_reported(tmp_path):
    root = tmp_path / "photos"
    for i in range(5):
        write(root / f"{i}.jpg", solid(PALETTE[i], (16, 16)))
    write(root / "2b.jpg", b"\xff\xd8 not really a jpeg")
    write(root / "3b.png", b"\x89PNG garbage")
    with pytest.raises(KrrstError) as error:
        load_images("folder", root, cache_dir=False, num_workers=2)
    message = str(error.value)
    assert "cannot decode image 2b.jpg" in message and "\n" not in message
    assert "--skip-corrupt" in message and "skip_corrupt=True" in message
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\): 2b.jpg, 3b.png"):
        image_set = load_images("folder", root, skip_corrupt=True, cache_dir=False, num_workers=2)
    assert image_set.skipped == ("2b.jpg", "3b.png") and len(image_set) == 5
    assert_colours(image_set, PALETTE[:5])
    # labelled: the labels of the skipped files go with them; through the cache the report repeats
    labelled = tmp_path / "pets"
    for i in range(3):
        write(labelled / "cat" / f"{i}.jpg", solid(PALETTE[0], (16, 16)))
        write(labelled / "dog" / f"{i}.jpg", solid(PALETTE[1], (16, 16)))
    write(labelled / "cat" / "1.jpg", b"broken")
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): cat/1.jpg"):
            pets = load_images("folder", labelled, "all", skip_corrupt=True, cache_dir=tmp_path / "cache")
        assert pets.labels.tolist() == [0, 0, 1, 1, 1]
        assert_colours(pets, [PALETTE[0]] * 2 + [PALETTE[1]] * 3)


def test_empty_folder_and_folder_of_non_images_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KrrstError, match=re.escape(f"{empty}: no images found; it is empty")):
        load_images("folder", empty, cache_dir=False)
    docs = tmp_path / "docs"
    write(docs / "a.txt", "text")
    write(docs / "sub" / "b.csv", "1,2")
    with pytest.raises(KrrstError, match=re.escape(f"{docs}: no images found; found 2 files but no images (e.g. a.txt)")):
        load_images("folder", docs, cache_dir=False)
    with pytest.raises(KrrstError, match=r"it is empty"):
        load_images("imagefolder", empty, cache_dir=False)
    listed = tmp_path / "list.txt"
    listed.write_text("photos/missing.jpg\n")
    with pytest.raises(KrrstError, match=r"photos/missing.jpg: listed in .*list.txt but missing"):
        load_images("folder", listed, cache_dir=False)
    with pytest.raises(KrrstError, match=r"not a folder, a .zip, a .tar \(.tar.gz, .tgz\) or a .txt list"):
        load_images("folder", write_returning(tmp_path / "photo.dat", b"\x00\x01 binary"), cache_dir=False)


def write_returning(path: Path, data: bytes) -> Path:
    write(path, data)
    return path


def test_wrong_source_names_what_was_found_and_what_to_pass(tmp_path):
    flat = tmp_path / "photos"
    for i in range(3):
        write(flat / f"{i}.jpg", solid(PALETTE[i]))
    with pytest.raises(KrrstError, match=r"found 3 images not in <split>/<class>/ folders \(e.g. 0.jpg\); pass --source folder"):
        load_images("imagefolder", flat, cache_dir=False)
    pets = tmp_path / "pets"
    for name in ("cat", "dog", "emu", "yak"):
        write(pets / name / "0.jpg", solid(PALETTE[0]))
    with pytest.raises(KrrstError, match=r"found <class>/<image> folders \(4 classes: cat, dog, emu, \.\.\.\) with no "
                       r"split folders; pass --source folder"):
        load_images("imagefolder", pets, cache_dir=False)
    # a Tiny-ImageNet zip given as imagefolder (its val/images/ looks like a split of one class)
    tiny = tmp_path / "tiny.zip"
    with zipfile.ZipFile(tiny, "w") as archive:
        archive.writestr("tiny-imagenet-200/wnids.txt", "n01\n")
        archive.writestr("tiny-imagenet-200/train/n01/images/n01_0.JPEG", solid(PALETTE[0]))
        archive.writestr("tiny-imagenet-200/val/images/val_0.JPEG", solid(PALETTE[1]))
        archive.writestr("tiny-imagenet-200/val/val_annotations.txt", "val_0.JPEG\tn01\n")
    with pytest.raises(KrrstError, match=re.escape(f"{tiny} holds the Tiny-ImageNet-200 layout (wnids.txt); "
                                                   "pass --source tinyimagenet")):
        load_images("imagefolder", tiny, "train", cache_dir=False)
    # an unlabelled folder has no test split to give a target
    with pytest.raises(KrrstError, match=r"no test split: the images are not in <class>/<image> folders"):
        load_images("folder", flat, "test", cache_dir=False)
    # imagefolder itself is unchanged: a split that is absent lists those present and points to folder
    write(tmp_path / "set" / "train" / "a" / "0.png", solid((1, 1, 1), (4, 4), "PNG"))
    with pytest.raises(KrrstError, match=r"no split folder 'test'; valid splits here: train \(.*--source folder"):
        load_images("imagefolder", tmp_path / "set", "test", cache_dir=False)


def test_stratified_split_is_seeded_stratified_disjoint_and_respects_the_fraction():
    from krrst.data import stratified_split

    labels = [0] * 50 + [1] * 30 + [2] * 7 + [3] * 2 + [4]
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(len(labels))) and not set(train) & set(test)
    test_counts = torch.tensor([labels[i] for i in test]).bincount(minlength=5).tolist()
    assert test_counts == [10, 6, 1, 1, 0]  # round(0.2 n) per class; 2 images: one each side; 1 image: train
    assert stratified_split(labels, 0.2, seed=0) == (train, test)
    other = stratified_split(labels, 0.2, seed=1)
    assert other[1] != test and torch.tensor([labels[i] for i in other[1]]).bincount(minlength=5).tolist() == test_counts
    assert [len(stratified_split(labels, f, 0)[1]) for f in (0.1, 0.5)] == [5 + 3 + 1 + 1, 25 + 15 + 4 + 1]
    with pytest.raises(KrrstError, match=r"test_fraction \(run.test_fraction\) must lie in \(0, 1\), got 1.0"):
        stratified_split(labels, 1.0, 0)


def test_labelled_folder_gets_train_and_test_splits(tmp_path):
    root = tmp_path / "pets"
    for c, name in enumerate(("cat", "dog")):
        for i in range(10):
            write(root / "all-photos" / name / f"{i:02d}.png", solid(PALETTE[c], (8, 8), "PNG"))
    zipped = zip_folder(root / "all-photos", tmp_path / "pets.zip")  # one common top folder is not a class
    for location in (root, zipped):
        train = load_images("folder", location, "train", test_fraction=0.3, cache_dir=False)
        test = load_images("folder", location, "test", test_fraction=0.3, cache_dir=False)
        assert train.class_names == test.class_names == ["cat", "dog"]
        assert train.labels.bincount().tolist() == [7, 7] and test.labels.bincount().tolist() == [3, 3]
        assert test.name == train.name == f"{location.name.removesuffix('.zip')} (test 30%, seed 0)"
        assert_colours(test, [PALETTE[0]] * 3 + [PALETTE[1]] * 3)
    everything = load_images("folder", root, "all", cache_dir=False)
    assert len(everything) == 20 and everything.name == "pets"
    seeded = load_images("folder", root, "test", test_fraction=0.3, split_seed=1, cache_dir=False)
    assert seeded.name == "pets (test 30%, seed 1)"


def test_folder_cache_reuses_without_decoding_and_a_changed_file_invalidates_it(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        write(root / "deep" / "er" / f"{i}.png", solid(PALETTE[i], (8, 8), "PNG"))
    cache_dir = tmp_path / "cache"
    first = load_images("folder", root, cache_dir=cache_dir)
    marker = cache_file("folder", root, cache_dir=cache_dir)
    assert marker.is_file() and not list(cache_dir.glob(".decoding.*"))  # the temp map was renamed into place
    # A reused entry decodes nothing: every file turned to zeros of the same size and time still loads the pixels.
    files = {path: (path.read_bytes(), path.stat()) for path in (root / "deep" / "er").glob("*.png")}
    for path, (data, stat) in files.items():
        path.write_bytes(bytes(len(data)))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_images("folder", root, cache_dir=cache_dir)
    assert torch.equal(again.images, first.images) and again.name == first.name
    for path, (data, stat) in files.items():
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again.images[0] = 0  # the handed-out map is copy-on-write: the entry's file keeps its pixels
    assert torch.equal(load_images("folder", root, cache_dir=cache_dir).images, first.images)
    # rewriting one image deep inside (the folder's own mtime does not change) invalidates the entry
    folder_mtime = root.stat().st_mtime_ns
    write(root / "deep" / "er" / "2.png", solid((1, 2, 3), (8, 8), "PNG"))
    assert root.stat().st_mtime_ns == folder_mtime
    changed = load_images("folder", root, cache_dir=cache_dir)
    assert cache_file("folder", root, cache_dir=cache_dir) != marker
    assert changed.images[2, :, 0, 0].tolist() == [1, 2, 3]
    # the resize policy and the split are part of the key
    assert cache_file("folder", root, image_size=4, cache_dir=cache_dir) != cache_file(
        "folder", root, image_size=4, resize="stretch", cache_dir=cache_dir)


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional extra krrst[hf] (datasets) is not installed")
    colours = [PALETTE[i % 2] for i in range(10)]
    images = [Image.new("RGB", (8, 8), colour) for colour in colours]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green"])})
    labelled = datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(10)]}, features=features)
    labelled.save_to_disk(str(tmp_path / "saved"))
    train = load_images("hf", tmp_path / "saved", "train", test_fraction=0.2, cache_dir=False)
    test = load_images("hf", tmp_path / "saved", "test", test_fraction=0.2, cache_dir=False)
    assert train.class_names == ["red", "green"] and train.labels.bincount().tolist() == [4, 4]
    assert test.labels.bincount().tolist() == [1, 1] and test.name == "saved (test 20%, seed 0)"
    assert_colours(test, [PALETTE[label] for label in test.labels.tolist()])  # each image keeps its label
    # a DatasetDict with its own test split is read as it is, through the cache too; an unlabelled one as a source
    split = datasets.DatasetDict({"train": labelled, "test": labelled.select([0, 1])})
    split.save_to_disk(str(tmp_path / "dict"))
    for _ in range(2):
        own = load_images("hf", tmp_path / "dict", "test", cache_dir=tmp_path / "cache")
        assert own.labels.tolist() == [0, 1] and own.name == "dict"
    unlabelled = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    unlabelled.save_to_disk(str(tmp_path / "plain"))
    source = load_images("hf", tmp_path / "plain", "train", cache_dir=False)
    assert source.labels is None and len(source) == 10
    with pytest.raises(KrrstError, match=r"has no split 'val'; its splits: train, test"):
        load_images("hf", tmp_path / "dict", "val", cache_dir=False)


def test_datasets_listing_shows_every_layout_with_example_paths():
    from krrst.data import describe_datasets

    text = describe_datasets()
    for needle in ("folder", "~/photos/*.jpg", "~/pets/<class>/*.jpg", "~/photos.zip", ".tar.gz", "~/photos.txt",
                   "hf", "save_to_disk", "short side", "--skip-corrupt", "CMYK"):
        assert needle in text, needle
    assert "../shared" not in text and "/work" not in text


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_cli_teacher_and_distill_accept_a_flat_folder(tmp_path, command, capsys):
    from krrst.cli import main
    from krrst.teacher import TEACHER_FILE, TeacherConfig, save_teacher, train_teacher

    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(24):  # mixed sizes: --image-size brings them to 16
        size = (20 + i % 3 * 4, 16 + i % 2 * 8)
        write(photos / f"IMG_{i:04d}.jpg", pillow_jpeg(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))
    write(photos / "broken.jpg", b"not a jpeg")
    common = ["--source", "folder", "--root", str(photos), "--image-size", "16", "--device", "cpu", "--no-progress"]
    if command == "teacher":
        argv = ["teacher", *common, "--out", str(tmp_path / "t"), "--set", "teacher.arch=convnet3",
                "--set", "teacher.convnet_widths=4,8,8", "--set", "teacher.projector_dims=16,16",
                "--set", "teacher.steps=2", "--set", "teacher.batch_size=8"]
    else:
        with pytest.warns(UserWarning, match="skipped 1"):
            source = load_images("folder", photos, image_size=16, skip_corrupt=True, cache_dir=False)
        config = TeacherConfig(arch="convnet3", convnet_widths=(4, 8, 8), projector_dims=(16, 16), steps=1, batch_size=8)
        teacher = train_teacher(source, config, device="cpu", progress=False)
        save_teacher(tmp_path / TEACHER_FILE, teacher, (0.5,) * 3, (0.25,) * 3)
        argv = ["distill", *common, "--teacher", str(tmp_path / TEACHER_FILE), "--out", str(tmp_path / "d"),
                "--m", "4", "--steps", "2", "--heldout", "0", "--set", "distill.widths=4,8,8", "--set", "distill.pool_size=2",
                "--set", "distill.batch_size=8", "--set", "distill.image_size=16"]
    assert main(argv) == 2  # the broken file stops it, in one line naming it and the option to skip it
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "broken.jpg" in error and "--skip-corrupt" in error
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): broken.jpg"):
        assert main([*argv, "--skip-corrupt"]) == 0
    produced = tmp_path / ("t" if command == "teacher" else "d")
    assert (produced / (TEACHER_FILE if command == "teacher" else "distilled.safetensors")).is_file()


def pillow_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_the_registry_knows_each_datasets_test_split_and_fine_grained_size():
    from krrst.data import DATASETS, FINE_GRAINED, evaluation_split

    assert evaluation_split("tinyimagenet") == evaluation_split("imagenet64") == "val"
    assert evaluation_split("cifar10") == evaluation_split("folder") == "test"
    assert set(FINE_GRAINED) == {name for name, dataset in DATASETS.items() if dataset.fine_grained}
    with pytest.raises(KrrstError, match=r"^unknown dataset 'cifar1000'; did you mean 'cifar100'"):
        evaluation_split("cifar1000")
