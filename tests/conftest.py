"""Shared fixtures: the real data beside the repo, and quiet, fast torch."""

import os
from pathlib import Path

import pytest
import torch

# The real archives: $KRRST_TEST_DATA, else the `shared/data` folder beside the checkout (where CI puts it).
SHARED_DATA = Path(os.environ.get("KRRST_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CIFAR10_ZIP = SHARED_DATA / "cifar10-jpeg.zip"
TINYIMAGENET_ZIP = SHARED_DATA / "tiny-imagenet-200-250pc.zip"

# Decoded-dataset caches of the tests stay inside the checkout (git-ignored), not in the user's home.
os.environ.setdefault("KRRST_CACHE", str(Path(__file__).resolve().parents[1] / ".krrst-cache"))

# torch.compile's C++ kernels: a cache per CPU capability. Inductor's precompiled header does not record the
# ATEN_CPU_CAPABILITY it was built under, so a cache shared between `ATEN_CPU_CAPABILITY=default` and native runs
# fails to compile ("at::vec has not been declared"). Inside the checkout (git-ignored).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".inductor-cache" / os.environ.get("ATEN_CPU_CAPABILITY", "native")),
)

# One thread: the tests are tiny, and two threads on a busy 2-core machine spin-wait on each other (10x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real archives; skips the test where it is absent."""
    if not CIFAR10_ZIP.exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set KRRST_TEST_DATA to the folder holding cifar10-jpeg.zip)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_small(shared_data):
    """2,000 real CIFAR-10 train images and 1,000 test images, read once per session."""
    from krrst.data import load_images

    train = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "train", max_per_class=200)
    test = load_images("imagefolder", shared_data / "cifar10-jpeg.zip", "test", max_per_class=100)
    return train, test


@pytest.fixture
def conv_calls(monkeypatch):
    """(input layout, weight layout, autocast dtype or None) of every `Conv2d` forward: what the speed knobs did."""
    calls = []
    forward = torch.nn.Conv2d.forward

    def layout(tensor: torch.Tensor) -> str:
        if tensor.is_contiguous():
            return "contiguous"
        return "channels_last" if tensor.is_contiguous(memory_format=torch.channels_last) else "strided"

    def recording(self, images):
        device = images.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        calls.append((layout(images), layout(self.weight), dtype))
        return forward(self, images)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording)
    return calls
