"""The one batched forward: a network's outputs on many images, chunk by chunk, without gradients.

Teacher targets, k-means features, the linear probe's features and the
high-loss scores all run a network over more images than fit one batch.
`batched_features` is that loop, written once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from krrst.augment import normalize
from krrst.infra.progress import progress_bar

if TYPE_CHECKING:
    from krrst.infra.speed import SpeedSettings


@torch.no_grad()
def batched_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    chunk: int = 512,
    device: torch.device | str | None = None,
    speed: "SpeedSettings | None" = None,
    dtype: torch.dtype | None = None,
    out_device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """`forward` of N images, `chunk` at a time, concatenated: (N, ...) with no autograd graph.

    Args:
        forward: the network's forward (`model`, `model.forward_features`, ...).
            Its mode is the caller's business: put the network in eval mode for
            features that do not depend on the chunking (BatchNorm).
        images: N x C x H x W. uint8 images are normalised with `mean`/`std`
            chunk by chunk (as floats of the default dtype); float images are
            fed as they are (already normalised).
        device: where each chunk is computed (moved there before normalising);
            None: the images' device. A large source can stay on the CPU.
        speed: the forward's layout and precision (`krrst.infra.speed.SpeedSettings`);
            None: as the network is.
        dtype: each chunk's output is cast to it; None: as `forward` returns it.
        out_device: where the outputs are gathered, chunk by chunk (e.g. "cpu"
            for N x d targets too large for the accelerator); None: where computed.
        progress, desc: a progress bar of the chunks.

    No images give an empty tensor of shape (0,).
    """
    if images.dtype == torch.uint8 and (mean is None or std is None):
        raise TypeError("batched_features: uint8 images need the mean and std to normalise them")
    if chunk < 1:
        raise ValueError(f"batched_features: chunk must be >= 1, got {chunk}")
    starts = range(0, len(images), chunk)
    outputs = []
    with progress_bar(len(starts), desc, unit="batch", enabled=progress, leave=False) as bar:
        for start in starts:
            inputs = images[start : start + chunk]
            if device is not None:
                inputs = inputs.to(device)
            if inputs.dtype == torch.uint8:
                inputs = normalize(inputs, mean, std)
            output = speed.forward(forward, inputs) if speed is not None else forward(inputs)
            if dtype is not None:
                output = output.to(dtype)
            outputs.append(output if out_device is None else output.to(out_device))
            bar.update()
    if not outputs:
        return torch.empty(0, dtype=dtype, device=out_device or device or images.device)
    return torch.cat(outputs)
