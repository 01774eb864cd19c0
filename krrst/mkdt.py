"""MKDT: dataset distillation by matching knowledge-distillation trajectories.

MKDT ("Dataset Distillation via Knowledge Distillation: Towards Efficient
Self-Supervised Pre-Training of Deep Networks", Joshi, Ni, Mirzasoleiman,
ICLR 2025, arXiv 2410.02116) avoids the high-variance SSL gradient by
distilling the SSL teacher `g` into small students first:

1. experts (`train_expert_trajectories`): E students of the distillation
   architecture, each with a d-dim linear head, regress `g(x)` of the real
   images by MSE with SGD; their flattened parameters are saved after every
   epoch (or every `expert_interval` steps): the trajectories.
2. trajectory matching (`matching_loss`, `mkdt_distill`; MTT, Cazenavette et
   al., CVPR 2022): synthetic images `X_s` (initialised from the real images
   the experts regress worst, `baselines.high_loss_indices`) with targets
   `Y_s = g(X_s)` are learnt so that N SGD steps on `(X_s, Y_s)` from an
   expert's checkpoint θ_t land near its θ_{t+M}.

The result is a `DistilledSet` (method `mkdt`, representation targets,
images normalised with the source's mean/std), evaluated by the same code as
KRR-ST's sets. Given an `out_dir`, a run is resumable as `krrst.distill`'s:
the experts are saved once (`trajectories.safetensors`) and the matching
loop is checkpointed (`checkpoint.safetensors`), so `resume=True` continues
an interrupted run to the set an uninterrupted one reaches. Defaults are the
authors' public code
(github.com/sjoshi804/mkdt-data-distill-ssl: `buffer.py`, `distill.py`, and
the CIFAR-100 2% command of github.com/jiayini1119/MKDT): see `MKDTConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from krrst.augment import apply_crop_flip, normalize, sample_crop_flip
from krrst.baselines import high_loss_indices
from krrst.distill import check_field_ranges, network_options, source_tensors
from krrst.distilled import DistilledSet
from krrst.formats import fit_to_source
from krrst.infra import io, run_state
from krrst.infra.config import check_numeric_fields, config_changes, config_to_dict, resolve_device
from krrst.infra.distributed import DistributedContext
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch
from krrst.infra.progress import progress_bar
from krrst.infra.run_state import RunningMean, RunState, draw_seed, stage_seeds
from krrst.losses import parameter_matching_loss
from krrst.models import fresh_model
from krrst.teacher import check_teacher_features, teacher_features, teacher_identity

CHECKPOINT_NAME = run_state.CHECKPOINT_NAME  # the run folder's files, as the pipeline and the tests find them
LOSS_CSV_NAME = run_state.LOSS_CSV_NAME
TRAJECTORIES_NAME = "trajectories.safetensors"
DISTILLED_NAME = "distilled.safetensors"
LOSS_CSV_FIELDS = ("step", "loss", "syn_lr", "elapsed_s")
Trajectories = list[list[torch.Tensor]]

# Fields that change neither the synthetic set nor the random streams,
# so a resumed run may use other values than the checkpointed one.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class MKDTConfig:
    """Hyper-parameters of MKDT; defaults are the public code's CIFAR-100 2% setting (m = 1,000).

    From `buffer.py` (experts) and `commands/distill/barlow_twins/CIFAR100/2_per.sh`
    with `distill.py`'s defaults: MTT's ConvNet (3 blocks of width 128,
    instance norm, average pooling), 100 experts of 20 epochs (SGD lr 0.1,
    momentum 0.9, weight decay 1e-4, batch 256, no augmentation, targets the
    teacher's representations of the un-augmented images), N = 40 synthetic
    steps on batches of 256, M = 2 expert epochs, start epoch in [0, 2),
    5,000 outer steps, SGD with momentum 0.5 for the images (lr 1000, in the
    normalised-pixel space the networks see: the public code does not ZCA
    here), the targets (lr 1: the public code learns them; 0 keeps them at
    `g(X_s)`) and the learnt inner lr (init 0.1, lr 1e-4). The public code
    cycles through shuffled expert files; here an expert is drawn uniformly.
    """

    # --- the network (experts and students share it)
    # m, the number of synthetic images
    num_images: int = 1000
    # the distillation network (widths / norm / image_size go to create_model where the arch takes them)
    arch: str = "convnet3"
    widths: tuple[int, ...] = (128, 128, 128)
    norm: Literal["batch", "instance", "none"] = "instance"
    image_size: int = 32
    # --- the experts
    # E trajectories of expert_epochs epochs each; a checkpoint after every epoch (expert_interval=0) or every
    # expert_interval SGD steps ("epochs" below count checkpoints)
    experts: int = 100
    expert_epochs: int = 20
    expert_interval: int = 0
    # the experts' SGD
    expert_lr: float = 0.1
    expert_momentum: float = 0.9
    expert_weight_decay: float = 1e-4
    expert_batch_size: int = 256
    # > 0: the experts train on random crops (that zero padding) + flips, with the teacher run on each augmented
    # view; 0 (the public code): the images as they are
    expert_padding: int = 0
    # --- trajectory matching
    # N, unrolled student steps per outer step
    syn_steps: int = 40
    # M: the target is checkpoint t + M
    expert_epochs_matched: int = 2
    # t is drawn uniformly in [0, max_start_epoch)
    max_start_epoch: int = 2
    # outer steps
    steps: int = 5000
    # outer lrs of X_s, Y_s (0: fixed) and the inner lr (0: fixed)
    image_lr: float = 1000.0
    target_lr: float = 1.0
    lr_lr: float = 1e-4
    # initial inner (student) lr
    init_lr: float = 0.1
    # outer SGD momentum, or adam (Adam with the same lrs)
    momentum: float = 0.5
    optimizer: Literal["sgd", "adam"] = "sgd"
    # synthetic images per unrolled step (capped at m)
    batch_syn: int = 256
    # high-loss (the real images with the largest mean MSE under the experts' last checkpoints, as the public
    # code's sort_dset.py) or random
    init: Literal["high-loss", "random"] = "high-loss"
    # seeds every random choice
    seed: int = 0
    # --- logging, in outer steps
    # outer steps per row of loss.csv
    log_every: int = 100
    # outer steps per checkpoint of the matching loop (with an out_dir; 0: only at the end)
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        check_numeric_fields(self, "mkdt")
        check_field_ranges(
            self, "mkdt",
            at_least_one=("num_images", "image_size", "experts", "expert_epochs", "expert_batch_size", "syn_steps",
                          "expert_epochs_matched", "max_start_epoch", "batch_syn", "log_every"),
            non_negative=("steps", "checkpoint_every", "expert_interval", "expert_padding", "expert_weight_decay",
                          "target_lr", "lr_lr"),
            positive=("expert_lr", "image_lr", "init_lr"),
        )
        for name in ("expert_momentum", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise KrrstError(f"mkdt.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.init not in ("high-loss", "random"):
            raise KrrstError(f"mkdt.init={self.init!r} is not valid; expected high-loss or random")
        if self.optimizer not in ("sgd", "adam"):
            raise KrrstError(f"mkdt.optimizer={self.optimizer!r} is not valid; expected sgd or adam")
        last_start = self.max_start_epoch - 1
        if self.expert_interval == 0 and last_start + self.expert_epochs_matched > self.expert_epochs:
            raise KrrstError(f"mkdt.max_start_epoch - 1 + mkdt.expert_epochs_matched = "
                             f"{last_start + self.expert_epochs_matched} exceeds mkdt.expert_epochs="
                             f"{self.expert_epochs}: the target checkpoint would not exist")


# --------------------------------------------------------------------------- helpers


def _student(config: MKDTConfig, num_outputs: int, seed: int) -> nn.Module:
    """A fresh student of the distillation architecture whose weights depend only on `seed`."""
    return fresh_model(config.arch, num_outputs, seed, **network_options(config))


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of `model` in `named_parameters` order, as one detached 1-D tensor."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of a flat parameter vector under the names and shapes of `model`'s parameters."""
    named = list(model.named_parameters())
    pieces = flat.split([p.numel() for _, p in named])
    return {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}


# --------------------------------------------------------------------------- experts


def train_expert_trajectories(source_images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                              teacher: nn.Module | None, config: MKDTConfig, *,
                              device: str | torch.device | None = None, progress: bool = True,
                              target_reps: torch.Tensor | None = None) -> Trajectories:
    """E expert trajectories: per expert, its flattened parameters (CPU float32) at every checkpoint, θ_0 first.

    Each expert is a freshly seeded `config.arch` network with a d-dim head
    trained in train mode by SGD on `mean_ij (f(x_i)_j - g(x_i)_j)^2` over
    shuffled batches of the real images (MKDT's knowledge distillation).
    `target_reps` (N x d, the teacher's features of the normalised images)
    spares the teacher pass when `config.expert_padding` is 0; with padding
    the teacher runs on every augmented batch.
    """
    device = resolve_device(device)
    images = source_images.to(device)
    if target_reps is None or config.expert_padding > 0:
        if teacher is None:
            raise KrrstError("mkdt experts need a teacher (or target_reps, without expert_padding)")
        teacher = teacher.to(device).eval()
    if target_reps is None:
        target_reps = teacher_features(teacher, images, mean, std, 512, device, progress)
    target_reps = target_reps.to(device).float()
    num_source, batch = len(images), config.expert_batch_size
    steps_per_epoch = math.ceil(num_source / batch)
    interval = config.expert_interval or steps_per_epoch  # steps between checkpoints (expert_interval 0: one per epoch)
    generator = torch.Generator().manual_seed(stage_seeds(config.seed, 3)[0])
    trajectories: Trajectories = []
    watch = LossWatch("mkdt expert training", "mkdt.expert_lr too high for mkdt.expert_batch_size", device)
    with progress_bar(config.experts * config.expert_epochs * steps_per_epoch, "mkdt experts", unit="step",
                      enabled=progress) as bar:
        for _ in range(config.experts):
            model = _student(config, target_reps.shape[1], draw_seed(generator)).to(device).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=config.expert_lr, momentum=config.expert_momentum,
                                        weight_decay=config.expert_weight_decay)
            checkpoints, step = [flat_parameters(model).cpu()], 0
            for _ in range(config.expert_epochs):
                order = torch.randperm(num_source, generator=generator).to(device)
                for start in range(0, num_source, batch):
                    indices = order[start : start + batch]
                    if config.expert_padding > 0:
                        crop = sample_crop_flip(len(indices), config.expert_padding, generator, device)
                        inputs = normalize(apply_crop_flip(images[indices], crop, config.expert_padding), mean, std)
                        with torch.no_grad():
                            targets = teacher(inputs).float()
                    else:
                        inputs, targets = normalize(images[indices], mean, std), target_reps[indices]
                    loss = F.mse_loss(model(inputs), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    watch.update(loss, step)
                    bar.update()
                    if step % interval == 0:
                        checkpoints.append(flat_parameters(model).cpu())
                watch.check()  # once an epoch: no trajectory of a diverged expert is kept
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            trajectories.append(checkpoints)
    return trajectories


def save_trajectories(path: str | Path, trajectories: Trajectories, config: MKDTConfig, *,
                      source: list[Any] | None = None, teacher: str | None = None) -> None:
    """Write trajectories to one safetensors file (tensor `e{expert}.{checkpoint}`) with the config, atomically.

    `source` ([name, number of images]) and `teacher` (`teacher_identity`),
    when given, are recorded too, so that resuming `mkdt_distill` can refuse
    experts of another run.
    """
    tensors = {f"e{e}.{c}": tensor for e, trajectory in enumerate(trajectories) for c, tensor in enumerate(trajectory)}
    metadata = {"format": "krrst.MKDTTrajectories", "lengths": [len(t) for t in trajectories],
                "config": config_to_dict(config),
                **{key: value for key, value in (("source", source), ("teacher", teacher)) if value is not None}}
    io.save_tensors(path, tensors, metadata)


def _read_trajectories(path: str | Path) -> tuple[Trajectories, dict[str, Any]]:
    tensors, metadata = io.load_tensors(path, "expert trajectories")
    if metadata.get("format") != "krrst.MKDTTrajectories":
        raise KrrstError(f"expert trajectories {path} is not a krrst MKDT trajectory file (no 'format' metadata)")
    trajectories = [[tensors[f"e{e}.{c}"] for c in range(length)] for e, length in enumerate(metadata["lengths"])]
    return trajectories, metadata


def load_trajectories(path: str | Path) -> Trajectories:
    """Read trajectories written by `save_trajectories` (CPU tensors)."""
    return _read_trajectories(path)[0]


# --------------------------------------------------------------------------- matching


def matching_loss(student: nn.Module, start_params: torch.Tensor, target_params: torch.Tensor,
                  synthetic_images: torch.Tensor, synthetic_targets: torch.Tensor, syn_lr: torch.Tensor, *,
                  syn_steps: int, batch_syn: int, generator: torch.Generator) -> torch.Tensor:
    """MTT's normalised parameter-matching loss after N unrolled SGD steps (Cazenavette et al. 2022, Eq. 2).

    θ_0 = θ_t (`start_params`); θ_{k+1} = θ_k - α ∇_θ mean ||f_θ(X_b) - Y_b||² on
    mini-batches b of `batch_syn` synthetic examples (a fresh permutation,
    drawn from `generator`, whenever the previous one is used up);
    loss = ||θ_N - θ_{t+M}||² / ||θ_t - θ_{t+M}||². Differentiable w.r.t.
    the images, the targets and α (`syn_lr`), through the whole unroll.
    `student` gives the architecture (and, in train mode, the norm layers'
    batch statistics) through `torch.func.functional_call`.
    """
    theta = start_params.detach().clone().requires_grad_(True)
    pending: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not pending:
            order = torch.randperm(len(synthetic_images), generator=generator).to(synthetic_images.device)
            pending = list(order.split(batch_syn))
        batch = pending.pop()
        outputs = functional_call(student, _unflatten(student, theta), (synthetic_images[batch],))
        inner = F.mse_loss(outputs, synthetic_targets[batch])
        (gradient,) = torch.autograd.grad(inner, theta, create_graph=True)
        theta = theta - syn_lr * gradient
    return parameter_matching_loss(theta, start_params, target_params)


def _check_trajectories(trajectories: Trajectories, config: MKDTConfig, num_params: int) -> None:
    if not trajectories:
        raise KrrstError("mkdt: no expert trajectories")
    needed = config.max_start_epoch + config.expert_epochs_matched
    for index, trajectory in enumerate(trajectories):
        if len(trajectory) < needed:
            raise KrrstError(f"mkdt: expert {index} has {len(trajectory)} checkpoints; mkdt.max_start_epoch + "
                             f"mkdt.expert_epochs_matched needs {needed}")
        if trajectory[0].numel() != num_params:
            raise KrrstError(f"mkdt: expert {index} has {trajectory[0].numel()} parameters, the {config.arch} "
                             f"student {num_params}; train the experts with the same arch/widths/norm/image_size")


def _check_experts_file(path: Path, saved: dict[str, Any], config: MKDTConfig, identity: dict[str, Any]) -> None:
    """Refuse the trajectory file of another run (config, source, teacher) in the words the run scaffold uses."""
    changes = config_changes(saved["config"], config, RESUMABLE_CHANGES)
    if changes:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        raise KrrstError(f"--resume: {path} was written with another config ({details}); use the same settings "
                         "or a new --out")
    for key, now in identity.items():
        if key in saved and saved[key] != now:  # JSON gives lists, and so does the source identity
            raise KrrstError(f"--resume: {path} was written with another {key} ({saved[key]} -> {now}); use the "
                             f"same {key} or a new --out")


def _trajectories_identity(trajectories: Trajectories) -> str:
    """Shape and a float64 checksum of the experts: enough to refuse resuming against other trajectories."""
    checksum = sum(float(params.double().abs().sum()) for trajectory in trajectories for params in trajectory)
    return f"{len(trajectories)}x{len(trajectories[0])}x{trajectories[0][0].numel()}:{checksum:.12e}"


def _initial_indices(config: MKDTConfig, trajectories: Trajectories, source_images: torch.Tensor,
                     target_reps: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], init_seed: int,
                     device: torch.device) -> torch.Tensor:
    """The m real images `X_s` starts from (CPU indices): `config.init` = high-loss or random."""
    if config.init == "random":
        order = torch.randperm(len(source_images), generator=torch.Generator().manual_seed(init_seed))
        return order[: config.num_images]

    # Score with every expert's last checkpoint, in train mode (batch statistics, as the unrolled students).
    scorers = []
    for trajectory in trajectories:
        scorer = _student(config, target_reps.shape[1], 0).to(device).train()
        nn.utils.vector_to_parameters(trajectory[-1].to(device), scorer.parameters())
        scorers.append(scorer)
    return high_loss_indices(
        source_images, target_reps, config.num_images, mean=mean, std=std, models=scorers,
        batch_size=config.expert_batch_size, device=device,
    )


def mkdt_distill(source: Any, teacher: nn.Module, config: MKDTConfig | None = None, *,
                 out_dir: str | Path | None = None, resume: bool = False, device: str | torch.device | None = None,
                 progress: bool = True, trajectories: Trajectories | None = None, stop_at_step: int | None = None,
                 distributed: DistributedContext | None = None) -> DistilledSet:
    """Distil `source` (an `ImageSet`) into `config.num_images` images with teacher-representation targets (MKDT).

    `g` of every source image once, the experts (unless `trajectories` are given), then at each outer step an expert
    and t in [0, max_start_epoch), `matching_loss` from θ_t to θ_{t+M}, and one optimiser step on `X_s`, `Y_s` (if
    `target_lr` > 0) and the inner lr α (if `lr_lr` > 0; kept >= 0).

    Args:
        source, teacher, config: what is distilled, by `g`, with which `MKDTConfig`.
        out_dir: the run folder, each file written atomically: `trajectories.safetensors` (the experts once trained,
            not given ones; E x checkpoints x parameters float32, gigabytes at the authors' scale),
            `checkpoint.safetensors` (`X_s`, `Y_s`, α, the optimiser, the matching generator, the initial indices;
            every `checkpoint_every` steps and at the last), `loss.csv` (step, mean loss since the previous row, α,
            wall seconds of this process's loop; every `log_every` steps and at `config.steps`) and, once
            `config.steps` are done, `distilled.safetensors`. None writes nothing.
        resume: continue the run in `out_dir`: the saved experts are loaded instead of retrained (unless
            `trajectories` are given) and the loop continues to the same `X_s`, `Y_s`, α as an uninterrupted run
            (bitwise on CPU). A checkpoint or trajectory file of another config (any field but `log_every`,
            `checkpoint_every`; so `steps` may not change), source or teacher is refused; no checkpoint starts a
            new run (from the saved experts if any). Without `resume`, an existing checkpoint or trajectory file in
            `out_dir` is refused.
        device: None/"auto" picks CUDA when available.
        progress: show tqdm bars (only on a terminal).
        trajectories: experts to use instead of training (or loading) them.
        stop_at_step: stop after this step (checkpointing it), as a kill
            would; `resume=True` later continues the same run.
        distributed: the torchrun group, if any. MKDT is not data-parallel:
            every rank resumes from the same files and does the same work, and
            rank 0 alone writes.
    """
    config = config or MKDTConfig()
    if not isinstance(config, MKDTConfig):
        raise KrrstError(f"config must be an MKDTConfig, got {type(config).__name__}")
    device = resolve_device(device)
    source_images, mean, std, source_name = source_tensors(source, config, device, "mkdt")
    source_id = [source_name, len(source_images)]
    teacher = fit_to_source(teacher, mean, std, config.image_size).to(device).eval()  # a library teacher's own input
    # The scaffold refuses another run's checkpoint here, before any expensive work.
    with RunState("mkdt", out_dir, config=config, total_steps=config.steps, log_fields=LOSS_CSV_FIELDS,
                  resume=resume, resumable=RESUMABLE_CHANGES,
                  identity={"source": source_id, "teacher": teacher_identity(teacher)},
                  checkpoint_every=config.checkpoint_every, log_every=config.log_every, stop_at_step=stop_at_step,
                  progress=progress, context=distributed, guarded=(TRAJECTORIES_NAME,)) as run:
        shown = run.show_progress  # rank 0's bars only
        target_reps = teacher_features(teacher, source_images, mean, std, 512, device, shown).to(device)  # (N, d)
        check_teacher_features(teacher, target_reps, f"the {len(source_images):,} source images")
        trajectories = _experts(run, trajectories, resume, source_images, mean, std, teacher, target_reps, shown)
        _, init_seed, match_seed = stage_seeds(config.seed, 3)
        student = _student(config, target_reps.shape[1], match_seed).to(device).train()
        _check_trajectories(trajectories, config, sum(p.numel() for p in student.parameters()))
        experts_id = _trajectories_identity(trajectories)
        _check_same_experts(run, experts_id)
        learnt = _LearntSet.start(config, run.saved, trajectories, source_images, target_reps, mean, std, init_seed)
        # draws the expert, the start epoch and the unroll's batches: its state is part of the checkpoint
        generator = torch.Generator().manual_seed(match_seed)
        mean_loss = RunningMean(device)  # the losses since the last row, summed on the device
        if run.saved is not None:
            generator.set_state(run.saved["generator"])
            mean_loss.load_state_dict(run.saved)
        _match(run, config, trajectories, student, learnt, generator, mean_loss, experts_id)
    result = learnt.distilled_set(config, mean, std, source_id[0], teacher, run.last_step)
    if run.last_step == config.steps:
        run.write(lambda out: result.save(out / DISTILLED_NAME))
        run.write(lambda out: result.preview(out / "preview.png"))
    return result


def _match(run: RunState, config: MKDTConfig, trajectories: Trajectories, student: nn.Module, learnt: "_LearntSet",
           generator: torch.Generator, mean_loss: RunningMean, experts_id: str) -> None:
    """The outer loop: each step draws an expert and t, and takes one step on X_s, Y_s, α against `matching_loss`."""
    device = learnt.images.device
    watch = LossWatch("mkdt matching", "mkdt.image_lr / mkdt.lr_lr / mkdt.target_lr too high", device)
    batch_syn = min(config.batch_syn, config.num_images)

    def checkpoint() -> dict[str, Any]:  # the scaffold adds step, config, source and teacher
        return {"experts": experts_id, "generator": generator.get_state(), **learnt.state_dict(),
                **mean_loss.state_dict()}

    for step in run.steps():
        trajectory = trajectories[int(torch.randint(len(trajectories), (1,), generator=generator))]
        start_epoch = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
        start_params = trajectory[start_epoch].to(device)
        target_params = trajectory[start_epoch + config.expert_epochs_matched].to(device)
        loss = matching_loss(student, start_params, target_params, learnt.images, learnt.targets, learnt.syn_lr,
                             syn_steps=config.syn_steps, batch_syn=batch_syn, generator=generator)
        watch.update(loss, step)
        for tensor, gradient in zip(learnt.tensors, torch.autograd.grad(loss, learnt.tensors)):
            tensor.grad = gradient
        learnt.optimizer.step()
        with torch.no_grad():
            learnt.syn_lr.clamp_(min=0.0)  # a negative inner lr would climb the inner loss
        mean_loss.add(loss)
        # rows at the same steps whether or not the run was interrupted (a stop is not a row)
        if run.is_log_step(step):
            watch.check()
            run.log(step, loss=mean_loss.take(), syn_lr=learnt.syn_lr.detach().clone())
            run.flush()
        if run.is_checkpoint_step(step):
            watch.check()  # never checkpoint a diverged set
            run.save(step, checkpoint())
    watch.check()
    if run.start_step == run.last_step:  # nothing ran: still leave a complete run folder
        run.save(run.last_step, checkpoint())


@dataclasses.dataclass
class _LearntSet:
    """What MKDT learns: X_s (m, C, H, W; normalised), Y_s (m, d), the inner lr α (a scalar), and their optimiser."""

    images: torch.Tensor
    targets: torch.Tensor
    syn_lr: torch.Tensor
    initial: torch.Tensor  # (m,) the source indices X_s started from
    optimizer: torch.optim.Optimizer
    tensors: list[torch.Tensor]  # those with an outer lr > 0

    @classmethod
    def start(cls, config: MKDTConfig, saved: dict[str, Any] | None, trajectories: Trajectories,
              source_images: torch.Tensor, target_reps: torch.Tensor, mean: tuple[float, ...],
              std: tuple[float, ...], init_seed: int) -> "_LearntSet":
        """The initial set (`config.init` images and g of them, α = `init_lr`), or the checkpoint's."""
        device = source_images.device
        if saved is None:
            initial = _initial_indices(config, trajectories, source_images, target_reps, mean, std, init_seed, device)
            images = normalize(source_images[initial.to(device)], mean, std)
            targets = target_reps[initial.to(device)].clone()
            syn_lr = torch.tensor(config.init_lr, device=device)
        else:
            initial = saved["init_indices"]
            images, targets, syn_lr = (saved[key].to(device).clone() for key in ("images", "targets", "syn_lr"))
        groups = [(images, config.image_lr), (targets, config.target_lr), (syn_lr, config.lr_lr)]
        for tensor, lr in groups:
            tensor.requires_grad_(lr > 0)  # the images always: mkdt.image_lr > 0
        param_groups = [{"params": [tensor], "lr": lr} for tensor, lr in groups if lr > 0]
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(param_groups, lr=config.image_lr, momentum=config.momentum)
        else:
            optimizer = torch.optim.Adam(param_groups, lr=config.image_lr)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        return cls(images, targets, syn_lr, initial, optimizer, [tensor for tensor, lr in groups if lr > 0])

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach(), "targets": self.targets.detach(), "syn_lr": self.syn_lr.detach(),
                "init_indices": self.initial, "optimizer": self.optimizer.state_dict()}

    def distilled_set(self, config: MKDTConfig, mean: tuple[float, ...], std: tuple[float, ...], source: str,
                      teacher: nn.Module, step: int) -> DistilledSet:
        return DistilledSet(
            images=self.images.detach().cpu(), targets=self.targets.detach().float().cpu(), mean=mean, std=std,
            target_kind="representation", method="mkdt", source=source,
            teacher_arch=getattr(teacher, "spec", {}).get("arch"),
            config={**config_to_dict(config), "init_indices": [int(i) for i in self.initial],
                    "syn_lr": self.syn_lr.item()},
            step=step,
        )


def _experts(run: RunState, given: Trajectories | None, resume: bool, source_images: torch.Tensor,
             mean: tuple[float, ...], std: tuple[float, ...], teacher: nn.Module, target_reps: torch.Tensor,
             progress: bool) -> Trajectories:
    """The experts: given, saved by an earlier start of this run, or trained now and saved at once.

    They are most of the run's cost, and a resumed run must match against the same trajectories.
    """
    config, path = run.config, run.out_dir / TRAJECTORIES_NAME if run.out_dir is not None else None
    if given is not None:
        return given
    if resume and path.is_file():
        if run.saved is None:
            run.message(f"mkdt: {run.out_dir} holds expert trajectories and no matching checkpoint; matching "
                        "starts from them")
        trajectories, saved = _read_trajectories(path)
        _check_experts_file(path, saved, config, run.identity)
        return trajectories
    trajectories = train_expert_trajectories(source_images, mean, std, teacher, config, device=source_images.device,
                                             progress=progress, target_reps=target_reps)
    run.write(lambda out: save_trajectories(out / TRAJECTORIES_NAME, trajectories, config, **run.identity))
    return trajectories


def _check_same_experts(run: RunState, experts_id: str) -> None:
    """A checkpoint matched against other experts is refused (a run started with given experts, resumed without)."""
    saved = run.saved.get("experts", experts_id) if run.saved is not None else experts_id
    if saved != experts_id:
        raise KrrstError(f"--resume: {run.checkpoint_path} was matched against other expert trajectories "
                         f"({saved} -> {experts_id}); pass the same trajectories or a new --out")


# --------------------------------------------------------------------------- compute


def mkdt_cost(config: MKDTConfig, num_source: int = 50_000, feature_dim: int = 512) -> dict[str, float]:
    """Image passes (and FLOPs) of an MKDT run, to compare its compute with KRR-ST's.

    Counts, for a source of `num_source` images and d = `feature_dim`:
    `teacher_forward_images` (g once per image; per augmented expert batch with
    `expert_padding`), `expert_train_images` (forward + backward of the
    students: E x epochs x N), `init_forward_images` (high-loss scoring: E x N),
    `matching_unrolled_images` (forward + backward with create_graph inside the
    unroll: steps x N_syn x batch), whose reverse pass (`matching_meta_backward_images`,
    the same count) costs about two unrolled steps each (Hessian-vector
    products). `student_forward_flops` is one image's forward through the
    student (torch's FLOP counter, multiply-add = 2 FLOPs); `student_flops`
    totals the student's work counting backward = 2 forwards, so an unrolled
    image = 3 and its reverse pass about 6. A KRR-ST step, for comparison,
    is about a teacher + student forward of the real batch, a forward/backward
    of the m synthetic images and one pool step on them.
    """
    from torch.utils.flop_counter import FlopCounterMode

    student = _student(config, feature_dim, 0)
    probe = torch.zeros(1, 3, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student(probe)
    forward_flops = float(counter.get_total_flops())
    expert_images = config.experts * config.expert_epochs * num_source
    unrolled = config.steps * config.syn_steps * min(config.batch_syn, config.num_images)
    init_images = config.experts * num_source if config.init == "high-loss" else 0
    student_flops = forward_flops * (3 * expert_images + init_images + (3 + 6) * unrolled)
    return {
        "teacher_forward_images": num_source + (expert_images if config.expert_padding > 0 else 0),
        "expert_train_images": expert_images,
        "init_forward_images": init_images,
        "matching_unrolled_images": unrolled,
        "matching_meta_backward_images": unrolled,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "student_forward_flops": forward_flops,
        "student_flops": student_flops,
    }
