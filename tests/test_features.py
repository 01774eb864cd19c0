"""The one batched forward: chunking, normalisation, no gradients, dtypes and devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from krrst.augment import normalize
from krrst.features import batched_features

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _network(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).to(dtype)


def _uint8_images(n: int = 11) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.mark.parametrize("chunk", [1, 3, 11, 64])
def test_chunked_equals_one_shot_in_float64(chunk):
    model = _network(torch.float64)
    images = torch.randn(11, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # float64: a batch-size-dependent kernel differs in the last bits only, far below any chunking mistake
    assert torch.allclose(batched_features(model, images, chunk=chunk), model(images).detach(), rtol=0, atol=1e-12)


def test_uint8_images_are_normalised_and_float_images_fed_as_they_are():
    model = _network(torch.float64)
    images = _uint8_images()
    with_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # normalise into float64, so that both sides compute the same numbers
    try:
        expected = model(normalize(images, MEAN, STD)).detach()
        from_uint8 = batched_features(model, images, mean=MEAN, std=STD, chunk=4)
    finally:
        torch.set_default_dtype(with_default)
    assert torch.allclose(from_uint8, expected, rtol=0, atol=1e-12)
    normalised = normalize(images, MEAN, STD).double()
    assert torch.allclose(batched_features(model, normalised, chunk=4), model(normalised).detach(), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="mean and std"):
        batched_features(model, images)


def test_no_gradients_and_the_mode_is_left_to_the_caller():
    model = _network()
    model.train()
    images = torch.randn(6, 3, 8, 8, requires_grad=True)
    features = batched_features(model, images, chunk=2)
    assert not features.requires_grad and features.grad_fn is None
    assert model.training, "the caller picks the mode"
    bn = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten()).train()
    per_chunk = batched_features(bn, images.detach(), chunk=3)  # batch statistics: one chunk at a time
    first = bn(images.detach()[:3]).detach()
    assert torch.allclose(per_chunk[:3], first)


def test_dtype_devices_speed_and_empty_input():
    model = _network()
    images = _uint8_images(5)
    out = batched_features(model, images, mean=MEAN, std=STD, chunk=2, dtype=torch.float64, device="cpu",
                           out_device="cpu")
    assert out.dtype == torch.float64 and out.shape == (5, 5) and out.device.type == "cpu"
    calls = []

    class Speed:
        def forward(self, forward, inputs):
            calls.append(len(inputs))
            return forward(inputs)

    batched_features(model, images, mean=MEAN, std=STD, chunk=2, speed=Speed())
    assert calls == [2, 2, 1]
    empty = batched_features(model, images[:0], mean=MEAN, std=STD)
    assert empty.shape == (0,)
