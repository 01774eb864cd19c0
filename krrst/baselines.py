"""Baselines a distilled set is compared against, under the identical evaluation code.

- `random_subset`: m real images drawn without replacement (`random_subset_of`
  for given indices).
- `kmeans_coreset`: k-means with k = m in the teacher's feature space, and the
  real image nearest each centroid (distinct images).
- targets for both: the teacher's features of the chosen images (`Y = g(X)`,
  the fair comparison: they differ from KRR-ST only in the images) or the
  source's labels (`targets="labels"`, pre-trained with cross-entropy).
  Both return a `DistilledSet`, so they go through `evaluate.pretrain` and
  `evaluate.finetune` exactly as a KRR-ST set does.
- `high_loss_subset`: the m real images whose teacher representations are
  hardest to regress for briefly trained students (MKDT's "high-loss"
  initialisation, `high_loss_indices`), with teacher targets.
- `no_pretraining`: a freshly initialised network, the floor. Not a
  `DistilledSet` (there is nothing to pre-train on): `evaluate.evaluate_set`
  with no set and no network builds it, and the row's method is `none`.
- full-data SSL, the ceiling, is the teacher itself: pass it as
  `evaluate.evaluate_set(None, ..., pretrained=teacher)` (method `full-ssl`).

`kmeans` is a torch k-means (k-means++ init, then Lloyd or mini-batch
updates, distances by matrix products in chunks) that runs on the device of
its features, so a 1.2M-image source on a GPU needs no extra library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from krrst.augment import normalize
from krrst.distilled import DistilledSet
from krrst.features import batched_features
from krrst.infra.config import resolve_device
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch
from krrst.infra.progress import progress_bar
from krrst.models import fresh_model
from krrst.teacher import check_teacher_features, teacher_features

if TYPE_CHECKING:
    from krrst.data import ImageSet

TARGET_CHOICES = ("teacher", "labels")

# Lloyd's full passes up to this many points; mini-batch updates beyond (the "auto" rule).
MINIBATCH_THRESHOLD = 200_000
# Distance blocks hold at most this many floats (256 MB in float32).
_BLOCK_ELEMENTS = 1 << 26


def _check_targets(targets: str, source: "ImageSet", teacher: nn.Module | None, what: str) -> None:
    if targets not in TARGET_CHOICES:
        raise KrrstError(f"{what}: targets={targets!r} is not valid; expected one of {', '.join(TARGET_CHOICES)}")
    if targets == "labels" and source.labels is None:
        raise KrrstError(f"{what}: targets='labels' but the source {source.name!r} has no labels; "
                         "use targets='teacher'")
    if targets == "teacher" and teacher is None:
        raise KrrstError(f"{what}: targets='teacher' needs a teacher network (or use targets='labels')")


def _check_positive(value: Any, what: str, name: str = "m") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KrrstError(f"{what}: {name} must be a positive integer, got {value!r}")


def _check_m(m: int, n: int, what: str) -> None:
    _check_positive(m, what)
    if m > n:
        raise KrrstError(f"{what}: m={m} is more than the {n} source images")


def _source_features(teacher: nn.Module, source: "ImageSet", indices: torch.Tensor | None = None, *,
                     batch_size: int = 512, device: str | torch.device | None = None,
                     progress: bool = False) -> torch.Tensor:
    """The teacher's features (float32 N x d, on `device`) of the source images, or of `indices` only."""
    device = resolve_device(device)
    images = source.images if indices is None else source.images[indices.to(source.images.device)]
    features = teacher_features(teacher, images, source.mean, source.std, batch_size, device, progress).to(device)
    check_teacher_features(teacher, features, f"{len(images):,} images of {source.name or 'the source'}")
    return features


def _make_set(source: "ImageSet", indices: torch.Tensor, features: torch.Tensor | None, targets: str, method: str,
              teacher: nn.Module | None, config: dict[str, Any]) -> DistilledSet:
    cpu_indices = indices.cpu()
    images = normalize(source.images[cpu_indices.to(source.images.device)], source.mean, source.std).cpu()
    if targets == "teacher":
        target_tensor, kind = features.detach().float().cpu(), "representation"
        spec = getattr(teacher, "spec", None)
        teacher_arch = spec.get("arch") if isinstance(spec, dict) else type(teacher).__name__
    else:
        target_tensor, kind = source.labels[cpu_indices.to(source.labels.device)].cpu().long(), "hard_labels"
        config, teacher_arch = {**config, "num_classes": len(source.class_names)}, None
    return DistilledSet(images=images.contiguous(), targets=target_tensor.contiguous(), mean=tuple(source.mean),
                        std=tuple(source.std), target_kind=kind, method=method, source=source.name,
                        teacher_arch=teacher_arch, config={**config, "indices": [int(i) for i in cpu_indices]})


def random_subset(source: "ImageSet", m: int, teacher: nn.Module | None = None, *, seed: int = 0,
                  targets: Literal["teacher", "labels"] = "teacher", device: str | torch.device | None = None,
                  batch_size: int = 512, progress: bool = False) -> DistilledSet:
    """m distinct real images drawn uniformly by `seed`, as a `DistilledSet` (method `random`).

    Targets are the teacher's features of the normalised images
    (`targets="teacher"`) or the source's labels (`"labels"`, hard labels).
    The chosen indices are in `config["indices"]`.
    """
    _check_m(m, len(source), "random subset")
    _check_targets(targets, source, teacher, "random subset")
    generator = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(len(source), generator=generator)[:m]
    return random_subset_of(
        source, indices, teacher, targets=targets, device=device, batch_size=batch_size, progress=progress,
        config={"seed": int(seed)},
    )


def random_subset_of(source: "ImageSet", indices: torch.Tensor | list[int], teacher: nn.Module | None = None, *,
                     targets: Literal["teacher", "labels"] = "teacher", device: str | torch.device | None = None,
                     batch_size: int = 512, progress: bool = False,
                     config: dict[str, Any] | None = None) -> DistilledSet:
    """The real images at `indices` as a `DistilledSet` (method `random`), targets as in `random_subset`.

    For a subset chosen elsewhere, e.g. the very images KRR-ST's synthetic
    set was initialised from, so the pair differs only in what distillation
    did to them. Indices must be distinct and inside the source.
    """
    indices = torch.as_tensor(indices, dtype=torch.long).cpu().flatten()
    if len(indices) == 0:
        raise KrrstError("random subset: no indices given")
    if int(indices.min()) < 0 or int(indices.max()) >= len(source):
        raise KrrstError(f"random subset: indices must lie in [0, {len(source)}), "
                         f"got [{int(indices.min())}, {int(indices.max())}]")
    if len(indices.unique()) != len(indices):
        raise KrrstError("random subset: indices must be distinct")
    _check_targets(targets, source, teacher, "random subset")
    features = None
    if targets == "teacher":
        features = _source_features(teacher, source, indices, batch_size=batch_size, device=device, progress=progress)
    set_config = {"m": len(indices), **(config or {}), "targets": targets}
    return _make_set(source, indices, features, targets, "random", teacher, set_config)


# --------------------------------------------------------------------------- k-means


def _rows_per_block(k: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, k))


def _squared_distances(points: torch.Tensor, centroids: torch.Tensor, centroid_norms: torch.Tensor) -> torch.Tensor:
    """||p - c||^2 for a block of points against every centroid, via one matrix product (clamped at 0)."""
    point_norms = points.pow(2).sum(dim=1, keepdim=True)
    return (point_norms - 2.0 * points @ centroids.T + centroid_norms[None, :]).clamp_(min=0.0)


def assign_to_centroids(features: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid, squared distance to it) for every point, in memory-bounded blocks."""
    centroid_norms = centroids.pow(2).sum(dim=1)
    block = _rows_per_block(len(centroids))
    labels = torch.empty(len(features), dtype=torch.long, device=features.device)
    distances = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for start in range(0, len(features), block):
        d2 = _squared_distances(features[start : start + block], centroids, centroid_norms)
        distances[start : start + block], labels[start : start + block] = d2.min(dim=1)
    return labels, distances


def kmeans_plus_plus(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k initial centres by k-means++ (Arthur & Vassilvitskii 2007): each drawn with probability ∝ D².

    The draws are single uniforms from the CPU `generator`, mapped through
    the cumulative D² on the features' device, so the choice is the same on
    any device up to float rounding.
    """
    n = len(features)
    chosen = torch.empty(k, dtype=torch.long)
    first = int(torch.randint(n, (), generator=generator))
    chosen[0] = first
    nearest = (features - features[first]).pow(2).sum(dim=1)
    for index in range(1, k):
        cumulative = nearest.double().cumsum(0)
        total = float(cumulative[-1])
        if total <= 0.0:  # every point coincides with a centre: fall back to any point not yet chosen
            taken = set(chosen[:index].tolist())
            pick = next(i for i in range(n) if i not in taken)
        else:
            uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
            threshold = torch.tensor(uniform * total, dtype=torch.float64, device=features.device)
            pick = int(torch.searchsorted(cumulative, threshold, right=True).clamp_(max=n - 1))
        chosen[index] = pick
        nearest = torch.minimum(nearest, (features - features[pick]).pow(2).sum(dim=1))
    return chosen


def kmeans(features: torch.Tensor, k: int, *, iterations: int = 20, seed: int = 0,
           algorithm: Literal["auto", "lloyd", "minibatch"] = "auto", minibatch_size: int = 8192,
           init_sample: int = 100_000, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of N x d `features` on their device; returns (k x d centroids, N cluster indices).

    Init: k-means++ on at most `init_sample` points drawn by `seed`.
    `lloyd`: `iterations` full assignment/update passes, stopping early when
    no assignment changes; an emptied cluster is re-seeded at the point
    farthest from its centroid. `minibatch` (Sculley 2010): `iterations`
    epochs of batches of `minibatch_size`, each centroid moving toward the
    mean of its batch points with step size (its batch count) / (its total
    count so far). `auto` picks Lloyd up to `MINIBATCH_THRESHOLD` points,
    mini-batch beyond. Distances are computed in blocks of at most 2^26
    entries, so memory stays bounded for any N (1.2M ImageNet features with
    k = 1,000 fit any GPU).
    """
    if features.dim() != 2:
        raise KrrstError(f"k-means features must be N x d, got shape {tuple(features.shape)}")
    n = len(features)
    _check_m(k, n, "k-means")
    if algorithm not in ("auto", "lloyd", "minibatch"):
        raise KrrstError(f"k-means algorithm={algorithm!r} is not valid; expected auto, lloyd or minibatch")
    if algorithm == "auto":
        algorithm = "lloyd" if n <= MINIBATCH_THRESHOLD else "minibatch"
    features = features.float()
    generator = torch.Generator().manual_seed(int(seed))
    sample = features
    if n > init_sample:
        sample = features[torch.randperm(n, generator=generator)[: max(init_sample, k)].to(features.device)]
    centroids = sample[kmeans_plus_plus(sample, k, generator).to(features.device)].clone()
    with progress_bar(iterations, f"k-means ({algorithm}, k={k})", enabled=progress, leave=False) as bar:
        if algorithm == "lloyd":
            _lloyd(features, centroids, iterations, bar)
        else:
            _minibatch_kmeans(features, centroids, iterations, minibatch_size, generator, bar)
    labels, _ = assign_to_centroids(features, centroids)
    return centroids, labels


def _lloyd(features: torch.Tensor, centroids: torch.Tensor, iterations: int, bar) -> None:
    """Lloyd's passes on `centroids` in place (see `kmeans`)."""
    previous = None
    for _ in range(iterations):
        labels, distances = assign_to_centroids(features, centroids)
        counts = torch.bincount(labels, minlength=len(centroids))
        sums = torch.zeros_like(centroids).index_add_(0, labels, features)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(features.dtype)
        empty = torch.nonzero(~nonempty).flatten()
        if len(empty):
            farthest = distances.topk(len(empty)).indices
            centroids[empty] = features[farthest]
        bar.update(1)
        if previous is not None and len(empty) == 0 and torch.equal(labels, previous):
            break
        previous = labels


def _minibatch_kmeans(features: torch.Tensor, centroids: torch.Tensor, iterations: int, batch_size: int,
                      generator: torch.Generator, bar) -> None:
    """Mini-batch epochs on `centroids` in place (see `kmeans`), the batch order drawn from `generator`."""
    n, k = len(features), len(centroids)
    totals = torch.zeros(k, dtype=features.dtype, device=features.device)
    for _ in range(iterations):
        order = torch.randperm(n, generator=generator).to(features.device)
        for start in range(0, n, batch_size):
            batch = features[order[start : start + batch_size]]
            labels, _ = assign_to_centroids(batch, centroids)
            counts = torch.bincount(labels, minlength=k).to(features.dtype)
            sums = torch.zeros_like(centroids).index_add_(0, labels, batch)
            totals += counts
            moved = counts > 0
            # c <- c + (sum_batch - b c) / total: each centroid is the running mean of its points.
            centroids[moved] += (sums[moved] - counts[moved, None] * centroids[moved]) / totals[moved, None]
        bar.update(1)


def nearest_distinct(features: torch.Tensor, centroids: torch.Tensor, candidates: int = 16) -> torch.Tensor:
    """For every centroid, the index of its nearest point, all distinct (k indices, int64, CPU).

    Each centroid's `candidates` nearest points are found in blocks; pairs
    are then taken in order of distance, skipping a point already taken, so
    a point two centroids share goes to the closer one and the other takes
    its next nearest. A centroid whose candidates all went elsewhere (rare)
    gets its nearest point not yet taken, by a full pass.
    """
    n, k = len(features), len(centroids)
    _check_m(k, n, "nearest points")
    features = features.float()
    centroids = centroids.float()
    candidates = min(candidates, n)
    centroid_norms = centroids.pow(2).sum(dim=1)
    best_d = torch.full((k, 0), float("inf"), device=features.device)
    best_i = torch.empty((k, 0), dtype=torch.long, device=features.device)
    block = _rows_per_block(k)
    for start in range(0, n, block):
        d2 = _squared_distances(features[start : start + block], centroids, centroid_norms).T  # k x block
        top = min(candidates, d2.shape[1])
        d_block, i_block = d2.topk(top, dim=1, largest=False)
        merged_d = torch.cat([best_d, d_block], dim=1)
        merged_i = torch.cat([best_i, i_block + start], dim=1)
        keep = min(candidates, merged_d.shape[1])
        best_d, order = merged_d.topk(keep, dim=1, largest=False)
        best_i = merged_i.gather(1, order)
    best_d, best_i = best_d.cpu(), best_i.cpu()
    pair_order = torch.argsort(best_d.flatten(), stable=True)
    chosen = torch.full((k,), -1, dtype=torch.long)
    taken: set[int] = set()
    for flat in pair_order.tolist():
        centroid, point = divmod(flat, best_d.shape[1])
        point = int(best_i[centroid, point])
        if chosen[centroid] >= 0 or point in taken:
            continue
        chosen[centroid] = point
        taken.add(point)
    for centroid in torch.nonzero(chosen < 0).flatten().tolist():
        distances = (features - centroids[centroid]).pow(2).sum(dim=1)
        if taken:
            distances[torch.tensor(sorted(taken), device=features.device)] = float("inf")
        point = int(distances.argmin())
        chosen[centroid] = point
        taken.add(point)
    return chosen


def kmeans_indices(features: torch.Tensor, m: int, *, seed: int = 0, iterations: int = 20,
                   algorithm: Literal["auto", "lloyd", "minibatch"] = "auto", progress: bool = False) -> torch.Tensor:
    """The m distinct points nearest each of m k-means centroids of `features` (N x d): the k-means coreset's
    choice, and KRR-ST's `init=kmeans`."""
    centroids, _ = kmeans(features, m, iterations=iterations, seed=seed, algorithm=algorithm, progress=progress)
    return nearest_distinct(features, centroids)


def kmeans_coreset(source: "ImageSet", m: int, teacher: nn.Module, *, seed: int = 0,
                   targets: Literal["teacher", "labels"] = "teacher", iterations: int = 20,
                   algorithm: Literal["auto", "lloyd", "minibatch"] = "auto", device: str | torch.device | None = None,
                   batch_size: int = 512, progress: bool = False) -> DistilledSet:
    """The real image nearest each of m k-means centroids in the teacher's feature space (method `kmeans`).

    Features are the teacher's outputs on the normalised images (eval mode),
    computed once for the whole source and kept on `device` (N x d float32:
    2.4 GB for 1.2M images at d = 512). k-means as `kmeans` (seeded by
    `seed`); the m chosen images are distinct (`nearest_distinct`). Targets:
    those images' teacher features, or the source's labels.
    """
    _check_m(m, len(source), "k-means coreset")
    if teacher is None:
        raise KrrstError("k-means coreset needs a teacher network: clustering happens in its feature space")
    _check_targets(targets, source, teacher, "k-means coreset")
    features = _source_features(teacher, source, batch_size=batch_size, device=device, progress=progress)
    indices = kmeans_indices(features, m, seed=seed, iterations=iterations, algorithm=algorithm, progress=progress)
    chosen_features = features[indices.to(features.device)] if targets == "teacher" else None
    config = {"m": m, "seed": int(seed), "targets": targets, "iterations": iterations, "algorithm": algorithm}
    return _make_set(source, indices, chosen_features, targets, "kmeans", teacher, config)


# --------------------------------------------------------------------------- high-loss subset


def _draw_candidates(n: int, candidates: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """`candidates` distinct indices below n drawn by `generator`, sorted; None when that would be all of them."""
    if candidates is None or candidates >= n:
        return None
    _check_positive(candidates, "high-loss subset", "candidates")
    return torch.randperm(n, generator=generator)[:candidates].sort().values


def _train_students(images: torch.Tensor, targets: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                    arch: str, arch_options: dict[str, Any], students: int, epochs: int, batch_size: int,
                    sgd: dict[str, float], generator: torch.Generator, progress: bool) -> list[nn.Module]:
    """The students of `high_loss_indices`: fresh `arch` networks trained by SGD to regress `targets` (eval mode).

    Each student's init seed and batch order come from `generator`, in turn; they train on the images' device.
    """
    models = []
    total = students * epochs * -(-len(images) // batch_size)
    watch = LossWatch("high-loss students", "their lr too high for their batch size", images.device)
    steps = 0
    with progress_bar(total, "high-loss students", unit="step", enabled=progress, leave=False) as bar:
        for _ in range(students):
            student_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            model = fresh_model(arch, targets.shape[1], student_seed, **arch_options).to(images.device)
            optimizer = torch.optim.SGD(model.parameters(), **sgd)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=generator).to(images.device)
                for start in range(0, len(images), batch_size):
                    batch = order[start : start + batch_size]
                    loss = torch.nn.functional.mse_loss(model(normalize(images[batch], mean, std)), targets[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    watch.update(loss, steps)
                    bar.update()
            watch.check()  # a diverged student would score every image NaN
            models.append(model.eval())
    return models


def high_loss_indices(source_images: torch.Tensor, target_reps: torch.Tensor, num_images: int, *,
                      mean: tuple[float, ...], std: tuple[float, ...], arch: str = "convnet3",
                      arch_options: dict[str, Any] | None = None, students: int = 3, epochs: int = 2,
                      batch_size: int = 256, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                      seed: int = 0, device: str | torch.device | None = None, candidates: int | None = None,
                      models: list[nn.Module] | None = None, progress: bool = False) -> torch.Tensor:
    """Indices (int64, CPU, descending loss) of the m images hardest to regress: MKDT's "high-loss" initialisation.

    MKDT (Joshi et al., ICLR 2025, Sec. 4) starts its synthetic set from the
    real images with the largest knowledge-distillation loss
    `l_i = (1/S) sum_s mean_j (f_s(x_i)_j - y_ij)^2`, averaged over S student
    networks `f_s` trained to regress the teacher's representations `y_i`
    (its public code scores with the final weights of its expert
    trajectories). Here S = `students` freshly seeded `arch` networks (d-dim
    linear head) are trained for `epochs` epochs of SGD (`lr`, `momentum`,
    `weight_decay`, batches of `batch_size`, no augmentation: the experts'
    recipe) on the MSE to `target_reps`, then every image is scored in eval
    mode. `models` skips the training and scores those networks instead, in
    the mode they are in. `candidates` = k < N runs all of it on k images
    drawn by `seed` (for speed on a large source); the returned indices are
    still into `source_images`. Ties keep the lower index first.
    """
    n = len(source_images)
    _check_m(num_images, n, "high-loss subset")
    if source_images.dim() != 4 or source_images.dtype != torch.uint8:
        raise KrrstError(
            f"high-loss subset: source images must be uint8 N x C x H x W, got {source_images.dtype} "
            f"{tuple(source_images.shape)}"
        )
    if target_reps.dim() != 2 or len(target_reps) != n:
        raise KrrstError(f"high-loss subset: target_reps must be {n} x d, got shape {tuple(target_reps.shape)}")
    for value, name in ((students, "students"), (epochs, "epochs"), (batch_size, "batch_size")):
        _check_positive(value, "high-loss subset", name)
    if candidates is not None:
        _check_positive(candidates, "high-loss subset", "candidates")
        if candidates < num_images:
            raise KrrstError(
                f"high-loss subset: candidates={candidates} is fewer than the m={num_images} images asked for"
            )
    generator = torch.Generator().manual_seed(int(seed))
    pool = _draw_candidates(n, candidates, generator)
    images, targets = source_images, target_reps
    if pool is not None:  # else no copy of a large source
        images, targets = images[pool.to(images.device)], targets[pool.to(targets.device)]
    device = resolve_device(device)
    images, targets = images.to(device), targets.to(device).float()
    if models is None:
        sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        models = _train_students(images, targets, mean, std, arch, arch_options or {}, students, epochs, batch_size,
                                 sgd, generator, progress)
    if not models:
        raise KrrstError("high-loss subset: no models to score with")
    scores = torch.zeros(len(images), dtype=torch.float64, device=device)
    for model in models:  # each in the mode it is in, on the images' device
        outputs = batched_features(model, images, mean=mean, std=std, chunk=batch_size, dtype=torch.float32)
        scores += (outputs - targets).pow(2).mean(dim=1).double()  # the per-image MSE
    scores /= len(models)
    order = torch.argsort(-scores.cpu(), stable=True)[:num_images]
    return order if pool is None else pool[order]


def high_loss_subset(source: "ImageSet", teacher: nn.Module, m: int, *, seed: int = 0, arch: str = "convnet3",
                     arch_options: dict[str, Any] | None = None, students: int = 3, epochs: int = 2,
                     batch_size: int = 256, lr: float = 0.1, candidates: int | None = None,
                     device: str | torch.device | None = None, progress: bool = False) -> DistilledSet:
    """The m real images of `high_loss_indices` with their teacher features as targets (method `high-loss`).

    The teacher's features of the whole source (or of the `candidates`
    drawn) are the regression targets of the students and the set's targets.
    The chosen indices, in descending loss, are in `config["indices"]`.
    """
    _check_m(m, len(source), "high-loss subset")
    if teacher is None:
        raise KrrstError("high-loss subset needs a teacher network: its representations are the regression targets")
    device = resolve_device(device)
    # drawn here so that only the candidates need teacher features
    pool = _draw_candidates(len(source), candidates, torch.Generator().manual_seed(int(seed)))
    features = _source_features(teacher, source, pool, batch_size=512, device=device, progress=progress)
    images = source.images if pool is None else source.images[pool.to(source.images.device)]
    chosen = high_loss_indices(
        images, features, m, mean=source.mean, std=source.std, arch=arch, arch_options=arch_options,
        students=students, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress,
    )
    indices = chosen if pool is None else pool[chosen]
    config = {
        "m": m, "seed": int(seed), "targets": "teacher", "arch": arch, "arch_options": dict(arch_options or {}),
        "students": students, "epochs": epochs, "batch_size": batch_size, "lr": lr, "candidates": candidates,
    }
    return _make_set(source, indices, features[chosen.to(features.device)], "teacher", "high-loss", teacher, config)


def no_pretraining(arch: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A freshly initialised `arch` network without a head (init fixed by `seed`): the `none` baseline."""
    return fresh_model(arch, None, seed, **overrides)
