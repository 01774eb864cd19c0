"""The self-supervised teacher `g`: SSL losses, training, loading your own, health checks.

KRR-ST regresses the representations of a teacher trained with
self-supervised learning on the unlabelled source set. This module trains
that teacher (Barlow Twins by default, SimCLR behind the same interface),
loads one from a file instead (ours, any registered architecture's
safetensors, or a torchvision-layout `.pt` such as the authors' released
ResNet-18), and checks that its features have not collapsed.

The losses (`krrst.losses`) are written in a few lines rather than taken from
`lightly`: lightly pulls in pytorch-lightning, hydra and its own utilities for
what are two short functions, and the in-house versions are tested against
explicit hand computations (tests/test_losses.py).

Files a training run writes into `out_dir`:
- `teacher.safetensors`: the backbone's weights (no projector) with metadata
  {kind, arch, spec, feature_dim, config, mean, std, source, steps};
- `checkpoint.safetensors`: everything needed to resume (model, projector,
  optimiser, schedule position, generator state, step), via `io.save_state`;
- `loss.csv`: one row per step (step, loss, lr, elapsed_s);
- `health.json`: the feature health check and, when labels are given, the
  k-NN accuracy.

Under torchrun (`train_teacher(..., distributed=init_distributed())`) the
teacher trains with DistributedDataParallel on the context's device: every
rank draws the same global batch (`batch_size`, a multiple of the world size)
and views, keeps its contiguous share, normalises with SyncBatchNorm, and the
SSL loss sees the all-gathered embeddings, so a run equals the single-process
run on the same global batch and a checkpoint resumes with any world size;
rank 0 writes the files and prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from krrst.augment import SSLAugmentConfig, ssl_view_pair
from krrst.features import batched_features
from krrst.formats import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherInput,
    fit_to_source,
    is_library_arch,
    is_torchscript,
    library_backbone,
    load_backbone_weights,
    load_exactly,
    load_library_teacher,
    load_torchscript,
    strip_prefixes,
    unwrap_checkpoint,
)
from krrst.infra.config import check_numeric_fields, config_to_dict, resolve_device
from krrst.infra.distributed import DistributedContext, all_gather_with_grad, barrier, convert_sync_batchnorm
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch, describe_nonfinite, first_nonfinite_tensor
from krrst.infra.io import load_tensors, save_tensors, torch_load_weights_only, write_json
from krrst.infra.run_state import CHECKPOINT_NAME, RunState, read_log
from krrst.infra.speed import SpeedSettings, check_speed_fields, fused_options
from krrst.losses import barlow_twins_loss, simclr_loss
from krrst.models import NORMS, create_model, list_models, model_options

TEACHER_FILE = "teacher.safetensors"
CHECKPOINT_FILE = CHECKPOINT_NAME  # the run scaffold's, as the pipeline finds it
HEALTH_FILE = "health.json"
TEACHER_KIND = "krrst-teacher"
CHECKPOINT_KIND = "krrst-teacher-checkpoint"
FORMAT_VERSION = 1

SSL_METHODS = ("barlow_twins", "simclr")
OPTIMIZERS = ("lars", "sgd", "adamw")

# Overrides that turn the default (Barlow Twins) config into solo-learn's
# SimCLR CIFAR recipe (scripts/pretrain/cifar/simclr.yaml): a preset for pipelines.
SIMCLR_CIFAR_OVERRIDES: dict[str, Any] = {
    "method": "simclr",
    "projector_dims": (2048, 256),
    "temperature": 0.2,
    "lr": 0.4,
    "solarize_p": (0.0, 0.0),  # solo-learn's symmetric.yaml
}

# Config fields that only steer logging and checkpointing, or the memory layout
# (float rounding, not the method): they may change on resume.
_RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "channels_last")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Hyper-parameters of the SSL teacher.

    Defaults are solo-learn's Barlow Twins recipe for CIFAR with a ResNet-18
    (github.com/vturrisi/solo-learn, `scripts/pretrain/cifar/barlow.yaml`,
    augmentations `asymmetric.yaml`, scheduler defaults of its base
    method): batch 256, 1,000 epochs, LARS (eta 0.02,
    LR clipping, biases and norm parameters excluded from adaptation and
    weight decay), lr 0.3, weight decay 1e-4, 10 warm-up epochs from 3e-5
    then cosine to 0, projector 2048-2048-2048 (Linear-BN-ReLU hidden
    layers), off-diagonal weight lambda = 0.0051 (Zbontar et al., "Barlow
    Twins", ICML 2021) and loss scale 0.1.

    `krrst.infra.speed.reference_speed(config)` (float32, channels_last off) is the
    reference path the fast one is tested against (tests/test_teacher.py).
    """

    # --- the method and the network
    # barlow_twins or simclr (NT-Xent, Chen et al. 2020; SIMCLR_CIFAR_OVERRIDES gives solo-learn's SimCLR recipe)
    method: Literal["barlow_twins", "simclr"] = "barlow_twins"
    # a registered architecture (krrst.models.list_models())
    arch: str = "resnet18"
    # a ConvNet teacher's widths option (empty: the architecture's default); ConvNets are built for the source's
    # image size
    convnet_widths: tuple[int, ...] = ()
    # a ConvNet teacher's representation: flatten (the last map, as the distillation ConvNet) or avg (global
    # average pooling, width features, as a ResNet's pooled feature)
    convnet_pool: str = "flatten"
    # --- length
    # passes over the source set; ignored when steps > 0
    epochs: int = 1000
    # total optimiser steps (0: epochs x batches per epoch)
    steps: int = 0
    # images per step (each gives two views)
    batch_size: int = 256
    # --- optimiser and schedule
    # lars, sgd (momentum) or adamw
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    # peak learning rate (solo-learn does not scale it with the batch)
    lr: float = 0.3
    # SGD/LARS momentum
    momentum: float = 0.9
    # L2 weight decay (LARS/SGD) or decoupled decay (AdamW)
    weight_decay: float = 1e-4
    # LARS trust coefficient
    lars_eta: float = 0.02
    # linear warm-up length in epochs, capped at a tenth of the run so that short runs still reach the peak rate
    warmup_epochs: float = 10.0
    # learning rate at step 0
    warmup_start_lr: float = 3e-5
    # learning rate at the end of the cosine decay
    min_lr: float = 0.0
    # --- projector and losses
    # hidden sizes then output size of the projector MLP
    projector_dims: tuple[int, ...] = (2048, 2048, 2048)
    # Barlow Twins: weight of the off-diagonal (redundancy) term, and the factor on the loss (solo-learn's scale_loss)
    lambda_offdiag: float = 0.0051
    loss_scale: float = 0.1
    # SimCLR softmax temperature
    temperature: float = 0.2
    # --- augmentation
    # smallest area fraction of the random resized crop
    crop_min_scale: float = 0.08
    # probabilities of colour jitter (0.4, 0.4, 0.2, 0.1), greyscale and Gaussian blur, in both views
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    # solarisation probability of the first and second view (asymmetric in the Barlow Twins recipe)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    # seeds the initial weights, the batch order and the augmentation
    seed: int = 0
    # --- logging, in steps
    # steps between checkpoints (one is always written at the end)
    checkpoint_every: int = 500
    # steps between loss syncs to the CSV and the progress bar
    log_every: int = 10
    # --- speed (krrst.infra.speed.reference_speed turns both off)
    # bfloat16 runs the backbone and projector under autocast (the SSL loss stays float32); auto = bfloat16 on
    # CUDA, float32 elsewhere (krrst.infra.speed)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # the backbone and the views in NHWC memory layout (auto = on)
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        check_speed_fields(self, "teacher")
        check_numeric_fields(self, "teacher")


# --------------------------------------------------------------------------- optimiser and schedule


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as solo-learn's.

    For a weight tensor p with gradient g the update direction is
    `clip(eta·‖p‖ / (‖g‖ + wd·‖p‖) / lr, max=1) · (g + wd·p)`, fed to
    heavy-ball momentum; one-dimensional parameters (biases, norm scales)
    get plain momentum SGD with neither weight decay nor adaptation
    (solo-learn's `exclude_bias_n_norm` and `clip_lr`).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = group["eta"] * p_norm / (g_norm + group["weight_decay"] * p_norm + group["eps"])
                    # Where either norm is zero the adaptation is skipped, as in solo-learn.
                    trust = torch.where((p_norm > 0) & (g_norm > 0), torch.clamp(trust / group["lr"], max=1.0), 1.0)
                    update = (update + group["weight_decay"] * p) * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _make_optimizer(
    config: TeacherConfig, params: list[nn.Parameter], device: torch.device = torch.device("cpu")
) -> torch.optim.Optimizer:
    # SGD and AdamW take one fused kernel per step on CUDA; LARS (not in torch) stays a per-tensor loop.
    decay = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "lars":
        return LARS(params, momentum=config.momentum, eta=config.lars_eta, **decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=config.momentum, **decay, **fused_options(torch.optim.SGD, device))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **decay, **fused_options(torch.optim.AdamW, device))
    raise KrrstError(f"teacher.optimizer={config.optimizer!r} is not valid; expected one of {', '.join(OPTIMIZERS)}")


def learning_rate_at(step: int, total_steps: int, steps_per_epoch: int, config: TeacherConfig) -> float:
    """Linear warm-up from `warmup_start_lr` to `lr`, then cosine decay to `min_lr` (per step)."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps // 10)
    if step < warmup:
        return config.warmup_start_lr + (config.lr - config.warmup_start_lr) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- building blocks


def build_backbone(config: TeacherConfig, image_size: int) -> nn.Module:
    """The teacher network of `config.arch` without a head (forward = features)."""
    options: dict[str, Any] = {}
    valid = model_options(config.arch)
    if config.convnet_widths:
        if "widths" not in valid:
            raise KrrstError(f"teacher.convnet_widths is set but model {config.arch!r} has no widths option")
        options["widths"] = tuple(config.convnet_widths)
    if config.convnet_pool != "flatten":
        if "pool" not in valid:
            raise KrrstError(f"teacher.convnet_pool is set but model {config.arch!r} has no pool option")
        options["pool"] = config.convnet_pool
    if "image_size" in valid:
        options["image_size"] = int(image_size)
    return create_model(config.arch, num_outputs=None, **options)


def build_projector(feature_dim: int, dims: tuple[int, ...]) -> nn.Module:
    """Projector MLP: (Linear-BN-ReLU) per hidden size, then a Linear to the last size."""
    if not dims:
        raise KrrstError("teacher.projector_dims must hold at least one size, e.g. 2048,2048,2048")
    layers: list[nn.Module] = []
    width = feature_dim
    for hidden in dims[:-1]:
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, dims[-1]))
    return nn.Sequential(*layers)


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The batch order of one epoch, a pure function of (seed, epoch), so resume needs no stored order."""
    generator = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF))
    return torch.randperm(n, generator=generator)


def view_configs(config: TeacherConfig):
    """The two `augment.SSLAugmentConfig`s of the teacher's views (jitter strengths are solo-learn's)."""
    if len(config.solarize_p) != 2:
        raise KrrstError(f"teacher.solarize_p must hold two probabilities (view 1, view 2), got {config.solarize_p}")
    return tuple(SSLAugmentConfig(crop_scale=(config.crop_min_scale, 1.0), jitter_p=config.jitter_p,
                                  grayscale_p=config.grayscale_p, blur_p=config.blur_p, solarize_p=solarize_p)
                 for solarize_p in config.solarize_p)


def _freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- training


def train_teacher(images, config: TeacherConfig | None = None, out_dir: str | os.PathLike | None = None,
                  resume: bool = False, device: str | torch.device | None = None, heldout=None, labelled=None, *,
                  stop_at_step: int | None = None, progress: bool | None = None,
                  distributed: DistributedContext | None = None) -> nn.Module:
    """Train an SSL teacher on the unlabelled `images` (an `ImageSet`) and return its backbone.

    The backbone (no projector) comes back frozen (eval mode, `requires_grad_(False)`) in contiguous memory, the
    same on every rank; `forward(x)` gives the features. Bad settings, divergence or collapse raise `KrrstError`.

    Args:
        images: the source `ImageSet` (uint8 images; labels are ignored).
        config: hyper-parameters; `TeacherConfig()` when None.
        out_dir: where the files listed in the module docstring go; None keeps everything in memory.
        resume: continue from `out_dir/checkpoint.safetensors` when present; the result equals an
            uninterrupted run's. Without `resume`, an existing checkpoint there is an error.
        device: see `krrst.infra.config.resolve_device`.
        heldout: an `ImageSet` for the feature health check (default: up to 1,000 source images).
        labelled: a `(train, test)` pair of labelled `ImageSet`s for the k-NN probe in `health.json`.
        stop_at_step: stop after this global step, checkpoint and return the unfinished backbone.
        progress: show progress and the summary line (None: a bar on a terminal, plain lines in a log file).
        distributed: a torchrun process's `init_distributed()` context (see the module docstring); with
            world_size > 1 its device replaces `device`.
    """
    config = config or TeacherConfig()
    total_steps, steps_per_epoch = _schedule(config, len(images))
    sharded = distributed is not None and distributed.world_size > 1
    device = distributed.device if sharded else resolve_device(device)
    speed = SpeedSettings.resolve(config, device)
    views = _ViewStream(images, config, steps_per_epoch, speed, device, distributed if sharded else None)
    backbone, projector = _build_networks(config, images.image_size, device, speed, sharded)
    optimizer = _make_optimizer(config, [*backbone.parameters(), *projector.parameters()], device)
    loss_fn = _ssl_loss(config, sharded)
    watch = LossWatch(f"teacher training ({config.method})",
                      "teacher.lr too high for teacher.batch_size (or teacher.loss_scale too large)", device)
    with _open_run(config, out_dir, total_steps, len(images), resume, stop_at_step, progress, distributed) as run:
        _restore(run.saved, backbone, projector, optimizer, views.generator)  # a resumed run's state, if any
        two_views = _two_view_network(backbone, projector, device, sharded)  # after the restore: DDP copies rank 0
        logged = run.rows()  # a resumed run's rows, up to its checkpoint
        last_loss = logged[-1]["loss"] if logged else float("nan")
        for step in run.steps():
            view_a, view_b = views(step)
            lr = learning_rate_at(step - 1, total_steps, steps_per_epoch, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with speed.autocast(device):
                z_a, z_b = two_views(view_a, view_b)
            # The loss in the views' dtype (float32, float64 in a float64 reference run), not autocast's.
            loss = loss_fn(z_a.to(view_a.dtype), z_b.to(view_b.dtype))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            watch.update(loss, step)
            run.log(step, loss=loss.detach(), lr=lr)
            if run.is_log_step(step) or run.is_checkpoint_step(step):
                last_loss = run.flush()[-1]["loss"]  # one sync for the rows since the last flush
                watch.check()  # before any checkpoint: none is written from a diverged state
            if run.is_checkpoint_step(step):
                run.save(step, _checkpoint(backbone, projector, optimizer, views.generator, step, total_steps))
    watch.check()
    teacher = _trained_backbone(backbone, config, images.image_size, device, sharded)
    if run.last_step == total_steps:
        _finish(run, teacher, images, config, last_loss, heldout, labelled, device, progress)
    if sharded:
        barrier()  # rank 0's files (the last checkpoint, the teacher) are on disk before any rank returns
    return teacher


LOSS_FIELDS = ("step", "loss", "lr", "elapsed_s")


def _schedule(config: TeacherConfig, num_images: int) -> tuple[int, int]:
    """`(total steps, steps per epoch)` of `config` on `num_images` images, once its settings are checked."""
    if config.method not in SSL_METHODS:
        raise KrrstError(f"teacher.method={config.method!r} is not valid; expected one of {', '.join(SSL_METHODS)}")
    for name in ("checkpoint_every", "log_every"):
        if getattr(config, name) < 1:
            raise KrrstError(f"teacher.{name}={getattr(config, name)} is not valid; "
                             "expected a positive number of steps")
    if config.batch_size < 2 or config.batch_size > num_images:
        raise KrrstError(f"teacher.batch_size={config.batch_size} is not valid for {num_images} source images; "
                         f"expected 2..{num_images}")
    steps_per_epoch = num_images // config.batch_size  # the last partial batch is dropped, as usual in SSL
    total_steps = config.steps if config.steps > 0 else config.epochs * steps_per_epoch
    if total_steps < 1:
        raise KrrstError("teacher.steps and teacher.epochs are both 0; set one of them")
    return total_steps, steps_per_epoch


def _build_networks(
    config: TeacherConfig, image_size: int, device: torch.device, speed: SpeedSettings, sharded: bool
) -> tuple[nn.Module, nn.Module]:
    """Backbone and projector on `device`, their initial weights from the stage seed alone."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left untouched
        torch.manual_seed(config.seed)
        backbone = build_backbone(config, image_size)
        projector = build_projector(backbone.feature_dim, tuple(config.projector_dims))
    backbone.to(device=device, memory_format=speed.memory_format)
    projector.to(device)
    if sharded:
        # Batch statistics over the global batch, as the single process sees them.
        backbone, projector = convert_sync_batchnorm(backbone), convert_sync_batchnorm(projector)
    return backbone, projector


def _two_view_network(backbone: nn.Module, projector: nn.Module, device: torch.device, sharded: bool) -> nn.Module:
    network = _TwoViews(backbone, projector).train()
    if not sharded:
        return network
    # DDP all-reduces (averages) the gradients in buckets during backward.
    return nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def _ssl_loss(config: TeacherConfig, sharded: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The SSL loss of two batches of embeddings, each (B / world size, D).

    Under torchrun every rank computes the loss of the global batch (the
    all-gathered rows); the gather's backward sums the ranks' gradients and
    DDP averages them: the single-process gradient.
    """
    if config.method == "barlow_twins":
        loss = lambda a, b: barlow_twins_loss(a, b, config.lambda_offdiag, config.loss_scale)  # noqa: E731
    else:
        loss = lambda a, b: simclr_loss(a, b, config.temperature)  # noqa: E731
    if not sharded:
        return loss
    return lambda a, b: loss(all_gather_with_grad(a), all_gather_with_grad(b))


def _open_run(config: TeacherConfig, out_dir: str | os.PathLike | None, total_steps: int, num_images: int,
              resume: bool, stop_at_step: int | None, progress: bool | None,
              distributed: DistributedContext | None) -> RunState:
    """The run scaffold: resume (refusing another config or source size), `loss.csv`, progress in images."""
    return RunState("teacher", out_dir, config=config, total_steps=total_steps, log_fields=LOSS_FIELDS,
                    resume=resume, resumable=_RESUME_FREE_FIELDS, identity={"num_images": num_images},
                    kind=CHECKPOINT_KIND, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                    stop_at_step=stop_at_step, progress=progress is not False, unit="img",
                    unit_scale=config.batch_size, context=distributed)


class _ViewStream:
    """The two augmented views of every step's batch (this rank's rows of them), in the memory layout trained.

    The batch order of an epoch is a pure function of (seed, epoch) and the
    views come from `generator`, whose state the checkpoint holds: a resumed
    run draws exactly what an uninterrupted one would.
    """

    def __init__(self, images, config: TeacherConfig, steps_per_epoch: int, speed: SpeedSettings,
                 device: torch.device, distributed: DistributedContext | None):
        # Under torchrun each rank keeps its contiguous share of the global batch.
        self.rows = distributed.shard(config.batch_size, "teacher.batch_size") if distributed else slice(None)
        self.source = images.images.to(device)  # (N, C, H, W) uint8
        self.mean, self.std = tuple(images.mean), tuple(images.std)
        self.seed, self.batch_size, self.steps_per_epoch = config.seed, config.batch_size, steps_per_epoch
        self.augment = view_configs(config)
        self.speed = speed
        self.generator = torch.Generator().manual_seed(config.seed)
        self._epoch, self._order = -1, torch.empty(0)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of global step `step` (1-based), each (B / world size, C, H, W)."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = _epoch_permutation(self.seed, epoch, len(self.source)).to(self.source.device)
            self._epoch = epoch
        batch = self.source[self._order[position * self.batch_size : (position + 1) * self.batch_size]]
        view_a, view_b = ssl_view_pair(batch, self.mean, self.std, self.generator, self.augment)
        # Views of the whole global batch from the shared generator, then this rank's rows: the union over
        # ranks is exactly the single-process batch.
        return self.speed.layout(view_a[self.rows]), self.speed.layout(view_b[self.rows])


def _checkpoint(backbone: nn.Module, projector: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, step: int, total_steps: int) -> dict[str, Any]:
    """What resumes the run; the scaffold adds step, config, num_images and kind."""
    return {
        "format_version": FORMAT_VERSION,
        "total_steps": total_steps,
        "model": backbone.state_dict(),
        "projector": projector.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"name": "warmup_cosine", "step": step},
        "generator": generator.get_state(),
    }


def _restore(saved: Mapping[str, Any] | None, backbone: nn.Module, projector: nn.Module,
             optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    if saved is None:  # a fresh run
        return
    backbone.load_state_dict(saved["model"])
    projector.load_state_dict(saved["projector"])
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])


def _trained_backbone(backbone: nn.Module, config: TeacherConfig, image_size: int, device: torch.device,
                      sharded: bool) -> nn.Module:
    """The frozen backbone, contiguous as `load_teacher` gives it: it computes the same bits as its file's."""
    if sharded:
        # A plain backbone (BatchNorm, not SyncBatchNorm) with the trained weights, for single-process use.
        with torch.random.fork_rng(devices=[]):
            plain = build_backbone(config, image_size)
        plain.to(device=device).load_state_dict(backbone.state_dict())
        backbone = plain
    return _freeze(backbone.to(memory_format=torch.contiguous_format))


def _finish(run: RunState, teacher: nn.Module, images, config: TeacherConfig, last_loss: float, heldout, labelled,
            device: torch.device, progress: bool | None) -> None:
    """Check the finished teacher's health, then write `health.json`, the summary line and `teacher.safetensors`.

    Every rank checks (same weights, same verdict), so a collapse fails them all alike.
    """
    health = _health_report(teacher, images, heldout, labelled, device)
    run.write(lambda out: write_json(out / HEALTH_FILE, health))
    if progress is not False:
        run.message(_summary_line(config, run.total_steps, last_loss, health))
    check_not_collapsed(health, where=f"teacher trained in {run.out_dir}" if run.out_dir else "trained teacher")
    run.write(lambda out: save_teacher(out / TEACHER_FILE, teacher, tuple(images.mean), tuple(images.std),
                                       config=config, source=getattr(images, "name", ""), steps=run.total_steps))


class _TwoViews(nn.Module):
    """Backbone + projector applied to both views in one forward, the unit DDP wraps."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each view on its own so that BatchNorm sees per-view statistics, as in the Barlow Twins and
        # solo-learn code.
        return self.projector(self.backbone(view_a)), self.projector(self.backbone(view_b))


def read_loss_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a teacher's `loss.csv` as dicts {step, loss, lr, elapsed_s} (a line torn by a kill is skipped)."""
    return read_log(path)


def teacher_identity(teacher: nn.Module) -> str:
    """Architecture and a weight checksum: enough to refuse resuming a run with another teacher."""
    arch = getattr(teacher, "spec", {}).get("arch", type(teacher).__name__)
    with torch.no_grad():
        checksum = sum(float(t.double().abs().sum()) for t in teacher.state_dict().values() if t.is_floating_point())
    return f"{arch}:{checksum:.6e}"


def _health_report(teacher: nn.Module, images, heldout, labelled, device: torch.device) -> dict[str, Any]:
    if heldout is not None:
        check_images, what = heldout, f"held-out set {getattr(heldout, 'name', '')}".strip()
    else:
        count = min(1000, len(images))
        check_images, what = images.subset(torch.arange(count)), f"first {count} source images"
    health = feature_health(teacher, check_images.images, check_images.mean, check_images.std, device=device)
    health["images"] = what
    if labelled is not None:
        train_set, test_set = labelled
        health["knn_k"] = 20
        health["knn_accuracy"] = knn_accuracy(teacher, train_set, test_set, k=20, device=device)
        health["knn_sets"] = (
            f"{getattr(train_set, 'name', 'train')} ({len(train_set)}) -> "
            f"{getattr(test_set, 'name', 'test')} ({len(test_set)})"
        )
    return health


def _summary_line(config: TeacherConfig, steps: int, last_loss: float, health: Mapping[str, Any]) -> str:
    text = (
        f"teacher: {config.method} {config.arch}, {steps} steps, final loss {last_loss:.4g}; "
        f"features: median std {health['std_median']:.3g}, {100 * health['dead_fraction']:.1f}% dead dims, "
        f"effective rank {health['effective_rank']:.1f} of {health['feature_dim']}"
    )
    if "knn_accuracy" in health:
        text += f"; {health['knn_k']}-NN accuracy {100 * health['knn_accuracy']:.2f}%"
    return text


# --------------------------------------------------------------------------- saving and loading


def save_teacher(path: str | os.PathLike, teacher: nn.Module, mean, std, config: TeacherConfig | None = None,
                 source: str = "", steps: int = 0) -> None:
    """Write a teacher's weights and what rebuilds it (arch spec, feature size, normalisation) atomically."""
    spec = dict(getattr(teacher, "spec", {}) or {})
    if "arch" not in spec:
        raise KrrstError("save_teacher needs a model from krrst.models.create_model (it has no .spec)")
    spec["num_outputs"] = None
    metadata = {
        "kind": TEACHER_KIND,
        "format_version": FORMAT_VERSION,
        "arch": spec["arch"],
        "spec": spec,
        "feature_dim": int(teacher.feature_dim),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "config": config_to_dict(config) if config is not None else {},
        "source": source,
        "steps": steps,
    }
    save_tensors(path, dict(teacher.state_dict()), metadata)


def load_teacher(path: str | os.PathLike | None, arch: str | None = None, device: str | torch.device | None = "cpu",
                 input_size: int | None = None) -> nn.Module:
    """Load a teacher (frozen backbone, forward = features) from a file.

    Teachers of other libraries (`krrst.formats`): `arch` =
    `torchvision:NAME` or `timm:NAME` with a state dict, a solo-learn or
    lightly `.ckpt`, or `path=None` for the library's pretrained weights
    (online); a TorchScript file is taken as it is. They declare their input
    (size and normalisation; `input_size` overrides the size, and gives a
    TorchScript teacher ImageNet's normalisation at that size), which the
    stages honour (`krrst.formats.fit_to_source`).

    Accepted files:
    - a `teacher.safetensors` written by `train_teacher`/`save_teacher`: the
      architecture comes from its metadata (`arch`, if given, must agree);
    - any other safetensors state dict of a registered architecture `arch`
      (default options, except `widths` and `norm`, read off the tensors);
    - a torchvision-layout `.pt`/`.pth` state dict, read with
      `torch.load(weights_only=True)` into `arch` (default `resnet18_pad2`:
      the authors' released teacher, a ResNet-18 with a 3x3 padding-2 stem).

    Prefixes `module.`, `_orig_mod.`, `backbone.`, `encoder.`, `model.` are
    stripped and head/projector keys (`fc.`, `head.`, `projector.`,
    `classifier.`, `predictor.`) dropped. Padding leaves no trace in weights,
    so `resnet18` and `resnet18_pad2` files are interchangeable as tensors:
    name the one the weights were trained with.

    Raises:
        KrrstError: one line naming the file, the architecture and the first
            mismatch (missing/unexpected key or the two shapes), or saying that
            the file is unreadable.
    """
    if path is not None and not Path(path).is_file():
        raise KrrstError(f"teacher file not found: {path}")
    if path is None or is_library_arch(arch) or is_torchscript(Path(path)):
        return _load_foreign_teacher(path, arch, device, input_size)
    path = Path(path)
    metadata: dict[str, Any] = {}
    if _is_safetensors(path):
        tensors, metadata = load_tensors(path, "teacher file")
    else:
        tensors = _torch_load_state_dict(path)

    state = _clean_state_dict(tensors)
    _refuse_nonfinite_weights(path, state)
    if metadata.get("kind") == TEACHER_KIND and is_library_arch(metadata["spec"]["arch"]):
        # an imported torchvision/timm teacher: rebuilt by its library, its weights as saved (head already removed)
        spec = metadata["spec"]
        model = library_backbone(spec["arch"], input_size=spec.get("input_size"))
        load_backbone_weights(model, tensors, path, spec["arch"])
        return _freeze(model.to(resolve_device(device)))
    if metadata.get("kind") == TEACHER_KIND:
        model = _model_of_our_file(path, metadata, arch)
        mean, std = metadata.get("mean"), metadata.get("std")
    else:
        model = _model_of_plain_state(path, state, arch)
        mean, std = None, None
    _load_exactly(model, state, path, model.spec["arch"])
    model.teacher_mean = tuple(mean) if mean else None
    model.teacher_std = tuple(std) if std else None
    return _freeze(model.to(resolve_device(device)))


def _model_of_our_file(path: Path, metadata: Mapping[str, Any], arch: str | None) -> nn.Module:
    """The untrained network a `teacher.safetensors` describes (its `spec`); `arch`, if given, must agree."""
    spec = dict(metadata["spec"])
    if arch is not None and arch != spec["arch"]:
        raise KrrstError(f"teacher file {path} holds a {spec['arch']!r} teacher, not {arch!r} (--teacher-arch)")
    spec["num_outputs"] = None
    return create_model(**spec)


def _model_of_plain_state(path: Path, state: Mapping[str, torch.Tensor], arch: str | None) -> nn.Module:
    """The untrained `arch` network for a state dict without metadata: `widths` and `norm` read off its tensors."""
    if arch is None:
        if path.suffix == ".safetensors":
            raise KrrstError(f"teacher file {path} has no krrst metadata; name its architecture with --teacher-arch "
                             f"(one of: {', '.join(list_models())})")
        arch = "resnet18_pad2"
    if arch not in list_models():
        raise KrrstError(f"--teacher-arch {arch!r} is not a registered model; "
                         f"expected one of: {', '.join(list_models())}")
    accepted = model_options(arch)
    options = {"widths": _infer_widths(arch, state, path)} if "widths" in accepted else {}
    if "norm" in accepted:
        options["norm"] = _infer_norm(arch, options, state)
    return create_model(arch, num_outputs=None, **options)


def _load_foreign_teacher(path: str | os.PathLike | None, arch: str | None, device: str | torch.device | None,
                          input_size: int | None) -> nn.Module:
    """A torchvision/timm teacher (weights from `path`, or pretrained when None) or a TorchScript file."""
    if path is None and not is_library_arch(arch):
        raise KrrstError("a teacher without a file needs --teacher-arch torchvision:NAME or timm:NAME "
                         "(the library's pretrained weights)")
    if is_library_arch(arch):
        model = load_library_teacher(None if path is None else Path(path), arch, input_size)
    else:
        model = load_torchscript(Path(path))
        if input_size:
            model.teacher_input = TeacherInput(int(input_size), IMAGENET_MEAN, IMAGENET_STD)
    _refuse_nonfinite_weights(path, model.state_dict())
    return _freeze(model.to(resolve_device(device)))


def _refuse_nonfinite_weights(path: str | os.PathLike | None, state: Mapping[str, torch.Tensor]) -> None:
    nonfinite = first_nonfinite_tensor(state.items())
    if nonfinite is not None:
        raise KrrstError(f"teacher file {path}: {nonfinite[1]} in its weights ({nonfinite[0]}); its features would "
                         "be NaN")


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header size, then '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _torch_load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch_load_weights_only(path, "teacher file", "a weights-only PyTorch checkpoint or safetensors file",
                                     "as a state dict (torch.save(model.state_dict(), ...)) or as safetensors")
    # Training scripts often wrap the weights: {'state_dict': ...}, {'model': ...}.
    loaded = unwrap_checkpoint(loaded, ("state_dict", "model", "backbone", "teacher", "encoder"))
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise KrrstError(f"teacher file {path} does not hold a state dict of tensors (got {type(loaded).__name__})")
    return dict(loaded)


_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.")
_DROP_PREFIXES = ("fc.", "head.", "projector.", "classifier.", "predictor.", "prediction_head.", "projection_head.")


def _clean_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in tensors.items():
        key = strip_prefixes(key, _STRIP_PREFIXES)
        if not key.startswith(_DROP_PREFIXES):
            cleaned[key] = value
    return cleaned


def _looks_like(state: Mapping[str, torch.Tensor], arch: str) -> str:
    """" (its keys look like 'NAME')" when the keys are those of another registered architecture, else ""."""
    guess = _guess_arch(state)  # builds every registered model (on meta): for error messages only
    return f" (its keys look like {guess!r})" if guess and guess != arch else ""


def _misfit(path: Path, arch: str, state: Mapping[str, torch.Tensor]) -> str:
    """The start of a one-line error: the file does not fit `arch`, and which architecture its keys look like."""
    return f"teacher file {path} does not fit architecture {arch!r}{_looks_like(state, arch)}"


def _load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load `state` strictly (BatchNorm's step counter may be absent: some writers drop it); a mismatch is one line
    naming the file, the arch, the first key that does not fit and the architecture the keys look like."""
    try:
        load_exactly(model, state, f"teacher file {path}", f"architecture {arch!r}")
    except KrrstError as error:
        hint = _looks_like(state, arch)
        if hint:
            raise KrrstError(f"{error}{hint}") from None
        raise


def _infer_widths(arch: str, state: Mapping[str, torch.Tensor], path: Path) -> tuple[int, ...]:
    """The `widths` option of `arch` read off the output channels of the conv weights in `state`.

    A plain state dict carries no options, and ConvNets are often trained
    narrower than the registry's default widths; the weights themselves say
    how wide each block is.
    """
    with torch.device("meta"):
        reference = create_model(arch, num_outputs=None)
    conv_keys = [key for key, tensor in reference.state_dict().items() if tensor.dim() == 4]
    for key in conv_keys:
        if key not in state or state[key].dim() != 4:
            found = "is missing" if key not in state else f"has shape {tuple(state[key].shape)}"
            raise KrrstError(f"{_misfit(path, arch, state)}: cannot infer its widths option, {key!r} {found}; "
                             f"expected {len(conv_keys)} conv weights {', '.join(conv_keys)} of shape "
                             "(width, in_channels, k, k)")
    return tuple(int(state[key].shape[0]) for key in conv_keys)


def _infer_norm(arch: str, options: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """The `norm` option whose parameters and buffers the file holds (BatchNorm's running
    statistics, an affine instance norm's weights, or none). A file that fits none gets the
    default, so that `_load_exactly` names the first key that does not fit."""

    def names(keys) -> set[str]:  # some writers drop BatchNorm's step counter
        return {key for key in keys if not key.endswith("num_batches_tracked")}

    for norm in NORMS:
        with torch.device("meta"):
            expected = create_model(arch, num_outputs=None, **options, norm=norm).state_dict()
        if names(expected) == names(state):
            return norm
    return model_options(arch)["norm"]


def _guess_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """A registered architecture (default options) whose parameter names are exactly those of `state`."""
    keys = set(state)
    for name in list_models():
        try:
            with torch.device("meta"):
                candidate = create_model(name, num_outputs=None)
        except Exception:  # noqa: BLE001 - a guess only; an unbuildable candidate is skipped
            continue
        if set(candidate.state_dict()) == keys:
            return name
    return None


# --------------------------------------------------------------------------- health checks


@torch.no_grad()
def teacher_features(model: nn.Module, images_uint8: torch.Tensor, mean, std, batch_size: int = 500,
                     device: str | torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """Features (N x d float32, on the CPU) of uint8 images, normalised per batch, in eval mode.

    Float32 throughout: these features become regression targets (baselines)
    and must match what the distillation computes for the same images.
    """
    if device is None:  # the model's own device
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = resolve_device(device)
    model = fit_to_source(model, mean, std, images_uint8.shape[-1])  # a library teacher's own preprocessing
    was_training = model.training
    model.to(device).eval()
    features = batched_features(model, images_uint8, mean=mean, std=std, chunk=batch_size, device=device,
                                dtype=torch.float32, out_device="cpu", progress=progress, desc="teacher features")
    model.train(was_training)
    return features.flatten(1) if features.dim() > 1 else features  # (N, d); no images: (0,)


def check_teacher_features(teacher: nn.Module, features: torch.Tensor, what: str) -> None:
    """One line when the teacher's first features are not N x d or hold NaN or inf, naming the teacher as the cause.

    Checked where a stage first computes them (distillation, MKDT, the
    baselines), so a NaN teacher is reported as such and not, steps later,
    as a kernel that is not positive definite.
    """
    if features.dim() != 2:
        raise KrrstError(f"teacher must output N x d features, got shape {tuple(features.shape)}")
    found = describe_nonfinite(features)
    if found is None:
        return
    arch = getattr(teacher, "spec", {}).get("arch", type(teacher).__name__)
    weights = first_nonfinite_tensor(teacher.state_dict().items())
    cause = (f"its weights hold {weights[1]} ({weights[0]})" if weights is not None
             else "its weights are finite, so its arithmetic overflowed on these images")
    raise KrrstError(f"the teacher ({arch})'s features of {what} hold {found}: {cause}; use another teacher file")


# Thresholds of the collapse check. A random network's per-dimension spread is
# about 1e-1 of its feature scale and a trained SSL teacher's higher; 1e-6 is
# float32 round-off on a constant output. BatchNorm/ReLU networks may leave
# some dimensions dead (always zero), a few per cent after SSL; 90% dead is
# dimensional collapse, a teacher with too little left for KRR-ST to regress.
COLLAPSE_RELATIVE_STD = 1e-6
DEAD_DIM_RELATIVE_STD = 1e-4
COLLAPSE_DEAD_FRACTION = 0.9


def feature_health(teacher: nn.Module, images_uint8: torch.Tensor, mean, std,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """Per-dimension spread of the teacher's features over `images_uint8`, and a collapse verdict.

    Returns a JSON-able dict: `num_images`, `feature_dim`, `finite`, the
    per-dimension std over the images (`std_min`, `std_median`, `std_mean`,
    `std_max`), `feature_rms` (root mean square of all feature values, the
    scale), `relative_median_std` = std_median / feature_rms, `dead_fraction`
    (dims whose std < 1e-4 x std_max), `effective_rank` (exp of the entropy
    of the normalised singular values of the centred features; Roy & Vetterli
    2007), and `collapsed` with its `reason` (see `check_not_collapsed`).
    """
    features = teacher_features(teacher, images_uint8, mean, std, device=device).double()
    n, d = features.shape
    finite = bool(torch.isfinite(features).all())
    health: dict[str, Any] = {"num_images": n, "feature_dim": d, "finite": finite}
    stats = ("std_min", "std_median", "std_mean", "std_max", "feature_rms", "relative_median_std")
    if not finite or n < 2:
        reason = "features contain NaN or inf" if not finite else "fewer than 2 images"
        return {**health, **dict.fromkeys(stats, float("nan")), "dead_fraction": 1.0, "effective_rank": 0.0,
                "collapsed": True, "reason": reason}
    per_dim_std = features.std(0, unbiased=False)
    std_median, std_max = float(per_dim_std.median()), float(per_dim_std.max())
    rms = float(features.pow(2).mean().sqrt())
    dead_fraction = float((per_dim_std < DEAD_DIM_RELATIVE_STD * std_max).double().mean()) if std_max > 0 else 1.0
    centred = features - features.mean(0)
    # Singular values from the eigenvalues of the smaller Gram matrix: the same
    # numbers as svdvals, several times faster for N x d with N, d ~ 1,000.
    gram = centred @ centred.T if n <= d else centred.T @ centred
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    if float(singular.sum()) > 0:
        p = singular / singular.sum()
        effective_rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    else:
        effective_rank = 0.0
    relative = std_median / rms if rms > 0 else 0.0
    values = (float(per_dim_std.min()), std_median, float(per_dim_std.mean()), std_max, rms, relative)
    health.update(zip(stats, values), dead_fraction=dead_fraction, effective_rank=effective_rank)
    if std_median <= COLLAPSE_RELATIVE_STD * rms:
        reason = f"features do not vary across images (median per-dim std {std_median:.3g} at feature scale {rms:.3g})"
    elif dead_fraction > COLLAPSE_DEAD_FRACTION:
        reason = f"{100 * dead_fraction:.1f}% of the {d} feature dims are constant across images"
    else:
        reason = ""
    return {**health, "collapsed": bool(reason), "reason": reason}


def check_not_collapsed(health: Mapping[str, Any], where: str = "teacher") -> None:
    """Raise a one-line `KrrstError` when `feature_health` judged the features collapsed.

    Collapsed means: non-finite features; or features that do not vary across
    images (median per-dimension std at most `COLLAPSE_RELATIVE_STD` of the
    feature scale: round-off on a constant output); or more than
    `COLLAPSE_DEAD_FRACTION` of the dimensions constant, i.e. dimensional collapse.
    """
    if health.get("collapsed"):
        raise KrrstError(
            f"{where} has collapsed: {health.get('reason')} on {health.get('num_images')} images; "
            f"it cannot serve as a KRR-ST target (train longer, lower teacher.lr, or check the checkpoint)"
        )


@torch.no_grad()
def knn_accuracy(teacher: nn.Module, train, test, k: int = 20, temperature: float = 0.07,
                 device: str | torch.device | None = None) -> float:
    """Weighted cosine k-NN accuracy of the teacher's features (Wu et al. 2018, InstDisc; solo-learn's k-NN).

    Each test image's `k` most cosine-similar train images vote for their
    label with weight exp(similarity / temperature); returns the top-1
    accuracy in [0, 1]. `train` and `test` are labelled `ImageSet`s.
    """
    if train.labels is None or test.labels is None:
        raise KrrstError("k-NN accuracy needs labelled train and test sets (labels are None)")
    train_features = F.normalize(teacher_features(teacher, train.images, train.mean, train.std, device=device), dim=1)
    test_features = F.normalize(teacher_features(teacher, test.images, test.mean, test.std, device=device), dim=1)
    train_labels = train.labels.long().cpu()
    num_classes = int(max(int(train_labels.max()), int(test.labels.max())) + 1)
    k = min(k, train_features.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], 256):
        similarity = test_features[start : start + 256] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_index], torch.exp(top_similarity / temperature))
        correct += int((votes.argmax(1) == test.labels[start : start + 256].long().cpu()).sum())
    return correct / max(1, test_features.shape[0])
