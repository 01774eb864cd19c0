"""The model registry and the architectures of the paper.

One registry, as timm does: `register_model(name)` decorates a builder
`fn(num_outputs=None, **options) -> nn.Module` and adds it to `MODELS` (a
`krrst.infra.registry.Registry`); `create_model(arch, ...)` builds by name and
checks the options; `list_models()` lists the names.

Every model has the same surface, so the distillation, the evaluation and the
checkpoints treat them alike:

- `feature_dim: int`, the size of the flat backbone features;
- `forward_features(x)`: those features (no head);
- `head`: `nn.Linear(feature_dim, num_outputs)`, or `nn.Identity()` when
  `num_outputs` is None, in which case `forward` returns the features;
- `forward(x) = head(forward_features(x))`;
- `spec: dict` = `{"arch": name, "num_outputs": ..., **options}`, JSON-able,
  so a checkpoint records the architecture and `create_model(**spec)`
  rebuilds it.

Architectures follow the authors' public code (github.com/db-Lee/selfsup_dd,
`models/`), which the paper's numbers come from; where this module differs, the
builder's docstring says so. Only channels_last-safe ops are used (`flatten`/
`reshape`, never `view`, on feature maps).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from krrst.infra.errors import KrrstError
from krrst.infra.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model", sort=True)

NORMS = ("batch", "instance", "none")


# --------------------------------------------------------------------------- registry


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder `fn(num_outputs=None, **options)` to the registry under `name`."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if "num_outputs" not in inspect.signature(builder).parameters:
            raise ValueError(f"builder of {name!r} must take a num_outputs argument")
        return MODELS.register(name, builder)

    return decorate


def list_models() -> list[str]:
    """The registered architecture names, sorted."""
    return MODELS.names()


def model_options(arch: str) -> dict[str, Any]:
    """The options `create_model(arch, ...)` accepts, with their defaults (num_outputs excluded)."""
    parameters = inspect.signature(MODELS.get(arch)).parameters
    return {name: parameter.default for name, parameter in parameters.items() if name != "num_outputs"}


def create_model(arch: str, num_outputs: int | None = None, **options: Any) -> nn.Module:
    """Build the registered architecture `arch` with a head of `num_outputs` (None: no head).

    `options` are the builder's keyword options (see `model_options(arch)`);
    an unknown name or option raises `KrrstError` listing the valid ones.
    The returned model carries `model.spec`, from which `create_model(**spec)`
    rebuilds the same architecture.
    """
    valid = model_options(arch)
    unknown = [option for option in options if option not in valid]
    if unknown:
        names = ", ".join(valid) or "(none)"
        raise KrrstError(f"model {arch!r}: unknown option {unknown[0]!r}; valid options: {names}")
    positive = isinstance(num_outputs, int) and not isinstance(num_outputs, bool) and num_outputs >= 1
    if not (num_outputs is None or positive):
        raise KrrstError(f"model {arch!r}: num_outputs must be a positive integer or None, got {num_outputs!r}")
    model = MODELS.get(arch)(num_outputs=num_outputs, **options)
    model.spec = {"arch": arch, "num_outputs": num_outputs, **{k: _jsonable(v) for k, v in options.items()}}
    return model


def fresh_model(arch: str, num_outputs: int | None = None, seed: int = 0, **options: Any) -> nn.Module:
    """`create_model` with its random initialisation fixed by `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return create_model(arch, num_outputs=num_outputs, **options)


def reset_head(model: nn.Module, num_outputs: int | None) -> nn.Module:
    """Replace `model.head` by a fresh `Linear(feature_dim, num_outputs)` (None: `Identity`).

    The new head is created on the device and with the dtype of the model's
    parameters; `model.spec["num_outputs"]` follows. Returns the model.
    """
    if num_outputs is None:
        model.head = nn.Identity()
    else:
        reference = next(model.parameters())
        model.head = nn.Linear(model.feature_dim, num_outputs, device=reference.device, dtype=reference.dtype)
    if isinstance(getattr(model, "spec", None), dict):
        model.spec = {**model.spec, "num_outputs": num_outputs}
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of `model`; only those with requires_grad if `trainable_only`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One line: architecture, parameter count, feature size and head size."""
    arch = getattr(model, "spec", {}).get("arch", type(model).__name__)
    outputs = model.head.out_features if isinstance(model.head, nn.Linear) else "none"
    return (f"{arch}: {count_parameters(model) / 1e6:.2f}M parameters, {model.feature_dim} features, "
            f"head outputs {outputs}")


def from_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision-layout ResNet state dict to this module's layout.

    `fc.*` becomes `head.*`, and a DataParallel `module.` prefix is dropped;
    every other key (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...) is
    already the same. Load the result with `strict=False` when it has no head.
    """
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        renamed["head." + key[len("fc."):] if key.startswith("fc.") else key] = value
    return renamed


def _jsonable(value: Any) -> Any:
    """Tuples become lists so that a spec survives a JSON round trip unchanged."""
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _make_head(feature_dim: int, num_outputs: int | None) -> nn.Module:
    return nn.Identity() if num_outputs is None else nn.Linear(feature_dim, num_outputs)


def _check_norm(arch: str, norm: str) -> None:
    if norm not in NORMS:
        raise KrrstError(f"model {arch!r}: option norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        # GroupNorm with one group per channel is instance norm with a learnt
        # affine, as DC/DSA's "instancenorm"; unlike nn.InstanceNorm2d it is
        # affine by default and fine on channels_last.
        return nn.GroupNorm(channels, channels, affine=True)
    return nn.Identity()


def _conv_block(in_channels: int, out_channels: int, kernel: int, norm: str) -> list[nn.Module]:
    """conv (same padding, with bias) -> norm -> ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=kernel // 2)
    return [conv, _norm_layer(norm, out_channels), nn.ReLU()]


class FeatureModel(nn.Module):
    """Common surface: `feature_dim`, `forward_features`, `head`, `forward = head(features)`."""

    feature_dim: int
    head: nn.Module
    spec: dict[str, Any]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------- ConvNet


POOLS = ("flatten", "avg")


class ConvNet(FeatureModel):
    """conv3x3 (pad 1) -> norm -> ReLU -> AvgPool 2x2 per block, then flatten (or global average pooling).

    As the authors' `models/convnet.py` (and DC/DSA/FRePo's ConvNet): the
    convolutions keep their bias even before BatchNorm, and the features are
    the flattened last map. `pool="avg"` averages it over space instead
    (width features): a representation that, like a ResNet's, changes little
    under crops and flips, for a ConvNet used as a teacher.
    """

    def __init__(self, depth: int, widths: Sequence[int], image_size: int, norm: str, num_outputs: int | None,
                 pool: str):
        super().__init__()
        self.arch = arch = f"convnet{depth}"
        widths = tuple(widths)
        if len(widths) != depth or not all(isinstance(w, int) and w > 0 for w in widths):
            raise KrrstError(f"model {arch!r}: option widths must be {depth} positive integers, got {list(widths)}")
        _check_norm(arch, norm)
        if pool not in POOLS:
            raise KrrstError(f"model {arch!r}: option pool must be one of {', '.join(POOLS)}, got {pool!r}")
        widths = tuple(int(w) for w in widths)
        if image_size % (2**depth) != 0 or image_size <= 0:
            raise KrrstError(f"model {arch!r}: option image_size must be a positive multiple of {2**depth} "
                             f"({depth} pooling blocks), got {image_size}")
        self.image_size = int(image_size)
        blocks, in_channels = [], 3
        for width in widths:
            blocks.append(nn.Sequential(*_conv_block(in_channels, width, 3, norm), nn.AvgPool2d(2, stride=2)))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = pool
        self.feature_dim = widths[-1] * (1 if pool == "avg" else (self.image_size // 2**depth) ** 2)
        self.head = _make_head(self.feature_dim, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise KrrstError(f"model {self.arch!r} was built for {self.image_size}x{self.image_size} images "
                             f"(option image_size) but got {x.shape[-2]}x{x.shape[-1]}; "
                             f"create it with image_size={x.shape[-1]}")
        maps = self.blocks(x)  # (N, width, s, s)
        return maps.mean((2, 3)) if self.pool == "avg" else torch.flatten(maps, 1)


@register_model("convnet3")
def convnet3(num_outputs: int | None = None, widths: Sequence[int] = (128, 256, 512), image_size: int = 32,
             norm: str = "batch", pool: str = "flatten") -> nn.Module:
    """The CIFAR distillation ConvNet: 3 blocks (128, 256, 512); 8,192 features at 32x32 (512 with pool="avg")."""
    return ConvNet(3, widths, image_size, norm, num_outputs, pool)


@register_model("convnet4")
def convnet4(num_outputs: int | None = None, widths: Sequence[int] = (64, 128, 256, 512), image_size: int = 64,
             norm: str = "batch", pool: str = "flatten") -> nn.Module:
    """The Tiny-ImageNet/ImageNet-64 distillation ConvNet: 4 blocks (64..512); 8,192 features at 64x64."""
    return ConvNet(4, widths, image_size, norm, num_outputs, pool)


# --------------------------------------------------------------------------- ResNets


class CifarResNet(FeatureModel, ResNet):  # FeatureModel first: its forward (head of the features) replaces ResNet's
    """torchvision's ResNet with a 3x3 stride-1 stem, no max-pool, and `fc` moved to `head`.

    Parameter names are torchvision's (`conv1.weight`, `bn1.*`,
    `layer1.0.conv1.weight`, ...), so a torchvision-layout state dict loads
    after `from_torchvision_state_dict` (or, without its `fc.*`, directly with
    `strict=False`).
    """

    def __init__(self, layers: list[int], stem_padding: int, zero_init_residual: bool, num_outputs: int | None):
        super().__init__(BasicBlock, layers, num_classes=1, zero_init_residual=zero_init_residual)
        # Replaced after torchvision's kaiming init, so the stem keeps PyTorch's
        # default init: the authors' ResNet10/ResNet18 do exactly this.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
        self.maxpool = nn.Identity()
        del self.fc
        self.feature_dim = 512 * BasicBlock.expansion
        self.head = _make_head(self.feature_dim, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@register_model("resnet18")
def resnet18(num_outputs: int | None = None, stem_padding: int = 1, zero_init_residual: bool = True) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlock [2,2,2,2]); 512 features.

    `zero_init_residual=True` as the authors' evaluation networks (torchvision's
    default is False).
    """
    return CifarResNet([2, 2, 2, 2], stem_padding, zero_init_residual, num_outputs)


@register_model("resnet18_pad2")
def resnet18_pad2(num_outputs: int | None = None, zero_init_residual: bool = True) -> nn.Module:
    """`resnet18` with stem padding 2: the architecture of the authors' released teacher."""
    return CifarResNet([2, 2, 2, 2], 2, zero_init_residual, num_outputs)


@register_model("resnet10")
def resnet10(num_outputs: int | None = None, stem_padding: int = 1, zero_init_residual: bool = True) -> nn.Module:
    """CIFAR ResNet-10 (BasicBlock [1,1,1,1]); 512 features.

    The authors' ResNet10 has stem padding 2 (`stem_padding=2` reproduces it);
    the default here is the usual CIFAR stem.
    """
    return CifarResNet([1, 1, 1, 1], stem_padding, zero_init_residual, num_outputs)


# --------------------------------------------------------------------------- VGG-11 (BN)

_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(FeatureModel):
    """CIFAR VGG with BatchNorm (authors' `models/vgg.py`), global average pool -> 512 features.

    At 32x32 the five max-pools leave 1x1, so the average pool is the identity
    and the network is exactly the authors'; at 64x64 it averages the 2x2 map
    (the authors flatten it into 2,048 features instead), keeping one head size.
    """

    def __init__(self, cfg: Sequence[int | str], norm: str, num_outputs: int | None):
        super().__init__()
        _check_norm("vgg11_bn", norm)
        layers: list[nn.Module] = []
        in_channels = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += _conv_block(in_channels, int(item), 3, norm)
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_channels
        self.head = _make_head(self.feature_dim, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


@register_model("vgg11_bn")
def vgg11_bn(num_outputs: int | None = None, norm: str = "batch") -> nn.Module:
    """CIFAR VGG-11 with BN: conv cfg [64,M,128,M,256,256,M,512,512,M,512,512,M], one linear head; 512 features."""
    return VGG(_VGG11_CFG, norm, num_outputs)


# --------------------------------------------------------------------------- AlexNet


class AlexNet(FeatureModel):
    """The CIFAR AlexNet with BatchNorm of the authors' `models/alexnet.py`.

    conv5x5(3->128, pad 2)-BN-ReLU-maxpool, conv5x5(128->192, pad 2)-BN-ReLU-
    maxpool, conv3x3(192->256)-BN-ReLU, conv3x3(256->192)-BN-ReLU,
    conv3x3(192->192)-BN-ReLU-maxpool, then an adaptive average pool to 4x4:
    3,072 features. At 32x32 the map is already 4x4, so this is exactly the
    authors' network; at 64x64 they flatten 8x8 (12,288 features) instead.
    (DC/DSA's AlexNet is a different, BN-free variant with padding 4 in the
    first layer; the paper's architecture-transfer numbers use this one.)
    """

    def __init__(self, norm: str, num_outputs: int | None):
        super().__init__()
        _check_norm("alexnet", norm)
        self.features = nn.Sequential(
            *_conv_block(3, 128, 5, norm), nn.MaxPool2d(kernel_size=2, stride=2),
            *_conv_block(128, 192, 5, norm), nn.MaxPool2d(kernel_size=2, stride=2),
            *_conv_block(192, 256, 3, norm), *_conv_block(256, 192, 3, norm), *_conv_block(192, 192, 3, norm),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.feature_dim = 192 * 4 * 4
        self.head = _make_head(self.feature_dim, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


@register_model("alexnet")
def alexnet(num_outputs: int | None = None, norm: str = "batch") -> nn.Module:
    """CIFAR AlexNet with BN (authors' variant); 3,072 features at any input size."""
    return AlexNet(norm, num_outputs)


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1; a residual (1x1 conv when widths differ) at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int):
        super().__init__()
        hidden = expansion * in_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 1 and in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(FeatureModel):
    """CIFAR MobileNetV2 (kuangliu/pytorch-cifar, as adapted in the authors' `models/mobilenet.py`).

    Stride 1 in the first convolution and in the second stage (24 channels),
    ReLU, 1x1-conv shortcuts where a stride-1 block changes width, 1x1 conv to
    1,280 channels, global average pool: 1,280 features. `expansion` is the
    expansion factor of every stage after the first: 6 is MobileNetV2 (the
    default); the authors' file uses 2.
    """

    # (expansion of the stage, or None for `expansion`; out channels; blocks; first stride)
    STAGES: tuple[tuple[int | None, int, int, int], ...] = (
        (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(self, expansion: int, num_outputs: int | None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, in_channels = [], 32
        for stage_expansion, out_channels, num_blocks, first_stride in self.STAGES:
            for index in range(num_blocks):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(in_channels, out_channels, stage_expansion or expansion, stride))
                in_channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_channels, 1280, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 1280
        self.head = _make_head(self.feature_dim, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(self.layers(x))))
        return torch.flatten(self.avgpool(x), 1)


@register_model("mobilenetv2")
def mobilenetv2(num_outputs: int | None = None, expansion: int = 6) -> nn.Module:
    """CIFAR MobileNetV2 (kuangliu's); 1,280 features. `expansion=2` is the authors' 'mobilenet'."""
    if not isinstance(expansion, int) or expansion < 1:
        raise KrrstError(f"model 'mobilenetv2': option expansion must be a positive integer, got {expansion!r}")
    return MobileNetV2(expansion, num_outputs)
