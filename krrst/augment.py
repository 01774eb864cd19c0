"""Batched, device-side tensor augmentation, seeded by a caller-supplied generator.

Images stay on their device as one `N x C x H x W` tensor (uint8, or float in
[0, 1]); every operation here works on the whole batch at once, with no
per-image Python loop, on CPU or CUDA alike.

Every random draw comes from a `torch.Generator` the caller passes in. The
generator must live on the CPU: parameters are drawn there (a few numbers per
image) and moved to the images' device in one transfer. CPU generators give the
same stream on every machine and their state can be saved and restored
(`generator.get_state()`), so a run is reproducible and resumable whatever
device the images are on.

- `normalize` / `denormalize`: to and from the networks' input space.
- `sample_crop_flip` / `apply_crop_flip` / `crop_flip`: random crop of a
  zero-padded image plus horizontal flip (torchvision's
  `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`), as exact pixel
  shifts. The parameters are a separate value (`CropFlipParams`) so a cache
  can replay them exactly.
- `ssl_views` with `SSLAugmentConfig`: the SimCLR / Barlow Twins view
  pipeline (random resized crop, flip, colour jitter, greyscale, blur,
  solarisation, normalisation).
- `fixed_augment` / `fixed_augment_all` with `FIXED_AUGMENTATIONS`: the
  deterministic views (rotations by multiples of 90 degrees, flips) of
  "Boost Self-Supervised Dataset Distillation" (Yu et al., ICLR 2025).
- `strong_augment`: crop + flip then DSA's colour jitter, for label-based
  sets and knowledge distillation in the evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)

from krrst.infra.errors import KrrstError

ChannelStats = Sequence[float] | torch.Tensor


# --------------------------------------------------------------------------- normalisation


def to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [0, 1] of the default dtype (float32 unless a float64 reference run set it);
    float images are returned as they are (assumed in [0, 1])."""
    if images.dtype == torch.uint8:
        return images.to(torch.get_default_dtype()).div_(255.0)
    if not images.is_floating_point():
        raise KrrstError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    return images


def _channel_stats(values: ChannelStats, images: torch.Tensor, what: str) -> torch.Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32).to(images.device)
    if stats.ndim != 1 or stats.numel() != images.shape[-3]:
        raise KrrstError(f"{what} must hold one value per channel ({images.shape[-3]}), got shape {tuple(stats.shape)}")
    dtype = images.dtype if images.is_floating_point() else torch.float32
    return stats.to(dtype).reshape(-1, 1, 1)


def normalize(images: torch.Tensor, mean: ChannelStats, std: ChannelStats) -> torch.Tensor:
    """`(images - mean) / std` per channel, as a float tensor.

    uint8 input is divided by 255 first; float input is assumed in [0, 1].
    Works on `C x H x W` and `N x C x H x W`.
    """
    x = to_float01(images)
    return (x - _channel_stats(mean, x, "mean")) / _channel_stats(std, x, "std")


def denormalize(images: torch.Tensor, mean: ChannelStats, std: ChannelStats) -> torch.Tensor:
    """Inverse of `normalize`: float images in [0, 1] (not clamped: learnt images may leave it)."""
    return images * _channel_stats(std, images, "std") + _channel_stats(mean, images, "mean")


# --------------------------------------------------------------------------- crop + flip


class CropFlipParams(NamedTuple):
    """Per-image parameters of `apply_crop_flip`.

    `offsets_y`, `offsets_x`: int64, in [0, 2 * padding], top-left corner of
    the crop inside the padded image (offset `padding` is no shift).
    `flips`: bool, flip the crop horizontally.
    """

    offsets_y: torch.Tensor
    offsets_x: torch.Tensor
    flips: torch.Tensor

    def to(self, device: torch.device | str) -> CropFlipParams:
        """The same parameters on `device`."""
        return CropFlipParams(*(t.to(device) for t in self))


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.default_generator
    if generator.device.type != "cpu":
        raise KrrstError("augmentation generators must live on the CPU (portable, savable state), "
                         f"got one on {generator.device}")
    return generator


def _check_batch(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4:
        raise KrrstError(f"{what} expects a batch N x C x H x W, got shape {tuple(images.shape)}")


def sample_crop_flip(batch_size: int, padding: int, generator: torch.Generator | None,
                     device: torch.device | str = "cpu") -> CropFlipParams:
    """Draw crop offsets (uniform in [0, 2 * padding]) and flips (p = 0.5) for `batch_size` images.

    Draws on the CPU from `generator` (None: torch's default CPU generator),
    then moves the parameters to `device`.
    """
    if padding < 0:
        raise KrrstError(f"crop padding must be >= 0, got {padding}")
    generator = _check_generator(generator)
    offsets = torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator, dtype=torch.int64)
    flips = torch.rand(batch_size, generator=generator, dtype=torch.float32) < 0.5  # the same flips in float64 runs
    return CropFlipParams(offsets[0], offsets[1], flips).to(device)


def apply_crop_flip(images: torch.Tensor, params: CropFlipParams, padding: int) -> torch.Tensor:
    """Crop each image of the zero-padded batch at its offsets and flip it where asked.

    Pure and exact: the output pixels are input pixels (or zeros from the
    padding), moved by whole pixels; no interpolation. Works for any dtype and
    device; the output has the input's dtype, device and memory format.

    Zeros are zeros of the input's space: crop uint8 (or [0, 1]) images before
    `normalize` for black padding, as torchvision's CIFAR pipeline does; on
    normalised images the padding would be the dataset's mean colour instead.
    """
    _check_batch(images, "apply_crop_flip")
    batch, channels, height, width = images.shape
    if params.offsets_y.shape != (batch,) or params.offsets_x.shape != (batch,) or params.flips.shape != (batch,):
        raise KrrstError(f"crop/flip parameters are for a different batch size than the images ({batch})")
    device = images.device
    offsets_y, offsets_x, flips = params.to(device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    padded_width = width + 2 * padding

    rows = offsets_y[:, None] + torch.arange(height, device=device)  # B x H
    columns = torch.arange(width, device=device)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets_x[:, None]  # B x W

    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        # Index the channels-last view so the gathered B x H x W x C block is
        # already the channels_last layout of the result.
        batch_index = torch.arange(batch, device=device)[:, None, None]
        gathered = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], columns[:, None, :]]
        return gathered.permute(0, 3, 1, 2)
    flat_index = (rows[:, :, None] * padded_width + columns[:, None, :]).reshape(batch, 1, height * width)
    gathered = torch.gather(padded.reshape(batch, channels, -1), 2, flat_index.expand(batch, channels, -1))
    return gathered.reshape(batch, channels, height, width)


def crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding `padding`) + horizontal flip of a batch: `sample_crop_flip` then `apply_crop_flip`."""
    _check_batch(images, "crop_flip")
    params = sample_crop_flip(images.shape[0], padding, generator, device=images.device)
    return apply_crop_flip(images, params, padding)


def _dsa_colour(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DSA's colour jitter on normalised images: brightness, saturation, contrast, one draw per image.

    DSA (Zhao & Bilen 2021), ParamDiffAug: x + (u - 0.5); (x - mean_c)(2u) +
    mean_c over channels; (x - mean)(u + 0.5) + mean over the image, with u
    ~ U(0, 1) per image; applied in the normalised space as DSA does.
    """
    n = images.shape[0]
    # float32 draws whatever the default dtype: a float64 reference run sees the same jitter
    draws = torch.rand(3, n, 1, 1, 1, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    images = images + (draws[0] - 0.5)
    channel_mean = images.mean(dim=1, keepdim=True)
    images = (images - channel_mean) * (draws[1] * 2.0) + channel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * (draws[2] + 0.5) + image_mean


def strong_augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Strong augmentation of normalised images: random crop (zero pad) + flip, then DSA colour jitter.

    Stands in for DSA's `color_crop_cutout_flip_scale_rotate` used by the
    authors for label-based sets and for KD (no scale, rotation or cutout).
    """
    return _dsa_colour(crop_flip(images, padding=padding, generator=generator), generator)


# --------------------------------------------------------------------------- SSL views


@dataclass(frozen=True)
class SSLAugmentConfig:
    """Parameters of one SSL view pipeline; defaults are solo-learn's CIFAR Barlow Twins recipe.

    Source: solo-learn (github.com/vturrisi/solo-learn),
    `scripts/pretrain/cifar/barlow.yaml` with `augmentations/asymmetric.yaml`:
    random resized crop scale (0.08, 1.0), colour jitter p 0.8 (brightness 0.4,
    contrast 0.4, saturation 0.2, hue 0.1), greyscale p 0.2, no Gaussian blur,
    horizontal flip p 0.5, and solarisation p 0.0 for the first view and 0.2
    for the second (see `BARLOW_TWINS_CIFAR`).

    `output_size` None keeps the input's size. Jitter factors are drawn as
    torchvision's `ColorJitter` does (brightness/contrast/saturation in
    [max(0, 1 - x), 1 + x], hue in [-x, x] of a full turn) but applied in a fixed
    order: brightness, contrast, saturation, hue.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    output_size: int | None = None
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise KrrstError(f"SSLAugmentConfig.{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise KrrstError(f"SSLAugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise KrrstError(f"SSLAugmentConfig.hue must be in [0, 0.5], got {self.hue}")
        for name, top in (("crop_scale", 1.0), ("crop_ratio", math.inf), ("blur_sigma", math.inf)):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= top:
                rule = "0 < low <= high" + (" <= 1" if top == 1.0 else "")
                raise KrrstError(f"SSLAugmentConfig.{name} must satisfy {rule}, got {getattr(self, name)}")
        if self.output_size is not None and self.output_size < 1:
            raise KrrstError(f"SSLAugmentConfig.output_size must be a positive integer or None, got {self.output_size}")


BARLOW_TWINS_CIFAR: tuple[SSLAugmentConfig, SSLAugmentConfig] = (
    SSLAugmentConfig(),
    SSLAugmentConfig(solarize_p=0.2),
)
"""The two asymmetric views of solo-learn's CIFAR Barlow Twins recipe (solarisation only in the second)."""

# How many (scale, ratio) attempts a random resized crop makes before falling
# back to a centre crop: torchvision's RandomResizedCrop makes 10.
_CROP_ATTEMPTS = 10


class _ViewDraws(NamedTuple):
    """Uniform [0, 1) draws for one batch of views, one row per image."""

    crop_area: torch.Tensor  # B x attempts
    crop_log_ratio: torch.Tensor  # B x attempts
    crop_position: torch.Tensor  # B x 2 (y, x)
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_factors: torch.Tensor  # B x 4 (brightness, contrast, saturation, hue)
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor


def _draw_view_randomness(batch_size: int, generator: torch.Generator) -> _ViewDraws:
    # One fixed-size draw whatever the config, so that the stream consumed per
    # call depends only on the batch size (resume replays it exactly).
    widths = (_CROP_ATTEMPTS, _CROP_ATTEMPTS, 2, 1, 1, 4, 1, 1, 1, 1)
    uniform = torch.rand(batch_size, sum(widths), generator=generator, dtype=torch.float64)
    columns = torch.split(uniform, widths, dim=1)
    return _ViewDraws(*(c if c.shape[1] > 1 else c[:, 0] for c in columns))


def _between(u: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
    return low + (high - low) * u


def _resized_crop_boxes(draws: _ViewDraws, height: int, width: int,
                        config: SSLAugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, crop height, crop width) per image, torchvision's RandomResizedCrop rule, batched."""
    area = height * width
    target_area = area * _between(draws.crop_area, *config.crop_scale)
    log_low, log_high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    aspect = torch.exp(_between(draws.crop_log_ratio, log_low, log_high))
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first_fit = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first True (0 when none)
    any_fit = fits.any(dim=1)
    crop_w = crop_w.gather(1, first_fit)[:, 0]
    crop_h = crop_h.gather(1, first_fit)[:, 0]

    # torchvision's fallback: the centre crop of the largest box within the ratio range.
    in_ratio = width / height
    if in_ratio < config.crop_ratio[0]:
        fallback_w, fallback_h = width, round(width / config.crop_ratio[0])
    elif in_ratio > config.crop_ratio[1]:
        fallback_w, fallback_h = round(height * config.crop_ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    crop_w = torch.where(any_fit, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(any_fit, crop_h, torch.full_like(crop_h, fallback_h))

    top = torch.floor(draws.crop_position[:, 0] * (height - crop_h + 1)).clamp(max=height - crop_h)
    left = torch.floor(draws.crop_position[:, 1] * (width - crop_w + 1)).clamp(max=width - crop_w)
    top = torch.where(any_fit, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fallback_w) // 2))
    return top, left, crop_h, crop_w


def _crop_flip_affine(top: torch.Tensor, left: torch.Tensor, crop_h: torch.Tensor, crop_w: torch.Tensor,
                      flip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B x 2 x 3 affine maps (for `affine_grid`, align_corners=False) from output to the crop box."""
    # With align_corners=False, -1 and 1 are the outer edges of the border
    # pixels, so the box [left, left + w) maps to centre 2 (left + w/2) / W - 1
    # and half-extent w / W; a negative x scale mirrors the crop (the flip).
    scale_x = (crop_w / width) * torch.where(flip, -1.0, 1.0).to(crop_w.dtype)
    scale_y = crop_h / height
    centre_x = 2 * (left + crop_w / 2) / width - 1
    centre_y = 2 * (top + crop_h / 2) / height - 1
    zeros = torch.zeros_like(scale_x)
    return torch.stack(
        [torch.stack([scale_x, zeros, centre_x], dim=1), torch.stack([zeros, scale_y, centre_y], dim=1)], dim=1
    )


def color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> torch.Tensor:
    """torchvision's colour-jitter operations with per-image factors, in the order b, c, s, h.

    `images`: float B x 3 x H x W in [0, 1]; factors: B-vectors (`hue` in
    turns, [-0.5, 0.5]). Brightness scales, contrast blends with the mean grey
    level, saturation blends with the greyscale image, hue rotates in HSV; each
    clamps to [0, 1] (torchvision's definitions, via kornia's functional ops).
    """
    images = adjust_brightness_accumulative(images, brightness, clip_output=True)
    images = adjust_contrast_with_mean_subtraction(images, contrast)
    images = adjust_saturation_with_gray_subtraction(images, saturation)
    return adjust_hue(images, hue * (2 * math.pi))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image `sigma` (B-vector), reflect padding.

    The kernel size is fixed per batch, 2 * ceil(3 * max_sigma) + 1 (capped so
    the reflect padding fits the image), so one grouped convolution serves
    every image.
    """
    batch, channels, height, width = images.shape
    radius = min(math.ceil(3 * max_sigma), height - 1, width - 1)
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(images)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # B x K
    kernel = kernel.repeat_interleave(channels, dim=0)[:, None]  # (B*C) x 1 x K
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, :, None, :], groups=batch * channels)  # along x
    flat = F.conv2d(flat, kernel[:, :, :, None], groups=batch * channels)  # along y
    return flat.reshape(batch, channels, height, width)


def ssl_views(images: torch.Tensor, mean: ChannelStats, std: ChannelStats, generator: torch.Generator | None,
              config: SSLAugmentConfig | None = None) -> torch.Tensor:
    """One randomly augmented, normalised view of each image (SimCLR / Barlow Twins style).

    `images`: uint8 or float in [0, 1], B x 3 x H x W, any device. Steps, each
    with per-image random parameters drawn from `generator` (CPU; None: torch's
    default): random resized crop to `config.output_size` with the horizontal
    flip folded into the same sampling grid (one batched `affine_grid` +
    `grid_sample`), colour jitter, greyscale, Gaussian blur, solarisation, then
    `normalize(mean, std)`. Returns B x 3 x S x S in the default dtype.

    The crop box is torchvision's (integer pixels, same scale/ratio rule);
    the bilinear resize reads the pixels just outside the box at its edges
    where torchvision would repeat the edge pixel, and does not antialias when
    shrinking: differences of a fraction of a pixel.
    """
    config = config or SSLAugmentConfig()
    _check_batch(images, "ssl_views")
    if images.shape[1] != 3:
        raise KrrstError(f"ssl_views expects RGB images (3 channels), got {images.shape[1]}")
    generator = _check_generator(generator)
    batch, _, height, width = images.shape
    size = config.output_size or height
    device = images.device

    draws = _draw_view_randomness(batch, generator)
    top, left, crop_h, crop_w = _resized_crop_boxes(draws, height, width, config)
    flip = draws.flip < config.flip_p
    theta = _crop_flip_affine(top, left, crop_h, crop_w, flip, height, width)
    strengths = (config.brightness, config.contrast, config.saturation)
    low = torch.tensor([*(max(0.0, 1 - x) for x in strengths), -config.hue], dtype=torch.float64)
    high = torch.tensor([*(1 + x for x in strengths), config.hue], dtype=torch.float64)
    factors = _between(draws.jitter_factors, low, high)  # B x 4 (brightness, contrast, saturation, hue)
    sigma = _between(draws.blur_sigma, *config.blur_sigma)
    chances = torch.tensor([config.jitter_p, config.grayscale_p, config.blur_p, config.solarize_p], dtype=torch.float64)
    masks = torch.stack([draws.jitter, draws.grayscale, draws.blur, draws.solarize], dim=1) < chances
    # One host-to-device copy of everything the batch needs.
    packed = torch.cat([theta.reshape(batch, 6), factors, sigma[:, None], masks.to(theta.dtype)], dim=1)
    packed = packed.to(device=device, dtype=torch.get_default_dtype())  # float32 but in a float64 reference run
    theta, factors, sigma = packed[:, :6].reshape(batch, 2, 3), packed[:, 6:10], packed[:, 10]
    jitter_mask, gray_mask, blur_mask, solarize_mask = (packed[:, 11:15] > 0.5).T[:, :, None, None, None]

    x = to_float01(images).to(packed.dtype)
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if config.jitter_p > 0:
        jittered = color_jitter(x, factors[:, 0], factors[:, 1], factors[:, 2], factors[:, 3])
        x = torch.where(jitter_mask, jittered, x)
    if config.grayscale_p > 0:
        x = torch.where(gray_mask, rgb_to_grayscale(x).expand(-1, 3, -1, -1), x)
    if config.blur_p > 0:
        x = torch.where(blur_mask, gaussian_blur(x, sigma, config.blur_sigma[1]), x)
    if config.solarize_p > 0:
        x = torch.where(solarize_mask & (x >= config.solarize_threshold), 1.0 - x, x)
    return normalize(x, mean, std)


def ssl_view_pair(images: torch.Tensor, mean: ChannelStats, std: ChannelStats, generator: torch.Generator | None,
                  configs: tuple[SSLAugmentConfig, SSLAugmentConfig] = BARLOW_TWINS_CIFAR,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of each image, the first with `configs[0]`, the second with `configs[1]`."""
    first, second = (ssl_views(images, mean, std, generator, config) for config in configs)
    return first, second


# --------------------------------------------------------------------------- fixed (predefined) augmentations

FIXED_AUGMENTATIONS = ("identity", "rot90", "rot180", "rot270", "hflip", "vflip")
"""Names `fixed_augment` knows: rotations are counter-clockwise (as displayed), flips mirror left-right / top-bottom."""

ROTATIONS = ("identity", "rot90", "rot180", "rot270")
"""The four rotations, the predefined augmentations of Yu et al. (ICLR 2025)."""


def check_fixed_augmentations(names: Sequence[str], height: int | None = None,
                              width: int | None = None) -> tuple[str, ...]:
    """`names` as a tuple, after checking they are known, distinct and (for quarter turns) that H == W."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise KrrstError("fixed augmentations: expected at least one name")
    for name in names:
        if name not in FIXED_AUGMENTATIONS:
            raise KrrstError(f"unknown fixed augmentation {name!r}; expected one of {', '.join(FIXED_AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise KrrstError(f"fixed augmentations must not repeat, got {', '.join(names)}")
    if height != width and any(name in ("rot90", "rot270") for name in names):
        raise KrrstError(f"rot90/rot270 need square images to keep the batch shape, got {height}x{width}")
    return names


def fixed_augment(images: torch.Tensor, name: str) -> torch.Tensor:
    """The view `name` (one of `FIXED_AUGMENTATIONS`) of every image of a N x C x H x W batch, exactly.

    Pixels are only moved (`torch.rot90` / `torch.flip` on the last two
    dimensions, no interpolation), so it works on any dtype and device; rot90
    applied four times gives the batch back exactly.
    """
    _check_batch(images, "fixed_augment")
    check_fixed_augmentations((name,), *images.shape[-2:])
    if name == "identity":
        return images
    if name.startswith("rot"):
        return torch.rot90(images, int(name[3:]) // 90, dims=(-2, -1))
    return images.flip(-1 if name == "hflip" else -2)


def fixed_augment_all(images: torch.Tensor, names: Sequence[str] = ROTATIONS) -> torch.Tensor:
    """(A*N) x C x H x W: the view `names[0]` of every image, then `names[1]`, ... (view-major order).

    Row `a * N + i` is view `names[a]` of image i, the order
    `krrst.parameterize.AugmentationPredictor` predicts representations in.
    """
    _check_batch(images, "fixed_augment_all")
    names = check_fixed_augmentations(names, *images.shape[-2:])
    return torch.cat([fixed_augment(images, name) for name in names])
