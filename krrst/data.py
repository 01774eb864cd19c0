"""Reading image datasets from their on-disk layouts into uint8 tensors.

`load_images(name, root, split)` returns an `ImageSet`: every image of one
split as one contiguous `uint8` tensor N x 3 x H x W, the integer labels, the
class names and the per-channel mean/std used to normalise it downstream
(`krrst.augment.normalize`). One small reader per layout:

- `imagefolder`: `<split>/<class>/<image>`, optionally inside one top folder;
  splits: the split folders present.
- `tinyimagenet`: `tiny-imagenet-200/{wnids.txt, words.txt,
  train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}`;
  train, val. Class order = wnids.txt; names = first synonym in words.txt.
- `cifar10`: `cifar-10-batches-py/{batches.meta, data_batch_1..5, test_batch}`;
  `cifar100`: `cifar-100-python/{meta, train, test}` (the python pickles,
  100 fine labels); train, test.
- `aircraft`: `fgvc-aircraft-2013b/data/{variants.txt,
  images_variant_{trainval,test}.txt, images/<id>.jpg}`, 100 variants;
  train (= trainval), test.
- `flowers`: `flowers-102/{imagelabels.mat, setid.mat, jpg/image_NNNNN.jpg}`;
  train (= torchvision's train + val), test.
- `cars`: `devkit/{cars_meta.mat, cars_train_annos.mat}`,
  `cars_test_annos_withlabels.mat`, `cars_train/`, `cars_test/`; train, test.
- `cub`: `CUB_200_2011/{images.txt, image_class_labels.txt,
  train_test_split.txt, classes.txt, images/}`; train, test.
- `dogs`: `Images/<wnid>-<name>/*.jpg` beside `{train,test}_list.mat` (or
  those in `lists/`), as images.tar and lists.tar extract; train, test.
- `imagenet64`: `train_data_batch_1..10.npz`, `val_data.npz` (the npz release
  of downsampled ImageNet 64x64), optional `map_clsloc.txt`; train, val.

The dataset folder may be `root` itself or sit up to a few levels below it, so
both torchvision's `root` and the dataset's own folder work.

Sizes: `image_size=None` keeps the native size (the images of a split must
then share one size); the fine-grained datasets (aircraft, flowers, cars, cub,
dogs) have images of every size and default to 32 x 32. Resizing squashes to
`image_size` x `image_size` with antialiased bilinear interpolation on the
uint8 tensors, batched per group of equally-sized images.

Normalisation statistics: CIFAR-10/100 use their usual published train-set
stats; Tiny-ImageNet, ImageNet64 and the fine-grained datasets use the usual
ImageNet stats (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). An `imagefolder`
whose class names are CIFAR-10's gets the CIFAR-10 stats; any other
`imagefolder` gets the per-channel mean/std computed from the images loaded
(the requested split, after `max_per_class`).

Decoding: JPEG/PNG/WebP/GIF bytes are decoded by torchvision's C++ decoder
(3-4x faster than Pillow on small images, measured; Pillow decodes every other
format) on a thread pool over chunks of 512 files, one thread per core: the
decoder releases the GIL, and so does `os.pread`, which reads uncompressed zip
members without zipfile's shared lock. Threads need no start-up and no copy of
the result back; a "spawn"/"forkserver" process pool paid 2-4 s importing
torch in its workers, and "fork" is unsafe once torch has started threads.

Cache: the decoded tensors are stored under `cache_dir` (default `$KRRST_CACHE`
or `~/.cache/krrst`; `cache_dir=False` disables it) as a raw `.npy` of images,
a `.npy` of labels and a JSON of class names and stats, keyed by the dataset
name, the resolved root path with its size and mtime, the split, the size and
`max_per_class`. A cached load memory-maps the images (copy-on-write), so it
takes well under a second and a large set is not held in RAM twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from krrst.errors import KrrstError
from krrst.io import atomic_write, describe_exception, read_json, write_json

Stats = tuple[float, float, float]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_STATS: tuple[Stats, Stats] = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: tuple[Stats, Stats] = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS: tuple[Stats, Stats] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

FINE_GRAINED_DEFAULT_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 512  # images per decode task: enough to amortise the task, small enough for a smooth progress bar
_CACHE_FORMAT = 1  # bump when a reader's output changes, so old cache entries are not reused


@dataclasses.dataclass
class ImageSet:
    """One split of a dataset: uint8 images N x 3 x H x W, labels, class names and normalisation stats.

    `labels` is None for unlabelled images. `mean`/`std` are per-channel in
    [0, 1] units, for `krrst.augment.normalize`.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    mean: Stats
    std: Stats
    name: str

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise KrrstError(f"ImageSet {self.name!r}: images must be a uint8 tensor, got {got}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise KrrstError(f"ImageSet {self.name!r}: images must be N x 3 x H x W, got shape {tuple(images.shape)}")
        self.images = images.contiguous()
        if self.labels is not None:
            labels = self.labels
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
                raise KrrstError(f"ImageSet {self.name!r}: labels must be a 1-D int64 tensor or None")
            if len(labels) != len(images):
                raise KrrstError(f"ImageSet {self.name!r}: {len(labels)} labels for {len(images)} images")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
                raise KrrstError(
                    f"ImageSet {self.name!r}: labels must lie in [0, {len(self.class_names)}) "
                    f"(one per class name), got [{int(labels.min())}, {int(labels.max())}]"
                )
        self.class_names = [str(name) for name in self.class_names]
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) != 3 or (field == "std" and min(values) <= 0):
                kind = "positive floats" if field == "std" else "floats"
                raise KrrstError(f"ImageSet {self.name!r}: {field} must be 3 {kind}, got {values}")
            setattr(self, field, values)

    def __repr__(self) -> str:
        # The dataclass default prints the tensors and every class name: kilobytes for one set.
        shape = "x".join(str(n) for n in self.images.shape[1:])
        labels = f"{len(self.class_names)} classes" if self.labels is not None else "unlabelled"
        dtype = str(self.images.dtype).removeprefix("torch.")
        return f"ImageSet(name={self.name!r}, {len(self)} images {shape} {dtype}, {labels})"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        """The image height H (images are square unless loaded at native non-square size)."""
        return int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | torch.Tensor | slice) -> ImageSet:
        """The images (and labels) at `indices`, with the same class names and stats."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        labels = None
        if self.labels is not None:
            labels = self.labels[indices if isinstance(indices, slice) else indices.to(self.labels.device)]
        return dataclasses.replace(self, images=self.images[indices], labels=labels)

    def to(self, device: str | torch.device) -> ImageSet:
        """The same set with images and labels on `device` (resolved by `krrst.config.resolve_device`)."""
        from krrst.config import resolve_device

        device = resolve_device(device)
        labels = None if self.labels is None else self.labels.to(device)
        return dataclasses.replace(self, images=self.images.to(device), labels=labels)


@dataclasses.dataclass(frozen=True)
class _Options:
    """What `load_images` was asked for, as the readers see it."""

    name: str
    split: str
    image_size: int | None
    max_per_class: int | None
    num_workers: int | None
    root: Path


# ---------------------------------------------------------------------------------------------------------------------
# Archives: a folder or a zip, addressed by '/'-separated member names relative to the root.


@dataclasses.dataclass
class _Archive:
    """A dataset root opened for reading: a folder, or a zip file read in place."""

    path: Path
    zip: zipfile.ZipFile | None
    fd: int | None = None  # a raw descriptor on the zip for os.pread (POSIX only)
    _names: list[str] | None = None
    _name_set: frozenset[str] | None = None

    @property
    def names(self) -> list[str]:
        """Every file (not folder) in the archive, sorted; for folders this walks the tree once."""
        if self._names is None:
            if self.zip is not None:
                self._names = sorted(n for n in self.zip.namelist() if not n.endswith("/") and not _hidden(n))
            else:
                found = []
                for folder, dirs, files in os.walk(self.path):
                    dirs[:] = [d for d in dirs if not _hidden(d)]
                    relative = Path(folder).relative_to(self.path).as_posix()
                    prefix = "" if relative == "." else relative + "/"
                    found.extend(prefix + f for f in files if not _hidden(f))
                self._names = sorted(found)
        return self._names

    def exists(self, name: str) -> bool:
        if self.zip is not None:
            if self._name_set is None:
                self._name_set = frozenset(self.names)
            return name in self._name_set
        return (self.path / name).is_file()

    def find(self, marker: str, max_depth: int = 3) -> str | None:
        """The prefix ('' or 'a/b/') of the shallowest `<prefix><marker>` file, or None."""
        if self.zip is not None:
            hits = [n[: -len(marker)] for n in self.names if n == marker or n.endswith("/" + marker)]
        else:
            # Probe a few depths instead of walking: torchvision-style roots often hold other big datasets.
            hits = []
            for depth in range(max_depth + 1):
                found = self.path.glob("*/" * depth + marker)
                hits = [p.relative_to(self.path).as_posix() for p in found if p.is_file()]
                if hits:
                    break
            hits = [h[: -len(marker)] for h in hits if not any(_hidden(part) for part in h.split("/"))]
        return min(hits, key=lambda h: (h.count("/"), h)) if hits else None

    def read(self, name: str) -> bytes:
        try:
            if self.zip is None:
                return (self.path / name).read_bytes()
            info = self.zip.getinfo(name)
            if self.fd is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                return self._read_stored(info)
            return self.zip.read(info)
        except KeyError:
            raise KrrstError(f"{self.path}: member {name} is listed by the dataset's annotations but missing") from None
        except FileNotFoundError:
            raise KrrstError(f"{self.path / name}: file is listed by the dataset's annotations but missing") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            reason = describe_exception(exc)
            raise KrrstError(f"{self.path}: cannot read {name} ({reason}); the archive is damaged") from None

    def _read_stored(self, info: zipfile.ZipInfo) -> bytes:
        """An uncompressed member in one `os.pread`.

        `ZipFile.read` costs ~40 us per member, under a lock shared by every
        thread; pread has no shared file position, releases the GIL and takes
        a few us. The local header's extra field may differ from the central
        directory's, so the data offset is read from the local header itself.
        """
        chunk = os.pread(self.fd, 30 + info.compress_size + 512, info.header_offset)
        if chunk[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", chunk[26:30])
        start = 30 + name_length + extra_length
        data = chunk[start : start + info.compress_size]
        if len(data) < info.compress_size:
            data = os.pread(self.fd, info.compress_size, info.header_offset + start)
        if len(data) != info.compress_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
        return data

    def open(self, name: str) -> BinaryIO:
        """A seekable binary stream of one member (for .mat / .npz / pickle readers)."""
        if self.zip is not None:
            return io.BytesIO(self.read(name))
        if not (self.path / name).is_file():
            raise KrrstError(f"{self.path / name}: file not found")
        return open(self.path / name, "rb")

    def subfolders(self, prefix: str) -> list[str]:
        """The sorted names of the folders directly under `prefix` (which ends with '/' or is '')."""
        if self.zip is None:
            folder = self.path / prefix
            if not folder.is_dir():
                return []
            return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))
        below = [n[len(prefix) :] for n in self.names if n.startswith(prefix)]
        return sorted({rest.split("/", 1)[0] for rest in below if "/" in rest})

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()
        if self.fd is not None:
            os.close(self.fd)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX") or "/." in name or "/__MACOSX" in name


def _open_archive(root: Path) -> _Archive:
    """Open `root` as a folder or a zip; anything else is a one-line KrrstError naming it."""
    if root.is_dir():
        return _Archive(root, None)
    try:
        archive = zipfile.ZipFile(root)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise KrrstError(
            f"{root} is not a readable zip archive ({describe_exception(exc)}); expected a dataset folder or a .zip"
        ) from None
    return _Archive(root, archive, os.open(root, os.O_RDONLY) if hasattr(os, "pread") else None)


def _locate(archive: _Archive, marker: str, dataset: str, layout: str) -> str:
    """The prefix under which `marker` sits, or a KrrstError naming the root and the expected layout."""
    prefix = archive.find(marker)
    if prefix is None:
        raise KrrstError(f"{archive.path}: no {marker} found; expected the {dataset} layout {layout}")
    return prefix


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and resizing.


@functools.lru_cache(maxsize=1)
def _fast_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's C++ JPEG/PNG/WebP/GIF decoder, or None where this torchvision has none.

    The op is called directly because `torchvision.io.decode_image` warns on
    every call since torchvision 0.29 (60,000 warnings per CIFAR-10 load, and
    `warnings.catch_warnings` is not thread-safe). It is 3-4x faster than
    Pillow on small images (measured: 47 vs 165-230 us per CIFAR JPEG);
    Pillow stays the fallback for other formats and for a torchvision without it.
    """
    try:
        import torchvision.io.image  # noqa: F401 - loads and registers the image ops

        decode = torch.ops.image.decode_image
        rgb = torchvision.io.image.ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda data: decode(data, rgb, False)


def _decode_one(data: bytes, member: str, archive_path: Path) -> torch.Tensor:
    """Decode one encoded image to uint8 3 x H x W RGB (greyscale, palette and RGBA become RGB)."""
    fast = _fast_decoder()
    if fast is not None:
        try:
            image = fast(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            if image.ndim == 3 and image.shape[0] == 3:
                return image
        except RuntimeError:
            pass  # formats it cannot decode (BMP, TIFF, ...) go to Pillow
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as pil_image:
            array = np.asarray(pil_image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise KrrstError(f"{archive_path}: cannot decode image {member} ({describe_exception(exc)})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 batch N x 3 x H x W to N x 3 x size x size."""
    from torchvision.transforms.v2 import functional as F

    if images.shape[-2:] == (size, size):
        return images
    return F.resize(images, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


def _decode_chunk(archive: _Archive, members: Sequence[str], out: torch.Tensor, image_size: int | None) -> None:
    """Decode `members` into the preallocated `out` (len(members) x 3 x H x W)."""
    images = [_decode_one(archive.read(member), member, archive.path) for member in members]
    target = tuple(out.shape[2:])
    if all(tuple(image.shape[1:]) == target for image in images):
        torch.stack(images, out=out)  # the common case: one copy for the whole chunk
        return
    to_resize: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        if tuple(image.shape[1:]) == target:
            out[index] = image
        elif image_size is None:
            raise KrrstError(
                f"{archive.path}: image {members[index]} is {image.shape[2]}x{image.shape[1]} but earlier images are "
                f"{target[1]}x{target[0]}; pass image_size (--image-size) to resize them all"
            )
        else:
            to_resize.setdefault(tuple(image.shape[1:]), []).append(index)
    for indices in to_resize.values():
        out[indices] = _resize(torch.stack([images[i] for i in indices]), image_size)


def _decode_members(
    archive: _Archive, members: Sequence[str], image_size: int | None, num_workers: int | None, desc: str
) -> torch.Tensor:
    """Decode every member into one contiguous uint8 tensor N x 3 x S x S, on a thread pool."""
    if not members:
        raise KrrstError(f"{archive.path}: no images to load for {desc}")
    if image_size is None:
        first = _decode_one(archive.read(members[0]), members[0], archive.path)
        height, width = first.shape[1:]
    else:
        height = width = image_size
    out = torch.empty((len(members), 3, height, width), dtype=torch.uint8)
    workers = num_workers or min(_available_cores(), 16)  # past ~16 threads the GIL-held part dominates
    starts = range(0, len(members), _CHUNK)
    with tqdm(total=len(members), desc=desc, unit="img", disable=None, leave=False) as progress:
        if workers == 1:
            for start in starts:
                _decode_chunk(archive, members[start : start + _CHUNK], out[start : start + _CHUNK], image_size)
                progress.update(len(members[start : start + _CHUNK]))
            return out
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="krrst-decode")
        try:
            futures = {
                pool.submit(_decode_chunk, archive, members[s : s + _CHUNK], out[s : s + _CHUNK], image_size): s
                for s in starts
            }
            for future in as_completed(futures):
                future.result()  # re-raises a worker's KrrstError
                progress.update(min(_CHUNK, len(members) - futures[future]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_per_class(labels: Sequence[int], max_per_class: int | None) -> list[int]:
    """Indices of the first `max_per_class` items of each class, in their original order."""
    if max_per_class is None:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for index, label in enumerate(labels):
        if seen.get(label, 0) < max_per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(index)
    return keep


def _labelled_files(
    archive: _Archive,
    members: list[str],
    labels: list[int],
    class_names: list[str],
    stats: tuple[Stats, Stats],
    opts: _Options,
) -> ImageSet:
    """Decode a listed split (members + labels) into an ImageSet, honouring max_per_class."""
    keep = _first_per_class(labels, opts.max_per_class)
    members = [members[i] for i in keep]
    images = _decode_members(archive, members, opts.image_size, opts.num_workers, f"{opts.name} {opts.split}")
    return ImageSet(images, torch.tensor([labels[i] for i in keep], dtype=torch.int64), class_names, *stats, opts.name)


def _array_set(
    images: torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    class_names: list[str],
    stats: tuple[Stats, Stats],
    opts: _Options,
) -> ImageSet:
    """An ImageSet from an in-memory uint8 batch (CIFAR pickles), honouring max_per_class and image_size."""
    labels = np.asarray(labels, dtype=np.int64)
    if opts.max_per_class is not None:
        keep = torch.tensor(_first_per_class(labels.tolist(), opts.max_per_class), dtype=torch.long)
        images, labels = images[keep], labels[keep.numpy()]
    if opts.image_size is not None:
        images = torch.cat([_resize(images[s : s + 4096], opts.image_size) for s in range(0, len(images), 4096)])
    return ImageSet(images.contiguous(), torch.from_numpy(labels.copy()), class_names, *stats, opts.name)


def _channel_stats(images: torch.Tensor) -> tuple[Stats, Stats]:
    """Per-channel mean and std of uint8 images in [0, 1] units, accumulated in float64 by chunks."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].to(torch.float64).div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    # A constant channel would divide by zero downstream; 1/255 is one grey level.
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def _load_mat(archive: _Archive, name: str) -> dict[str, Any]:
    """Read a MATLAB .mat member with scipy (installed with scikit-learn)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise KrrstError(f"reading {archive.path / name} needs scipy: pip install scipy") from None
    with archive.open(name) as handle:
        try:
            return loadmat(handle, squeeze_me=True)
        except (ValueError, TypeError, OSError) as exc:
            raise KrrstError(f"{archive.path / name} is not a readable .mat file ({describe_exception(exc)})") from None


def _read_lines(archive: _Archive, name: str) -> list[str]:
    return [line.strip() for line in archive.read(name).decode("utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Readers: one per layout. Each takes the opened archive and the options and returns an ImageSet.


def _read_imagefolder(archive: _Archive, opts: _Options) -> ImageSet:
    layout = "<split>/<class>/<image> (in a folder or a .zip, optionally inside one top folder)"
    files = [n for n in archive.names if n.lower().endswith(IMAGE_EXTENSIONS)]
    parts = [n.split("/") for n in files]
    tops = {p[0] for p in parts}
    # One top folder holding the splits (cifar10-jpeg/train/...) versus splits at the top level (train/...).
    depth = 1 if len(tops) == 1 and parts and all(len(p) >= 4 for p in parts) else 0
    by_split: dict[str, list[list[str]]] = {}
    for p in parts:
        if len(p) == depth + 3:
            by_split.setdefault(p[depth], []).append(p)
    if not by_split:
        raise KrrstError(f"{archive.path}: no <split>/<class>/<image> files; expected the imagefolder layout {layout}")
    if opts.split not in by_split:
        valid = ", ".join(sorted(by_split))
        raise KrrstError(f"{archive.path}: no split folder {opts.split!r}; valid splits here: {valid}")
    entries = by_split[opts.split]
    class_names = sorted({p[depth + 1] for p in entries})
    class_index = {c: i for i, c in enumerate(class_names)}
    entries.sort(key=lambda p: (class_index[p[depth + 1]], p[depth + 2]))
    members = ["/".join(p) for p in entries]
    labels = [class_index[p[depth + 1]] for p in entries]
    image_set = _labelled_files(archive, members, labels, class_names, ((0.0,) * 3, (1.0,) * 3), opts)
    stats = CIFAR10_STATS if class_names == CIFAR10_CLASSES else _channel_stats(image_set.images)
    return dataclasses.replace(image_set, mean=stats[0], std=stats[1])


def _read_tinyimagenet(archive: _Archive, opts: _Options) -> ImageSet:
    layout = (
        "tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG, val/val_annotations.txt}"
    )
    base = _locate(archive, "wnids.txt", "Tiny-ImageNet-200", layout)
    wnids = _read_lines(archive, base + "wnids.txt")
    class_names = list(wnids)
    if archive.exists(base + "words.txt"):
        # words.txt covers all of WordNet; keep the first synonym of each of our wnids ("goldfish, Carassius auratus").
        words = dict(line.split("\t", 1) for line in _read_lines(archive, base + "words.txt") if "\t" in line)
        class_names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    class_index = {w: i for i, w in enumerate(wnids)}
    if opts.split == "train":
        prefix = base + "train/"
        members, labels = [], []
        for name in archive.names if archive.zip is not None else _walk_under(archive, prefix):
            parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
            is_image = name.lower().endswith(IMAGE_EXTENSIONS)  # skips <wnid>_boxes.txt
            if len(parts) == 3 and parts[1] == "images" and parts[0] in class_index and is_image:
                members.append(name)
                labels.append(class_index[parts[0]])
        order = sorted(range(len(members)), key=lambda i: (labels[i], members[i]))
        members, labels = [members[i] for i in order], [labels[i] for i in order]
    else:
        annotations = base + "val/val_annotations.txt"
        if not archive.exists(annotations):
            raise KrrstError(f"{archive.path}: no {annotations}; expected the Tiny-ImageNet-200 layout {layout}")
        members, labels = [], []
        for line in _read_lines(archive, annotations):
            file_name, wnid = line.split("\t")[:2]
            if wnid not in class_index:
                raise KrrstError(f"{archive.path}: {annotations} names class {wnid!r}, which is not in wnids.txt")
            members.append(base + "val/images/" + file_name)
            labels.append(class_index[wnid])
    if not members:
        raise KrrstError(f"{archive.path}: no {opts.split} images; expected the Tiny-ImageNet-200 layout {layout}")
    return _labelled_files(archive, members, labels, class_names, IMAGENET_STATS, opts)


def _walk_under(archive: _Archive, prefix: str) -> list[str]:
    """Files under `prefix` of a folder archive, without walking the rest of the root."""
    folder = archive.path / prefix
    found = []
    for current, dirs, files in os.walk(folder):
        relative = Path(current).relative_to(archive.path).as_posix()
        found.extend(f"{relative}/{f}" for f in files if not _hidden(f))
    return sorted(found)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, strings and numpy arrays) and nothing else.

    The official archives are python pickles; refusing every other global
    means a tampered file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(archive: _Archive, name: str) -> dict[str, Any]:
    with archive.open(name) as handle:
        try:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
        except Exception as exc:  # noqa: BLE001 - no code runs (restricted globals); damaged bytes raise many types
            reason = describe_exception(exc)
            raise KrrstError(f"{archive.path / name} is not a readable CIFAR python batch ({reason})") from None
    if not isinstance(batch, dict):
        raise KrrstError(f"{archive.path / name} is not a readable CIFAR python batch (not a dict)")
    return batch


def _read_cifar(archive: _Archive, opts: _Options) -> ImageSet:
    is_10 = opts.name == "cifar10"
    folder, meta, names_key, labels_key = (
        ("cifar-10-batches-py", "batches.meta", "label_names", "labels")
        if is_10
        else ("cifar-100-python", "meta", "fine_label_names", "fine_labels")
    )
    if opts.split == "train":
        batches = [f"data_batch_{i}" for i in range(1, 6)] if is_10 else ["train"]
    else:
        batches = ["test_batch"] if is_10 else ["test"]
    layout = f"{folder}/{{{meta}, {', '.join(batches)}}} (python version; pass download=True / --download to fetch it)"
    if archive.exists(meta) and archive.exists(batches[0]):
        base = ""  # root is the cifar-*-py folder itself
    else:
        base = _locate(archive, f"{folder}/{meta}", opts.name.upper(), layout) + folder + "/"
    class_names = [str(c) for c in _load_pickle(archive, base + meta)[names_key]]
    arrays, labels = [], []
    for batch_name in batches:
        batch = _load_pickle(archive, base + batch_name)
        if "data" not in batch or labels_key not in batch:
            where = archive.path / (base + batch_name)
            raise KrrstError(f"{where}: no 'data' or {labels_key!r} entry; expected the {opts.name.upper()} {layout}")
        arrays.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(label) for label in batch[labels_key])
    images = torch.from_numpy(np.concatenate(arrays))
    return _array_set(images, labels, class_names, CIFAR10_STATS if is_10 else CIFAR100_STATS, opts)


def _read_aircraft(archive: _Archive, opts: _Options) -> ImageSet:
    layout = (
        "fgvc-aircraft-2013b/data/{variants.txt, images_variant_trainval.txt, images_variant_test.txt, images/<id>.jpg}"
    )
    base = _locate(archive, "data/variants.txt", "FGVC-Aircraft", layout) + "data/"
    class_names = _read_lines(archive, base + "variants.txt")
    class_index = {c: i for i, c in enumerate(class_names)}
    list_name = base + f"images_variant_{'trainval' if opts.split == 'train' else 'test'}.txt"
    if not archive.exists(list_name):
        raise KrrstError(f"{archive.path}: no {list_name}; expected the FGVC-Aircraft layout {layout}")
    members, labels = [], []
    for line in _read_lines(archive, list_name):
        image_id, variant = line.split(" ", 1)
        if variant not in class_index:
            raise KrrstError(f"{archive.path}: {list_name} names variant {variant!r}, which is not in variants.txt")
        members.append(f"{base}images/{image_id}.jpg")
        labels.append(class_index[variant])
    return _labelled_files(archive, members, labels, class_names, IMAGENET_STATS, opts)


def _read_flowers(archive: _Archive, opts: _Options) -> ImageSet:
    from torchvision.datasets import Flowers102

    layout = "flowers-102/{imagelabels.mat, setid.mat, jpg/image_NNNNN.jpg}"
    base = _locate(archive, "imagelabels.mat", "Flowers-102", layout)
    all_labels = np.atleast_1d(_load_mat(archive, base + "imagelabels.mat")["labels"]).astype(np.int64) - 1
    split_ids = _load_mat(archive, base + "setid.mat")
    keys = ("trnid", "valid") if opts.split == "train" else ("tstid",)
    image_ids = sorted(int(i) for key in keys for i in np.atleast_1d(split_ids[key]))
    members = [f"{base}jpg/image_{i:05d}.jpg" for i in image_ids]
    labels = [int(all_labels[i - 1]) for i in image_ids]
    return _labelled_files(archive, members, labels, list(Flowers102.classes), IMAGENET_STATS, opts)


def _read_cars(archive: _Archive, opts: _Options) -> ImageSet:
    layout = (
        "{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/}"
    )
    base = _locate(archive, "devkit/cars_meta.mat", "Stanford Cars", layout)
    class_names = [str(c) for c in np.atleast_1d(_load_mat(archive, base + "devkit/cars_meta.mat")["class_names"])]
    if opts.split == "train":
        annotations, folder = base + "devkit/cars_train_annos.mat", base + "cars_train/"
    else:
        # torchvision keeps the labelled test annotations beside devkit/; some copies put them inside it.
        folder, annotations = base + "cars_test/", base + "cars_test_annos_withlabels.mat"
        if not archive.exists(annotations) and archive.exists(base + "devkit/cars_test_annos_withlabels.mat"):
            annotations = base + "devkit/cars_test_annos_withlabels.mat"
    records = np.atleast_1d(_load_mat(archive, annotations)["annotations"])
    members = [folder + str(f) for f in records["fname"]]
    labels = [int(c) - 1 for c in records["class"]]
    return _labelled_files(archive, members, labels, class_names, IMAGENET_STATS, opts)


def _read_cub(archive: _Archive, opts: _Options) -> ImageSet:
    layout = (
        "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
        "images/<class>/<image>.jpg}"
    )
    base = _locate(archive, "image_class_labels.txt", "CUB-200-2011", layout)

    def table(file_name: str) -> dict[str, str]:
        if not archive.exists(base + file_name):
            raise KrrstError(f"{archive.path}: no {base + file_name}; expected the CUB-200-2011 layout {layout}")
        return dict(line.split(" ", 1) for line in _read_lines(archive, base + file_name))

    paths, classes, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    class_table = table("classes.txt")
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    class_names = [class_table[k].split(".", 1)[-1] for k in sorted(class_table, key=int)]
    wanted = "1" if opts.split == "train" else "0"
    ids = sorted((i for i in paths if is_train[i].strip() == wanted), key=int)
    members = [base + "images/" + paths[i] for i in ids]
    labels = [int(classes[i]) - 1 for i in ids]
    return _labelled_files(archive, members, labels, class_names, IMAGENET_STATS, opts)


def _read_dogs(archive: _Archive, opts: _Options) -> ImageSet:
    layout = "Images/<wnid>-<name>/*.jpg beside {train_list.mat, test_list.mat} (or beside lists/)"
    list_name = f"{opts.split}_list.mat"
    list_base = _locate(archive, list_name, "Stanford Dogs", layout)
    # lists.tar extracts beside Images/; some copies keep the lists in a lists/ folder instead.
    image_base = list_base[: -len("lists/")] if list_base.endswith("lists/") else list_base
    folders = archive.subfolders(image_base + "Images/")
    if not folders:
        raise KrrstError(
            f"{archive.path}: no {image_base}Images/<wnid>-<name>/ folders; expected the Stanford Dogs layout {layout}"
        )
    class_index = {f: i for i, f in enumerate(folders)}
    files = [str(f) for f in np.atleast_1d(_load_mat(archive, list_base + list_name)["file_list"])]
    unknown = sorted({f.split("/")[0] for f in files} - class_index.keys())
    if unknown:
        raise KrrstError(f"{archive.path}: {list_name} names classes with no Images/ folder: {', '.join(unknown[:5])}")
    members = [image_base + "Images/" + f for f in files]
    labels = [class_index[f.split("/")[0]] for f in files]
    class_names = [f.split("-", 1)[-1] for f in folders]
    return _labelled_files(archive, members, labels, class_names, IMAGENET_STATS, opts)


def _read_imagenet64(archive: _Archive, opts: _Options) -> ImageSet:
    layout = "{train_data_batch_1.npz .. train_data_batch_10.npz, val_data.npz} (npz release of downsampled ImageNet)"
    if opts.split == "train":
        pattern = re.compile(r"(^|/)train_data_batch_(\d+)(\.npz)?$")
        found = [(int(m.group(2)), n) for n in _imagenet64_candidates(archive) if (m := pattern.search(n))]
        batch_names = [n for _, n in sorted(found)]
    else:
        batch_names = [n for n in _imagenet64_candidates(archive) if re.search(r"(^|/)val_data(\.npz)?$", n)][:1]
    if not batch_names:
        raise KrrstError(f"{archive.path}: no {opts.split} batches found; expected the ImageNet64 layout {layout}")
    # Labels first (small): they fix the rows to keep, so the images go straight into one preallocated tensor.
    labels_per_batch = []
    for batch_name in batch_names:
        with _npz(archive, batch_name) as npz:
            # the files count classes from 1
            labels_per_batch.append(np.asarray(npz["labels"], dtype=np.int64).reshape(-1) - 1)
    all_labels = np.concatenate(labels_per_batch)
    keep = np.zeros(len(all_labels), dtype=bool)
    keep[_first_per_class(all_labels.tolist(), opts.max_per_class)] = True
    out: torch.Tensor | None = None
    row = offset = 0
    for batch_name, batch_labels in zip(batch_names, labels_per_batch):
        batch_keep = keep[offset : offset + len(batch_labels)]
        offset += len(batch_labels)
        with _npz(archive, batch_name) as npz:
            data = np.asarray(npz["data"])
        side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        if data.dtype != np.uint8 or side == 0 or 3 * side * side != data.shape[1] or len(data) != len(batch_labels):
            raise KrrstError(f"{archive.path / batch_name}: 'data' must be N x 3*S*S uint8; expected {layout}")
        kept = data if batch_keep.all() else data[batch_keep]  # a 10th of ImageNet64 per batch: avoid a copy
        images = torch.from_numpy(kept.reshape(-1, 3, side, side))
        if out is None:
            size = opts.image_size or side
            out = torch.empty((int(keep.sum()), 3, size, size), dtype=torch.uint8)
        for start in range(0, len(images), 4096):
            chunk = images[start : start + 4096]
            out[row : row + len(chunk)] = _resize(chunk, out.shape[-1]) if out.shape[-1] != side else chunk
            row += len(chunk)
        del data, kept, images
    class_names = _imagenet64_class_names(archive, int(all_labels.max()) + 1)
    return ImageSet(out, torch.from_numpy(all_labels[keep].copy()), class_names, *IMAGENET_STATS, opts.name)


def _imagenet64_candidates(archive: _Archive) -> list[str]:
    """Names that may be ImageNet64 batches: the zip's members, or files up to two folders down."""
    if archive.zip is not None:
        return archive.names
    found = (p for depth in range(3) for p in archive.path.glob("*/" * depth + "*_data*"))
    return sorted(p.relative_to(archive.path).as_posix() for p in found)


@contextlib.contextmanager
def _npz(archive: _Archive, name: str) -> Iterator[Any]:
    """An ImageNet64 .npz batch with 'data' and 'labels', loaded without pickles."""
    with archive.open(name) as handle:
        try:
            npz = np.load(handle, allow_pickle=False)
            missing = {"data", "labels"} - set(getattr(npz, "files", []))
            if missing:
                raise ValueError(f"no {' or '.join(sorted(missing))} array")
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            reason = describe_exception(exc)
            raise KrrstError(f"{archive.path / name} is not a readable ImageNet64 .npz batch ({reason})") from None
        with npz:
            yield npz


def _imagenet64_class_names(archive: _Archive, count: int) -> list[str]:
    """Names from map_clsloc.txt ("n02119789 1 kit_fox") when present, else the class numbers."""
    base = archive.find("map_clsloc.txt")
    if base is not None:
        entries = [line.split() for line in _read_lines(archive, base + "map_clsloc.txt")]
        names = {int(e[1]) - 1: e[2] for e in entries if len(e) >= 3}
        if len(names) >= count:
            return [names[i] for i in range(count)]
    return [str(i) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# Registry, downloads, cache and the public entry point.

_Reader = Callable[[_Archive, _Options], ImageSet]
_READERS: dict[str, tuple[_Reader, tuple[str, ...] | None]] = {
    "imagefolder": (_read_imagefolder, None),  # splits: the folders present
    "tinyimagenet": (_read_tinyimagenet, ("train", "val")),
    "cifar10": (_read_cifar, ("train", "test")),
    "cifar100": (_read_cifar, ("train", "test")),
    "aircraft": (_read_aircraft, ("train", "test")),
    "flowers": (_read_flowers, ("train", "test")),
    "cars": (_read_cars, ("train", "test")),
    "cub": (_read_cub, ("train", "test")),
    "dogs": (_read_dogs, ("train", "test")),
    "imagenet64": (_read_imagenet64, ("train", "val")),
}
_FINE_GRAINED = {"aircraft", "flowers", "cars", "cub", "dogs"}
_DOWNLOADABLE = {"cifar10", "cifar100", "aircraft", "flowers"}


_LAYOUTS = {
    "imagefolder": "<root>/<split>/<class>/<image>, a folder or a .zip (e.g. ../shared/data/cifar10-jpeg.zip)",
    "tinyimagenet": "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt}",
    "cifar10": "cifar-10-batches-py/ (python pickle batches; --download fetches it)",
    "cifar100": "cifar-100-python/ (python pickle batches; --download fetches it)",
    "aircraft": "fgvc-aircraft-2013b/data/ (variant level, 100 classes; --download fetches it)",
    "flowers": "flowers-102/{imagelabels.mat, setid.mat, jpg/} (--download fetches it)",
    "cars": "Stanford Cars: devkit/cars_meta.mat, cars_train/, cars_test/, cars_test_annos_withlabels.mat",
    "cub": "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}",
    "dogs": "Stanford Dogs: Images/<wnid-breed>/*.jpg + train_list.mat / test_list.mat (or lists/)",
    "imagenet64": "Imagenet64_train/train_data_batch_{1..10}.npz + val_data.npz (official downsampled release)",
}


def describe_datasets() -> str:
    """A table of every dataset name, its splits and the on-disk layout it reads (for `krrst datasets`)."""
    lines = [f"{'name':<13} {'splits':<12} layout under --root"]
    for name, (_, splits) in _READERS.items():
        lines.append(f"{name:<13} {','.join(splits) if splits else '<folders>':<12} {_LAYOUTS[name]}")
    return "\n".join(lines)


def list_datasets() -> list[str]:
    """The dataset names `load_images` accepts."""
    return list(_READERS)


def _download(name: str, root: Path) -> None:
    """Fetch a dataset with torchvision into `root` (verifying its md5s), for the readers to read."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    fetchers = {
        "cifar10": lambda: tvd.CIFAR10(str(root), download=True),
        "cifar100": lambda: tvd.CIFAR100(str(root), download=True),
        # Aircraft's splits come in one archive; Flowers' split ids are one file: one call fetches every split.
        "aircraft": lambda: tvd.FGVCAircraft(str(root), split="trainval", annotation_level="variant", download=True),
        "flowers": lambda: tvd.Flowers102(str(root), split="train", download=True),
    }
    try:
        fetchers[name]()
    except Exception as exc:  # network errors come in many types; any of them means "could not fetch"
        raise KrrstError(f"downloading {name} into {root} failed ({describe_exception(exc)})") from None


def default_cache_dir() -> Path:
    """`$KRRST_CACHE` when set, else `~/.cache/krrst`."""
    return Path(os.environ.get("KRRST_CACHE") or Path.home() / ".cache" / "krrst").expanduser()


def _cache_stem(cache_dir: Path, opts: _Options) -> Path:
    resolved = opts.root.resolve()
    info = resolved.stat()
    fields = [_CACHE_FORMAT, opts.name, str(resolved), info.st_size, info.st_mtime_ns]
    key = json.dumps(fields + [opts.split, opts.image_size, opts.max_per_class])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    size = opts.image_size or "native"
    count = opts.max_per_class or "all"
    return cache_dir / f"{opts.name}-{opts.split}-{size}-{count}-{digest}"


def _cache_paths(stem: Path) -> tuple[Path, Path, Path]:
    """The images .npy, the labels .npy and the JSON (written last, so it marks a complete entry)."""
    return tuple(stem.with_name(stem.name + suffix) for suffix in (".images.npy", ".labels.npy", ".json"))


def _read_cache(stem: Path) -> ImageSet | None:
    images_path, labels_path, meta_path = _cache_paths(stem)
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path, "cache entry")
        # Copy-on-write map: pages load on demand and the tensor is writable without touching the file.
        images = torch.from_numpy(np.load(images_path, mmap_mode="c", allow_pickle=False))
        labels = torch.from_numpy(np.load(labels_path, allow_pickle=False)) if meta["labelled"] else None
        if len(images) != meta["count"]:
            raise ValueError(f"{len(images)} images, expected {meta['count']}")
        return ImageSet(images, labels, meta["class_names"], tuple(meta["mean"]), tuple(meta["std"]), meta["name"])
    except (KrrstError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = describe_exception(exc)
        warnings.warn(f"ignoring unreadable cache entry {meta_path} ({reason}); reading the dataset again",
                      stacklevel=3)
        return None


def _write_cache(stem: Path, image_set: ImageSet) -> None:
    images_path, labels_path, meta_path = _cache_paths(stem)
    try:
        with atomic_write(images_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, image_set.images.numpy(), allow_pickle=False)
        if image_set.labels is not None:
            with atomic_write(labels_path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, image_set.labels.numpy(), allow_pickle=False)
        # The JSON goes last: its presence marks the entry complete.
        meta = {
            "name": image_set.name,
            "count": len(image_set),
            "labelled": image_set.labels is not None,
            "class_names": image_set.class_names,
            "mean": list(image_set.mean),
            "std": list(image_set.std),
        }
        write_json(meta_path, meta)
    except OSError as exc:
        reason = describe_exception(exc)
        warnings.warn(f"could not write the dataset cache {meta_path} ({reason}); continuing without it", stacklevel=3)


def cache_file(
    name: str,
    root: str | os.PathLike,
    split: str = "train",
    image_size: int | None = None,
    *,
    max_per_class: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The JSON file marking the cache entry `load_images` would use for these arguments (it may not exist yet)."""
    if name in _FINE_GRAINED and image_size is None:
        image_size = FINE_GRAINED_DEFAULT_SIZE
    opts = _Options(name, split, image_size, max_per_class, None, Path(root).expanduser())
    return _cache_paths(_cache_stem(Path(cache_dir) if cache_dir else default_cache_dir(), opts))[2]


def load_images(
    name: str,
    root: str | os.PathLike,
    split: str = "train",
    image_size: int | None = None,
    download: bool = False,
    *,
    max_per_class: int | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    num_workers: int | None = None,
) -> ImageSet:
    """Read one split of dataset `name` from `root` (a folder or a .zip) as an `ImageSet`.

    `image_size` resizes every image to image_size x image_size (antialiased
    bilinear; fine-grained datasets default to 32). `max_per_class` keeps the
    first k images of each class in the layout's order (sorted file names, or
    the annotation files' order). `download` fetches cifar10/cifar100/
    aircraft/flowers with torchvision when absent. `cache_dir` is where decoded
    tensors are cached (None: `default_cache_dir()`; False: no cache).
    `num_workers` decoding threads (default: every core).
    Every user mistake (unknown name or split, missing or unreadable root,
    wrong layout) raises a one-line `KrrstError`.
    """
    if name not in _READERS:
        raise KrrstError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    reader, splits = _READERS[name]
    if splits is not None and split not in splits:
        raise KrrstError(f"dataset {name} has no split {split!r}; valid splits: {', '.join(splits)}")
    for option, value in (("image_size", image_size), ("max_per_class", max_per_class), ("num_workers", num_workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KrrstError(f"{option} must be a positive integer or None, got {value!r}")
    if name in _FINE_GRAINED and image_size is None:
        image_size = FINE_GRAINED_DEFAULT_SIZE
    root = Path(root).expanduser()
    if cache_dir is False:
        cache_root = None
    else:
        cache_root = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()

    def options() -> _Options:
        return _Options(name, split, image_size, max_per_class, num_workers, root)

    if cache_root is not None and root.exists():
        cached = _read_cache(_cache_stem(cache_root, options()))
        if cached is not None:
            return cached
    if download and name in _DOWNLOADABLE:
        _download(name, root)
    if not root.exists():
        hint = ""
        if name in _DOWNLOADABLE:
            hint = "; pass download=True (--download) to fetch it"
        elif download:
            hint = f" (krrst cannot download {name}; fetch it from its official site)"
        raise KrrstError(f"dataset root {root} does not exist{hint}")
    archive = _open_archive(root)
    try:
        image_set = reader(archive, options())
    finally:
        archive.close()
    if name == "imagefolder":
        # Name the set after its archive/folder ("cifar10-jpeg"), which says more than "imagefolder".
        image_set = dataclasses.replace(image_set, name=root.name.removesuffix(".zip"))
    if cache_root is not None:
        # Keyed again: a download has just changed the root's mtime.
        _write_cache(_cache_stem(cache_root, options()), image_set)
    return image_set
