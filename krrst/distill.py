"""KRR-ST distillation: the config, the model pool and the outer loop.

`distill(source, teacher, config)` learns `m` synthetic images `X_s` and their
target representations `Y_s` so that, for feature extractors `f` drawn from a
pool of partly trained networks, ridge regression fitted on `(f(X_s), Y_s)`
predicts the teacher's representations `g(X_t)` of real images
(`krrst.losses.krr_st_loss`). It returns a `DistilledSet` and, given an
`out_dir`, leaves a resumable run there:

- `checkpoint.safetensors`: `X_s`, `Y_s`, the outer optimiser and schedule,
  the pool (weights, optimisers, step counters), every generator state, the
  history of logged rows and the step (written atomically every
  `checkpoint_every` steps and at the end);
- `loss.csv` / `loss.png`: one row every `log_every` / `validate_every`
  steps: `step`, `loss` (mean outer loss over the steps since the previous
  row), `lr` (of `X_s`, in the public code's raw-pixel units), `val_loss` and
  `val_reference` (the validation signal and its mean-predictor reference, on
  validation steps), `elapsed_s` (wall time of the loop since this process started it: a resumed run counts afresh);
- `preview.png`: a grid of the current images, refreshed at each checkpoint;
- `distilled.safetensors`: the final `DistilledSet`.

The method, and krrst's choices where the public code
(github.com/db-Lee/selfsup_dd) has a quirk, are in the README ("Method notes" and
"Reproduce the paper").
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from krrst.augment import (
    CropFlipParams,
    apply_crop_flip,
    check_fixed_augmentations,
    fixed_augment_all,
    normalize,
    sample_crop_flip,
)
from krrst.baselines import high_loss_indices, kmeans_indices
from krrst.distilled import DistilledSet
from krrst.features import batched_features
from krrst.formats import fit_to_source
from krrst.infra import io, run_state
from krrst.infra.config import check_numeric_fields, config_to_dict, resolve_device
from krrst.infra.distributed import DistributedContext, all_reduce_mean_, current_context
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch
from krrst.infra.progress import progress_bar
from krrst.infra.run_state import RunningMean, RunState, draw_seed, every, stage_seeds
from krrst.infra.speed import SpeedSettings, check_speed_fields, reference_speed  # SpeedSettings: re-exported
from krrst.losses import krr_st_loss, krr_st_loss_with_info
from krrst.models import fresh_model, model_options
from krrst.parameterize import (
    PARAMETERIZATIONS,
    AugmentationPredictor,
    augmentation_predictor_loss,
    valid_pyramid_levels,
)
from krrst.teacher import check_teacher_features, teacher_features, teacher_identity

CHECKPOINT_NAME = run_state.CHECKPOINT_NAME  # the run folder's files, as the pipeline and the report find them
LOSS_CSV_NAME = run_state.LOSS_CSV_NAME
DISTILLED_NAME = "distilled.safetensors"
LOSS_PLOT_NAME = "loss.png"
PREVIEW_NAME = "preview.png"
LOSS_CSV_FIELDS = ("step", "loss", "lr", "val_loss", "val_reference", "elapsed_s")
KERNEL_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Fields that change neither the trajectory of X_s, Y_s nor the random streams,
# so a resumed run may use other values than the checkpointed one.
# `channels_last` and `compile` change the arithmetic's order only (float rounding), not the method.
RESUMABLE_CHANGES = (
    "log_every", "checkpoint_every", "validate_every", "validation_models", "validation_images",
    "validation_train_steps", "channels_last", "compile", "compile_mode",
)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of KRR-ST distillation; defaults are the paper's CIFAR-100 setting.

    Learning rates: the public code keeps `X_s` in raw [0, 1] pixels and
    optimises it with AdamW at lr 1e-4. Here `X_s` is kept normalised
    (`x = (x_raw - mean) / std`), the space the networks see for real images.
    Adam's step is invariant to the scale of the gradient but is measured in
    parameter units, so a raw-pixel lr of η moves normalised pixels of channel
    c by η / std_c: each channel of `X_s` gets lr `image_lr / std_c` (about
    1e-4 / 0.26 ≈ 3.8e-4 for CIFAR), which reproduces the public code's updates
    exactly (up to Adam's ε). `image_lr` is therefore given in the public
    code's raw-pixel units. `Y_s` is in the teacher's units in both, and the
    public code uses one lr for both, hence `target_lr` = the same 1e-4.

    `reference_config(config)` turns every speed knob off (no cache, float32,
    contiguous, no compile): the straightforward implementation, kept as the
    oracle the fast path is tested against (tests/test_distill.py).
    """

    # --- the algorithm (Lee et al., ICLR 2024)
    # m, the number of synthetic images
    num_images: int = 1000
    # the distillation network f (widths / norm / image_size go to create_model where the arch takes them)
    arch: str = "convnet3"
    widths: tuple[int, ...] = (128, 256, 512)
    norm: Literal["batch", "instance", "none"] = "batch"
    # the side of the source images
    image_size: int = 32
    # outer steps; the lr decays linearly to final_lr_factor x lr over them
    steps: int = 160_000
    # real images per outer step (the global batch under torchrun)
    batch_size: int = 1024
    # AdamW for X_s, in the public code's raw-pixel units (see above), and for Y_s, in the teacher's units
    image_lr: float = 1e-4
    target_lr: float = 1e-4
    weight_decay: float = 0.0
    final_lr_factor: float = 1e-3
    # λ = ridge · trace(K_ss) in the inner ridge regression
    ridge: float = 1e-6
    # dtype of the m x m kernel and its Cholesky solve
    kernel_dtype: Literal["float32", "float64"] = "float32"
    # zero padding of the real batch's random crop (then a horizontal flip)
    padding: int = 4
    # L models, each re-initialised after T = pool_steps steps (0: a fresh random network at every step)
    pool_size: int = 10
    pool_steps: int = 1000
    # the pool's SGD on MSE(f(X_s), Y_s)
    pool_lr: float = 0.1
    pool_momentum: float = 0.9
    pool_weight_decay: float = 1e-3
    # False: the public code's quirk (the counter stays at T, so every later pick of that model is untrained)
    pool_counter_reset: bool = True
    # seeds every random choice of the run
    seed: int = 0
    # --- logging, in outer steps (0: never validate; checkpoint only at the end)
    log_every: int = 100
    checkpoint_every: int = 2000
    validate_every: int = 1000
    # the validation signal: KRR loss on held-out images, over networks with fixed seeds (ValidationSignal),
    # freshly initialised or first trained validation_train_steps steps on the current set as the pool's are
    validation_models: int = 3
    validation_images: int = 1000
    validation_train_steps: int = 0
    # --- speed (reference_config turns every knob off)
    # K > 0: the teacher's features of K crop/flip views per source image, computed once (N x K x d fp16 on the
    # device), each step replaying one: the teacher leaves the loop, at the price of K fixed augmentations per image
    teacher_cache_views: int = 0
    # the networks' forward passes under bfloat16 autocast (kernel and solve stay in kernel_dtype); auto = bf16 on
    # CUDA, float32 elsewhere (CPU bf16 is slower)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # NHWC memory layout for the networks and their inputs (auto = on)
    channels_last: Literal["auto", "on", "off"] = "auto"
    # torch.compile the step's features + loss (the pool model's weights enter through functional_call, so
    # re-initialised models reuse the graph); reduce-overhead replays it as CUDA graphs
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    # --- beyond the paper
    # what is learnt (krrst.parameterize): pixels (the paper), basis (Boost-DD: coefficients over PCA-initialised
    # learnt bases of image_rank images and target_rank targets) or pyramid (each image a sum of learnt levels of
    # sides pyramid_levels, strictly increasing in [1, image_size])
    parameterization: Literal["pixels", "basis", "pyramid"] = "pixels"
    image_rank: int = 0
    target_rank: int = 0
    pyramid_levels: tuple[int, ...] = (8, 16)
    # the real images X_s starts from: random (the paper), kmeans (nearest to k-means centroids in teacher space) or
    # high-loss (the hardest to regress for briefly trained students, MKDT)
    init: Literal["random", "kmeans", "high-loss"] = "random"
    # Boost-DD's fixed views, e.g. ("rot90", "rot180", "rot270"): the support also holds these views of X_s, their
    # targets predicted from Y_s by an AugmentationPredictor (hidden width predictor_hidden, 0: linear; Adam at
    # predictor_lr) fitted to the teacher on the same views of real images; the set holds every view
    fixed_augmentations: tuple[str, ...] = ()
    predictor_hidden: int = 0
    predictor_lr: float = 1e-4
    # learned (the paper): the set carries the learned Y_s; teacher: the teacher's representations of the final
    # images, within the set's storage (at CPU scale the learned targets drift and cost accuracy: docs/results.md)
    final_targets: Literal["learned", "teacher"] = "learned"

    def __post_init__(self) -> None:
        check_numeric_fields(self, "distill")  # finite, within float32: a config built in Python as from --set
        check_field_ranges(
            self, "distill",
            at_least_one=("num_images", "image_size", "batch_size", "pool_size", "log_every", "validation_images"),
            non_negative=("steps", "padding", "pool_steps", "checkpoint_every", "validate_every", "validation_models",
                          "validation_train_steps", "teacher_cache_views"),
            positive=("image_lr", "target_lr", "pool_lr"),
        )
        if not 0 < self.final_lr_factor <= 1:
            raise KrrstError(f"distill.final_lr_factor must be in (0, 1], got {self.final_lr_factor}")
        if self.ridge < 0:
            raise KrrstError(f"distill.ridge must be >= 0, got {self.ridge}")
        check_speed_fields(self, "distill")
        compile_modes = ("default", "reduce-overhead", "max-autotune")
        if self.compile_mode not in compile_modes:
            raise KrrstError(f"distill.compile_mode={self.compile_mode!r} is not valid; expected one of "
                             f"{', '.join(compile_modes)}")
        PARAMETERIZATIONS.get(self.parameterization, "distill.parameterization")
        if self.parameterization == "basis" and (self.image_rank < 1 or self.target_rank < 1):
            raise KrrstError("distill.parameterization=basis needs distill.image_rank >= 1 and "
                             "distill.target_rank >= 1")
        if self.parameterization == "pyramid" and not valid_pyramid_levels(self.pyramid_levels, self.image_size):
            raise KrrstError(f"distill.pyramid_levels must be strictly increasing sides in [1, distill.image_size="
                             f"{self.image_size}], e.g. 8,16; got {','.join(map(str, self.pyramid_levels)) or 'none'}")
        if self.init not in ("random", "kmeans", "high-loss"):
            raise KrrstError(f"distill.init={self.init!r} is not valid; expected random, kmeans or high-loss")
        if self.fixed_augmentations:
            check_fixed_augmentations(self.fixed_augmentations)
            if self.teacher_cache_views > 0:
                raise KrrstError("distill.fixed_augmentations cannot be combined with distill.teacher_cache_views > 0")
        if self.final_targets not in ("learned", "teacher"):
            raise KrrstError(f"distill.final_targets={self.final_targets!r} is not valid; expected learned or teacher")
        if self.predictor_hidden < 0 or not self.predictor_lr > 0:
            raise KrrstError("distill.predictor_hidden must be >= 0 and distill.predictor_lr > 0")
        if self.kernel_dtype not in KERNEL_DTYPES:
            raise KrrstError(f"distill.kernel_dtype={self.kernel_dtype!r} is not valid; expected float32 or float64")
        if self.teacher_cache_views > 0 and 2 * self.padding > 255:
            raise KrrstError("distill.teacher_cache_views needs distill.padding <= 127 (offsets are cached as uint8), "
                             f"got {self.padding}")


def reference_config(config: DistillConfig) -> DistillConfig:
    """`config` with every speed knob off: the straightforward path the fast one is checked against."""
    return dataclasses.replace(reference_speed(config), teacher_cache_views=0, compile=False)


class _Features(nn.Module):
    """`net.forward_features` as a module's forward, so `functional_call` can drive it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images)


def make_step_loss(
    config: DistillConfig, speed: SpeedSettings, template: nn.Module
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The per-step loss: `(model, X_s, Y_s, X_t, G_t) -> (loss, cholesky info)`.

    Features of `X_s` with gradient and of the real batch `X_t` without
    (their gradient is never used), then `krr_st_loss`. The Cholesky status
    comes back as a tensor instead of being checked here, so the step has no
    host-device synchronisation; the loop checks it when it logs or saves.
    With `speed.compile`, the function is `torch.compile`d once over a private
    copy of `template` (a network of the pool's architecture) whose weights and
    buffers are replaced by each picked model's (`torch.func.functional_call`)
    and whose mode follows the picked model's, so the compiled step computes
    exactly what the reference path computes and, in eval mode, writes nothing.
    """
    loss_from_features = functools.partial(krr_st_loss_with_info, ridge=config.ridge,
                                           kernel_dtype=KERNEL_DTYPES[config.kernel_dtype])

    if not speed.compile:
        def step_loss(model, synthetic_images, synthetic_targets, real_images, real_targets):
            synthetic_features = speed.forward(model.forward_features, synthetic_images)
            with torch.no_grad():
                real_features = speed.forward(model.forward_features, real_images)
            return loss_from_features(synthetic_features, synthetic_targets, real_features, real_targets)

        return step_loss

    # A private copy: the pool trains (and re-initialises) its own models, and a shared template would carry their
    # train mode into the compiled forward, which would then use batch statistics and write them into the picked
    # model's running buffers through the aliases `functional_call` hands it.
    wrapper = _Features(copy.deepcopy(template)).eval()

    def functional_loss(weights, synthetic_images, synthetic_targets, real_images, real_targets):
        def features(images):
            return torch.func.functional_call(wrapper, weights, (images,))

        synthetic_features = speed.forward(features, synthetic_images)
        real_features = speed.forward(features, real_images).detach()
        return loss_from_features(synthetic_features, synthetic_targets, real_features, real_targets)

    compiled = torch.compile(functional_loss, dynamic=False, mode=speed.compile_mode)

    def compiled_step_loss(model, synthetic_images, synthetic_targets, real_images, real_targets):
        wrapper.train(model.training)  # the mode the reference path would run: the loop puts the picked model in eval
        weights = {f"net.{name}": value.detach() for name, value in model.state_dict(keep_vars=True).items()}
        return compiled(weights, synthetic_images, synthetic_targets, real_images, real_targets)

    return compiled_step_loss


# --------------------------------------------------------------------------- helpers


def check_field_ranges(config: Any, stage: str, *, at_least_one: tuple[str, ...] = (),
                       non_negative: tuple[str, ...] = (), positive: tuple[str, ...] = ()) -> None:
    """One line naming `stage.field` for the first field out of its range, checked in the arguments' order."""
    for names, in_range, expected in ((at_least_one, lambda value: value >= 1, ">= 1"),
                                      (non_negative, lambda value: value >= 0, ">= 0"),
                                      (positive, lambda value: value > 0, "> 0")):
        for name in names:
            if not in_range(getattr(config, name)):
                raise KrrstError(f"{stage}.{name} must be {expected}, got {getattr(config, name)}")


def network_options(config: Any) -> dict[str, Any]:
    """`widths`, `image_size`, `norm` of a stage config (distill, MKDT) for its `arch`, where the arch takes them."""
    accepted = model_options(config.arch)
    wanted = {"widths": config.widths, "image_size": config.image_size, "norm": config.norm}
    return {name: value for name, value in wanted.items() if name in accepted}


# --------------------------------------------------------------------------- the model pool


class ModelPool:
    """L feature extractors, each trained by full-batch MSE regression of `Y_s` from `X_s` (after FRePo).

    Every model has a linear head of size d (the teacher's output size) and
    its own SGD optimiser and step counter. `train_step(i, X_s, Y_s)` is the
    public code's `update`: a model whose counter has reached `steps_per_model`
    (T) is re-initialised (fresh weights and optimiser) instead of trained, and
    its counter returns to 0 (`counter_reset=True`, the intended schedule); with
    `counter_reset=False` the counter stays at T, so the model is re-initialised
    at every later update and every later pick of it is an untrained network
    (the public code's quirk). T = 0 re-initialises at every update: every pick
    is a fresh random network. All randomness (picks, warm-up lengths,
    initialisations) comes from the pool's own generator.
    """

    def __init__(self, arch: str, num_outputs: int, model_options: dict[str, Any] | None = None, size: int = 10,
                 steps_per_model: int = 1000, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-3,
                 counter_reset: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                 speed: SpeedSettings | None = None):
        self.arch, self.num_outputs, self.model_options = arch, num_outputs, dict(model_options or {})
        self.steps_per_model, self.counter_reset = steps_per_model, counter_reset
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.device = torch.device(device)
        self.speed = speed or SpeedSettings(None, torch.contiguous_format, False)
        self.generator = torch.Generator().manual_seed(seed)
        self.models: list[nn.Module] = [self._fresh_model() for _ in range(size)]
        self.optimizers = [self._optimizer(model) for model in self.models]
        self.counters = [0] * size

    def __len__(self) -> int:
        return len(self.models)

    def _fresh_model(self) -> nn.Module:
        model = fresh_model(self.arch, self.num_outputs, draw_seed(self.generator), **self.model_options)
        return model.to(self.device, memory_format=self.speed.memory_format)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               foreach=True)

    def _train_once(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        model, optimizer = self.models[index], self.optimizers[index]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(self.speed.forward(model, images), targets).backward()
        optimizer.step()

    def warm_up(self, images: torch.Tensor, targets: torch.Tensor, progress: bool = False) -> None:
        """Train model i for a random number of steps in [1, T) on the initial set (none when T < 2)."""
        if self.steps_per_model < 2:
            return
        lengths = torch.randint(1, self.steps_per_model, (len(self),), generator=self.generator).tolist()
        with progress_bar(sum(lengths), "pool warm-up", unit="step", enabled=progress) as bar:
            for index, length in enumerate(lengths):
                for _ in range(length):
                    self._train_once(index, images, targets)
                    bar.update()
                self.counters[index] = length

    def pick(self) -> int:
        """The index of a model drawn uniformly."""
        return int(torch.randint(0, len(self), (1,), generator=self.generator))

    def train_step(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One more full-batch SGD step of model `index` on the (detached) set, or its re-initialisation at T."""
        if self.counters[index] >= self.steps_per_model:
            self.models[index] = self._fresh_model()
            self.optimizers[index] = self._optimizer(self.models[index])
            if self.counter_reset:
                self.counters[index] = 0
            return
        self._train_once(index, images.detach(), targets.detach())
        self.counters[index] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": [model.state_dict() for model in self.models],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "counters": list(self.counters),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["models"]) != len(self):
            raise KrrstError(f"checkpoint has a pool of {len(state['models'])} models, config asks for {len(self)}")
        for index, (weights, optimizer_state) in enumerate(zip(state["models"], state["optimizers"])):
            self.models[index].load_state_dict(weights)
            self.optimizers[index] = self._optimizer(self.models[index])
            self.optimizers[index].load_state_dict(optimizer_state)
        self.counters = [int(count) for count in state["counters"]]
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------- real batches and the teacher's targets


class BatchOrder:
    """Indices of real images, epoch by epoch in a random order (as a shuffled DataLoader), of a fixed size.

    Unlike a DataLoader, an epoch's short last batch is completed from the next
    epoch's order, so every batch has `batch_size` images.
    """

    def __init__(self, num_images: int, batch_size: int, generator: torch.Generator):
        self.num_images, self.batch_size, self.generator = num_images, batch_size, generator
        self.order = torch.empty(0, dtype=torch.int64)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        parts, needed = [], self.batch_size
        while needed > 0:
            if self.cursor >= len(self.order):
                self.order, self.cursor = torch.randperm(self.num_images, generator=self.generator), 0
            parts.append(self.order[self.cursor : self.cursor + needed])
            self.cursor += len(parts[-1])
            needed -= len(parts[-1])
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.cursor = state["order"], int(state["cursor"])


class TeacherBatches:
    """The real batch `X_t` of each outer step and the teacher's targets `g(X_t)`.

    Each image is randomly cropped (zero padding, as torchvision) and flipped on
    uint8, then normalised, on the device. Under torchrun every rank draws the
    global batch's indices and parameters from the same generator and keeps its
    share (`shard`), so the union over ranks is the single process's batch.
    Variants (`CachedTeacherBatches`, `FixedViewBatches`) change where the views
    and their targets come from, behind the same `next()`.
    """

    def __init__(self, source_images: torch.Tensor, teacher: nn.Module, config: DistillConfig,
                 mean: tuple[float, ...], std: tuple[float, ...], generator: torch.Generator, shard: slice,
                 speed: SpeedSettings):
        self.source_images, self.teacher, self.mean, self.std = source_images, teacher, mean, std
        self.batch_size, self.padding, self.generator, self.shard, self.speed = (
            config.batch_size, config.padding, generator, shard, speed)
        self.device = source_images.device
        self.order = BatchOrder(len(source_images), config.batch_size, generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(X_t, g(X_t))`: this rank's share of the next real batch, normalised, and its targets."""
        indices = self.order.next().to(self.device, non_blocking=True)
        crop, views = self._crop_params(indices)
        crop = CropFlipParams(*(part[self.shard] for part in crop))
        images = apply_crop_flip(self.source_images[indices[self.shard]], crop, self.padding)
        images = normalize(images, self.mean, self.std)
        with torch.no_grad():
            return images, self._targets(images, indices[self.shard], views)

    def _crop_params(self, indices: torch.Tensor) -> tuple[CropFlipParams, torch.Tensor | None]:
        return sample_crop_flip(self.batch_size, self.padding, self.generator, self.device), None

    def _targets(self, images: torch.Tensor, indices: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        return self.speed.forward(self.teacher, images)

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint keeps of the batches, by entry: the order of the real images."""
        return {"batches": self.order}


class CachedTeacherBatches(TeacherBatches):
    """`TeacherBatches` replaying one of K fixed crop/flip views per image, whose targets were computed once.

    The teacher leaves the outer loop (`build_teacher_cache`), at the price of K
    fixed augmentations per image instead of fresh ones.
    """

    def __init__(self, *args: Any, cache: TeacherCache):
        super().__init__(*args)
        self.cache = cache

    def _crop_params(self, indices: torch.Tensor) -> tuple[CropFlipParams, torch.Tensor]:
        views = torch.randint(0, self.cache.features.shape[1], (self.batch_size,), generator=self.generator)
        views = views.to(self.device, non_blocking=True)
        return self.cache.crop_params(indices, views), views

    def _targets(self, images: torch.Tensor, indices: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        return self.cache.targets(indices, views[self.shard])


class FixedViewBatches(TeacherBatches):
    """Boost-DD's fixed views: each real image is shown in one view drawn at random, and the predictor of the
    views' targets takes one step on the same batch.

    The predictor (`AugmentationPredictor`) maps the teacher's representation of
    an image to its representations of the image's views; it takes one Adam step
    on `augmentation_predictor_loss` of every view of the batch (A + 1 teacher
    passes), its gradient averaged over ranks so every rank holds the same one.
    """

    def __init__(self, *args: Any, predictor: AugmentationPredictor, learning_rate: float, views: tuple[str, ...]):
        super().__init__(*args)
        self.predictor, self.views = predictor, views
        self.predictor_optimizer = torch.optim.Adam(predictor.parameters(), lr=learning_rate)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, plain_targets = super().next()
        chosen = torch.randint(0, len(self.views), (self.batch_size,), generator=self.generator)[self.shard]
        batch = len(images)
        with torch.no_grad():
            view_images = fixed_augment_all(images, self.views)
            view_targets = torch.cat([self.speed.forward(self.teacher, chunk) for chunk in view_images.split(batch)])
        self.predictor_optimizer.zero_grad(set_to_none=True)
        augmentation_predictor_loss(self.predictor, view_targets, plain_targets).backward()
        all_reduce_mean_([p.grad for p in self.predictor.parameters()])
        self.predictor_optimizer.step()
        rows = chosen.to(self.device) * batch + torch.arange(batch, device=self.device)
        return view_images[rows], view_targets[rows]

    def checkpoint_parts(self) -> dict[str, Any]:
        return {**super().checkpoint_parts(), "predictor": self.predictor,
                "predictor_optimizer": self.predictor_optimizer}


class FixedViews:
    """A synthetic set whose KRR support also holds fixed views of its images (Boost-DD).

    `support()` gives every view of each image, view-major, with the identity
    view's targets `Y_s` and the others' predicted from `Y_s` by the predictor;
    everything else is the underlying set's. The set stored counts the
    predictor's weights.
    """

    def __init__(self, synthetic: Any, predictor: AugmentationPredictor, views: tuple[str, ...]):
        self.synthetic, self.predictor, self.views = synthetic, predictor, views

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.synthetic.support()
        return fixed_augment_all(images, self.views), self.predictor(targets)

    def project_targets(self, targets: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.synthetic.project_targets(targets))

    def storage_bytes(self) -> int:
        return self.synthetic.storage_bytes() + self.predictor.storage_bytes()

    def __getattr__(self, name: str) -> Any:  # images, targets, parameters, summary, state_dict: the set's own
        return getattr(self.synthetic, name)


# --------------------------------------------------------------------------- teacher-target cache


class TeacherCache(NamedTuple):
    """The teacher's features of K fixed crop/flip views of every source image (`build_teacher_cache`).

    `features`: N x K x d float16 on the device; `offsets_y`, `offsets_x`:
    N x K uint8 and `flips`: N x K bool, the `CropFlipParams` of each view.
    """

    features: torch.Tensor
    offsets_y: torch.Tensor
    offsets_x: torch.Tensor
    flips: torch.Tensor

    def crop_params(self, indices: torch.Tensor, views: torch.Tensor) -> CropFlipParams:
        """The crop/flip parameters of view `views[i]` of source image `indices[i]`, for `apply_crop_flip`."""
        return CropFlipParams(self.offsets_y[indices, views].long(), self.offsets_x[indices, views].long(),
                              self.flips[indices, views])

    def targets(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """The cached teacher features of those views, as float32 (B x d)."""
        return self.features[indices, views].float()


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, source_images: torch.Tensor, views: int, padding: int,
                        mean: tuple[float, ...], std: tuple[float, ...], generator: torch.Generator, *,
                        chunk: int = 512, progress: bool = False, speed: SpeedSettings | None = None) -> TeacherCache:
    """Teacher features of `views` (K) random crop/flip views of each uint8 source image, computed once.

    The parameters are drawn on the CPU from `generator` (K per image, in
    image order), so the cache is a function of the generator's seed: a
    resumed run rebuilds the same cache and needs no checkpoint of it. Each
    view goes through the same path as a real batch of the outer loop
    (`apply_crop_flip` on uint8, `normalize`, the teacher in eval mode,
    without gradient); features are stored as float16 on the images' device.

    Memory: N * K * d * 2 bytes for the features (e.g. CIFAR-100: 50,000 x
    K = 8 x 512 x 2 B = 410 MB), plus 3 bytes per view for the parameters.
    """
    if views < 1:
        raise KrrstError(f"distill.teacher_cache_views must be >= 1 to build a cache, got {views}")
    teacher.eval()
    num_images, device = len(source_images), source_images.device
    params = sample_crop_flip(num_images * views, padding, generator, "cpu")
    offsets_y, offsets_x = (p.view(num_images, views).to(torch.uint8).to(device) for p in params[:2])
    flips = params.flips.view(num_images, views).to(device)
    image_of_view = torch.arange(num_images, device=device).repeat_interleave(views)
    # every view's parameters, K per image in image order, as the chunks take them
    flat = CropFlipParams(offsets_y.view(-1).long(), offsets_x.view(-1).long(), flips.view(-1))
    features: torch.Tensor | None = None
    total = num_images * views
    with progress_bar(total, "teacher cache", unit="view", enabled=progress) as bar:
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            crop = CropFlipParams(*(part[start:stop] for part in flat))
            batch = normalize(apply_crop_flip(source_images[image_of_view[start:stop]], crop, padding), mean, std)
            output = speed.forward(teacher, batch) if speed is not None else teacher(batch)
            if output.dim() != 2:
                raise KrrstError(f"teacher must output N x d features, got shape {tuple(output.shape)}")
            if features is None:
                features = torch.empty(total, output.shape[1], dtype=torch.float16, device=device)
            features[start:stop] = output.to(torch.float16)
            bar.update(stop - start)
    return TeacherCache(features.view(num_images, views, -1), offsets_y, offsets_x, flips)


# --------------------------------------------------------------------------- validation signal


class ValidationSignal:
    """KRR loss of predicting the teacher's features of held-out images from the current set.

    Uses `validation_models` networks of the distillation architecture with
    fixed seeds (derived from the run's seed only), so values are comparable
    across steps, resumes and runs with the same seed. With
    `validation_train_steps` = 0 they are freshly initialised, in eval mode;
    with k > 0 each is first trained for k full-batch steps on the current set
    as the pool trains its models (SGD at `pool_lr` on MSE(f(X_s), Y_s)), so
    the signal sees networks like the ones the set meets. `reference` is the
    loss of the mean predictor (every held-out target predicted by their mean):
    a value near it means the set predicts nothing.
    """

    def __init__(self, config: DistillConfig, heldout_images: torch.Tensor, heldout_targets: torch.Tensor, seed: int):
        generator, options = torch.Generator().manual_seed(seed), network_options(config)
        self.config, self.train_steps = config, config.validation_train_steps
        outputs = heldout_targets.shape[1] if self.train_steps else None  # a regression head to train through
        self.models = [
            fresh_model(config.arch, outputs, draw_seed(generator), **options).to(heldout_images.device).eval()
            for _ in range(config.validation_models)
        ]
        self.heldout_images, self.targets = heldout_images, heldout_targets
        # Fresh networks are fixed, so their held-out features are computed once.
        self.heldout_features = None if self.train_steps else [
            batched_features(model.forward_features, heldout_images) for model in self.models]
        self.ridge, self.kernel_dtype = config.ridge, KERNEL_DTYPES[config.kernel_dtype]
        mean_prediction = heldout_targets.mean(0, keepdim=True).expand_as(heldout_targets)
        self.reference = F.mse_loss(mean_prediction, heldout_targets).item()

    def _trained(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> nn.Module:
        """A copy of `model` after `train_steps` of the pool's SGD on the set, in eval mode."""
        model = copy.deepcopy(model).train()
        config = self.config
        optimizer = torch.optim.SGD(model.parameters(), lr=config.pool_lr, momentum=config.pool_momentum,
                                    weight_decay=config.pool_weight_decay)
        with torch.enable_grad():
            for _ in range(self.train_steps):
                optimizer.zero_grad(set_to_none=True)
                F.mse_loss(model(images), targets).backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def __call__(self, synthetic_images: torch.Tensor, synthetic_targets: torch.Tensor) -> float:
        images, targets = synthetic_images.detach(), synthetic_targets.detach()
        losses = []
        for index, model in enumerate(self.models):
            if self.train_steps:
                model = self._trained(model, images, targets)
                heldout_features = batched_features(model.forward_features, self.heldout_images)
            else:
                heldout_features = self.heldout_features[index]
            synthetic_features = batched_features(model.forward_features, images)
            losses.append(krr_st_loss(synthetic_features, targets, heldout_features, self.targets, self.ridge,
                                      self.kernel_dtype))
        return torch.stack(losses).mean().item()


def _write_loss_plot(path: Path, history: list[dict[str, Any]]) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axis = figure.add_subplot()
    for key, label, style in (("loss", "training loss", "-"), ("val_loss", "validation loss", "o-"),
                              ("val_reference", "mean predictor (held-out)", "--")):
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if points:
            axis.plot(*zip(*points), style, label=label, markersize=3)
    axis.set_xlabel("outer step")
    axis.set_ylabel("MSE")
    if any(row.get("loss") for row in history):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    if history:
        axis.legend()
    figure.tight_layout()
    with io.atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# --------------------------------------------------------------------------- the outer step


def outer_step(synthetic: Any, pool: ModelPool, real_images: torch.Tensor, real_targets: torch.Tensor,
               step_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
               watch: DivergenceWatch,
               reduce_gradients: Callable[[list[torch.Tensor]], None] = all_reduce_mean_) -> torch.Tensor:
    """One KRR-ST outer step (Lee et al., ICLR 2024, Algorithm 1); returns the loss, on the device.

    A network f drawn from the pool, in eval mode, maps the support set `X_s`
    (with gradient) and the real batch `X_t` (without) to features; ridge
    regression fitted on `(f(X_s), Y_s)` predicts the teacher's `g(X_t)`
    (`krrst.losses.krr_st_loss`, through `step_loss`, the fast path of
    `make_step_loss`). `X_s` and `Y_s` take one optimiser step on that loss,
    then f takes one SGD step of its own on the updated set.
    """
    index = pool.pick()
    model = pool.models[index].eval()                         # f: running BatchNorm statistics, as the public code
    support_images, support_targets = synthetic.support()     # X_s (m, C, H, W), Y_s (m, d)
    watch.inputs(real_targets, support_images, support_targets, model)
    loss, info = step_loss(model, support_images, support_targets, real_images, real_targets)
    watch.outcome(info, loss)
    parameters = synthetic.parameters()
    gradients = torch.autograd.grad(loss, parameters)         # the set's only: f takes no gradient from this loss
    reduce_gradients(gradients)                               # under torchrun: the global batch's mean
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient
    optimizer.step()
    with torch.no_grad():
        support_images, support_targets = synthetic.support()
    pool.train_step(index, support_images, support_targets)  # MSE(f(X_s), Y_s), or a fresh f after T steps
    return loss.detach()


# --------------------------------------------------------------------------- divergence


class DivergenceWatch:
    """The first step with non-finite teacher targets, set, pool model, a failed Cholesky solve or a non-finite
    loss, kept on the device (reading them would synchronise every step); `check` reads them at log points.
    """

    CAUSES = ("teacher", "set", "pool", "solve", "loss")  # their order within a step: inputs, then solve, then loss

    def __init__(self, config: DistillConfig, cached: bool, device: torch.device):
        self.config, self.cached = config, cached
        self.watches = {cause: LossWatch("distillation", "", device) for cause in self.CAUSES}
        self.step = self.checked = 0

    def inputs(self, real_targets: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> None:
        self.watches["teacher"].note(~torch.isfinite(real_targets).all(), self.step)
        self.watches["set"].note(~(torch.isfinite(images).all() & torch.isfinite(targets).all()), self.step)
        weights = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        # one fused norm of every float weight and buffer, a device bool: no sync
        self.watches["pool"].note(~torch.isfinite(torch.nn.utils.get_total_norm(weights, foreach=True)), self.step)

    def outcome(self, info: torch.Tensor, loss: torch.Tensor) -> None:
        self.watches["solve"].note(info != 0, self.step)
        self.watches["loss"].update(loss, self.step)

    def check(self, step: int) -> None:
        """Stop at the first problem since the start, naming its first cause; never checkpoint past it."""
        events = sorted((found[0], order, cause) for order, (cause, watch) in enumerate(self.watches.items())
                        if (found := watch.first()) is not None)
        if events:
            first_step, _, cause = events[0]
            raise KrrstError(self._diagnosis(cause, first_step, step))
        self.checked = step

    def _diagnosis(self, cause: str, step: int, now: int) -> str:
        config, saved = self.config, "nothing was saved from the diverged state"
        if cause == "teacher":
            where = " (cached in float16 by distill.teacher_cache_views: set it to 0)" if self.cached else ""
            return (f"distillation stopped: the teacher's features of the real batch at step {step} hold NaN or inf"
                    f"{where}; the teacher is at fault, not the distillation settings; {saved}")
        if cause == "set":
            return (f"distillation diverged: the synthetic set held NaN or inf at step {step}; likely cause: "
                    f"distill.image_lr / distill.target_lr too high; {saved}")
        if cause == "pool":
            return (f"distillation diverged: the pool model picked at step {step} held NaN or inf weights, so its "
                    f"features were; likely cause: distill.pool_lr too high for the set's scale (or distill.image_lr"
                    f" / target_lr so high that the set outgrew it); {saved}")
        if cause == "solve":
            return (f"distillation stopped: the kernel matrix was not positive definite at some step in "
                    f"({self.checked}, {now}] (m={config.num_images}, ridge={config.ridge}, kernel_dtype="
                    f"{config.kernel_dtype}); increase distill.ridge or use distill.kernel_dtype=float64")
        loss = self.watches["loss"].first()
        return (f"distillation diverged: the loss was {loss[1] if loss else 'NaN'} at step {step}; likely cause: "
                f"distill.image_lr / distill.target_lr too high for distill.batch_size; {saved}")


# --------------------------------------------------------------------------- setting a run up


def _outer_optimizer(synthetic: Any, config: DistillConfig, std: tuple[float, ...]) -> torch.optim.AdamW:
    """AdamW over the synthetic set's parameter groups (`image_lr` in raw-pixel units, see `DistillConfig`)."""
    # one fused kernel on CUDA; CPU takes the multi-tensor path (the update is a tiny share of a step)
    kernel = {"fused": True} if synthetic.parameters()[0].is_cuda else {"foreach": True}
    return torch.optim.AdamW(synthetic.param_groups(config.image_lr, config.target_lr, std),
                             weight_decay=config.weight_decay, **kernel)


def _lr_factor(config: DistillConfig, step: int) -> float:
    """Linear from 1 to `final_lr_factor` over the run, as the public code's LinearLR."""
    return 1.0 - (1.0 - config.final_lr_factor) * min(step, config.steps) / max(config.steps, 1)


def unused_fields(config: DistillConfig) -> tuple[str, ...]:
    """Fields `config` never reads: the options of a parameterisation or of fixed views it does not use.

    Left out of the resume check and of the pipeline's stage fingerprint, so
    setting one cannot refuse or re-run a distillation it does not change.
    """
    unused = [field for name, kind in PARAMETERIZATIONS.items() if name != config.parameterization
              for field in kind.config_fields.values()]
    if not config.fixed_augmentations:
        unused += ["predictor_hidden", "predictor_lr"]
    return tuple(unused)


def _images_of(value: Any, what: str) -> torch.Tensor:
    images = getattr(value, "images", value)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise KrrstError(f"{what} must be an ImageSet or a uint8 N x C x H x W tensor")
    return images


def source_tensors(source: Any, config: Any, device: torch.device, stage: str = "distill"):
    """The source's uint8 images on the device, its normalisation and name, checked against a distillation
    config's `image_size` and `num_images` (KRR-ST's or MKDT's: `stage` names its options in the errors)."""
    if not all(hasattr(source, name) for name in ("images", "mean", "std")):
        raise KrrstError(f"source must be an ImageSet (uint8 images with mean/std), got {type(source).__name__}")
    images = _images_of(source, "source").to(device)
    num_source, _, height, width = images.shape
    if height != config.image_size or width != config.image_size:
        raise KrrstError(f"source images are {height}x{width} but {stage}.image_size={config.image_size}; "
                         f"load the source at that size or set {stage}.image_size={height}")
    if config.num_images > num_source:
        raise KrrstError(f"{stage}.num_images={config.num_images} exceeds the {num_source} source images")
    mean, std = tuple(float(v) for v in source.mean), tuple(float(v) for v in source.std)
    return images, mean, std, str(getattr(source, "name", ""))


# Independent seeds of one run, drawn in this order from distill.seed (one added at the end changes none of these).
SEED_NAMES = ("data", "pool", "validation", "heldout", "cache", "init", "predictor")


def _run_seeds(seed: int) -> dict[str, int]:
    return dict(zip(SEED_NAMES, stage_seeds(seed, len(SEED_NAMES))))


def initial_indices(num_source: int, config: DistillConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The indices of the m real images `X_s` starts from, as `distill` draws them.

    The random-subset baseline uses the same images, so that the two sets
    differ only in what distillation did to them.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(_run_seeds(config.seed)["data"])
    return torch.randperm(num_source, generator=generator)[: config.num_images]


def select_initial_indices(source_images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                           teacher: nn.Module, config: DistillConfig, generator: torch.Generator, *,
                           device: torch.device, progress: bool = False) -> torch.Tensor:
    """The m real images `X_s` starts from, by `config.init` (random, kmeans or high-loss).

    The random draw is always made from `generator` first, so that the data
    stream after it is the same whatever the initialisation.
    """
    indices = initial_indices(len(source_images), config, generator)
    if config.init == "random":
        return indices

    init_seed = _run_seeds(config.seed)["init"]
    features = teacher_features(teacher, source_images, mean, std, 512, device, progress)
    check_teacher_features(teacher, features, f"the {len(features):,} source images ({config.init} init)")
    if config.init == "kmeans":
        return kmeans_indices(features, config.num_images, seed=init_seed, progress=progress).cpu()
    return high_loss_indices(source_images, features, config.num_images, mean=mean, std=std, arch=config.arch,
                             arch_options=network_options(config), seed=init_seed, device=device,
                             progress=progress).cpu()


@dataclasses.dataclass
class _Run:
    """What a distillation run learns and draws from: everything its checkpoint holds."""

    synthetic: Any  # a parameterisation (`krrst.parameterize`), or `FixedViews` around one
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pool: ModelPool
    batches: TeacherBatches
    data_generator: torch.Generator
    validation: ValidationSignal | None
    loss_mean: RunningMean

    def parts(self) -> dict[str, Any]:
        """The checkpoint's entries and the objects they restore (the fixed views' predictor goes with the batches)."""
        return {"synthetic": self.synthetic, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "pool": self.pool, **self.batches.checkpoint_parts()}

    def state_dict(self) -> dict[str, Any]:
        return {**{name: part.state_dict() for name, part in self.parts().items()},
                "data_generator": self.data_generator.get_state(), **self.loss_mean.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if "synthetic" not in saved:  # pixel runs from before parameterisations kept images/targets at the top level
            saved = {**saved, "synthetic": {"images": saved["images"], "targets": saved["targets"]}}
        for name, part in self.parts().items():
            part.load_state_dict(saved[name])
        self.data_generator.set_state(saved["data_generator"])
        self.loss_mean.load_state_dict(saved)


def _set_up(source_images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], teacher: nn.Module,
            config: DistillConfig, speed: SpeedSettings, shard: slice, heldout: Any, progress: bool) -> _Run:
    """The synthetic set (m real images chosen by `config.init`, their teacher features), its optimiser and
    schedule, the model pool, the real batches (fresh, cached or fixed views) and the validation signal."""
    device, seeds = source_images.device, _run_seeds(config.seed)
    data_generator = torch.Generator().manual_seed(seeds["data"])
    initial = select_initial_indices(source_images, mean, std, teacher, config, data_generator, device=device,
                                     progress=progress).to(device)
    images = normalize(source_images[initial], mean, std)
    targets = batched_features(teacher, images)
    check_teacher_features(teacher, targets, f"the {len(targets):,} initial images")
    synthetic = PARAMETERIZATIONS.get(config.parameterization).from_config(images, targets, config)
    optimizer = _outer_optimizer(synthetic, config, std)
    batch_args = (source_images, teacher, config, mean, std, data_generator, shard, speed)
    if config.fixed_augmentations:
        views = check_fixed_augmentations(("identity", *config.fixed_augmentations), *images.shape[2:])
        predictor = AugmentationPredictor(targets.shape[1], views, config.predictor_hidden or None,
                                          generator=torch.Generator().manual_seed(seeds["predictor"])).to(device)
        synthetic = FixedViews(synthetic, predictor, views)
        batches = FixedViewBatches(*batch_args, predictor=predictor, learning_rate=config.predictor_lr, views=views)
    elif config.teacher_cache_views > 0:
        cache = build_teacher_cache(teacher, source_images, config.teacher_cache_views, config.padding, mean, std,
                                    torch.Generator().manual_seed(seeds["cache"]), progress=progress, speed=speed)
        batches = CachedTeacherBatches(*batch_args, cache=cache)
    else:
        batches = TeacherBatches(*batch_args)
    pool = ModelPool(config.arch, targets.shape[1], network_options(config), config.pool_size, config.pool_steps,
                     lr=config.pool_lr, momentum=config.pool_momentum, weight_decay=config.pool_weight_decay,
                     counter_reset=config.pool_counter_reset, seed=seeds["pool"], device=device, speed=speed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step))
    validation = _validation(config, heldout, source_images, mean, std, teacher, seeds)
    return _Run(synthetic, optimizer, scheduler, pool, batches, data_generator, validation, RunningMean(device))


def _validation(config: DistillConfig, heldout: Any, source_images: torch.Tensor, mean: tuple[float, ...],
                std: tuple[float, ...], teacher: nn.Module, seeds: dict[str, int]) -> ValidationSignal | None:
    """The validation signal on at most `validation_images` held-out images (or none)."""
    if heldout is None or config.validation_models == 0:
        return None
    heldout_images = _images_of(heldout, "heldout")
    if heldout_images.shape[1:] != source_images.shape[1:]:
        raise KrrstError(f"heldout images are {tuple(heldout_images.shape[1:])}, source images "
                         f"{tuple(source_images.shape[1:])}")
    if len(heldout_images) > config.validation_images:
        chosen = torch.randperm(len(heldout_images), generator=torch.Generator().manual_seed(seeds["heldout"]))
        heldout_images = heldout_images[chosen[: config.validation_images]]
    heldout_images = normalize(heldout_images.to(source_images.device), mean, std)
    heldout_targets = batched_features(teacher, heldout_images)
    check_teacher_features(teacher, heldout_targets, f"the {len(heldout_targets):,} held-out images")
    return ValidationSignal(config, heldout_images, heldout_targets, seeds["validation"])


# --------------------------------------------------------------------------- the outer loop


def distill(source: Any, teacher: nn.Module, config: DistillConfig | None = None, *, out_dir: str | Path | None = None,
            resume: bool = False, device: str | torch.device | None = None, heldout: Any = None, progress: bool = True,
            stop_at_step: int | None = None, distributed: DistributedContext | None = None) -> DistilledSet:
    """Distil `source` into `config.num_images` synthetic images with teacher-representation targets (KRR-ST).

    Each step: the next real batch and its teacher targets (`TeacherBatches`), one `outer_step`, the lr schedule;
    a row of `loss.csv` every `log_every` steps (the validation signal every `validate_every`), a checkpoint every
    `checkpoint_every`.

    Args:
        source: an `ImageSet` (uint8 N x 3 x H x W, `mean`, `std`, `name`); `X_s` lives in its normalisation.
        teacher: `g`, normalised images -> d-dim features; moved to the device, in eval mode.
        config: `DistillConfig` (default: the paper's CIFAR-100 setting).
        out_dir: the run folder (checkpoint, `loss.csv`, `loss.png`, `preview.png`, `distilled.safetensors`);
            None writes nothing.
        resume: continue from the checkpoint in `out_dir` to the same `X_s`, `Y_s` as an uninterrupted run
            (bitwise on CPU); none there starts a new run.
        device: None/"auto" picks CUDA when available.
        heldout: real images never distilled on (`ImageSet` or uint8 tensor) for the validation signal; None: off.
        progress: a bar on a terminal, plain lines in a log file.
        stop_at_step: stop after this step (checkpointing it), as a kill would.
        distributed: under `torchrun` (default: the current group) each rank takes its share of every real batch
            (`batch_size` stays global) and the set's gradients are averaged, so the set, the pool and every random
            draw stay identical on all ranks; rank 0 writes; a checkpoint resumes with any number of ranks.
    """
    config = config or DistillConfig()
    if not isinstance(config, DistillConfig):
        raise KrrstError(f"config must be a DistillConfig, got {type(config).__name__}")
    device = resolve_device(device)
    context = distributed or current_context(device)
    shard = context.shard(config.batch_size, "distill.batch_size")
    source_images, mean, std, source_name = source_tensors(source, config, device)
    speed = SpeedSettings.resolve(config, device)
    # a library teacher sees its own input size and normalisation; its identity then covers that preprocessing
    teacher = fit_to_source(teacher, mean, std, config.image_size).to(device, memory_format=speed.memory_format).eval()
    identity = {"source": [source_name, len(source_images)], "teacher": teacher_identity(teacher)}
    with RunState("distill", out_dir, config=config, total_steps=config.steps, log_fields=LOSS_CSV_FIELDS,
                  resume=resume, resumable=RESUMABLE_CHANGES + unused_fields(config), identity=identity,
                  checkpoint_every=config.checkpoint_every, log_every=config.log_every, stop_at_step=stop_at_step,
                  progress=progress, context=context) as run:
        state = _set_up(source_images, mean, std, teacher, config, speed, shard, heldout, run.show_progress)
        if run.saved is not None:
            state.load_state_dict(run.saved)
        else:
            with torch.no_grad():
                support = state.synthetic.support()
            state.pool.warm_up(*support, run.show_progress)
        step_loss = make_step_loss(config, speed, state.pool.models[0])
        watch = DivergenceWatch(config, config.teacher_cache_views > 0, device)
        export = functools.partial(_export, state.synthetic, config, mean, std, source_name, teacher)

        if run.start_step == 0:
            _log_row(run, state, watch, config, 0)
        for step in run.steps():
            real_images, real_targets = state.batches.next()
            watch.step = step
            loss = outer_step(state.synthetic, state.pool, real_images, real_targets, step_loss, state.optimizer,
                              watch)
            state.scheduler.step()
            state.loss_mean.add(loss)
            if run.is_log_step(step) or every(step, config.validate_every):
                _log_row(run, state, watch, config, step)
            if run.is_checkpoint_step(step):
                _save(run, state, watch, export, step)
        if run.start_step == run.last_step and run.out_dir is not None:
            _save(run, state, watch, export, run.last_step)  # nothing ran: still leave a complete run folder
    return _finish(export(run.last_step), state.synthetic, config, teacher, run, device)


def _log_row(run: RunState, state: _Run, watch: DivergenceWatch, config: DistillConfig, step: int) -> None:
    """A row of `loss.csv`: the mean loss since the last row, the lr, and on validation steps the validation signal."""
    watch.check(step)
    loss = state.loss_mean.take(all_reduce_mean_)  # each rank summed its share's losses
    val_loss = reference = None
    if state.validation is not None and (step == config.steps or every(step, config.validate_every)):
        with torch.no_grad():
            val_loss, reference = state.validation(*state.synthetic.support()), state.validation.reference
    if loss is not None or val_loss is not None:
        run.log(step, loss=loss, lr=config.image_lr * _lr_factor(config, step), val_loss=val_loss,
                val_reference=reference)
        run.flush()


def _save(run: RunState, state: _Run, watch: DivergenceWatch, export: Callable[[int], DistilledSet],
          step: int) -> None:
    """A checkpoint, then the loss plot and a preview of the current images."""
    watch.check(step)  # never checkpoint a set updated through a failed solve or a NaN
    run.save(step, state.state_dict())

    def write_views(folder: Path) -> None:  # what a person looks at during a run (on the writing rank only)
        _write_loss_plot(folder / LOSS_PLOT_NAME, run.rows())
        export(step).preview(folder / PREVIEW_NAME)

    run.write(write_views)


def _export(synthetic: Any, config: DistillConfig, mean: tuple[float, ...], std: tuple[float, ...],
            source_name: str, teacher: nn.Module, step: int) -> DistilledSet:
    """The set as it stands: its support (every view), normalised images and targets, and what made it."""
    with torch.no_grad():
        images, targets = synthetic.support()
    return DistilledSet(
        images=images.detach().cpu(), targets=targets.detach().cpu(), mean=mean, std=std,
        target_kind="representation", method="krr-st", source=source_name,
        teacher_arch=getattr(teacher, "spec", {}).get("arch"),
        config={**config_to_dict(config), "synthetic": {
            **synthetic.summary(), "storage_bytes": synthetic.storage_bytes(), "views": list(synthetic.views)}},
        step=step,
    )


def _finish(result: DistilledSet, synthetic: Any, config: DistillConfig, teacher: nn.Module, run: RunState,
            device: torch.device) -> DistilledSet:
    """`final_targets=teacher` swaps in the teacher's view of the final images; a finished run saves its set."""
    if config.final_targets == "teacher":
        # The teacher's features of the final images as the set can store them, so that it stays what
        # `storage_bytes` counts: a basis set keeps their best rank-k_t fit (`project_targets`), and the fixed views'
        # targets come from the predictor applied to the images' targets, not from the teacher (not shipped).
        with torch.no_grad():
            images = synthetic.images().detach()
            features = batched_features(teacher, images.to(device)).float().to(images.device)
            result = dataclasses.replace(result, targets=synthetic.project_targets(features).cpu())
    teacher.to(memory_format=torch.contiguous_format)  # leave the caller's teacher as it came (Module.to is in place)
    if run.last_step == config.steps:
        run.write(lambda folder: result.save(folder / DISTILLED_NAME))
    return result
