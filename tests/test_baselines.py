"""Tests of the baselines: random subsets, k-means coresets, no pre-training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from krrst import baselines as B
from krrst.augment import normalize
from krrst.data import ImageSet
from krrst.infra.errors import KrrstError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _source(n: int = 60, size: int = 4, seed: int = 0, labelled: bool = True) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.arange(n) % 5 if labelled else None
    return ImageSet(images=images, labels=labels, class_names=list("abcde"), mean=MEAN, std=STD, name="toy")


def _blobs(blobs: int, per_blob: int, seed: int = 0) -> tuple[ImageSet, torch.Tensor]:
    """Images in `blobs` tight, far-apart groups (shuffled); returns the set and each image's blob."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randint(30, 226, (blobs, 3, 4, 4), generator=generator)
    membership = torch.arange(blobs).repeat_interleave(per_blob)
    noise = torch.randint(-6, 7, (len(membership), 3, 4, 4), generator=generator)
    images = (centres[membership] + noise).clamp(0, 255).to(torch.uint8)
    order = torch.randperm(len(membership), generator=generator)
    image_set = ImageSet(images=images[order], labels=None, class_names=[], mean=MEAN, std=STD, name="blobs")
    return image_set, membership[order]


def _linear_teacher(d: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, d))


# --------------------------------------------------------------------------- random subset


def test_random_subset_is_distinct_and_seed_determined():
    source, teacher = _source(), _linear_teacher()
    first = B.random_subset(source, 20, teacher, seed=3)
    indices = torch.tensor(first.config["indices"])
    assert len(first) == 20 and len(indices.unique()) == 20
    assert first.method == "random" and first.target_kind == "representation"
    assert first.config["indices"] == B.random_subset(source, 20, teacher, seed=3).config["indices"]
    assert first.config["indices"] != B.random_subset(source, 20, teacher, seed=4).config["indices"]

    expected_images = normalize(source.images[indices], MEAN, STD)
    torch.testing.assert_close(first.images, expected_images)
    with torch.no_grad():
        torch.testing.assert_close(first.targets, teacher(expected_images))


def test_random_subset_of_given_indices():
    source, teacher = _source(), _linear_teacher()
    chosen = B.random_subset_of(source, [7, 3, 11], teacher)
    assert chosen.config["indices"] == [7, 3, 11] and chosen.config["m"] == 3
    torch.testing.assert_close(chosen.images, normalize(source.images[[7, 3, 11]], MEAN, STD))
    for bad, message in (([1, 1], "distinct"), ([0, 60], r"\[0, 60\)"), ([], "no indices")):
        with pytest.raises(KrrstError, match=message):
            B.random_subset_of(source, bad, teacher)


def test_random_subset_with_labels_and_its_errors():
    source = _source()
    labelled = B.random_subset(source, 10, seed=0, targets="labels")
    indices = torch.tensor(labelled.config["indices"])
    assert labelled.target_kind == "hard_labels" and torch.equal(labelled.targets, source.labels[indices])
    assert labelled.config["num_classes"] == 5
    with pytest.raises(KrrstError, match="more than the 60"):
        B.random_subset(source, 61, seed=0, targets="labels")
    with pytest.raises(KrrstError, match="needs a teacher"):
        B.random_subset(source, 5)
    with pytest.raises(KrrstError, match="has no labels"):
        B.random_subset(_source(labelled=False), 5, targets="labels")
    with pytest.raises(KrrstError, match="expected one of teacher, labels"):
        B.random_subset(source, 5, targets="logits")


# --------------------------------------------------------------------------- k-means


def test_kmeans_coreset_picks_one_image_per_blob_nearest_its_centre():
    source, membership = _blobs(blobs=6, per_blob=25)
    coreset = B.kmeans_coreset(source, 6, nn.Flatten(), seed=0)
    indices = torch.tensor(coreset.config["indices"])
    assert sorted(membership[indices].tolist()) == list(range(6))

    features = normalize(source.images, MEAN, STD).flatten(1)
    for index in indices.tolist():
        blob = membership == membership[index]
        centre = features[blob].mean(dim=0)
        members = torch.nonzero(blob).flatten()
        nearest = members[(features[members] - centre).pow(2).sum(dim=1).argmin()]
        assert index == int(nearest)
    torch.testing.assert_close(coreset.targets, features[indices])  # targets: the teacher's features


@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_kmeans_finds_the_blob_centres(algorithm):
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 8, generator=generator) * 20
    membership = torch.arange(5).repeat_interleave(200)
    points = centres[membership] + torch.randn(1000, 8, generator=generator) * 0.3
    centroids, labels = B.kmeans(points, 5, iterations=10, seed=0, algorithm=algorithm, minibatch_size=128)
    match = torch.cdist(centroids, centres).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(5))
    torch.testing.assert_close(centroids, centres[match], atol=0.1, rtol=0)
    assert torch.equal(match[labels], membership)


def test_nearest_distinct_gives_shared_nearest_points_to_the_closer_centroid():
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    centroids = torch.tensor([[0.4], [0.2], [9.0]])
    # Both first centroids are nearest point 0; the closer (0.2) keeps it, the other takes point 1.
    assert B.nearest_distinct(points, centroids, candidates=2).tolist() == [1, 0, 3]
    # With one candidate each the second centroid falls back to a full pass over untaken points.
    assert B.nearest_distinct(points, centroids, candidates=1).tolist() == [1, 0, 3]


def test_kmeans_coreset_with_labels_and_errors():
    source = _source()
    coreset = B.kmeans_coreset(source, 5, _linear_teacher(), targets="labels")
    indices = torch.tensor(coreset.config["indices"])
    assert len(indices.unique()) == 5 and torch.equal(coreset.targets, source.labels[indices])
    with pytest.raises(KrrstError, match="needs a teacher"):
        B.kmeans_coreset(source, 5, None)
    with pytest.raises(KrrstError, match="positive integer"):
        B.kmeans_coreset(source, 0, _linear_teacher())


# --------------------------------------------------------------------------- no pre-training


def test_no_pretraining_is_a_seeded_fresh_network_without_head():
    first = B.no_pretraining("convnet3", seed=1, widths=(4, 4, 4))
    again = B.no_pretraining("convnet3", seed=1, widths=(4, 4, 4))
    other = B.no_pretraining("convnet3", seed=2, widths=(4, 4, 4))
    assert isinstance(first.head, nn.Identity)
    weights = first.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in again.state_dict().items())
    assert not torch.equal(weights["blocks.0.0.weight"], other.state_dict()["blocks.0.0.weight"])


# --------------------------------------------------------------------------- high-loss subset


def _learnable_and_shuffled(n: int = 64, noisy: int = 8, seed: int = 0):
    """8x8 images with per-image colours; targets a linear map of the channel means, except `noisy` shuffled ones.

    The shuffled examples get another shuffled example's target: the same
    marginal distribution as the rest (so an untrained network cannot tell
    them apart by magnitude), but no function of their own image.
    """
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(20, 236, (n, 3, 1, 1), generator=generator)
    images = (colours + torch.randint(-15, 16, (n, 3, 8, 8), generator=generator)).clamp(0, 255).to(torch.uint8)
    mixing = torch.randn(6, 3, generator=generator)
    targets = normalize(images, MEAN, STD).mean(dim=(2, 3)) @ mixing.T
    chosen = torch.randperm(n, generator=generator)[:noisy]
    targets[chosen] = targets[chosen.roll(1)]
    return images, targets, chosen


HIGH_LOSS_OPTIONS = {"widths": (8, 8, 8), "image_size": 8}


def test_high_loss_indices_pick_the_examples_with_unlearnable_targets():
    images, targets, noisy = _learnable_and_shuffled()
    chosen = B.high_loss_indices(
        images, targets, 8, mean=MEAN, std=STD, arch_options=HIGH_LOSS_OPTIONS, students=2, epochs=30,
        batch_size=16, lr=0.05, seed=0, device="cpu",
    )
    assert chosen.dtype == torch.long and len(chosen) == 8
    assert sorted(chosen.tolist()) == sorted(noisy.tolist())


def test_high_loss_indices_are_seed_determined_descending_and_checked():
    images, targets, _ = _learnable_and_shuffled()
    kwargs = dict(mean=MEAN, std=STD, arch_options=HIGH_LOSS_OPTIONS, students=1, epochs=1, batch_size=32)
    first = B.high_loss_indices(images, targets, 10, seed=3, **kwargs)
    assert torch.equal(first, B.high_loss_indices(images, targets, 10, seed=3, **kwargs))
    assert not torch.equal(first, B.high_loss_indices(images, targets, 10, seed=4, **kwargs))
    with pytest.raises(KrrstError, match="more than the 64"):
        B.high_loss_indices(images, targets, 65, **kwargs)
    with pytest.raises(KrrstError, match="fewer than the m=10"):
        B.high_loss_indices(images, targets, 10, candidates=5, **kwargs)
    with pytest.raises(KrrstError, match="64 x d"):
        B.high_loss_indices(images, targets[:10], 5, **kwargs)

    # Given models are scored as they are: descending order of the mean per-example loss.
    models = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6)) for _ in range(2)]
    scored = B.high_loss_indices(images, targets, 64, mean=MEAN, std=STD, models=models)
    with torch.no_grad():
        flat = normalize(images, MEAN, STD)
        losses = sum((model(flat) - targets).pow(2).mean(dim=1) for model in models) / 2
    assert torch.equal(scored, torch.argsort(losses, descending=True, stable=True))

    # candidates: only those images are scored, indices still into the source
    subset = B.high_loss_indices(images, targets, 5, candidates=20, seed=1, **kwargs)
    assert len(subset.unique()) == 5 and int(subset.max()) < 64


def test_high_loss_subset_is_a_teacher_target_set():
    images, _, _ = _learnable_and_shuffled()
    source = ImageSet(images=images, labels=None, class_names=[], mean=MEAN, std=STD, name="colours")
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    chosen = B.high_loss_subset(source, teacher, 7, arch_options=HIGH_LOSS_OPTIONS, students=1, epochs=1, batch_size=32)
    indices = torch.tensor(chosen.config["indices"])
    assert chosen.method == "high-loss" and chosen.target_kind == "representation" and len(chosen) == 7
    expected_images = normalize(images[indices], MEAN, STD)
    torch.testing.assert_close(chosen.images, expected_images)
    with torch.no_grad():
        torch.testing.assert_close(chosen.targets, teacher(expected_images))
    # candidates: students and scores on 20 images drawn by the seed; targets still g of the chosen images
    few = B.high_loss_subset(source, teacher, 5, candidates=20, seed=2, arch_options=HIGH_LOSS_OPTIONS, students=1,
                             epochs=1, batch_size=32)
    drawn = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:20]
    assert len(set(few.config["indices"])) == 5 and set(few.config["indices"]) <= set(drawn.tolist())
    with torch.no_grad():
        torch.testing.assert_close(few.targets, teacher(normalize(images[few.config["indices"]], MEAN, STD)))
    with pytest.raises(KrrstError, match="needs a teacher"):
        B.high_loss_subset(source, None, 5)
    with pytest.raises(KrrstError, match="more than the 64"):
        B.high_loss_subset(source, teacher, 65)
