"""What a synthetic set is made of: the learnable parameters behind `X_s` and `Y_s`.

KRR-ST (Lee et al., ICLR 2024) learns every pixel of `X_s` (m x C x H x W,
normalised) and every entry of `Y_s` (m x d). "Boost Self-Supervised Dataset
Distillation via Parameterization, Predefined Augmentation, and Approximation"
(Yu, Yao & Chiu, ICLR 2025) stores both as coefficients over learnt
low-dimensional bases, so the storage of m0 pixel images holds more images,
and predicts the representations of fixed augmented views with a small network.

- `PixelSet` (kind "pixels"), `BasisSet` (kind "basis"), `PyramidSet` (kind
  "pyramid": each image a sum of learnt lower-resolution levels, upsampled),
  registered in `PARAMETERIZATIONS` and built by `make_synthetic_set(kind, ...)`
  or from a `DistillConfig` (`from_config`); each offers what `SyntheticSet` lists.
- `pixel_storage_bytes`, `basis_images_for_budget`, `pyramid_images_for_budget`:
  "same storage, more images".
- `AugmentationPredictor`, `augmentation_predictor_loss`: representations of
  the views of `krrst.augment.fixed_augment_all`, predicted from `Y_s`.

How `distill()` uses a set: AdamW over `param_groups(image_lr, target_lr, std)`
(`image_lr` in raw-pixel units, see `krrst.distill.DistillConfig`); each outer
step materialises `support()` once and steps on `parameters()`; the pool and
the validation signal take it detached. A checkpoint holds `state_dict()`
(tensors only); a resume rebuilds the set from the same initial images and
loads the state in place, so the optimiser keeps its leaves. The `DistilledSet`
carries `summary()` in its config. With fixed augmentations the support is
`fixed_augment_all(images, names)` with targets `predictor(targets)`; the
predictor is fitted on real images with `augmentation_predictor_loss` and its
`storage_bytes()` counts towards the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from krrst.augment import ROTATIONS, check_fixed_augmentations
from krrst.infra.errors import KrrstError
from krrst.infra.registry import Registry


def _check_initial(images: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise KrrstError("synthetic set: initial images must be a float m x C x H x W tensor")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or len(targets) != len(images):
        raise KrrstError(f"synthetic set: initial targets must be a {len(images)} x d tensor (one row per image)")


def _check_std(std: Sequence[float], channels: int) -> list[float]:
    std = [float(s) for s in std]
    if len(std) != channels or min(std) <= 0:
        raise KrrstError(f"synthetic set: std must hold {channels} positive values (one per channel), got {std}")
    return std


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], kind: str) -> None:
    """Refuse a state whose keys or shapes differ from `expected` (e.g. another kind, m or rank)."""
    if set(state) != set(expected):
        raise KrrstError(f"{kind} synthetic set: state has keys {sorted(state)}, expected {sorted(expected)}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            shapes = f"{list(state[name].shape)}, not {list(tensor.shape)}"
            raise KrrstError(f"{kind} synthetic set: state {name!r} has shape {shapes}")


def _rms_row_norm(rows: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_i ||rows_i||²), or 1 where that is 0 (a set of identical images has no coefficients to scale by)."""
    norm = rows.detach().pow(2).sum(1).mean().sqrt()
    return torch.where(norm > 0, norm, torch.ones_like(norm))


class SyntheticSet:
    """What every parameterisation offers the outer loop.

    `support()` is the KRR support set `(X_s, Y_s)` the outer step regresses
    from (`images()`, `targets()`: differentiable w.r.t. `parameters()`), of
    `num_images` rows; `parameters()` / `param_groups()` what the optimiser learns;
    `project_targets` the closest targets the set can store; `storage_bytes`,
    `summary`, `state_dict` / `load_state_dict` what is saved. `views` are the
    fixed views the support holds (`krrst.distill.FixedViews` adds some).
    """

    views: tuple[str, ...] = ("identity",)
    # this parameterisation's constructor options -> the DistillConfig fields that give them
    config_fields: dict[str, str] = {}

    @classmethod
    def from_config(cls, initial_images: torch.Tensor, initial_targets: torch.Tensor, config: Any) -> "SyntheticSet":
        """The set a distillation config asks for, its options read from the config's fields."""
        options = {option: getattr(config, field) for option, field in cls.config_fields.items()}
        return cls(initial_images, initial_targets, **options)

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(X_s, Y_s)`: m x C x H x W normalised images (differentiable in the parameters) and m x d targets."""
        return self.images(), self.targets()

    def storage_bytes(self, bytes_per_value: int = 4) -> int:
        return sum(p.numel() for p in self.parameters()) * bytes_per_value

    def summary(self) -> dict[str, Any]:
        """JSON-able: the kind, the number of images, the constructor's options (tuples as lists), the storage."""
        options = {name: getattr(self, name) for name in self.config_fields}
        options = {name: list(value) if isinstance(value, tuple) else value for name, value in options.items()}
        return {"kind": self.kind, "num_images": self.num_images, **options, "storage_bytes": self.storage_bytes()}


class _ChannelLeaves(SyntheticSet):
    """Images made of named parts (m x C x r x r) learnt as one leaf per channel, and every entry of `Y_s` learnt.

    One leaf per channel, so that channel c of each of the P parts gets Adam lr
    `image_lr / (std_c * P)`: `image_lr` is in raw-pixel units and `X_s` is
    normalised (see `krrst.distill.DistillConfig`). The parts' names are their
    `state_dict` keys.
    """

    def __init__(self, parts: dict[str, torch.Tensor], initial_targets: torch.Tensor):
        self.channel_leaves = {name: [part[:, c : c + 1].detach().clone().requires_grad_(True)
                                      for c in range(part.shape[1])] for name, part in parts.items()}
        self.target_values = initial_targets.detach().clone().requires_grad_(True)

    @property
    def num_images(self) -> int:
        return len(self.target_values)

    def part(self, name: str) -> torch.Tensor:
        return torch.cat(self.channel_leaves[name], dim=1)

    def targets(self) -> torch.Tensor:
        return self.target_values

    def parameters(self) -> list[torch.Tensor]:
        return [leaf for channels in self.channel_leaves.values() for leaf in channels] + [self.target_values]

    def param_groups(self, image_lr: float, target_lr: float, std: Sequence[float]) -> list[dict[str, Any]]:
        std = _check_std(std, len(next(iter(self.channel_leaves.values()))))
        share = len(self.channel_leaves)
        groups = [{"params": [leaf], "lr": image_lr / (std[c] * share)}
                  for channels in self.channel_leaves.values() for c, leaf in enumerate(channels)]
        return groups + [{"params": [self.target_values], "lr": target_lr}]

    def project_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The closest targets this set can store: any m x d targets, as they are."""
        stored = tuple(self.target_values.shape)
        if targets.shape != stored:
            raise KrrstError(f"project_targets: expected targets of shape {stored}, got {tuple(targets.shape)}")
        return targets

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: self.part(name).detach().clone() for name in self.channel_leaves}
        return state | {"targets": self.target_values.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name: self.part(name) for name in self.channel_leaves}
        _check_state(state, expected | {"targets": self.target_values}, self.kind)
        with torch.no_grad():  # in place: the optimiser keeps referring to the same leaves
            for name, channels in self.channel_leaves.items():
                for c, leaf in enumerate(channels):
                    leaf.copy_(state[name][:, c : c + 1])
            self.target_values.copy_(state["targets"])


class PixelSet(_ChannelLeaves):
    """Every pixel of `X_s` and every entry of `Y_s` learnt (KRR-ST): one part, the images, so channel c gets
    lr `image_lr / std_c`. Storage: m*C*H*W + m*d values."""

    kind = "pixels"

    def __init__(self, initial_images: torch.Tensor, initial_targets: torch.Tensor):
        _check_initial(initial_images, initial_targets)
        super().__init__({"images": initial_images}, initial_targets)
        self.image_channels = self.channel_leaves["images"]

    def images(self) -> torch.Tensor:
        return self.part("images")


def _pca(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coefficients m x k, basis k x D, mean D) with `coefficients @ basis + mean` the best rank-k fit of `rows`.

    PCA by a thin SVD of the centred rows, `rows - mean = U S Vᵀ`:
    coefficients `U_k S_k`, basis `V_kᵀ` (orthonormal rows). By Eckart-Young it
    minimises the Frobenius error among rank-k (affine) fits; exact for k >= m - 1.
    """
    mean = rows.mean(0)
    u, s, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].contiguous(), mean


def _check_rank(name: str, rank: int, num_images: int, dim: int) -> None:
    if not isinstance(rank, int) or not 1 <= rank <= min(num_images, dim):
        raise KrrstError(f"synthetic set: {name} must be an integer in [1, min(m={num_images}, {dim})], got {rank!r}")


class BasisSet(SyntheticSet):
    """`X_s = A B + mu` and `Y_s = A_t B_t + mu_t`, all six learnt (Yu, Yao & Chiu, ICLR 2025).

    `A`: m x k coefficients, `B`: k x (C*H*W) basis, `mu`: the mean image
    (likewise `A_t`: m x k_t, `B_t`: k_t x d, `mu_t`: d). Initialised by PCA of
    the initial images / targets (`_pca`), so the materialised start is their
    best rank-k approximation. Storage: m*k + k*C*H*W + C*H*W + m*k_t + k_t*d + d values.

    Learning rates (`param_groups`), chosen so that one Adam step (which moves
    every parameter entry by about its lr) moves the materialised pixels by
    about what the pixel set's step does: a root-mean-square of
    `pixel_step = image_lr * sqrt(mean_c 1/std_c²)` per normalised pixel
    (per channel exactly `image_lr / std_c` is not reachable: a basis mixes channels).
    - coefficients: `pixel_step * sqrt(D / k)`. With orthonormal basis rows,
      `||ΔA_i B|| = ||ΔA_i|| = lr * sqrt(k)`, i.e. an RMS of `pixel_step` per pixel.
    - basis: `pixel_step / a`, `a` the RMS coefficient-row norm at
      initialisation: PCA coefficients have orthogonal columns, so
      `||A ΔB||² = Σ_j s_j² ||ΔB_j||²` and the RMS per pixel is `lr * a`
      (exact at initialisation, about it later).
    - mean: `pixel_step`. Targets alike, with `target_lr` for `pixel_step`.
    `a` (and `a_t`) are fixed at initialisation and kept in `state_dict`, so a
    resumed run has the same learning rates.
    """

    kind = "basis"
    config_fields = {"image_rank": "image_rank", "target_rank": "target_rank"}

    def __init__(self, initial_images: torch.Tensor, initial_targets: torch.Tensor, image_rank: int,
                 target_rank: int):
        _check_initial(initial_images, initial_targets)
        m, *self.image_shape = initial_images.shape
        pixels, dim = math.prod(self.image_shape), initial_targets.shape[1]
        _check_rank("image_rank", image_rank, m, pixels)
        _check_rank("target_rank", target_rank, m, dim)
        with torch.no_grad():
            image_parts = _pca(initial_images.reshape(m, pixels), image_rank)
            target_parts = _pca(initial_targets, target_rank)
        names = ("coefficients", "basis", "mean")
        self.leaves = {f"image_{n}": t.detach().clone().requires_grad_(True) for n, t in zip(names, image_parts)}
        self.leaves |= {f"target_{n}": t.detach().clone().requires_grad_(True) for n, t in zip(names, target_parts)}
        # The basis lrs' scales, fixed at initialisation (see the class docstring).
        self.scales = {"image_coefficient_norm": _rms_row_norm(image_parts[0]),
                       "target_coefficient_norm": _rms_row_norm(target_parts[0])}

    @property
    def num_images(self) -> int:
        return len(self.leaves["image_coefficients"])

    @property
    def image_rank(self) -> int:
        return self.leaves["image_basis"].shape[0]

    @property
    def target_rank(self) -> int:
        return self.leaves["target_basis"].shape[0]

    def images(self) -> torch.Tensor:
        flat = torch.addmm(self.leaves["image_mean"], self.leaves["image_coefficients"], self.leaves["image_basis"])
        return flat.view(self.num_images, *self.image_shape)

    def targets(self) -> torch.Tensor:
        return torch.addmm(self.leaves["target_mean"], self.leaves["target_coefficients"], self.leaves["target_basis"])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.leaves.values())

    def param_groups(self, image_lr: float, target_lr: float, std: Sequence[float]) -> list[dict[str, Any]]:
        std = _check_std(std, self.image_shape[0])
        image_step = image_lr * math.sqrt(sum(1 / s**2 for s in std) / len(std))
        groups = []
        for what, step in (("image", image_step), ("target", target_lr)):
            rank, dim = self.leaves[f"{what}_basis"].shape
            lrs = {"coefficients": step * math.sqrt(dim / rank),
                   "basis": step / float(self.scales[f"{what}_coefficient_norm"]), "mean": step}
            groups += [{"params": [self.leaves[f"{what}_{part}"]], "lr": lr} for part, lr in lrs.items()]
        return groups

    def project_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The closest targets this set can store in its own budget: their best rank-k_t affine fit.

        A fresh PCA of `targets` (`_pca`, Eckart-Young) with the set's target
        rank: `A_t' B_t' + mu_t'` has the shapes of `A_t, B_t, mu_t`, so a set
        carrying these targets (e.g. the teacher's representations of its final
        images) costs the bytes `storage_bytes()` reports.
        """
        expected = (self.num_images, self.leaves["target_basis"].shape[1])
        if tuple(targets.shape) != expected:
            raise KrrstError(f"project_targets: expected targets of shape {expected}, got {tuple(targets.shape)}")
        coefficients, basis, mean = _pca(targets.detach(), self.target_rank)
        return torch.addmm(mean, coefficients, basis)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in (self.leaves | self.scales).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _check_state(state, self.leaves | self.scales, self.kind)
        with torch.no_grad():  # in place: the optimiser keeps referring to the same leaves
            for name, tensor in (self.leaves | self.scales).items():
                tensor.copy_(state[name])


def _check_levels(levels: Sequence[int], image_shape: Sequence[int]) -> tuple[int, ...]:
    """The pyramid's sides as a tuple: non-empty, strictly increasing integers in [1, H] of square C x H x H images."""
    height, width = image_shape[-2:]
    if height != width:
        raise KrrstError(f"pyramid synthetic set: images must be square, got {height} x {width}")
    if not valid_pyramid_levels(levels, height):
        raise KrrstError(f"synthetic set: levels must be strictly increasing integers in [1, {height}] "
                         f"(the image side), got {levels!r}")
    return tuple(levels)


def valid_pyramid_levels(levels: Any, side: int) -> bool:
    """Whether `levels` are pyramid sides for side x side images: a non-empty, strictly increasing sequence of
    integers in [1, side] (checked here for `PyramidSet` and by `DistillConfig` for `distill.pyramid_levels`)."""
    sides = tuple(levels) if isinstance(levels, Sequence) and not isinstance(levels, str) else ()
    return (bool(sides) and all(isinstance(r, int) and not isinstance(r, bool) for r in sides)
            and sides[0] >= 1 and sides[-1] <= side and all(a < b for a, b in zip(sides, sides[1:])))


def _upsample(level: torch.Tensor, side: int) -> torch.Tensor:
    """`up_l`: bilinear (align_corners=False) from r x r to side x side; the identity at r = side.

    Bilinear, not nearest: no block edges at every (side/r)-th pixel, which no
    real image has and a 3x3 convolution responds to (IDC's decoder, Kim et al.,
    ICML 2022, also resizes bilinearly). Each output pixel is a convex
    combination of at most 4 entries, which `PyramidSet`'s learning rates use.
    """
    if level.shape[-1] == side:
        return level
    return F.interpolate(level, size=(side, side), mode="bilinear", align_corners=False)


class PyramidSet(_ChannelLeaves):
    """`X_i = sum_l up_l(P_{i,l})`: each image a sum of learnt levels at lower resolutions; `Y_s` learnt as is.

    `P_{i,l}`: C x r_l x r_l for each side r_l of `levels` (strictly
    increasing, in [1, H]; square H x H images), `up_l` the fixed bilinear
    upsampling of `_upsample`. Initialised coarse to fine from the initial
    images: `P_{:,1} = down_1(X)`, then `P_{:,l} = down_l(X - sum_{j<l} up_j(P_{:,j}))`,
    `down_l` area (average-pool) downsampling to r_l x r_l; so the start is
    exact when the finest level is H (down and up are then the identity) and
    `up_1(down_1(X))` for a single level below H. Targets: m x d, as `PixelSet`.
    Storage: m * sum_l C*r_l² + m*d values.

    Learning rates (`param_groups`): one leaf per (level, channel), lr
    `image_lr / (std_c * L)` for L levels; targets `target_lr`. An Adam step
    moves every entry by at most about its lr, and a pixel of `up_l(P_l)` is a
    convex combination of entries of `P_l`, so it moves by at most that level's
    lr whatever r_l. Summed over the L levels a pixel moves by at most
    `image_lr / std_c`, `PixelSet`'s step, reached when every level moves it the
    same way (a smooth gradient). With `levels = (H,)` the set is `PixelSet`,
    update for update.
    """

    kind = "pyramid"
    config_fields = {"levels": "pyramid_levels"}

    def __init__(self, initial_images: torch.Tensor, initial_targets: torch.Tensor, levels: Sequence[int]):
        _check_initial(initial_images, initial_targets)
        self.image_shape = tuple(initial_images.shape[1:])
        self.levels = _check_levels(levels, self.image_shape)
        side = self.image_shape[-1]
        parts, residual = {}, initial_images.detach()
        with torch.no_grad():  # coarse to fine: each level is the area downsampling of what is not yet explained
            for r in self.levels:
                parts[f"level_{r}"] = F.adaptive_avg_pool2d(residual, r)
                residual = residual - _upsample(parts[f"level_{r}"], side)
        super().__init__(parts, initial_targets)  # one leaf per (level, channel), see the class docstring
        self.level_channels = list(self.channel_leaves.values())

    def level(self, index: int) -> torch.Tensor:
        """`P_{:,l}`: m x C x r_l x r_l."""
        return self.part(f"level_{self.levels[index]}")

    def images(self) -> torch.Tensor:
        upsampled = [_upsample(self.level(index), self.image_shape[-1]) for index in range(len(self.levels))]
        return sum(upsampled[1:], upsampled[0])


def pixel_storage_bytes(num_images: int, image_shape: Sequence[int], target_dim: int, bytes_per_value: int = 4) -> int:
    """Storage of a `PixelSet` of `num_images`: (m*C*H*W + m*d) values."""
    return num_images * (math.prod(image_shape) + target_dim) * bytes_per_value


def basis_images_for_budget(budget_bytes: int, image_shape: Sequence[int], target_dim: int, image_rank: int,
                            target_rank: int, bytes_per_value: int = 4) -> int:
    """The largest m whose `BasisSet` storage fits `budget_bytes`.

    Storage is `k*D + D + k_t*d + d` shared values plus `k + k_t` per image
    (D = C*H*W), so m = floor((budget / bytes_per_value - shared) / (k + k_t)).
    "Same storage, more images": `budget_bytes = pixel_storage_bytes(m0, ...)`.
    """
    pixels = math.prod(image_shape)
    shared = image_rank * pixels + pixels + target_rank * target_dim + target_dim
    count = (budget_bytes // bytes_per_value - shared) // (image_rank + target_rank)
    if count < max(image_rank, target_rank):
        raise KrrstError(f"a storage budget of {budget_bytes} bytes holds {max(count, 0)} basis images at "
                         f"image_rank={image_rank}, target_rank={target_rank}; the ranks need at least "
                         f"{max(image_rank, target_rank)}: lower them")
    return int(count)


def pyramid_images_for_budget(budget_bytes: int, image_shape: Sequence[int], target_dim: int, levels: Sequence[int],
                              bytes_per_value: int = 4) -> int:
    """The largest m whose `PyramidSet` storage fits `budget_bytes`.

    Nothing is shared: each image costs `C * sum_l r_l² + d` values, so
    m = floor(budget / bytes_per_value / (C * sum_l r_l² + d)).
    "Same storage, more images": `budget_bytes = pixel_storage_bytes(m0, ...)`.
    """
    sides = _check_levels(levels, image_shape)
    per_image = image_shape[0] * sum(r * r for r in sides) + target_dim
    count = budget_bytes // bytes_per_value // per_image
    if count < 1:
        raise KrrstError(f"a storage budget of {budget_bytes} bytes holds no pyramid image at levels={list(sides)} "
                         f"({per_image * bytes_per_value} bytes each): coarsen the levels or raise the budget")
    return int(count)


PARAMETERIZATIONS: Registry[type[SyntheticSet]] = Registry("parameterisation")
PARAMETERIZATIONS.register("pixels", PixelSet)
PARAMETERIZATIONS.register("basis", BasisSet)
PARAMETERIZATIONS.register("pyramid", PyramidSet)


def make_synthetic_set(kind: str, initial_images: torch.Tensor, initial_targets: torch.Tensor, **options: Any):
    """A `PixelSet` (kind "pixels", no options), `BasisSet` (kind "basis": `image_rank`, `target_rank`)
    or `PyramidSet` (kind "pyramid": `levels`)."""
    cls = PARAMETERIZATIONS.get(kind, "synthetic set kind")
    if set(options) != set(cls.config_fields):
        raise KrrstError(f"synthetic set kind {kind!r} takes options {list(cls.config_fields)}, got {sorted(options)}")
    return cls(initial_images, initial_targets, **options)


# --------------------------------------------------------------------------- augmented views' representations


class AugmentationPredictor(nn.Module):
    """Predicts the teacher's representation of each fixed view of an image from the image's representation.

    After the approximation network of Yu, Yao & Chiu (ICLR 2025): for each
    non-identity view v of `names`, `P_v(y) = W_v y + b_v` (W_v d x d,
    initialised to the identity, b_v to 0), or with `hidden` = h,
    `P_v(y) = y + W2_v relu(W1_v y + b1_v) + b2_v` (W2_v initialised to 0).
    Either way every `P_v` starts as the identity. `identity` is predicted
    exactly (`P(y) = y`) and holds no parameters. `forward(targets)` returns
    (A*m) x d, view-major as `krrst.augment.fixed_augment_all(images, names)`.
    `generator` draws W1 (the only random initialisation).
    """

    def __init__(self, dim: int, names: Sequence[str] = ROTATIONS, hidden: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.names = check_fixed_augmentations(names)
        if dim < 1 or (hidden is not None and hidden < 1):
            raise KrrstError(f"AugmentationPredictor: dim and hidden must be >= 1, got {dim}, {hidden}")
        views = sum(name != "identity" for name in self.names)
        self.hidden = hidden
        if hidden is None:
            self.weight = nn.Parameter(torch.eye(dim).repeat(views, 1, 1))
            self.bias = nn.Parameter(torch.zeros(views, dim))
        else:
            self.weight1 = nn.Parameter(torch.randn(views, hidden, dim, generator=generator) / math.sqrt(dim))
            self.bias1 = nn.Parameter(torch.zeros(views, hidden))
            self.weight2 = nn.Parameter(torch.zeros(views, dim, hidden))
            self.bias2 = nn.Parameter(torch.zeros(views, dim))

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        if self.hidden is None:
            predicted = torch.einsum("vij,mj->vmi", self.weight, targets) + self.bias[:, None]
        else:
            inner = F.relu(torch.einsum("vhj,mj->vmh", self.weight1, targets) + self.bias1[:, None])
            predicted = targets + torch.einsum("vih,vmh->vmi", self.weight2, inner) + self.bias2[:, None]
        learnt = iter(predicted)
        return torch.cat([targets if name == "identity" else next(learnt) for name in self.names])

    storage_bytes = SyntheticSet.storage_bytes  # every parameter entry is stored, as in a synthetic set


def augmentation_predictor_loss(predictor: AugmentationPredictor, teacher_reps_of_views: torch.Tensor,
                                teacher_reps: torch.Tensor) -> torch.Tensor:
    """Mean over non-identity views v, images i, entries j of `(P_v(g(x_i)) - g(T_v x_i))_j²`.

    `teacher_reps`: m x d, the teacher's g(x_i) of real images;
    `teacher_reps_of_views`: (A*m) x d, g of `fixed_augment_all(x, predictor.names)`.
    The identity rows (predicted exactly) are left out of the mean. Fitting P
    to the teacher on real images is the approximation step of Yu, Yao & Chiu (ICLR 2025).
    """
    views, m = len(predictor.names), len(teacher_reps)
    if teacher_reps_of_views.shape != (views * m, teacher_reps.shape[1]):
        raise KrrstError(f"augmentation_predictor_loss: teacher_reps_of_views must be {views * m} x "
                         f"{teacher_reps.shape[1]} ({views} views of {m} images), "
                         f"got {tuple(teacher_reps_of_views.shape)}")
    keep = [v for v, name in enumerate(predictor.names) if name != "identity"]
    if not keep:
        return teacher_reps.new_zeros(())
    predicted = predictor(teacher_reps).view(views, m, -1)[keep]
    return F.mse_loss(predicted, teacher_reps_of_views.view(views, m, -1)[keep])
