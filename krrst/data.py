"""Reading image datasets from their on-disk layouts into uint8 tensors.

`load_images(name, root, split)` returns an `ImageSet`: every image of one
split as one contiguous `uint8` tensor N x 3 x H x W, the integer labels, the
class names and the per-channel mean/std used to normalise it downstream
(`krrst.augment.normalize`). One small reader per layout, registered in
`DATASETS` with the layout it reads (`krrst datasets` lists them):

- `folder`: your own images in any layout (flat, nested, a `.zip`/`.tar`/
  `.tar.gz` of either, or a text list of paths); `<class>/<image>` folders give
  labels, and train/test of a labelled folder are a seeded, stratified split.
- `imagefolder`: `<split>/<class>/<image>`, optionally inside one top folder.
- `tinyimagenet`, `cifar10`, `cifar100`, `aircraft` (train = trainval),
  `flowers` (train = torchvision's train + val), `cars`, `cub`, `dogs`,
  `imagenet64`: the official releases' layouts.
- `hf`: a Hugging Face dataset (hub name or `save_to_disk` folder).

The dataset folder may be `root` itself or sit a few levels below it, so both
torchvision's `root` and the dataset's own folder work.

Sizes: `image_size=None` keeps the native size (the images of a split must
then share it); the fine-grained datasets default to 32 x 32. `resize="crop"`
resizes the short side (antialiased bilinear, batched per group of
equally-sized images) and keeps the centre; `"stretch"` resizes both sides.

Normalisation statistics: CIFAR-10/100 use their published train-set stats
(so does a folder whose class names are CIFAR-10's); Tiny-ImageNet, ImageNet64
and the fine-grained datasets the ImageNet stats; any other folder or HF
dataset the per-channel mean/std of the images loaded.

Decoding runs on a thread pool, one thread per core: torchvision's C++ decoder
(3-4x faster than Pillow on small images; Pillow decodes every other format)
releases the GIL, and so does `os.pread`, which reads uncompressed zip members
without zipfile's shared lock. Threads need no start-up and no copy of the
result back; a "spawn" process pool paid seconds importing torch in its
workers, and "fork" is unsafe once torch has started threads.

Cache: the decoded tensors are stored under `cache_dir` (default `$KRRST_CACHE`
or `~/.cache/krrst`) keyed by every argument that changes them and by what
says the data is unchanged (`_root_identity`). Images are decoded straight into
a memory-mapped temp file that is renamed into the entry, so a set of millions
of images is never held in RAM; every load hands out a copy-on-write map.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import struct
import tarfile
import tempfile
import threading
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from krrst.infra.errors import KrrstError
from krrst.infra.io import atomic_write, describe_exception, read_json, write_json
from krrst.infra.registry import Registry

Stats = tuple[float, float, float]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_STATS: tuple[Stats, Stats] = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: tuple[Stats, Stats] = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS: tuple[Stats, Stats] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

FINE_GRAINED_DEFAULT_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 512  # images per decode task: enough to amortise the task, small enough for a smooth progress bar
DEFAULT_TEST_FRACTION = 0.2  # the test share of a labelled set that has no test split of its own
_CACHE_FORMAT = 2  # bump when a reader's output changes, so old cache entries are not reused

@dataclasses.dataclass
class ImageSet:
    """One split of a dataset: uint8 images N x 3 x H x W, labels, class names and normalisation stats.

    `labels` is None for unlabelled images. `mean`/`std` are per-channel in
    [0, 1] units, for `krrst.augment.normalize`. `resize` names the policy the
    images were resized with (None: native size), `skipped` the files left out
    as undecodable.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    mean: Stats
    std: Stats
    name: str
    resize: str | None = None  # the policy that brought every image to H x W (`RESIZE_POLICIES`), None: native
    skipped: tuple[str, ...] = ()  # files skipped as undecodable (`skip_corrupt`)

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
        """The same set with images and labels on `device` (resolved by `krrst.infra.config.resolve_device`)."""
        from krrst.infra.config import resolve_device

        device = resolve_device(device)
        labels = None if self.labels is None else self.labels.to(device)
        return dataclasses.replace(self, images=self.images.to(device), labels=labels)


class _Sink:
    """Decoded images go straight into a memory-mapped `.npy` temp file in the cache folder.

    A large set is then never held in memory: the pages are the file's, written
    back by the kernel, and on success the temp file is renamed into the cache
    entry (`claim`). A temp file that is not claimed is removed (`discard`).
    Without a cache folder, or without room on its disk, images go into memory.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.files: dict[int, tuple[Path, np.memmap]] = {}  # data_ptr of the tensor -> its temp file and map

    def allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised uint8 tensor of `shape`."""
        if self.folder is None:
            return torch.empty(shape, dtype=torch.uint8)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".decoding.", suffix=".npy.tmp", dir=self.folder)
            os.close(fd)
            array = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate") and array.size:
                # Reserve the blocks now: writing a page of a sparse map on a full disk kills the process (SIGBUS).
                with open(name, "rb+") as handle:
                    os.posix_fallocate(handle.fileno(), 0, os.path.getsize(name))
        except OSError as exc:
            if "name" in locals():
                Path(name).unlink(missing_ok=True)
            warnings.warn(f"cannot decode into the cache folder {self.folder} ({describe_exception(exc)}); "
                          "decoding into memory", stacklevel=4)
            return torch.empty(shape, dtype=torch.uint8)
        tensor = torch.from_numpy(array)
        self.files[tensor.data_ptr()] = (Path(name), array)
        return tensor

    def claim(self, tensor: torch.Tensor, destination: Path) -> bool:
        """Flush the temp file behind `tensor` and rename it to `destination`; False if `tensor` has none."""
        entry = self.files.get(tensor.data_ptr())
        if entry is None or tuple(entry[1].shape) != tuple(tensor.shape):
            return False
        path, array = entry
        array.flush()
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(path, destination)
        del self.files[tensor.data_ptr()]
        return True

    def release(self, tensor: torch.Tensor) -> None:
        """Remove the temp file behind `tensor` (replaced by a compacted copy)."""
        entry = self.files.pop(tensor.data_ptr(), None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def discard(self) -> None:
        for path, _ in self.files.values():
            path.unlink(missing_ok=True)
        self.files.clear()


@dataclasses.dataclass
class _Options:
    """What `load_images` was asked for, as the readers see it: each argument checked (a one-line KrrstError), and
    the fine-grained datasets' default size applied."""

    name: str
    root: Path
    split: str = "train"
    image_size: int | None = None
    max_per_class: int | None = None
    num_workers: int | None = None
    resize: str = "crop"
    skip_corrupt: bool = False
    test_fraction: float = DEFAULT_TEST_FRACTION
    split_seed: int = 0
    sink: _Sink = dataclasses.field(default_factory=_Sink, compare=False)
    identity: tuple = ()  # what identifies data that is not a path (a Hugging Face dataset's fingerprint)

    def __post_init__(self) -> None:
        dataset = DATASETS.get(self.name)
        if dataset.splits is not None and self.split not in dataset.splits:
            valid = ", ".join(dataset.splits)
            raise KrrstError(f"dataset {self.name} has no split {self.split!r}; valid splits: {valid}")
        for option in ("image_size", "max_per_class", "num_workers"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KrrstError(f"{option} must be a positive integer or None, got {value!r}")
        RESIZE_POLICIES.get(self.resize)
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise KrrstError(f"test_fraction (run.test_fraction) must lie in (0, 1), got {fraction!r}")
        if dataset.fine_grained and self.image_size is None:
            self.image_size = FINE_GRAINED_DEFAULT_SIZE
        self.skip_corrupt = bool(self.skip_corrupt)
        self.test_fraction = float(fraction)


# ---------------------------------------------------------------------------------------------------------------------
# Archives: a folder, a zip, a tar (optionally compressed), a list of image files or a Hugging Face dataset's rows,
# addressed by '/'-separated member names relative to the root.

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclasses.dataclass
class _Archive:
    """A dataset root opened for reading.

    A folder is read by path. Every other kind has an `index` of its members
    and a `fetch` that reads one: a zip or a plain tar by one `os.pread` per
    member, a list by the path it names, a Hugging Face dataset by row. A
    compressed tar cannot be read at random: `stream` decompresses it once, in
    order, for the images, and `fetch` serves the few annotation files.
    """

    path: Path
    index: dict[str, Any] | None = None  # member name -> what `fetch` reads it from (None: a folder)
    fetch: Callable[[Any], bytes] | None = None
    streamed: bool = False  # a compressed tar: the images are read in archive order (`stream`)
    handles: tuple = ()  # the open files `close` closes
    hf: tuple = ()  # a Hugging Face dataset: (the name given, its rows, label column or None, split by krrst)

    def exists(self, name: str) -> bool:
        return name in self.index if self.index is not None else (self.path / name).is_file()

    def files(self, prefix: str = "", max_depth: int | None = None) -> list[str]:
        """The files (not folders) under `prefix` ('' or ending in '/'), sorted; in a folder, at most `max_depth`
        folders down from it, without walking the rest of the root."""
        if self.index is not None:
            return sorted(name for name in self.index if name.startswith(prefix))
        folder = self.path / prefix
        return sorted(prefix + name for name in _walk_files(folder, max_depth)) if folder.is_dir() else []

    def find(self, marker: str, max_depth: int = 3) -> str | None:
        """The prefix ('' or 'a/b/') of the shallowest `<prefix><marker>` file, or None."""
        if self.index is not None:
            hits = [n[: -len(marker)] for n in self.index if n == marker or n.endswith("/" + marker)]
        else:
            # Probe a few depths instead of walking: torchvision-style roots often hold other big datasets.
            for depth in range(max_depth + 1):
                found = self.path.glob("*/" * depth + marker)
                hits = [p.relative_to(self.path).as_posix() for p in found if p.is_file()]
                if hits:
                    break
            hits = [h[: -len(marker)] for h in hits if not any(_hidden(part) for part in h.split("/"))]
        return min(hits, key=lambda h: (h.count("/"), h)) if hits else None

    def read(self, name: str) -> bytes:
        try:
            return self.fetch(self.index[name]) if self.index is not None else (self.path / name).read_bytes()
        except KeyError:
            raise KrrstError(f"{self.path}: member {name} is listed by the dataset's annotations but missing") from None
        except FileNotFoundError:
            raise KrrstError(f"{self.path / name}: file is listed by the dataset's annotations but missing") from None
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            reason = describe_exception(exc)
            raise KrrstError(f"{self.path}: cannot read {name} ({reason}); the archive is damaged") from None

    def stream(self, wanted: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """`(name, bytes)` of the `wanted` members of a compressed tar, in archive order, in one pass."""
        wanted = set(wanted)
        try:
            with tarfile.open(self.path, "r|*") as tar:
                for info in tar:
                    name = _tar_name(info)
                    if info.isfile() and name in wanted:
                        yield name, tar.extractfile(info).read()
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            reason = describe_exception(exc)
            raise KrrstError(f"{self.path}: cannot read the archive ({reason}); it is damaged") from None

    def open(self, name: str) -> BinaryIO:
        """A seekable binary stream of one member (for .mat / .npz / pickle readers)."""
        if self.index is not None:
            return io.BytesIO(self.read(name))
        if not (self.path / name).is_file():
            raise KrrstError(f"{self.path / name}: file not found")
        return open(self.path / name, "rb")

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX") or "/." in name or "/__MACOSX" in name


def _walk_files(folder: Path, max_depth: int | None = None) -> Iterator[str]:
    """The relative name of every file under `folder` (at most `max_depth` folders down), hidden files and folders
    skipped, in no set order."""
    stack = [("", folder)]
    while stack:
        prefix, current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                if entry.is_dir() and (max_depth is None or prefix.count("/") < max_depth):
                    stack.append((prefix + entry.name + "/", Path(entry.path)))
                elif entry.is_file():
                    yield prefix + entry.name


def _tar_name(info: tarfile.TarInfo) -> str:
    return re.sub(r"^(\./)+", "", info.name)


def _open_archive(root: Path) -> _Archive:
    """Open `root` as a folder, zip, tar or list file; anything else is a one-line KrrstError naming it."""
    if root.is_dir():
        return _Archive(root)
    lower = root.name.lower()
    if lower.endswith(_LIST_SUFFIXES):
        return _open_list(root)
    is_tar = lower.endswith(_TAR_SUFFIXES)
    if not is_tar and (lower.endswith(".zip") or zipfile.is_zipfile(root)):
        return _open_zip(root)
    if is_tar or tarfile.is_tarfile(root):
        return _open_tar(root)
    raise KrrstError(
        f"{root} is not a folder, a .zip, a .tar (.tar.gz, .tgz) or a .txt list of image paths; "
        "expected one of those (see `krrst datasets`)"
    )


def _open_zip(root: Path) -> _Archive:
    try:
        archive = zipfile.ZipFile(root)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise KrrstError(
            f"{root} is not a readable zip archive ({describe_exception(exc)}); expected a dataset folder or a .zip"
        ) from None
    raw = open(root, "rb")  # for os.pread, which has no shared file position

    def fetch(info: zipfile.ZipInfo) -> bytes:
        if hasattr(os, "pread") and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            return _read_stored(raw.fileno(), info)
        return archive.read(info)

    index = {info.filename: info for info in archive.infolist() if not info.is_dir() and not _hidden(info.filename)}
    return _Archive(root, index, fetch, handles=(archive, raw))


def _read_stored(fd: int, info: zipfile.ZipInfo) -> bytes:
    """An uncompressed zip member in one `os.pread`.

    `ZipFile.read` costs ~40 us per member, under a lock shared by every
    thread; pread has no shared file position, releases the GIL and takes
    a few us. The local header's extra field may differ from the central
    directory's, so the data offset is read from the local header itself.
    """
    chunk = os.pread(fd, 30 + info.compress_size + 512, info.header_offset)
    if chunk[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", chunk[26:30])
    start = 30 + name_length + extra_length
    data = chunk[start : start + info.compress_size]
    if len(data) < info.compress_size:
        data = os.pread(fd, info.compress_size, info.header_offset + start)
    if len(data) != info.compress_size or zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    return data


def _open_tar(root: Path) -> _Archive:
    try:
        with open(root, "rb") as handle:
            magic = handle.read(6)
        tar = tarfile.open(root, "r:*")
        index = {_tar_name(info): info for info in tar.getmembers() if info.isfile() and not _hidden(_tar_name(info))}
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise KrrstError(f"{root} is not a readable tar archive ({describe_exception(exc)})") from None
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":  # gzip, bzip2, xz
        lock = threading.Lock()

        def extract(info: tarfile.TarInfo) -> bytes:  # seeking decompresses from the start: for small files only
            with lock:
                return tar.extractfile(info).read()

        return _Archive(root, index, extract, streamed=True, handles=(tar,))
    tar.close()
    raw = open(root, "rb")

    def fetch(info: tarfile.TarInfo) -> bytes:
        data = os.pread(raw.fileno(), info.size, info.offset_data)
        if len(data) != info.size:
            raise EOFError(f"{info.name} is cut short")
        return data

    return _Archive(root, index, fetch, handles=(raw,))


def _open_list(root: Path) -> _Archive:
    """A text file naming one image per line, relative to the file's folder or absolute ('#' starts a comment)."""
    try:
        lines = root.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KrrstError(f"{root} is not a readable text list of image paths ({describe_exception(exc)})") from None
    index: dict[str, Path] = {}
    for entry in (line.strip() for line in lines):
        if entry and not entry.startswith("#"):
            path = Path(entry).expanduser()
            index[entry] = path if path.is_absolute() else root.parent / path

    def fetch(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KrrstError(f"{path}: listed in {root} but missing") from None

    return _Archive(root, index, fetch)


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
    every call since torchvision 0.29 (a warning per image, and
    `warnings.catch_warnings` is not thread-safe).
    """
    try:
        import torchvision.io.image  # noqa: F401 - loads and registers the image ops

        decode = torch.ops.image.decode_image
        rgb = torchvision.io.image.ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda data: decode(data, rgb, False)


SKIP_HINT = "pass --skip-corrupt (skip_corrupt=True, --set run.skip_corrupt=true) to skip unreadable images"


def _decode_one(data: bytes, member: str, archive_path: Path, skip_corrupt: bool) -> torch.Tensor | None:
    """Decode one encoded image to uint8 3 x H x W RGB (greyscale, palette, RGBA and CMYK become RGB).

    An undecodable image is None under `skip_corrupt`, else a KrrstError naming it.
    """
    fast = _fast_decoder()
    if fast is not None:
        try:
            image = fast(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            if image.ndim == 3 and image.shape[0] == 3:
                return image
        except RuntimeError:
            pass  # formats it cannot decode (BMP, TIFF, ...) go to Pillow
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(io.BytesIO(data)) as pil_image:
            return pil_to_tensor(pil_image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if skip_corrupt:
            return None
        reason = describe_exception(exc)
        raise KrrstError(f"{archive_path}: cannot decode image {member} ({reason}); {SKIP_HINT}") from None


RESIZE_POLICIES: Registry[str] = Registry("resize policy", plural="resize policies")
RESIZE_POLICIES.register("crop", "resize the short side to S (antialiased bilinear), then take the centre S x S")
RESIZE_POLICIES.register("stretch", "resize both sides to S (antialiased bilinear), changing the aspect ratio")


def _resize(images: torch.Tensor, size: int, policy: str = "crop") -> torch.Tensor:
    """Resize a uint8 batch N x 3 x H x W to N x 3 x size x size under `policy` (`RESIZE_POLICIES`).

    "crop" is torchvision's `Resize(size)` + `CenterCrop(size)`: the short side
    becomes `size`, the long side `int(size * long / short)`, and the centre is kept.
    """
    from torchvision.transforms.v2 import functional as F

    if images.shape[-2:] == (size, size):
        return images
    bilinear = F.InterpolationMode.BILINEAR
    if policy == "stretch":
        return F.resize(images, [size, size], interpolation=bilinear, antialias=True)
    resized = F.resize(images, size, interpolation=bilinear, antialias=True)
    return F.center_crop(resized, [size, size]).contiguous()


_Chunk = list[tuple[int, bytes | None]]  # (row, the member's bytes, or None: read by the decoding thread)


def _chunks(archive: _Archive, members: Sequence[str]) -> Iterator[_Chunk]:
    """The members in chunks of `_CHUNK`, in reading order: a compressed tar's own, else the members'."""
    if archive.streamed:
        row_of = {member: row for row, member in enumerate(members)}
        items = ((row_of[name], data) for name, data in archive.stream(row_of))
    else:
        items = ((row, None) for row in range(len(members)))
    while chunk := list(itertools.islice(items, _CHUNK)):
        yield chunk


def _decode_chunk(archive: _Archive, members: Sequence[str], chunk: _Chunk, out: torch.Tensor, opts: _Options
                  ) -> list[int]:
    """Decode the chunk's members into their rows of `out`; returns the rows skipped as undecodable."""
    skipped = []
    to_resize: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for row, data in chunk:
        member = members[row]
        image = _decode_one(archive.read(member) if data is None else data, member, archive.path, opts.skip_corrupt)
        if image is None:
            skipped.append(row)
        elif image.shape[1:] == out.shape[2:]:
            out[row] = image
        elif opts.image_size is None:
            raise KrrstError(
                f"{archive.path}: image {member} is {image.shape[2]}x{image.shape[1]} but earlier images are "
                f"{out.shape[3]}x{out.shape[2]}; pass image_size (--image-size) to resize them all"
            )
        else:
            to_resize.setdefault(tuple(image.shape[1:]), []).append((row, image))
    for group in to_resize.values():  # one batched resize per group of equally-sized images
        rows, images = zip(*group)
        out[list(rows)] = _resize(torch.stack(images), opts.image_size, opts.resize)
    return skipped


def _first_shape(archive: _Archive, members: Sequence[str], first: _Chunk, opts: _Options) -> tuple[int, int]:
    """The H x W of the output: `image_size`, else the size of the first decodable image."""
    if opts.image_size is not None:
        return opts.image_size, opts.image_size
    # A stream has only its first chunk at hand; any other archive can read every member.
    candidates = first if archive.streamed else [(row, None) for row in range(len(members))]
    for row, data in candidates:
        data = archive.read(members[row]) if data is None else data
        image = _decode_one(data, members[row], archive.path, opts.skip_corrupt)
        if image is not None:
            return tuple(image.shape[1:])
    raise KrrstError(f"{archive.path}: the first {len(candidates)} images cannot be decoded; "
                     "pass image_size (--image-size) to read the rest, or check the files")


def _decode_members(archive: _Archive, members: Sequence[str], opts: _Options) -> tuple[torch.Tensor, list[int]]:
    """Decode every member into one contiguous uint8 tensor N x 3 x H x W, on a thread pool.

    Returns the tensor and the sorted positions of the members skipped as
    undecodable (only under `opts.skip_corrupt`); their rows are not in the tensor.
    """
    desc = f"{opts.name} {opts.split}"
    if not members:
        raise KrrstError(f"{archive.path}: no images to load for {desc}")
    chunks = _chunks(archive, members)
    first = next(chunks)
    out = opts.sink.allocate((len(members), 3, *_first_shape(archive, members, first, opts)))
    skipped: list[int] = []
    workers = opts.num_workers or min(_available_cores(), 16)  # past ~16 threads the GIL-held part dominates
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="krrst-decode")
    with tqdm(total=len(members), desc=desc, unit="img", disable=None, leave=False) as progress:
        pending: collections.deque = collections.deque()

        def collect(bound: int) -> None:
            # In order, so an error names the first bad file; the bound keeps few of a stream's bytes in memory.
            while pending and (len(pending) > bound or pending[0][0].done()):
                future, count = pending.popleft()
                skipped.extend(future.result())
                progress.update(count)

        try:
            for chunk in itertools.chain([first], chunks):
                pending.append((pool.submit(_decode_chunk, archive, members, chunk, out, opts), len(chunk)))
                collect(4 * workers)
            collect(0)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    skipped.sort()
    if not skipped:
        return out, skipped
    if len(skipped) == len(out):
        raise KrrstError(f"{archive.path}: none of the {len(out)} images could be decoded")
    keep = torch.ones(len(out), dtype=torch.bool)
    keep[skipped] = False
    compact = opts.sink.allocate((len(out) - len(skipped), *out.shape[1:]))  # a map stays a map
    torch.index_select(out, 0, keep.nonzero().squeeze(1), out=compact)
    opts.sink.release(out)
    return compact, skipped


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_per_class(labels: Sequence[int], max_per_class: int | None) -> list[int]:
    """Indices of the first `max_per_class` items of each class, in their original order."""
    if max_per_class is None:
        return list(range(len(labels)))
    seen: collections.Counter = collections.Counter()
    keep = []
    for index, label in enumerate(labels):
        seen[label] += 1
        if seen[label] <= max_per_class:
            keep.append(index)
    return keep


def _labelled_files(archive: _Archive, members: list[str], labels: list[int] | None, class_names: list[str],
                    opts: _Options, stats: tuple[Stats, Stats] | None = None, name: str | None = None) -> ImageSet:
    """Decode a listed split (members + labels, or None: unlabelled) into an ImageSet, honouring max_per_class.

    `stats` None: the images' own (`_channel_stats`); `name` None: the dataset's.
    """
    keep = _first_per_class(labels if labels is not None else [0] * len(members), opts.max_per_class)
    members = [members[i] for i in keep]
    images, skipped = _decode_members(archive, members, opts)
    bad = set(skipped)
    keep = [k for position, k in enumerate(keep) if position not in bad]
    label_tensor = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    return ImageSet(images, label_tensor, class_names, *(stats or _channel_stats(images)), name or opts.name,
                    resize=opts.resize if opts.image_size else None, skipped=tuple(members[i] for i in skipped))


def _from_arrays(arrays: Iterable[np.ndarray], labels: np.ndarray, class_names: list[str], stats: tuple[Stats, Stats],
                 opts: _Options) -> ImageSet:
    """An ImageSet from uint8 batches N_i x 3 x S x S (CIFAR's pickles, ImageNet64's npz), taken one at a time,
    whose labels are known first, honouring max_per_class and image_size."""
    keep = np.zeros(len(labels), dtype=bool)
    keep[_first_per_class(labels.tolist(), opts.max_per_class)] = True
    out: torch.Tensor | None = None
    row = offset = 0
    for array in arrays:
        batch_keep = keep[offset : offset + len(array)]
        offset += len(array)
        # Keeping a whole batch (a 10th of ImageNet64) makes no copy of it.
        images = torch.from_numpy(array if batch_keep.all() else array[batch_keep])
        if out is None:
            size = opts.image_size or images.shape[-1]
            out = opts.sink.allocate((int(keep.sum()), 3, size, size))
        for start in range(0, len(images), 4096):
            chunk = _resize(images[start : start + 4096], size, opts.resize)
            out[row : row + len(chunk)] = chunk
            row += len(chunk)
    return ImageSet(out, torch.from_numpy(labels[keep]), class_names, *stats, opts.name,
                    resize=opts.resize if opts.image_size else None)


def _channel_stats(images: torch.Tensor) -> tuple[Stats, Stats]:
    """Per-channel mean and std of uint8 images in [0, 1] units, accumulated in float64 by chunks."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), 512):  # 512 images of 64 px are 50 MB of float64, whatever the set's size
        chunk = images[start : start + 512].to(torch.float64).div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    # A constant channel would divide by zero downstream; 1/255 is one grey level.
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def _by_label(members: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """`members` and `labels` sorted class by class, by name within a class."""
    pairs = sorted(zip(labels, members))
    return [member for _, member in pairs], [label for label, _ in pairs]


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


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _read_imagefolder(archive: _Archive, opts: _Options) -> ImageSet:
    files = [n for n in archive.files() if _is_image(n)]
    parts = [n.split("/") for n in files]
    # One top folder holding the splits (cifar10-jpeg/train/...) versus splits at the top level (train/...).
    depth = 1 if len({p[0] for p in parts}) == 1 and all(len(p) >= 4 for p in parts) else 0
    by_split: dict[str, list[str]] = {}
    for name, p in zip(files, parts):
        if len(p) == depth + 3:
            by_split.setdefault(p[depth], []).append(name)
    if opts.split not in by_split and archive.find("wnids.txt") is not None:
        raise KrrstError(f"{archive.path} holds the Tiny-ImageNet-200 layout (wnids.txt); pass --source tinyimagenet")
    if not by_split:
        raise KrrstError(f"{archive.path}: no <split>/<class>/<image> files; {_layout_found(archive, files)}")
    if opts.split not in by_split:
        valid = ", ".join(sorted(by_split))
        raise KrrstError(
            f"{archive.path}: no split folder {opts.split!r}; valid splits here: {valid} (for one folder of "
            "<class>/<image> with no split folders, pass --source folder: it splits train/test itself)"
        )
    classes = [member.split("/")[depth + 1] for member in by_split[opts.split]]
    class_names = sorted(set(classes))
    class_index = {c: i for i, c in enumerate(class_names)}
    members, labels = _by_label(by_split[opts.split], [class_index[c] for c in classes])
    stats = CIFAR10_STATS if class_names == CIFAR10_CLASSES else None
    # Named after its archive/folder ("cifar10-jpeg"), which says more than "imagefolder".
    return _labelled_files(archive, members, labels, class_names, opts, stats, archive.path.name.removesuffix(".zip"))


def _layout_found(archive: _Archive, images: list[str]) -> str:
    """What the root holds instead of the imagefolder layout, and what to pass for it."""
    if not images:
        return _no_images(archive)
    classes = _class_folders(images)[1]
    if classes:
        shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
        return (f"found <class>/<image> folders ({len(classes)} classes: {shown}) with no split folders; "
                "pass --source folder (it makes a seeded, stratified train/test split)")
    return (f"found {len(images)} image{'s' * (len(images) > 1)} not in <split>/<class>/ folders (e.g. {images[0]}); "
            "pass --source folder to read images in any layout")


def _no_images(archive: _Archive) -> str:
    others = archive.files()
    if not others:
        return "it is empty; expected image files (.jpg, .png, .webp, ...)"
    return (f"found {len(others)} files but no images (e.g. {others[0]}); expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}")


def _class_folders(files: list[str]) -> tuple[list[int] | None, list[str]]:
    """`(labels, class names)` when every image sits in a `<class>/` folder (below common folders), else `(None, [])`.

    Folders every file shares (`photos/2024/...`) are not classes; at least two
    class folders are needed. Images at different depths are unlabelled.
    """
    parts = [name.split("/") for name in files]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    if not parts or any(len(p) != 2 for p in parts) or len({p[0] for p in parts}) < 2:
        return None, []
    class_names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(class_names)}
    return [index[p[0]] for p in parts], class_names


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`(train, test)` indices: each class gives `round(test_fraction * n_c)` images to test, drawn by `seed`.

    A class of two or more images keeps at least one on each side; a class of
    one image stays in train. Both lists are sorted, disjoint and cover every index.
    """
    if not 0 < test_fraction < 1:
        raise KrrstError(f"test_fraction (run.test_fraction) must lie in (0, 1), got {test_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    test: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        count = round(test_fraction * len(indices))
        count = min(max(count, 1), len(indices) - 1) if len(indices) > 1 else 0
        order = torch.randperm(len(indices), generator=generator)[:count]
        test.extend(indices[i] for i in order.tolist())
    chosen = set(test)
    return [i for i in range(len(labels)) if i not in chosen], sorted(test)


def _own_split(members: list[str], labels: list[int] | None, opts: _Options, name: str
               ) -> tuple[list[str], list[int] | None, str]:
    """`opts.split` of a set with no test split of its own: train/test of a labelled one by `stratified_split`,
    with the fraction and seed in its name; `all`, or any split of an unlabelled one, is every image."""
    if labels is None or opts.split == "all":
        return members, labels, name
    train, test = stratified_split(labels, opts.test_fraction, opts.split_seed)
    chosen = train if opts.split == "train" else test
    # The split is part of the data: rows of another fraction or seed must not be mixed with these.
    name = f"{name} (test {100 * opts.test_fraction:g}%, seed {opts.split_seed})"
    return [members[i] for i in chosen], [labels[i] for i in chosen], name


def _read_folder(archive: _Archive, opts: _Options) -> ImageSet:
    """Images in any layout: flat, nested, zipped, tarred or listed; `<class>/<image>` folders give labels."""
    files = [n for n in archive.files() if _is_image(n)]
    if not files:
        raise KrrstError(f"{archive.path}: no images found; {_no_images(archive)}")
    labels, class_names = _class_folders(files)
    if labels is None and opts.split == "test":
        raise KrrstError(
            f"{archive.path}: no test split: the images are not in <class>/<image> folders, so they have no labels "
            "to split by (a target needs them; a <split>/<class>/<image> tree is --source imagefolder)"
        )
    base = re.sub(r"(\.tar(\.\w+)?|\.tgz|\.zip|\.txt|\.lst|\.list)$", "", archive.path.name, flags=re.I)
    files, labels, name = _own_split(files, labels, opts, base)
    if labels is not None:
        files, labels = _by_label(files, labels)
    stats = CIFAR10_STATS if class_names == CIFAR10_CLASSES else None
    return _labelled_files(archive, files, labels, class_names, opts, stats, name)


def _read_tinyimagenet(archive: _Archive, opts: _Options) -> ImageSet:
    layout = ("tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
              "val/images/*.JPEG, val/val_annotations.txt}")
    base = _locate(archive, "wnids.txt", "Tiny-ImageNet-200", layout)
    wnids = _read_lines(archive, base + "wnids.txt")
    class_names = list(wnids)
    if archive.exists(base + "words.txt"):
        # words.txt covers all of WordNet; keep the first synonym of each of our wnids ("goldfish, Carassius auratus").
        words = dict(line.split("\t", 1) for line in _read_lines(archive, base + "words.txt") if "\t" in line)
        class_names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    class_index = {w: i for i, w in enumerate(wnids)}
    members, labels = [], []
    if opts.split == "train":
        prefix = base + "train/"
        for name in archive.files(prefix):
            parts = name[len(prefix) :].split("/")
            if len(parts) == 3 and parts[1] == "images" and parts[0] in class_index and _is_image(name):
                members.append(name)  # not <wnid>_boxes.txt
                labels.append(class_index[parts[0]])
        members, labels = _by_label(members, labels)
    else:
        annotations = base + "val/val_annotations.txt"
        if not archive.exists(annotations):
            raise KrrstError(f"{archive.path}: no {annotations}; expected the Tiny-ImageNet-200 layout {layout}")
        for line in _read_lines(archive, annotations):
            file_name, wnid = line.split("\t")[:2]
            if wnid not in class_index:
                raise KrrstError(f"{archive.path}: {annotations} names class {wnid!r}, which is not in wnids.txt")
            members.append(base + "val/images/" + file_name)
            labels.append(class_index[wnid])
    if not members:
        raise KrrstError(f"{archive.path}: no {opts.split} images; expected the Tiny-ImageNet-200 layout {layout}")
    return _labelled_files(archive, members, labels, class_names, opts, IMAGENET_STATS)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, strings and numpy arrays) and nothing else.

    The official archives are python pickles; refusing every other global
    means a tampered file cannot run code.
    """

    _ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                for name in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

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
    folder, meta = ("cifar-10-batches-py", "batches.meta") if is_10 else ("cifar-100-python", "meta")
    names_key, labels_key = ("label_names", "labels") if is_10 else ("fine_label_names", "fine_labels")
    if not is_10:
        batches = [opts.split]  # "train" or "test"
    else:
        batches = [f"data_batch_{i}" for i in range(1, 6)] if opts.split == "train" else ["test_batch"]
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
    stats = CIFAR10_STATS if is_10 else CIFAR100_STATS
    return _from_arrays(arrays, np.asarray(labels, dtype=np.int64), class_names, stats, opts)


def _read_aircraft(archive: _Archive, opts: _Options) -> ImageSet:
    layout = ("fgvc-aircraft-2013b/data/{variants.txt, images_variant_trainval.txt, images_variant_test.txt, "
              "images/<id>.jpg}")
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
    return _labelled_files(archive, members, labels, class_names, opts, IMAGENET_STATS)


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
    return _labelled_files(archive, members, labels, list(Flowers102.classes), opts, IMAGENET_STATS)


def _read_cars(archive: _Archive, opts: _Options) -> ImageSet:
    layout = ("{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, "
              "cars_test/}")
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
    return _labelled_files(archive, members, labels, class_names, opts, IMAGENET_STATS)


def _read_cub(archive: _Archive, opts: _Options) -> ImageSet:
    layout = ("CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
              "images/<class>/<image>.jpg}")
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
    return _labelled_files(archive, members, labels, class_names, opts, IMAGENET_STATS)


def _read_dogs(archive: _Archive, opts: _Options) -> ImageSet:
    layout = "Images/<wnid>-<name>/*.jpg beside {train_list.mat, test_list.mat} (or beside lists/)"
    list_name = f"{opts.split}_list.mat"
    list_base = _locate(archive, list_name, "Stanford Dogs", layout)
    # lists.tar extracts beside Images/; some copies keep the lists in a lists/ folder instead.
    images = list_base.removesuffix("lists/") + "Images/"
    below = [name[len(images) :] for name in archive.files(images)]
    folders = sorted({rest.split("/")[0] for rest in below if "/" in rest})
    if not folders:
        raise KrrstError(
            f"{archive.path}: no {images}<wnid>-<name>/ folders; expected the Stanford Dogs layout {layout}"
        )
    class_index = {f: i for i, f in enumerate(folders)}
    files = [str(f) for f in np.atleast_1d(_load_mat(archive, list_base + list_name)["file_list"])]
    unknown = sorted({f.split("/")[0] for f in files} - class_index.keys())
    if unknown:
        raise KrrstError(f"{archive.path}: {list_name} names classes with no Images/ folder: {', '.join(unknown[:5])}")
    labels = [class_index[f.split("/")[0]] for f in files]
    class_names = [f.split("-", 1)[-1] for f in folders]
    return _labelled_files(archive, [images + f for f in files], labels, class_names, opts, IMAGENET_STATS)


def _read_imagenet64(archive: _Archive, opts: _Options) -> ImageSet:
    layout = "{train_data_batch_1.npz .. train_data_batch_10.npz, val_data.npz} (npz release of downsampled ImageNet)"
    candidates = archive.files(max_depth=2)  # up to two folders down
    if opts.split == "train":
        pattern = re.compile(r"(^|/)train_data_batch_(\d+)(\.npz)?$")
        found = [(int(m.group(2)), n) for n in candidates if (m := pattern.search(n))]
        batch_names = [n for _, n in sorted(found)]
    else:
        batch_names = [n for n in candidates if re.search(r"(^|/)val_data(\.npz)?$", n)][:1]
    if not batch_names:
        raise KrrstError(f"{archive.path}: no {opts.split} batches found; expected the ImageNet64 layout {layout}")
    # Labels first (small): they fix the rows to keep, so the images go straight into one preallocated tensor.
    labels = []
    for batch_name in batch_names:
        with _npz(archive, batch_name) as npz:
            labels.append(np.asarray(npz["labels"], dtype=np.int64).reshape(-1) - 1)  # the files count from 1

    def arrays() -> Iterator[np.ndarray]:
        for batch_name, batch_labels in zip(batch_names, labels):
            with _npz(archive, batch_name) as npz:
                data = np.asarray(npz["data"])
            side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
            well_formed = data.dtype == np.uint8 and side > 0 and 3 * side * side == data.shape[1]
            if not well_formed or len(data) != len(batch_labels):
                raise KrrstError(f"{archive.path / batch_name}: 'data' must be N x 3*S*S uint8; expected {layout}")
            yield data.reshape(-1, 3, side, side)

    all_labels = np.concatenate(labels)
    class_names = _imagenet64_class_names(archive, int(all_labels.max()) + 1)
    return _from_arrays(arrays(), all_labels, class_names, IMAGENET_STATS, opts)


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
# Hugging Face datasets (optional: pip install 'krrst[hf]').


def _open_hf(root: str, split: str) -> tuple[_Archive, tuple]:
    """A Hugging Face dataset as an archive of its rows for `_read_hf`, and what identifies it.

    `root` is a folder written by `save_to_disk` (read offline) or a hub name
    (fetched by `datasets`). The first `Image` column holds the images and the
    first `ClassLabel` column, when there is one, the labels. A split the
    dataset has is read as it is; `train`/`test` of a dataset with no `test`
    split come from its `train` split (or its only one), split by `_own_split`.
    """
    try:
        import datasets
    except ImportError:
        raise KrrstError("reading a Hugging Face dataset needs the datasets package: pip install 'krrst[hf]'") from None
    local = Path(root).expanduser()
    try:
        data = datasets.load_from_disk(str(local)) if local.exists() else datasets.load_dataset(root)
    except Exception as exc:  # noqa: BLE001 - network, format and hub errors come in many types
        raise KrrstError(f"cannot open the Hugging Face dataset {root!r} ({describe_exception(exc)}); expected a "
                         "hub name or a folder written by save_to_disk") from None
    splits = dict(data) if isinstance(data, datasets.DatasetDict) else {"all": data}
    if split in splits:
        base, derived = split, False
    elif split in ("train", "test", "all") and "test" not in splits and ("train" in splits or len(splits) == 1):
        base, derived = ("train" if "train" in splits else next(iter(splits))), True
    else:
        raise KrrstError(f"Hugging Face dataset {root!r} has no split {split!r}; its splits: {', '.join(splits)}")
    rows = splits[base]
    image_column = next((c for c, f in rows.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None:
        raise KrrstError(f"Hugging Face dataset {root!r} has no Image column (columns: {', '.join(rows.features)})")
    label_column = next((c for c, f in rows.features.items() if isinstance(f, datasets.ClassLabel)), None)
    rows = rows.cast_column(image_column, datasets.Image(decode=False))
    lock = threading.Lock()

    def fetch(row: int) -> bytes:
        with lock:
            item = rows[row][image_column]
        return item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()

    index = {str(row): row for row in range(len(rows))}
    archive = _Archive(local if local.exists() else Path(root), index, fetch, hf=(root, rows, label_column, derived))
    return archive, ("hf", str(local.resolve()) if local.exists() else root, base, derived, rows._fingerprint)


def _read_hf(archive: _Archive, opts: _Options) -> ImageSet:
    root, rows, label_column, derived = archive.hf
    members, labels, class_names = list(archive.index), None, []
    if label_column is not None:
        labels = [int(label) for label in rows[label_column]]
        class_names = list(rows.features[label_column].names)
    elif derived and opts.split == "test":
        raise KrrstError(f"Hugging Face dataset {root!r} has no test split and no ClassLabel column to split by")
    name = Path(root).name or root
    if derived:
        members, labels, name = _own_split(members, labels, opts, name)
    return _labelled_files(archive, members, labels, class_names, opts, name=name)


# ---------------------------------------------------------------------------------------------------------------------
# Registry, downloads, cache and the public entry point.

class Dataset(NamedTuple):
    """What `load_images` needs to know of a dataset name."""

    read: Callable[[_Archive, _Options], ImageSet]  # the reader of its layout
    splits: tuple[str, ...] | None  # the splits it has (None: the folders present, or the HF dataset's own)
    layout: str  # what it reads under --root (`krrst datasets`)
    downloadable: bool = False  # torchvision fetches it (--download)
    fine_grained: bool = False  # read at 32 x 32 unless image_size says otherwise
    splits_itself: bool = False  # a labelled set cut into train/test by `stratified_split` (seeded)
    test_split: str = "test"  # the split a target is tested on


DATASETS: Registry[Dataset] = Registry("dataset")
for _name, _dataset in {
    "imagefolder": Dataset(_read_imagefolder, None,
                           "<split>/<class>/<image>, a folder or a .zip (e.g. ~/data/cifar10-jpeg.zip)"),
    "tinyimagenet": Dataset(_read_tinyimagenet, ("train", "val"), "tiny-imagenet-200/{wnids.txt, "
                            "train/<wnid>/images/*.JPEG, val/images + val_annotations.txt}", test_split="val"),
    "cifar10": Dataset(_read_cifar, ("train", "test"), "cifar-10-batches-py/ (python pickle batches; --download "
                       "fetches it)", downloadable=True),
    "cifar100": Dataset(_read_cifar, ("train", "test"), "cifar-100-python/ (python pickle batches; --download "
                        "fetches it)", downloadable=True),
    "aircraft": Dataset(_read_aircraft, ("train", "test"), "fgvc-aircraft-2013b/data/ (variant level, 100 classes; "
                        "--download fetches it)", downloadable=True, fine_grained=True),
    "flowers": Dataset(_read_flowers, ("train", "test"), "flowers-102/{imagelabels.mat, setid.mat, jpg/} "
                       "(--download fetches it)", downloadable=True, fine_grained=True),
    "cars": Dataset(_read_cars, ("train", "test"), "Stanford Cars: devkit/cars_meta.mat, cars_train/, cars_test/, "
                    "cars_test_annos_withlabels.mat", fine_grained=True),
    "cub": Dataset(_read_cub, ("train", "test"), "CUB_200_2011/{images.txt, image_class_labels.txt, "
                   "train_test_split.txt, classes.txt, images/}", fine_grained=True),
    "dogs": Dataset(_read_dogs, ("train", "test"), "Stanford Dogs: Images/<wnid-breed>/*.jpg + train_list.mat / "
                    "test_list.mat (or lists/)", fine_grained=True),
    "imagenet64": Dataset(_read_imagenet64, ("train", "val"), "Imagenet64_train/train_data_batch_{1..10}.npz + "
                          "val_data.npz (official downsampled release)", test_split="val"),
    "folder": Dataset(_read_folder, ("train", "test", "all"), "your own images in any layout (the examples below)",
                      splits_itself=True),
    "hf": Dataset(_read_hf, None, "a Hugging Face dataset: a hub name (e.g. --root cifar10) or a save_to_disk folder "
                  "(pip install 'krrst[hf]')", splits_itself=True),
}.items():
    DATASETS.register(_name, _dataset)

# The five fine-grained targets, in the order a run config lists them (run configs, and so run folders, keep it).
FINE_GRAINED = ("aircraft", "cars", "cub", "dogs", "flowers")
assert set(FINE_GRAINED) == set(DATASETS.select(lambda dataset: dataset.fine_grained))


_FOLDER_EXAMPLES = (
    ("~/photos", "flat: ~/photos/*.jpg (unlabelled; train = all = every image)"),
    ("~/photos", "nested at any depth: ~/photos/2023/trip/*.png (unlabelled)"),
    ("~/pets", "classes: ~/pets/<class>/*.jpg (labelled; train/test: a seeded, stratified split)"),
    ("~/photos.zip", "a .zip, .tar, .tar.gz or .tgz of any of these, read without extracting"),
    ("~/photos.txt", "a list: one image path per line, relative to the list's folder or absolute"),
)


def describe_datasets() -> str:
    """A table of every dataset name, its splits and the on-disk layout it reads (for `krrst datasets`)."""
    lines = [f"{'name':<13} {'splits':<16} layout under --root"]
    for name, dataset in DATASETS.items():
        splits = dataset.splits
        shown = ",".join(splits) if splits else "<its own>" if name == "hf" else "<folders>"
        lines.append(f"{name:<13} {shown:<16} {dataset.layout}")
        if name == "folder":
            lines += [f"{'':<13} {'':<16}   --root {root:<14} {text}" for root, text in _FOLDER_EXAMPLES]
    lines += [
        "",
        "Formats: JPEG, PNG, WebP, BMP, GIF, TIFF; greyscale, palette, RGBA and CMYK images become RGB.",
        f"--image-size S: {RESIZE_POLICIES.get('crop')} (images of mixed sizes need it).",
        "An undecodable file stops the load with its name; --skip-corrupt skips such files and reports them.",
    ]
    return "\n".join(lines)


def list_datasets() -> list[str]:
    """The dataset names `load_images` accepts."""
    return DATASETS.names()


def evaluation_split(name: str) -> str:
    """The split a target dataset is tested on ("val" where the release names it so, else "test")."""
    return DATASETS.get(name).test_split


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


def _root_identity(opts: _Options) -> list[Any]:
    """What says the data under the root is unchanged.

    A zip, a tar or a released dataset's folder: the root's size and mtime.
    Your own folder of images: every image's name, size and mtime (a file
    changed deep inside a folder leaves the folder's mtime alone); a list: its
    text and every listed file's size and mtime.
    """
    if opts.identity:
        return list(opts.identity)
    resolved = opts.root.resolve()
    if opts.name in ("folder", "imagefolder") and resolved.is_dir():
        digest = hashlib.sha256()
        for name in sorted(_walk_files(resolved)):
            if _is_image(name):
                info = (resolved / name).stat()
                digest.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return [str(resolved), digest.hexdigest()]
    if opts.name == "folder" and resolved.name.lower().endswith(_LIST_SUFFIXES) and resolved.is_file():
        digest = hashlib.sha256(resolved.read_bytes())
        for path in _open_list(resolved).index.values():
            info = path.stat() if path.exists() else None
            digest.update(f"{path}\0{info and info.st_size}\0{info and info.st_mtime_ns}\n".encode())
        return [str(resolved), digest.hexdigest()]
    info = resolved.stat()
    return [str(resolved), info.st_size, info.st_mtime_ns]


def _cache_entry(cache_dir: Path, opts: _Options) -> Path:
    """The JSON of the cache entry for `opts`: written last, it marks a complete entry; the images and the labels
    are `.images.npy` and `.labels.npy` beside it."""
    fields = [_CACHE_FORMAT, opts.name, *_root_identity(opts), opts.split, opts.image_size, opts.max_per_class,
              opts.resize, opts.skip_corrupt]
    if DATASETS.get(opts.name).splits_itself:
        fields += [opts.test_fraction, opts.split_seed]
    digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]
    size = opts.image_size or "native"
    count = opts.max_per_class or "all"
    return cache_dir / f"{opts.name}-{opts.split}-{size}-{count}-{digest}.json"


def _read_cache(meta_path: Path) -> ImageSet | None:
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path, "cache entry")
        # Copy-on-write map: pages load on demand and the tensor is writable without touching the file.
        images = torch.from_numpy(np.load(meta_path.with_suffix(".images.npy"), mmap_mode="c", allow_pickle=False))
        labels = None
        if meta["labelled"]:
            labels = torch.from_numpy(np.load(meta_path.with_suffix(".labels.npy"), allow_pickle=False))
        if len(images) != meta["count"]:
            raise ValueError(f"{len(images)} images, expected {meta['count']}")
        return ImageSet(images, labels, meta["class_names"], tuple(meta["mean"]), tuple(meta["std"]), meta["name"],
                        resize=meta.get("resize"), skipped=tuple(meta.get("skipped", ())))
    except (KrrstError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = describe_exception(exc)
        warnings.warn(f"ignoring unreadable cache entry {meta_path} ({reason}); reading the dataset again",
                      stacklevel=3)
        return None


def _write_cache(meta_path: Path, image_set: ImageSet, sink: _Sink) -> None:
    """Store `image_set` as a cache entry: its images are renamed into place when decoded into `sink`'s map."""
    images_path = meta_path.with_suffix(".images.npy")
    try:
        arrays = {} if sink.claim(image_set.images, images_path) else {images_path: image_set.images}
        if image_set.labels is not None:
            arrays[meta_path.with_suffix(".labels.npy")] = image_set.labels
        for path, tensor in arrays.items():
            with atomic_write(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, tensor.numpy(), allow_pickle=False)
        # The JSON goes last: its presence marks the entry complete.
        write_json(meta_path, dict(
            name=image_set.name, count=len(image_set), labelled=image_set.labels is not None,
            class_names=image_set.class_names, mean=list(image_set.mean), std=list(image_set.std),
            resize=image_set.resize, skipped=list(image_set.skipped),
        ))
    except OSError as exc:
        reason = describe_exception(exc)
        warnings.warn(f"could not write the dataset cache {meta_path} ({reason}); continuing without it", stacklevel=3)


def cache_file(name: str, root: str | os.PathLike, split: str = "train", image_size: int | None = None, *,
               cache_dir: str | os.PathLike | None = None, **options: Any) -> Path:
    """The JSON file marking the cache entry `load_images` would use for the same arguments (it may not exist yet);
    `options`: its max_per_class, resize, skip_corrupt, test_fraction and split_seed."""
    opts = _Options(name, Path(root).expanduser(), split, image_size, **options)
    return _cache_entry(Path(cache_dir) if cache_dir else default_cache_dir(), opts)


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
    resize: str = "crop",
    skip_corrupt: bool = False,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
) -> ImageSet:
    """Read one split of dataset `name` from `root` (a folder, a .zip, a .tar or a list) as an `ImageSet`.

    `image_size` brings every image to image_size x image_size under `resize`
    ("crop": the short side to image_size, then the centre; "stretch": both
    sides; fine-grained datasets default to 32). `max_per_class` keeps the
    first k images of each class in the layout's order (sorted file names, or
    the annotation files' order). `download` fetches cifar10/cifar100/
    aircraft/flowers with torchvision when absent. `cache_dir` is where decoded
    tensors are cached (None: `default_cache_dir()`; False: no cache).
    `num_workers` decoding threads (default: every core). `skip_corrupt` skips
    undecodable image files (warning with their count and first names)
    instead of stopping at the first. `test_fraction` and `split_seed` make
    the seeded, stratified train/test split of a labelled `folder` (or `hf`
    dataset) that has no test split of its own.
    Every user mistake (unknown name or split, missing or unreadable root,
    wrong layout) raises a one-line `KrrstError`.
    """
    if cache_dir is False:
        cache_root = None
    else:
        cache_root = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()
    opts = _Options(name, Path(root).expanduser(), split, image_size, max_per_class, num_workers, resize, skip_corrupt,
                    test_fraction, split_seed, _Sink(cache_root))
    archive = None
    if name == "hf":
        archive, identity = _open_hf(str(root), split)
        opts = dataclasses.replace(opts, identity=identity)
    image_set = None
    if cache_root is not None and (opts.identity or opts.root.exists()):
        image_set = _read_cache(_cache_entry(cache_root, opts))
    if image_set is None:
        image_set = _read_into_cache(archive or _open_root(opts, download), opts)
    elif archive is not None:
        archive.close()
    if image_set.skipped:
        shown = ", ".join(image_set.skipped[:3]) + (", ..." if len(image_set.skipped) > 3 else "")
        warnings.warn(f"{opts.root}: skipped {len(image_set.skipped)} unreadable image file(s): {shown}", stacklevel=2)
    return image_set


def _open_root(opts: _Options, download: bool) -> _Archive:
    """Open the dataset's root, fetching it first when asked and possible."""
    name, root = opts.name, opts.root
    downloadable = DATASETS.get(name).downloadable
    if download and downloadable:
        _download(name, root)
    if not root.exists():
        hint = ""
        if downloadable:
            hint = "; pass download=True (--download) to fetch it"
        elif download:
            hint = f" (krrst cannot download {name}; fetch it from its official site)"
        raise KrrstError(f"dataset root {root} does not exist{hint}")
    return _open_archive(root)


def _read_into_cache(archive: _Archive, opts: _Options) -> ImageSet:
    """Read the dataset and store it in the cache (the images decoded straight into the entry's file)."""
    try:
        image_set = DATASETS.get(opts.name).read(archive, opts)
        if opts.sink.folder is not None:
            entry = _cache_entry(opts.sink.folder, opts)  # keyed again: a download has just changed the root's mtime
            _write_cache(entry, image_set, opts.sink)
            # The decoding map is writable and shared with the file: hand out the copy-on-write map instead.
            image_set = _read_cache(entry) or image_set
    finally:
        archive.close()
        opts.sink.discard()
    return image_set
