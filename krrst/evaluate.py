"""The evaluation protocol: pre-train on a set, then fine-tune, linear-probe or distil knowledge.

A distilled set is only worth what it does downstream (see the README, "Reproduce the paper", and
docs/reproduce.md): `pretrain` a fresh network on the set, then `finetune` it, `linear_probe` its frozen
features (SGD, or MKDT's L-BFGS) or distil a target classifier through the set's images
(`knowledge_distillation`), on all labels or a `few_label_split`. `evaluate_set` chains them into one
results row (`krrst.results.result_row`); this module writes nothing: the caller stores rows with
`krrst.results.append_results`. Accuracies are fractions in [0, 1].

Normalisation: every network sees images normalised with the statistics of the dataset they come from (a
target with its own mean/std, as the authors' code does per dataset); distilled images are already
normalised with the source's.

Speed: the pre-training, fine-tuning and probe configs carry `precision` and `channels_last`
(`krrst.infra.speed`): by default networks and inputs are channels_last, forwards run under bf16 autocast
on CUDA only, losses are float32, and SGD/AdamW are fused on CUDA. `reference_speed(config)` is the
float32, contiguous reference path (tests/test_evaluate.py holds the fast path to it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from krrst.augment import crop_flip, normalize, strong_augment
from krrst.distilled import DistilledSet
from krrst.features import batched_features
from krrst.formats import is_library_arch, library_classifier, load_classifier_weights, read_classifier_file
from krrst.infra.config import check_numeric_fields, resolve_device
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch, check_finite
from krrst.infra.progress import progress_bar
from krrst.infra.speed import SpeedSettings, check_speed_fields, fused_options
from krrst.losses import soft_cross_entropy
from krrst.models import create_model, fresh_model, list_models, model_options, reset_head
from krrst.results import result_row

if TYPE_CHECKING:
    from krrst.data import ImageSet

PROTOCOLS = ("finetune", "linear", "kd")
KD_TEACHER_ARCH = "resnet18"
# "knowledge_distillation" is read as "kd", the name its rows carry
_PROTOCOL_ALIASES = {"knowledge_distillation": "kd"}


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pre-training on a distilled set (defaults: the paper's, for representation targets).

    Representation targets: MSE regression by SGD at a constant learning rate, no augmentation (as the
    authors' code). Hard labels (DSA/DM/MTT, random or k-means subsets with labels): cross-entropy by SGD,
    learning rate x0.1 at half the epochs (the authors' recipe). Soft labels (KIP/FRePo): AdamW (wd 0),
    linear warm-up then cosine (the authors' recipe: 10,000 iterations, batch 500, 500 warm-up steps).
    Label-based sets are augmented when `label_augment` is set: random crop + flip + DSA's colour jitter
    (brightness, saturation, contrast), which stands in for the full DSA augmentation of the authors' code
    (it also scales, rotates and cuts out).
    """

    # passes over the set (representations and hard labels)
    epochs: int = 1000
    batch_size: int = 256
    # SGD for representation targets
    lr: float = 0.1
    # SGD momentum, for representations and hard labels alike
    momentum: float = 0.9
    weight_decay: float = 1e-3
    # SGD for hard labels
    label_lr: float = 0.01
    label_weight_decay: float = 5e-4
    # AdamW for soft labels, for `soft_label_iterations` steps (whole epochs, rounded up)
    soft_label_lr: float = 3e-4
    soft_label_iterations: int = 10_000
    soft_label_batch_size: int = 500
    # linear warm-up steps before the cosine decay
    soft_label_warmup: int = 500
    # "mse" (the authors' code for these sets): regression of the learned labels, 0.5 * squared error summed
    # over classes, mean over the batch; "cross_entropy": soft cross-entropy against the labels (taken as
    # probabilities when every row is a distribution, else softmax-ed as logits)
    soft_label_loss: Literal["mse", "cross_entropy"] = "mse"
    # strong augmentation of label-based sets (crop + flip + DSA colour jitter); representations never
    label_augment: bool = True
    # zero padding of the random crop (pixels)
    padding: int = 4
    # the network's init, the batch order and the augmentation
    seed: int = 0
    # "auto": bf16 autocast on CUDA, float32 elsewhere (krrst.infra.speed)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # "auto" = on: networks and inputs in channels_last memory (krrst.infra.speed)
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        check_speed_fields(self, "pretrain")
        check_numeric_fields(self, "pretrain")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning every weight on a target (the paper's: 10,000 iterations; 5,000 for fine-grained sets).

    SGD with momentum and weight decay, cosine learning rate from `lr` to 0 over `iterations`, random crop
    (zero padding, in pixel space) + horizontal flip, batches drawn without replacement, epoch by epoch.
    """

    iterations: int = 10_000
    # the protocol krrst follows says 256; the authors' code uses 128
    batch_size: int = 256
    # peak of the cosine schedule
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # zero padding of the random crop (pixels)
    padding: int = 4
    # the head's init, the batch order, the augmentation and the few-label subset
    seed: int = 0
    # batch of the test pass
    eval_batch_size: int = 1024
    # speed knobs of krrst.infra.speed, for training and the test pass
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        check_speed_fields(self, "finetune")
        check_numeric_fields(self, "finetune")


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """Linear classifier on frozen features.

    `solver="lbfgs"` (MKDT's few-label probe) is multinomial logistic regression on the full feature matrix,
    minimising mean cross-entropy + `lbfgs_l2 * ||W||^2` (bias not penalised) with `torch.optim.LBFGS`,
    with a strong-Wolfe line search so that unnormalised features cannot make it diverge. An sklearn
    `LogisticRegression(C)` fit on n samples is the same problem with `lbfgs_l2 = 1 / (2 * C * n)`.
    """

    # solver "sgd" (the paper's check): SGD + cosine over `iterations`, in batches of `batch_size`
    iterations: int = 5000
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 0.0
    # "sgd" or "lbfgs"
    solver: Literal["sgd", "lbfgs"] = "sgd"
    # weight of ||W||^2 in the L-BFGS objective (MKDT's 1e-3)
    lbfgs_l2: float = 1e-3
    # L-BFGS steps of up to 20 inner iterations each (MKDT's 100 x 20)
    lbfgs_steps: int = 100
    # the SGD classifier's init and batch order, and the few-label subset
    seed: int = 0
    # batch of the feature extraction
    eval_batch_size: int = 1024
    # speed knobs of krrst.infra.speed, for the feature extraction; the features and the classifier are float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        check_speed_fields(self, "linear")
        check_numeric_fields(self, "linear")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Target-data-free knowledge distillation through the distilled images (the paper's KD experiment).

    The student (the network pre-trained on the set, with a fresh head) is
    trained with Adam `lr`, `epochs` passes over the set's images in batches
    of `batch_size`, cosine schedule, soft cross-entropy at `temperature`;
    each batch is strongly augmented (crop pad `padding` + flip + DSA colour
    jitter) and teacher and student see the same augmented batch. The
    no-pre-training baseline (`none`) has no set: its fresh student sees
    Gaussian noise instead, at `noise_lr`, as the authors' code does.

    The target-task teacher is a file (`teacher_path`, of architecture
    `teacher_arch`), or, without one, a fresh `teacher_arch` network trained
    on the target's train split with the `teacher_*` recipe (SGD, cosine,
    crop + flip; trained once per target and architecture, then reused).
    """

    # 1,000 epochs, batch 512, Adam (AdamW, wd 0) 1e-4: the authors' test_kd.py (test_epoch, test_batch_size,
    # test_lr, test_wd; github.com/db-Lee/selfsup_dd) and the paper's KD experiment
    epochs: int = 1000
    batch_size: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    # soft cross-entropy at T = 1: algorithms/zeroshot_kd.py, distillation_loss(T=1.0)
    temperature: float = 1.0
    # zero padding of the random crop (pixels); the strong augmentation stands in for DSA's
    padding: int = 4
    # lr of the no-pre-training student on Gaussian noise (test_kd.py: test_lr = 1e-3 for method "gaussian")
    noise_lr: float = 1e-3
    # the student's head init, the batch order and the augmentation
    seed: int = 0
    # batch of the test pass
    eval_batch_size: int = 1024
    # the target classifier's file (a state dict, weights-only); empty: krrst trains one on the target
    teacher_path: str = ""
    # its architecture: a registered model, or torchvision:NAME / timm:NAME for a file; empty: the one a krrst
    # file names, else KD_TEACHER_ARCH (the paper's teacher: a ResNet-18)
    teacher_arch: str = ""
    # the recipe krrst trains the teacher with (the authors ship their CIFAR-10 ResNet-18 without one):
    # the common CIFAR ResNet-18 recipe, 200 epochs of SGD 0.1, momentum 0.9, wd 5e-4, batch 128, cosine, crop + flip
    teacher_epochs: int = 200
    teacher_batch_size: int = 128
    teacher_lr: float = 0.1
    teacher_momentum: float = 0.9
    teacher_weight_decay: float = 5e-4
    # the trained teacher's init, batch order and augmentation
    teacher_seed: int = 0


# --------------------------------------------------------------------------- small helpers


def _check_positive(value: int | float, name: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise KrrstError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """One shuffled pass over n items in batches; a trailing batch of one joins the previous (BatchNorm)."""
    order = torch.randperm(n, generator=generator).to(device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def _steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `_epoch_batches` makes of n items (a trailing batch of one joins the previous)."""
    return len(_epoch_batches(n, batch_size, _seeded_generator(0), torch.device("cpu"))) if n else 0


def _batch_stream(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled batches, epoch after epoch (each item once per epoch)."""
    while True:
        yield from _epoch_batches(n, batch_size, generator, device)


def _seeded_reset_head(model: nn.Module, num_outputs: int | None, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return reset_head(model, num_outputs)


def _trainable_copy(model: nn.Module, num_outputs: int, seed: int) -> nn.Module:
    """A copy of `model` with a fresh head (init fixed by `seed`) and every weight trainable, `model` untouched.

    Teachers come frozen (requires_grad False); fine-tuning and KD train every weight whatever the caller's flags.
    """
    network = copy.deepcopy(model).requires_grad_(True)
    _seeded_reset_head(network, num_outputs, seed)
    return network


def _cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def _train_loop(
    units: int, batches_of: Callable[[], list[torch.Tensor]], batch_loss: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None, bar: Any,
    watch: LossWatch, log_every: int, on_unit: Callable[[int, float], None] | None = None,
) -> float:
    """The loop of every training stage here: `units` epochs (or iterations), each an optimiser step (then a
    scheduler step) on `batch_loss(batch)` for every batch of `batches_of()`.

    The unit's mean loss goes to `watch`, which is checked, and to `bar`, every `log_every` units and at the
    last; `on_unit(unit, mean_loss)` is called after every unit (a device sync). Closes `bar`; returns the
    last loss shown.
    """
    shown = float("nan")
    try:
        for unit in range(units):
            batches, total = batches_of(), None  # never empty: an epoch has at least one batch
            for batch in batches:
                loss = batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                # on the loss's device; one batch per unit (fine-tuning, the probe) costs no extra kernel
                total = loss.detach() if total is None else total + loss.detach()
            mean_loss = total / len(batches) if len(batches) > 1 else total
            watch.update(mean_loss, unit + 1)
            log_point = unit % log_every == 0 or unit == units - 1
            if log_point or on_unit is not None:
                watch.check()
            if on_unit is not None:
                on_unit(unit, float(mean_loss))
            if log_point:
                shown = float(mean_loss)
                bar.set_postfix(loss=f"{shown:.4g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return shown


def _model_input_size(model: nn.Module) -> int | None:
    size = getattr(model, "image_size", None)
    if size is None and isinstance(getattr(model, "spec", None), dict):
        size = model.spec.get("image_size")
    return int(size) if size is not None else None


def _model_arch(model: nn.Module, default: str = "") -> str:
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and spec.get("arch"):
        return str(spec["arch"])
    return default or type(model).__name__


def resize_images(images: torch.Tensor, size: int, chunk_size: int = 2048) -> torch.Tensor:
    """Resize uint8 N x C x H x W images to size x size (bilinear, antialiased), keeping uint8.

    Returns `images` itself when they already have that size. Done in chunks
    on the images' device so a large target never needs a full float copy.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, images.shape[0], chunk_size):
        chunk = images[start : start + chunk_size].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk_size] = resized.round().clamp_(0, 255).to(torch.uint8)
    return out


def _progress_bar(total: int, desc: str, unit: str, progress: bool):
    return progress_bar(total, desc, unit=unit, enabled=progress, leave=False)


# --------------------------------------------------------------------------- labelled target data


def class_count(*sets: "ImageSet") -> int:
    """The number of classes of a labelled target (its class names, else the largest label + 1)."""
    names = getattr(sets[0], "class_names", None)
    if names:
        return len(names)
    return int(max(int(s.labels.max()) for s in sets if s.labels is not None and len(s.labels))) + 1


def few_label_split(labels: torch.Tensor, fraction: float, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of a class-balanced subset holding `fraction` of each class's examples (sorted, int64).

    Class c with n_c examples keeps round(fraction * n_c) of them (half up),
    at least one. The subset depends only on the labels, the fraction and the
    seed, so every method is evaluated on the same images (paired
    comparisons). Each class is shuffled once per seed and the first k_c are
    kept, so for one seed a smaller fraction's subset is inside a larger one's.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise KrrstError(f"label fraction must be in (0, 1], got {fraction!r}")
    labels = torch.as_tensor(labels).cpu().long()
    if labels.dim() != 1:
        raise KrrstError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if len(labels) and labels.min() < 0:
        raise KrrstError("labels must be non-negative class indices")
    num_classes = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
    if len(labels) and labels.max() >= num_classes:
        raise KrrstError(f"labels reach {int(labels.max())} but num_classes is {num_classes}")
    generator = _seeded_generator(seed)
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label, as_tuple=False).flatten()
        # Drawn for every class, even empty ones, so each class's shuffle depends only on the seed.
        order = torch.randperm(len(members), generator=generator)
        if len(members) == 0:
            continue
        keep = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[order[:keep]])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(chosen).sort().values


def protocol_name(protocol: str, label_fraction: float = 1.0) -> str:
    """`finetune`, `linear`, `kd`, or `finetune@P%` / `linear@P%` for a label fraction.

    `kd` takes no fraction: target-data-free KD uses no target label (its
    teacher is trained on the target's full train split, or comes from a file).
    """
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    if protocol not in PROTOCOLS:
        raise KrrstError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if not 0.0 < float(label_fraction) <= 1.0:
        raise KrrstError(f"label fraction must be in (0, 1], got {label_fraction!r}")
    if float(label_fraction) == 1.0:
        return protocol
    if protocol == "kd":
        raise KrrstError("kd (knowledge distillation) uses no target labels; a label fraction does not apply")
    return f"{protocol}@{float(label_fraction) * 100:g}%"


def _prepared_target(
    images_set: "ImageSet", what: str, size: int | None, device: torch.device, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (resized to `size`) and labels of a target split, on `device`."""
    if images_set.labels is None:
        raise KrrstError(f"{what} {images_set.name!r} has no labels; fine-tuning and probes need a labelled target")
    images, labels = images_set.images, images_set.labels
    if indices is not None:
        images, labels = images[indices.to(images.device)], labels[indices.to(labels.device)]
    images, labels = images.to(device), labels.to(device).long()
    if size is not None:
        images = resize_images(images, size)
    return images, labels


@torch.no_grad()
def top1_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
    batch_size: int = 1024, speed: SpeedSettings | None = None,
) -> tuple[float, float]:
    """(top-1 accuracy as a fraction, mean cross-entropy) of `model` in eval mode on uint8 `images`.

    `speed` (`krrst.infra.speed.SpeedSettings`): the forward's layout and precision; None: as the model is.
    """
    model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(images), batch_size):
        inputs = normalize(images[start : start + batch_size], mean, std)
        logits = speed.forward(model, inputs) if speed is not None else model(inputs)
        batch_labels = labels[start : start + batch_size]
        correct += int((logits.argmax(dim=1) == batch_labels).sum())
        loss_sum += float(F.cross_entropy(logits.float(), batch_labels, reduction="sum"))
    n = max(1, len(images))
    return correct / n, loss_sum / n


# --------------------------------------------------------------------------- pre-training


def _check_set_fits(model: nn.Module, distilled: DistilledSet, arch: str) -> None:
    """A probe forward pass turns a size/channel mismatch into a one-line error before training."""
    probe = distilled.images[:2].detach().to("cpu", torch.get_default_dtype())  # the fresh model is still on the CPU
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    except KrrstError as exc:
        size = distilled.image_size
        raise KrrstError(f"distilled set of {size}x{size} images does not fit {arch!r}: {exc}") from None
    except RuntimeError as exc:
        raise KrrstError(
            f"distilled set of {tuple(distilled.images.shape[1:])} images does not fit architecture {arch!r} "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None
    finally:
        model.train(was_training)


def _pretrain_schedule(kind: str, config: PretrainConfig, m: int) -> tuple[int, int, int]:
    """(batch size, epochs, steps per epoch) of pre-training on m items: soft labels run whole epochs until
    `soft_label_iterations` steps are reached, in batches of `soft_label_batch_size`."""
    batch_size, epochs = config.batch_size, config.epochs
    if kind == "soft_labels":
        _check_positive(config.soft_label_batch_size, "pretrain.soft_label_batch_size")
        batch_size = config.soft_label_batch_size
    steps_per_epoch = _steps_per_epoch(m, batch_size)
    if kind == "soft_labels":
        epochs = math.ceil(config.soft_label_iterations / steps_per_epoch) if steps_per_epoch else 0
    return batch_size, epochs, steps_per_epoch


def _pretrain_optimizer(
    model: nn.Module, kind: str, config: PretrainConfig, steps_per_epoch: int, epochs: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimiser and per-step schedule of each target kind (`PretrainConfig`): SGD at a constant rate for
    representations; SGD x0.1 at half the epochs for hard labels; AdamW, warm-up then cosine, for soft labels."""
    fused = fused_options(torch.optim.SGD if kind != "soft_labels" else torch.optim.AdamW, device)
    if kind == "representation":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused
        )
        return optimizer, None
    if kind == "hard_labels":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.label_lr, momentum=config.momentum, weight_decay=config.label_weight_decay,
            **fused,
        )
        decay_step = max(1, config.epochs // 2) * steps_per_epoch
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[decay_step], gamma=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.soft_label_lr, weight_decay=0.0, **fused)
    total_steps = steps_per_epoch * epochs
    warmup = max(1, min(config.soft_label_warmup, total_steps))

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)


def _pretrain_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str, soft_label_loss: str) -> torch.Tensor:
    """MSE to representations, cross-entropy to hard labels, `PretrainConfig.soft_label_loss` to soft labels."""
    if kind == "representation":
        return F.mse_loss(outputs, targets)
    if kind == "hard_labels":
        return F.cross_entropy(outputs, targets)
    if soft_label_loss == "mse":
        return 0.5 * (outputs - targets).pow(2).sum(dim=1).mean()
    row_sums = targets.sum(dim=1)
    is_distribution = bool((targets >= 0).all() and torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4))
    probabilities = targets if is_distribution else targets.softmax(dim=1)
    return -(probabilities * outputs.log_softmax(dim=1)).sum(dim=1).mean()


def pretrain(
    distilled: DistilledSet, arch: str, config: PretrainConfig | None = None, *,
    device: str | torch.device | None = None, progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None, **arch_overrides: Any,
) -> nn.Module:
    """Pre-train a fresh `arch` network on a distilled set; returns it (eval mode, on `device`, with its head).

    Representation targets are regressed with MSE; hard and soft labels use the label recipes of
    `PretrainConfig`. The network's init, the batch order and the augmentation are fixed by `config.seed`.
    `arch_overrides` go to `create_model` (e.g. `widths=(16, 32, 64)` for a narrow CPU network).
    `on_epoch(epoch, mean_loss)` is called after every epoch (a device sync; leave it None for speed). A set
    whose images do not fit the architecture is a one-line `KrrstError`. The network trains in the layout and
    precision of `config` and is returned in contiguous memory.
    """
    config = config or PretrainConfig()
    _check_positive(config.batch_size, "pretrain.batch_size")
    _check_positive(config.epochs, "pretrain.epochs", allow_zero=True)
    device = resolve_device(device)
    kind = distilled.target_kind
    num_outputs = distilled.feature_dim
    if kind == "hard_labels":
        num_outputs = int(distilled.config.get("num_classes") or num_outputs)
    model = fresh_model(arch, num_outputs, config.seed, **arch_overrides)
    _check_set_fits(model, distilled, arch)
    speed = SpeedSettings.resolve(config, device)
    model.to(device, memory_format=speed.memory_format)
    images = distilled.images.detach().to(device, torch.get_default_dtype())  # float32 but in a float64 reference run
    targets = distilled.targets.detach().to(device)
    targets = targets.long() if kind == "hard_labels" else targets.to(images.dtype)
    m = len(distilled)
    batch_size, epochs, steps_per_epoch = _pretrain_schedule(kind, config, m)
    optimizer, scheduler = _pretrain_optimizer(model, kind, config, steps_per_epoch, epochs, device)

    augment = kind != "representation" and config.label_augment
    generator = _seeded_generator(config.seed)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = strong_augment(images[batch], generator, config.padding) if augment else images[batch]
        outputs = speed.forward(model, inputs)  # float32: the losses are computed in float32
        return _pretrain_loss(outputs, targets[batch], kind, config.soft_label_loss)

    lr_field = {"representation": "lr", "hard_labels": "label_lr", "soft_labels": "soft_label_lr"}[kind]
    watch = LossWatch(f"pre-training {arch} on {distilled.method}",
                      f"pretrain.{lr_field} too high for pretrain.batch_size and the targets' scale", device, "epoch")
    bar = _progress_bar(epochs, f"pre-train {arch} on {distilled.method}", "epoch", progress)
    model.train()
    _train_loop(epochs, lambda: _epoch_batches(m, batch_size, generator, device), batch_loss, optimizer, scheduler,
                bar, watch, 10, on_epoch)
    # Contiguous whatever the training layout: the caller's code (and a saved copy) sees a plain network.
    return model.to(memory_format=torch.contiguous_format).eval()


# --------------------------------------------------------------------------- fine-tuning and probes


def _target_splits(model, target_train, target_test, label_fraction, seed, image_size, device):
    """Class count, input size and the (images, labels) of the train split (few-label subset) and the test split."""
    num_classes = class_count(target_train, target_test)
    size = int(image_size or _model_input_size(model) or target_train.image_size)
    subset = None
    if float(label_fraction) < 1.0:
        subset = few_label_split(target_train.labels, label_fraction, seed, num_classes)
    train = _prepared_target(target_train, "target train split", size, device, subset)
    test = _prepared_target(target_test, "target test split", size, device)
    return num_classes, size, train, test


def finetune(
    model: nn.Module, target_train: "ImageSet", target_test: "ImageSet", config: FinetuneConfig | None = None, *,
    label_fraction: float = 1.0, image_size: int | None = None, device: str | torch.device | None = None,
    progress: bool = True, return_model: bool = False,
) -> dict[str, Any]:
    """Fine-tune a copy of `model` on a labelled target; returns `{"accuracy", "test_loss", ...}`.

    The head is replaced by a fresh `Linear(feature_dim, num_classes)` and every weight is trained
    (`FinetuneConfig`); `model` itself is left unchanged. With `label_fraction < 1`, only the subset of
    `few_label_split(labels, label_fraction, config.seed)` is used. Targets are resized to `image_size`
    (default: the network's own input size when it has one, e.g. ConvNets; else the target's size) and
    normalised with the target's mean/std. `accuracy` is top-1 on the whole test split. With `return_model`,
    the trained copy is returned too, as `"model"` (eval mode, contiguous).
    """
    config = config or FinetuneConfig()
    _check_positive(config.batch_size, "finetune.batch_size")
    _check_positive(config.iterations, "finetune.iterations", allow_zero=True)
    device = resolve_device(device)
    started = time.perf_counter()
    num_classes, size, (train_images, train_labels), (test_images, test_labels) = _target_splits(
        model, target_train, target_test, label_fraction, config.seed, image_size, device
    )
    mean, std = tuple(target_train.mean), tuple(target_train.std)

    network = _trainable_copy(model, num_classes, config.seed)
    speed = SpeedSettings.resolve(config, device)
    network.to(device, memory_format=speed.memory_format).train()
    optimizer = torch.optim.SGD(
        network.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        **fused_options(torch.optim.SGD, device),
    )
    generator = _seeded_generator(config.seed)
    batches = _batch_stream(len(train_images), config.batch_size, generator, device)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        pixels = train_images[batch].to(torch.get_default_dtype()).div_(255.0)
        inputs = normalize(crop_flip(pixels, padding=config.padding, generator=generator), mean, std)
        return F.cross_entropy(speed.forward(network, inputs), train_labels[batch])

    target_name = getattr(target_train, "name", "target")
    bar = _progress_bar(config.iterations, f"fine-tune on {target_name}", "it", progress)
    watch = LossWatch(f"fine-tuning on {target_name}", "finetune.lr too high for finetune.batch_size", device)
    last_loss = _train_loop(config.iterations, lambda: [next(batches)], batch_loss, optimizer,
                            _cosine_lr(optimizer, config.iterations), bar, watch, 50)
    accuracy, test_loss = top1_accuracy(network, test_images, test_labels, mean, std, config.eval_batch_size, speed)
    metrics = {"accuracy": accuracy, "test_loss": test_loss, "train_loss": last_loss, "train_size": len(train_images),
               "num_classes": num_classes, "image_size": size, "iterations": config.iterations,
               "wall_time_s": time.perf_counter() - started}
    if return_model:
        metrics["model"] = network.to(memory_format=torch.contiguous_format).eval()
    return metrics


def extract_features(
    model: nn.Module, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 1024,
    speed: SpeedSettings | None = None,
) -> torch.Tensor:
    """`model.forward_features` of uint8 `images` in eval mode, batched, in the default dtype (N x feature_dim).

    `speed` (`krrst.infra.speed.SpeedSettings`): the forward's layout and precision; None: as the model is.
    """
    model.eval()
    if len(images) == 0:
        return torch.empty(0, model.feature_dim, device=images.device)
    return batched_features(model.forward_features, images, mean=mean, std=std, chunk=batch_size, speed=speed,
                            dtype=torch.get_default_dtype())


def fit_linear_sgd(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: LinearProbeConfig, progress: bool = False
) -> nn.Linear:
    """A linear classifier on fixed features by SGD + cosine (the paper's probe)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        **fused_options(torch.optim.SGD, features.device),
    )
    batches = _batch_stream(len(features), config.batch_size, _seeded_generator(config.seed), features.device)
    bar = _progress_bar(config.iterations, "linear probe (sgd)", "it", progress)
    watch = LossWatch("the linear probe (sgd)", "linear.lr too high for linear.batch_size and the features' scale",
                      features.device)
    _train_loop(config.iterations, lambda: [next(batches)],
                lambda batch: F.cross_entropy(classifier(features[batch]), labels[batch]), optimizer,
                _cosine_lr(optimizer, config.iterations), bar, watch, 100)
    return classifier


def fit_linear_lbfgs(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: LinearProbeConfig, progress: bool = False
) -> nn.Linear:
    """Multinomial logistic regression on the full feature matrix with L-BFGS (MKDT's probe).

    Minimises mean cross-entropy + `config.lbfgs_l2 * ||W||^2` from a zero
    init (the problem is convex, so the solution does not depend on the seed).
    """
    classifier = nn.Linear(features.shape[1], num_classes, device=features.device, dtype=features.dtype)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(features), labels) + config.lbfgs_l2 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    bar = _progress_bar(config.lbfgs_steps, "linear probe (lbfgs)", "step", progress)
    watch = LossWatch("the linear probe (lbfgs)", "features too large for linear.lbfgs_l2 (or non-finite)",
                      features.device)
    try:
        previous = None
        for step in range(1, config.lbfgs_steps + 1):
            loss_tensor = optimizer.step(closure).detach()
            watch.update(loss_tensor, step)
            watch.check()  # L-BFGS reads its loss on the host every step anyway
            loss = float(loss_tensor)
            bar.set_postfix(loss=f"{loss:.5g}", refresh=False)
            bar.update(1)
            if previous is not None and abs(previous - loss) <= 1e-9 * max(1.0, abs(loss)):
                break  # converged: further steps change nothing
            previous = loss
    finally:
        bar.close()
    return classifier


def linear_probe(
    model: nn.Module, target_train: "ImageSet", target_test: "ImageSet", config: LinearProbeConfig | None = None, *,
    label_fraction: float = 1.0, image_size: int | None = None, device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Frozen-feature linear probe; returns `{"accuracy", "test_loss", ...}` (accuracy a fraction).

    Features (`forward_features`, eval mode, no augmentation) are computed once for the train and test
    splits; a linear classifier is fitted by SGD or L-BFGS (`config.solver`) on the train features (the
    few-label subset when `label_fraction < 1`) and scored on every test image. `model` is not modified.
    Resizing and normalisation as in `finetune`.
    """
    config = config or LinearProbeConfig()
    if config.solver not in ("sgd", "lbfgs"):
        raise KrrstError(f"linear.solver={config.solver!r} is not valid; expected sgd or lbfgs")
    _check_positive(config.batch_size, "linear.batch_size")
    device = resolve_device(device)
    started = time.perf_counter()
    num_classes, size, (train_images, train_labels), (test_images, test_labels) = _target_splits(
        model, target_train, target_test, label_fraction, config.seed, image_size, device
    )
    mean, std = tuple(target_train.mean), tuple(target_train.std)
    speed = SpeedSettings.resolve(config, device)
    network = copy.deepcopy(model).to(device, memory_format=speed.memory_format)
    train_features = extract_features(network, train_images, mean, std, config.eval_batch_size, speed)
    test_features = extract_features(network, test_images, mean, std, config.eval_batch_size, speed)
    del network
    for split, values in (("train", train_features), ("test", test_features)):
        check_finite(values, f"linear probe on {getattr(target_train, 'name', 'the target')}",
                     f"the network's features of the {split} split (the pre-trained network holds NaN or inf)")
    fit = fit_linear_lbfgs if config.solver == "lbfgs" else fit_linear_sgd
    classifier = fit(train_features, train_labels, num_classes, config, progress)
    with torch.no_grad():
        logits = classifier(test_features)
        accuracy = float((logits.argmax(dim=1) == test_labels).float().mean()) if len(test_labels) else 0.0
        test_loss = float(F.cross_entropy(logits, test_labels)) if len(test_labels) else float("nan")
    return {"accuracy": accuracy, "test_loss": test_loss, "train_size": len(train_images), "num_classes": num_classes,
            "image_size": size, "solver": config.solver, "wall_time_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- knowledge distillation


def _kd_inputs(
    distilled_images: DistilledSet | torch.Tensor | None, target: "ImageSet", noise_images: int, size: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """The images KD runs on, normalised with the target's statistics (what the teacher was trained on), and
    whether they are the Gaussian-noise stand-in of the no-pre-training baseline (only their shape is used)."""
    if distilled_images is None:
        _check_positive(noise_images, "the number of Gaussian-noise images of kd for none")
        channels, side = int(target.images.shape[1]), int(size or target.images.shape[-1])
        return torch.zeros(int(noise_images), channels, side, side, device=device), True
    if isinstance(distilled_images, DistilledSet):
        images = distilled_images.images.detach().to(device, torch.float32)
        source_mean, source_std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in
                                   (distilled_images.mean, distilled_images.std))
        target_mean, target_std = (torch.tensor(tuple(v), device=device, dtype=torch.float32).view(1, -1, 1, 1)
                                   for v in (target.mean, target.std))
        # the set is normalised with its source's statistics; the teacher and the test see the target's
        return ((images * source_std + source_mean) - target_mean) / target_std, False
    if distilled_images.dim() != 4:
        raise KrrstError(f"KD distilled images must be m x C x H x W, got shape {tuple(distilled_images.shape)}")
    return distilled_images.detach().to(device, torch.float32), False


def knowledge_distillation(
    teacher_classifier: nn.Module, student_init: nn.Module, distilled_images: DistilledSet | torch.Tensor | None,
    target_test: "ImageSet", config: KDConfig | None = None, *, noise_images: int = 1000,
    image_size: int | None = None, device: str | torch.device | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Target-data-free KD: distil `teacher_classifier` into a copy of `student_init` on the distilled images only.

    The student gets a fresh head with as many outputs as the teacher has and is trained with
    `soft_cross_entropy` (Adam, cosine) on strongly augmented distilled images (`strong_augment`), teacher
    and student seeing the same batch; no target training image is used. A `DistilledSet`'s images are
    re-normalised from its source's statistics to the target's (the teacher's inputs); a bare tensor is
    taken as normalised already. `distilled_images=None` is the no-pre-training baseline of the authors'
    code: every batch is fresh N(0, 1) noise (`noise_images` per epoch, no augmentation) at
    `config.noise_lr`. The teacher runs in eval mode (the authors' code left it in train mode, so its
    BatchNorm used batch statistics of the synthetic images). The student is tested on `target_test`,
    resized to the images' size (or `image_size`) and normalised with the target's mean/std. Returns
    `{"accuracy", "test_loss", ...}`.
    """
    config = config or KDConfig()
    _check_positive(config.batch_size, "kd.batch_size")
    _check_positive(config.epochs, "kd.epochs", allow_zero=True)
    device = resolve_device(device)
    started = time.perf_counter()
    images, noise = _kd_inputs(distilled_images, target_test, noise_images, image_size, device)
    teacher = copy.deepcopy(teacher_classifier).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        num_classes = int(teacher(images[:2]).shape[1])
    student = _trainable_copy(student_init, num_classes, config.seed).to(device).train()
    lr, lr_field = (config.noise_lr, "kd.noise_lr") if noise else (config.lr, "kd.lr")
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=config.weight_decay)
    m = len(images)
    scheduler = _cosine_lr(optimizer, _steps_per_epoch(m, config.batch_size) * config.epochs)
    generator = _seeded_generator(config.seed)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if noise:
                inputs = torch.randn((len(batch), *images.shape[1:]), generator=generator).to(device)
            else:
                inputs = strong_augment(images[batch], generator, config.padding)
            teacher_logits = teacher(inputs)
        return soft_cross_entropy(student(inputs), teacher_logits, config.temperature)

    bar = _progress_bar(config.epochs, "knowledge distillation", "epoch", progress)
    watch = LossWatch("knowledge distillation", f"{lr_field} too high for kd.batch_size", device, "epoch")
    _train_loop(config.epochs, lambda: _epoch_batches(m, config.batch_size, generator, device), batch_loss, optimizer,
                scheduler, bar, watch, 10)
    size = int(image_size or images.shape[-1])
    test_images, test_labels = _prepared_target(target_test, "target test split", size, device)
    accuracy, test_loss = top1_accuracy(
        student, test_images, test_labels, tuple(target_test.mean), tuple(target_test.std), config.eval_batch_size
    )
    return {"accuracy": accuracy, "test_loss": test_loss, "num_classes": num_classes, "image_size": size,
            "wall_time_s": time.perf_counter() - started}


def train_kd_teacher(
    target_train: "ImageSet", target_test: "ImageSet", config: KDConfig | None = None, *,
    arch_options: dict[str, Any] | None = None, image_size: int | None = None,
    device: str | torch.device | None = None, progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The target-task classifier of `kd`: a fresh `config.teacher_arch` (default `KD_TEACHER_ARCH`) trained
    on the whole train split by `finetune` with the `teacher_*` recipe of `KDConfig`.

    Returns `(classifier, metrics)`: the classifier frozen, in eval mode, with a head of the target's class
    count; `metrics` (`finetune`'s) hold its test accuracy.
    """
    config = config or KDConfig()
    arch = config.teacher_arch or KD_TEACHER_ARCH
    if is_library_arch(arch):
        raise KrrstError(f"kd.teacher_arch={arch!r}: krrst trains registered architectures only; "
                         "give a classifier of that library as a file (kd.teacher_path, --kd-teacher)")
    _check_positive(config.teacher_batch_size, "kd.teacher_batch_size")
    _check_positive(config.teacher_epochs, "kd.teacher_epochs")
    iterations = math.ceil(config.teacher_epochs * len(target_train) / config.teacher_batch_size)
    recipe = FinetuneConfig(
        iterations=iterations, batch_size=config.teacher_batch_size, lr=config.teacher_lr,
        momentum=config.teacher_momentum, weight_decay=config.teacher_weight_decay, padding=config.padding,
        seed=config.teacher_seed, eval_batch_size=config.eval_batch_size,
    )
    model = fresh_model(arch, None, config.teacher_seed, **(arch_options or {}))
    metrics = finetune(model, target_train, target_test, recipe, image_size=image_size, device=device,
                       progress=progress, return_model=True)
    classifier = metrics.pop("model").requires_grad_(False)
    return classifier, metrics


def load_kd_teacher(
    path: str | os.PathLike, num_classes: int, arch: str | None = None, *, arch_options: dict[str, Any] | None = None,
    target: str = "the target", device: str | torch.device | None = None, option: str = "--kd-teacher",
) -> nn.Module:
    """A target-task classifier for `kd` from a weights-only file; frozen, in eval mode.

    `path`: a safetensors file (a krrst model file names its architecture in its metadata) or a `.pt`/`.pth`
    state dict read with `torch.load(weights_only=True)`. `arch`: a registered model (a torchvision-layout
    `fc.` head is read as `head.`) or `torchvision:NAME` / `timm:NAME`; default: the one a krrst file names,
    else `KD_TEACHER_ARCH`. The file must hold the whole classifier, head included, with `num_classes`
    outputs; it is fed images at the evaluation's size normalised with the target's statistics. A wrong
    architecture or class count is one line naming `option`, the file and the mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise KrrstError(f"{option} {path}: no such file")
    state, spec = read_classifier_file(path, option)
    if spec.get("arch"):
        if arch and arch != spec["arch"]:
            raise KrrstError(f"{option} {path} holds a {spec['arch']!r} classifier, not {arch!r}")
        arch, options = spec["arch"], {k: v for k, v in spec.items() if k not in ("arch", "num_outputs")}
    else:
        arch = arch or KD_TEACHER_ARCH
        accepted = model_options(arch) if arch in list_models() else {}
        options = {k: v for k, v in (arch_options or {}).items() if k in accepted}
    if is_library_arch(arch):
        model = library_classifier(arch, num_classes, option)
    elif arch in list_models():
        model = create_model(arch, num_outputs=num_classes, **options)
    else:
        raise KrrstError(f"{option} architecture {arch!r} is not a registered model, torchvision:NAME or timm:NAME")
    load_classifier_weights(model, state, path, arch, num_classes, target, option)
    return model.to(resolve_device(device)).eval().requires_grad_(False)


# --------------------------------------------------------------------------- one evaluation


def _network_to_evaluate(
    distilled: DistilledSet | None, pretrained: nn.Module | None, arch: str, seed: int,
    pretrain_config: PretrainConfig | None, arch_options: dict[str, Any], device: torch.device, progress: bool,
) -> tuple[nn.Module, str]:
    """(network, its architecture) of `evaluate_set`: `pretrained` as given, else pre-trained on `distilled`,
    else a fresh `arch` network (the `none` baseline)."""
    if pretrained is not None:
        return pretrained, _model_arch(pretrained, arch)
    if distilled is not None:
        config = dataclasses.replace(pretrain_config or PretrainConfig(), seed=seed)
        return pretrain(distilled, arch, config, device=device, progress=progress, **arch_options), arch
    return fresh_model(arch, None, seed, **arch_options), arch


def evaluate_set(
    distilled: DistilledSet | None, arch: str, target_train: "ImageSet", target_test: "ImageSet", *,
    protocol: str = "finetune", label_fraction: float = 1.0, seed: int = 0, pretrained: nn.Module | None = None,
    method: str | None = None, source: str | None = None, target: str | None = None,
    pretrain_config: PretrainConfig | None = None, finetune_config: FinetuneConfig | None = None,
    linear_config: LinearProbeConfig | None = None, kd_config: KDConfig | None = None,
    kd_teacher: nn.Module | None = None, kd_images: DistilledSet | torch.Tensor | None = None,
    kd_noise_images: int = 1000, image_size: int | None = None, arch_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None, progress: bool = True, **arch_overrides: Any,
) -> dict[str, Any]:
    """Run one evaluation and return its results row (`result_row`); `wall_time_s` covers the whole call.

    The network, first match wins: `pretrained` as given, never modified (the full-data SSL teacher of the
    `full-ssl` reference, or a network already pre-trained on `distilled` and reused across targets);
    `pretrain(distilled, arch, pretrain_config)`; a fresh `arch` network (the `none` baseline). Then
    `protocol` (`finetune`, `linear` or `kd`) runs with `seed` replacing every config's seed, on
    `label_fraction` of the target's labels. `kd` distils `kd_teacher` (the target-task classifier) through
    `kd_images` (default: `distilled`; with neither, the `none` baseline, through `kd_noise_images`
    Gaussian-noise images per epoch). `method` defaults to the set's, `full-ssl` for a bare `pretrained`
    network and `none` for no network; `source` to the set's; `target` to the test split's name.
    `arch_options` and further keywords (e.g. `widths=(16, 32, 64)`) go to `create_model`; `image_size` is
    the targets' size (default: the set's images', else the network's input size), so a network's own
    `image_size` option can only be given inside `arch_options`.
    """
    started = time.perf_counter()
    protocol_label = protocol_name(protocol, label_fraction)
    protocol = protocol_label.partition("@")[0]
    kd_images = kd_images if kd_images is not None else distilled
    if protocol == "kd" and kd_teacher is None:
        raise KrrstError("protocol kd needs the target-task teacher classifier (kd_teacher)")
    if protocol == "kd" and kd_images is None and pretrained is not None:
        raise KrrstError("protocol kd with a network given as it is needs the images to distil through (kd_images)")
    if image_size is None and distilled is not None:
        image_size = distilled.image_size
    device = resolve_device(device)
    model, arch = _network_to_evaluate(distilled, pretrained, arch, seed, pretrain_config,
                                       {**(arch_options or {}), **arch_overrides}, device, progress)
    common = dict(image_size=image_size, device=device, progress=progress)
    if protocol == "finetune":
        config = dataclasses.replace(finetune_config or FinetuneConfig(), seed=seed)
        metrics = finetune(model, target_train, target_test, config, label_fraction=label_fraction, **common)
    elif protocol == "linear":
        config = dataclasses.replace(linear_config or LinearProbeConfig(), seed=seed)
        metrics = linear_probe(model, target_train, target_test, config, label_fraction=label_fraction, **common)
    else:
        config = dataclasses.replace(kd_config or KDConfig(), seed=seed)
        metrics = knowledge_distillation(kd_teacher, model, kd_images, target_test, config,
                                         noise_images=kd_noise_images, **common)
    if method is None:
        method = distilled.method if distilled is not None else ("full-ssl" if pretrained is not None else "none")
    if source is None:
        source = distilled.source if distilled is not None else ""
    target = target or getattr(target_test, "name", "") or getattr(target_train, "name", "")
    return result_row(method=method, source=source, target=target, arch=arch, protocol=protocol_label, seed=seed,
                      accuracy=metrics["accuracy"], wall_time_s=time.perf_counter() - started)
