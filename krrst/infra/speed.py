"""The speed knobs every training stage shares: forward precision and memory layout, resolved per device.

The configs of the teacher (`TeacherConfig`), the distillation
(`DistillConfig`) and the evaluation (`PretrainConfig`, `FinetuneConfig`,
`LinearProbeConfig`) each carry

- `precision`: "auto" | "float32" | "bfloat16". "bfloat16" runs the
  networks' forward passes under `torch.autocast` (losses stay float32);
  "auto" = bfloat16 on CUDA, float32 elsewhere (CPU bf16 is slower).
- `channels_last`: "auto" | "on" | "off". On ("auto" too) puts the
  networks and their image inputs in NHWC memory layout (faster cuDNN and
  oneDNN convolutions).

`SpeedSettings` is what a loop uses of them on its device.
`reference_speed(config)` turns both off: float32 forwards on contiguous
tensors, the straightforward implementation the tests hold the fast path to.
Optimisers take `fused_options(device)`: one fused kernel per step on CUDA
(the same update as the per-tensor loop, up to float rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from krrst.infra.errors import KrrstError

PRECISIONS = ("auto", "float32", "bfloat16")
CHANNELS_LAST = ("auto", "on", "off")

ConfigT = TypeVar("ConfigT")


def check_speed_fields(config: Any, stage: str) -> None:
    """One-line `KrrstError` naming `stage.precision` / `stage.channels_last` when a value is not valid."""
    for name, valid in (("precision", PRECISIONS), ("channels_last", CHANNELS_LAST)):
        value = getattr(config, name)
        if value not in valid:
            raise KrrstError(f"{stage}.{name}={value!r} is not valid; expected one of {', '.join(valid)}")


def reference_speed(config: ConfigT) -> ConfigT:
    """`config` with precision float32 and channels_last off: the reference path."""
    return dataclasses.replace(config, precision="float32", channels_last="off")


def fused_options(optimizer: type[torch.optim.Optimizer], device: torch.device) -> dict[str, bool]:
    """`{"fused": True}` on CUDA where `optimizer` takes it (SGD, Adam, AdamW in torch >= 2.3), else `{}`."""
    if device.type == "cuda" and "fused" in inspect.signature(optimizer).parameters:
        return {"fused": True}
    return {}


class SpeedSettings(NamedTuple):
    """The resolved speed knobs of a run on a device."""

    autocast_dtype: torch.dtype | None  # None: plain float32 forwards
    memory_format: torch.memory_format
    compile: bool = False
    compile_mode: str = "default"

    @classmethod
    def from_fields(cls, precision: str, channels_last: str, device: torch.device, compile: bool = False,
                    compile_mode: str = "default") -> "SpeedSettings":
        bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
        nhwc = channels_last != "off"  # faster on CPU too (oneDNN): ~1.3x for ConvNet-3 fwd+bwd
        return cls(torch.bfloat16 if bf16 else None, torch.channels_last if nhwc else torch.contiguous_format,
                   compile, compile_mode)

    @classmethod
    def resolve(cls, config: Any, device: torch.device) -> "SpeedSettings":
        """The settings of a config with `precision` and `channels_last` (and, if it has them, `compile[_mode]`)."""
        return cls.from_fields(config.precision, config.channels_last, device,
                               getattr(config, "compile", False), getattr(config, "compile_mode", "default"))

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """4-D `images` in this memory format (other tensors as they are)."""
        return images.contiguous(memory_format=self.memory_format) if images.dim() == 4 else images

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """Autocast to this precision on `device`'s type, or nothing for float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def forward(self, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """`forward(images)` in this layout and precision, returned as float32."""
        images = self.layout(images)
        if self.autocast_dtype is None:
            return forward(images)
        with self.autocast(images.device):
            return forward(images).float()
