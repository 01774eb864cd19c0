"""Tests of krrst.augment against per-image reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from krrst.augment import (
    BARLOW_TWINS_CIFAR,
    FIXED_AUGMENTATIONS,
    CropFlipParams,
    SSLAugmentConfig,
    apply_crop_flip,
    color_jitter,
    crop_flip,
    denormalize,
    fixed_augment,
    fixed_augment_all,
    gaussian_blur,
    normalize,
    sample_crop_flip,
    ssl_view_pair,
    ssl_views,
)
from krrst.infra.errors import KrrstError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# Only the random resized crop: every other step off.
PLAIN = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
WHOLE_IMAGE = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))



def random_uint8(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def reference_crop_flip(images, params, padding):
    """One image at a time: F.pad, slice, flip."""
    out = []
    h, w = images.shape[-2:]
    for image, oy, ox, flip in zip(images, *params):
        padded = F.pad(image, (padding,) * 4)
        crop = padded[:, int(oy) : int(oy) + h, int(ox) : int(ox) + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


# --------------------------------------------------------------------------- normalize


def test_normalize_uint8_matches_manual_and_round_trips():
    images = random_uint8()
    out = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(denormalize(out, MEAN, STD), images.float() / 255)
    # float input in [0, 1] gives the same result; single images work too
    torch.testing.assert_close(normalize(images.float() / 255, MEAN, STD), expected)
    torch.testing.assert_close(normalize(images[0], MEAN, STD), expected[0])


def test_denormalize_is_not_clamped():
    out = denormalize(torch.full((1, 3, 2, 2), 10.0), MEAN, STD)
    assert (out > 1).all()


def test_normalize_rejects_wrong_channel_count_and_dtype():
    with pytest.raises(KrrstError, match="mean"):
        normalize(random_uint8(), (0.5, 0.5), STD)
    with pytest.raises(KrrstError, match="uint8 or float"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.int32), MEAN, STD)


# --------------------------------------------------------------------------- crop + flip


def test_sample_crop_flip_ranges_types_and_determinism():
    params = sample_crop_flip(500, 4, torch.Generator().manual_seed(1))
    assert params.offsets_y.dtype == torch.int64 and params.offsets_x.dtype == torch.int64
    assert params.flips.dtype == torch.bool
    for offsets in (params.offsets_y, params.offsets_x):
        assert offsets.min() == 0 and offsets.max() == 8  # every value of [0, 2p] is reachable
    assert 150 < params.flips.sum() < 350
    again = sample_crop_flip(500, 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    other = sample_crop_flip(500, 4, torch.Generator().manual_seed(2))
    assert not torch.equal(params.offsets_x, other.offsets_x)
    with pytest.raises(KrrstError, match="padding"):
        sample_crop_flip(4, -1, torch.Generator())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding", [4, 2])
def test_apply_crop_flip_matches_per_image_reference(dtype, padding):
    images = random_uint8(n=16).to(dtype)
    before = images.clone()
    params = sample_crop_flip(16, padding, torch.Generator().manual_seed(3))
    assert params.flips.any() and not params.flips.all()
    out = apply_crop_flip(images, params, padding)
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(out, reference_crop_flip(images, params, padding))
    assert torch.equal(images, before)  # pure
    # channels_last input: same values, channels_last result
    out_cl = apply_crop_flip(images.contiguous(memory_format=torch.channels_last), params, padding)
    assert torch.equal(out_cl, out)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


def test_flip_really_flips_and_no_padding_no_flip_is_identity():
    images = random_uint8()
    n = images.shape[0]
    zeros = torch.zeros(n, dtype=torch.int64)
    flipped = apply_crop_flip(images, CropFlipParams(zeros, zeros, torch.ones(n, dtype=torch.bool)), 0)
    assert torch.equal(flipped, images.flip(-1))
    same = apply_crop_flip(images, CropFlipParams(zeros, zeros, torch.zeros(n, dtype=torch.bool)), 0)
    assert torch.equal(same, images)


def test_offset_zero_shifts_by_padding_with_zeros_entering():
    images = random_uint8().clamp(min=1)  # no zero pixels, so the padding's zeros are recognisable
    n = images.shape[0]
    zeros = torch.zeros(n, dtype=torch.int64)
    out = apply_crop_flip(images, CropFlipParams(zeros, zeros, torch.zeros(n, dtype=torch.bool)), 4)
    assert torch.equal(out[..., 4:, 4:], images[..., :-4, :-4])
    assert (out[..., :4, :] == 0).all() and (out[..., :, :4] == 0).all()
    # centre offset (= padding) is no shift
    centre = torch.full((n,), 4, dtype=torch.int64)
    out = apply_crop_flip(images, CropFlipParams(centre, centre, torch.zeros(n, dtype=torch.bool)), 4)
    assert torch.equal(out, images)


def test_crop_flip_seeded_is_reproducible():
    images = random_uint8(n=32)
    a = crop_flip(images, 4, torch.Generator().manual_seed(5))
    b = crop_flip(images, 4, torch.Generator().manual_seed(5))
    c = crop_flip(images, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # and equals sample + apply from the same seed
    params = sample_crop_flip(32, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, apply_crop_flip(images, params, 4))


def test_crop_flip_resumes_from_saved_generator_state():
    images = random_uint8(n=8)
    g = torch.Generator().manual_seed(7)
    crop_flip(images, 4, g)
    state = g.get_state()
    second = crop_flip(images, 4, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(crop_flip(images, 4, resumed), second)


def test_apply_crop_flip_rejects_mismatched_params():
    params = sample_crop_flip(3, 4, torch.Generator())
    with pytest.raises(KrrstError, match="batch size"):
        apply_crop_flip(random_uint8(n=4), params, 4)


# --------------------------------------------------------------------------- SSL views


def test_ssl_views_shape_range_and_determinism():
    images = random_uint8(n=16)
    views = ssl_views(images, MEAN, STD, torch.Generator().manual_seed(0))
    assert views.shape == images.shape and views.dtype == torch.float32
    assert torch.isfinite(views).all()
    pixels = denormalize(views, MEAN, STD)  # every step keeps pixels in [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    same = ssl_views(images, MEAN, STD, torch.Generator().manual_seed(0))
    other = ssl_views(images, MEAN, STD, torch.Generator().manual_seed(1))
    assert torch.equal(views, same)
    assert not torch.allclose(views, other)
    # float [0, 1] input gives the same views as uint8
    torch.testing.assert_close(ssl_views(images.float() / 255, MEAN, STD, torch.Generator().manual_seed(0)), views)


def test_ssl_view_pair_uses_both_configs_and_output_size():
    images = random_uint8(n=4)
    first, second = ssl_view_pair(
        images, MEAN, STD, torch.Generator().manual_seed(0),
        (SSLAugmentConfig(output_size=24), SSLAugmentConfig(output_size=16)),
    )
    assert first.shape == (4, 3, 24, 24) and second.shape == (4, 3, 16, 16)
    assert BARLOW_TWINS_CIFAR[0].solarize_p == 0.0 and BARLOW_TWINS_CIFAR[1].solarize_p == 0.2


def test_generator_consumption_does_not_depend_on_config():
    images = random_uint8(n=4)
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ssl_views(images, MEAN, STD, a, SSLAugmentConfig())
    ssl_views(images, MEAN, STD, b, SSLAugmentConfig(blur_p=1.0, solarize_p=0.5, jitter_p=0.0))
    assert torch.equal(a.get_state(), b.get_state())


def test_whole_image_crop_is_identity_and_flip_flips():
    images = random_uint8(n=4)
    g = torch.Generator().manual_seed(0)
    plain = ssl_views(images, MEAN, STD, g, SSLAugmentConfig(**PLAIN, **WHOLE_IMAGE))
    torch.testing.assert_close(plain, normalize(images, MEAN, STD), atol=1e-5, rtol=0)
    flipped = ssl_views(images, MEAN, STD, g, SSLAugmentConfig(**{**PLAIN, "flip_p": 1.0}, **WHOLE_IMAGE))
    torch.testing.assert_close(flipped, normalize(images.flip(-1), MEAN, STD), atol=1e-5, rtol=0)


def test_resized_crop_is_an_exact_window_when_not_resized():
    # A quarter-area square crop sampled at its own size lands on pixel centres:
    # the view must equal some 16 x 16 window of the image, pixel for pixel.
    images = random_uint8(n=6)
    config = SSLAugmentConfig(**PLAIN, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), output_size=16)
    views = denormalize(ssl_views(images, MEAN, STD, torch.Generator().manual_seed(4), config), MEAN, STD)
    source = images.float() / 255
    positions = set()
    for view, image in zip(views, source):
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1)  # 3 x 17 x 17 x 16 x 16
        error = (windows - view[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert error.min() < 1e-5
        positions.add(int(error.argmin()))
    assert len(positions) > 1  # the position is random


def reference_crop_box(area_u, ratio_u, position_u, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, one image, fed the given uniforms."""
    for a, r in zip(area_u.tolist(), ratio_u.tolist()):
        target_area = height * width * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(float(position_u[0]) * (height - h + 1))
            left = math.floor(float(position_u[1]) * (width - w + 1))
            return (top, left, h, w), False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), True


@pytest.mark.parametrize(
    "height, width, scale, ratio, all_fall_back",
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3), False),
        (32, 48, (0.5, 1.0), (3 / 4, 4 / 3), False),
        (32, 32, (0.9, 1.0), (2.0, 3.0), True),  # no box fits: always the centre fallback
    ],
)
def test_resized_crop_boxes_follow_torchvision_rule(height, width, scale, ratio, all_fall_back):
    from krrst.augment import _draw_view_randomness, _resized_crop_boxes

    config = SSLAugmentConfig(crop_scale=scale, crop_ratio=ratio)
    draws = _draw_view_randomness(400, torch.Generator().manual_seed(0))
    boxes = torch.stack(_resized_crop_boxes(draws, height, width, config), dim=1).long()
    fallbacks = 0
    for i in range(400):
        expected, fell_back = reference_crop_box(
            draws.crop_area[i], draws.crop_log_ratio[i], draws.crop_position[i], height, width, scale, ratio
        )
        assert tuple(boxes[i].tolist()) == expected
        top, left, h, w = expected
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fallbacks += fell_back
    assert fallbacks == 400 if all_fall_back else fallbacks < 40


def test_color_jitter_matches_torchvision_per_image():
    images = random_uint8(n=5).float() / 255
    g = torch.Generator().manual_seed(0)
    brightness = 0.6 + 0.8 * torch.rand(5, generator=g)
    contrast = 0.6 + 0.8 * torch.rand(5, generator=g)
    saturation = 0.8 + 0.4 * torch.rand(5, generator=g)
    hue = -0.1 + 0.2 * torch.rand(5, generator=g)
    out = color_jitter(images, brightness, contrast, saturation, hue)
    for i in range(5):
        expected = TF.adjust_brightness(images[i], float(brightness[i]))
        expected = TF.adjust_contrast(expected, float(contrast[i]))
        expected = TF.adjust_saturation(expected, float(saturation[i]))
        expected = TF.adjust_hue(expected, float(hue[i]))
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_grayscale_and_solarize_steps():
    images = random_uint8(n=4)
    g = torch.Generator().manual_seed(0)
    config = SSLAugmentConfig(**{**PLAIN, "grayscale_p": 1.0}, **WHOLE_IMAGE)
    gray = denormalize(ssl_views(images, MEAN, STD, g, config), MEAN, STD)
    # ITU-R 601 luma, as PIL's convert("L") that solo-learn's pipeline uses
    # (torchvision's tensor version rounds the red weight to 0.2989).
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    expected_gray = (images.float() / 255 * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(gray, expected_gray, atol=1e-5, rtol=0)
    config = SSLAugmentConfig(**{**PLAIN, "solarize_p": 1.0}, **WHOLE_IMAGE)
    solar = denormalize(ssl_views(images, MEAN, STD, g, config), MEAN, STD)
    source = images.float() / 255
    torch.testing.assert_close(solar, torch.where(source >= 0.5, 1 - source, source), atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_image():
    images = random_uint8(n=3).float() / 255
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(images, sigma, max_sigma=2.0)
    kernel_size = 2 * math.ceil(3 * 2.0) + 1
    for i in range(3):
        expected = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_blur_probability_one_blurs_every_view():
    images = random_uint8(n=4)
    config = SSLAugmentConfig(**{**PLAIN, "blur_p": 1.0, "blur_sigma": (1.0, 1.0)}, **WHOLE_IMAGE)
    blurred = denormalize(ssl_views(images, MEAN, STD, torch.Generator(), config), MEAN, STD)
    expected = gaussian_blur(images.float() / 255, torch.ones(4), 1.0)
    torch.testing.assert_close(blurred, expected, atol=1e-5, rtol=0)


def test_config_validation():
    with pytest.raises(KrrstError, match="jitter_p"):
        SSLAugmentConfig(jitter_p=1.5)
    with pytest.raises(KrrstError, match="crop_scale"):
        SSLAugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(KrrstError, match="3 channels"):
        ssl_views(torch.zeros(2, 1, 8, 8), (0.5,), (0.5,), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = random_uint8(n=8)
    cpu = crop_flip(images, 4, torch.Generator().manual_seed(0))
    gpu = crop_flip(images.cuda(), 4, torch.Generator().manual_seed(0))
    assert torch.equal(gpu.cpu(), cpu)
    views_cpu = ssl_views(images, MEAN, STD, torch.Generator().manual_seed(0))
    views_gpu = ssl_views(images.cuda(), MEAN, STD, torch.Generator().manual_seed(0))
    torch.testing.assert_close(views_gpu.cpu(), views_cpu, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- fixed augmentations


def reference_fixed(image, name):
    """One C x H x W image at a time, by index arithmetic: out[y, x] = image[source(y, x)]."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # counter-clockwise quarter turn (square): out[y, x] = in[x, w - 1 - y]
    source = {
        "identity": (ys, xs),
        "rot90": (xs, w - 1 - ys),
        "rot180": (h - 1 - ys, w - 1 - xs),
        "rot270": (h - 1 - xs, ys),
        "hflip": (ys, w - 1 - xs),
        "vflip": (h - 1 - ys, xs),
    }[name]
    return image[:, source[0], source[1]]


@pytest.mark.parametrize("name", FIXED_AUGMENTATIONS)
def test_fixed_augment_matches_per_image_reference(name):
    images = random_uint8(n=5, size=6)
    out = fixed_augment(images, name)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out, torch.stack([reference_fixed(image, name) for image in images]))
    if name.startswith("rot"):
        per_image = torch.stack([torch.rot90(image, int(name[3:]) // 90, dims=(1, 2)) for image in images])
        assert torch.equal(out, per_image)


def test_rot90_four_times_is_identity_and_rotations_compose():
    images = torch.randn(3, 2, 5, 5)
    out = images
    for _ in range(4):
        out = fixed_augment(out, "rot90")
    assert torch.equal(out, images)
    assert torch.equal(fixed_augment(fixed_augment(images, "rot90"), "rot180"), fixed_augment(images, "rot270"))
    assert not torch.equal(fixed_augment(images, "rot90"), images)
    assert torch.equal(fixed_augment(fixed_augment(images, "hflip"), "hflip"), images)


def test_fixed_augment_all_is_view_major_and_checks_names():
    images = torch.randn(4, 3, 6, 6)
    names = ("identity", "rot180", "hflip")
    out = fixed_augment_all(images, names)
    assert out.shape == (12, 3, 6, 6)
    for a, name in enumerate(names):
        assert torch.equal(out[a * 4 : (a + 1) * 4], fixed_augment(images, name))
    assert fixed_augment_all(images).shape == (16, 3, 6, 6)  # default: the four rotations
    with pytest.raises(KrrstError, match="unknown fixed augmentation 'rot45'"):
        fixed_augment_all(images, ("identity", "rot45"))
    with pytest.raises(KrrstError, match="repeat"):
        fixed_augment_all(images, ("rot90", "rot90"))
    with pytest.raises(KrrstError, match="square"):
        fixed_augment_all(torch.randn(2, 3, 4, 6), ("identity", "rot90"))
    assert fixed_augment_all(torch.randn(2, 3, 4, 6), ("rot180", "vflip")).shape == (4, 3, 4, 6)
