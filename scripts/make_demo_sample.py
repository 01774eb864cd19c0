"""Build krrst/assets/cifar10-sample.zip, the real-image sample the offline demo runs on.

Provenance: the first TRAIN_PER_CLASS training and TEST_PER_CLASS test images
of every class (in file-name order) of ../shared/data/cifar10-jpeg.zip, the
JPEG re-encoding of the official CIFAR-10 splits. The JPEG bytes are copied
unchanged (stored, not recompressed) into the same ImageFolder layout, so the
demo reads them through the same `imagefolder` reader as the full archive.

    python scripts/make_demo_sample.py [path/to/cifar10-jpeg.zip]
"""

import sys
import zipfile
from collections import defaultdict
from pathlib import Path

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
TARGET = ROOT / "krrst" / "assets" / "cifar10-sample.zip"


def main() -> None:
    keep = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    chosen: dict[tuple[str, str], list[str]] = defaultdict(list)
    with zipfile.ZipFile(SOURCE) as source:
        for name in sorted(source.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            _, split, class_name, _ = parts
            if len(chosen[split, class_name]) < keep[split]:
                chosen[split, class_name].append(name)
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(TARGET, "w", compression=zipfile.ZIP_STORED) as target:
            for names in chosen.values():
                for name in names:
                    target.writestr(name.replace("cifar10-jpeg/", "cifar10-sample/", 1), source.read(name))
    total = sum(len(names) for names in chosen.values())
    print(f"wrote {TARGET} ({total} images, {TARGET.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
