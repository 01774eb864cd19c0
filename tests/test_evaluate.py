"""Tests of the evaluation protocol: pre-training, fine-tuning, probes, few-label splits, KD, label sets, rows."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from test_teacher import UNIT_ROUNDOFF, assert_states_match, fast_path_tolerances, relative_errors
from torch import nn

from krrst import evaluate as E
from krrst.augment import crop_flip, normalize
from krrst.data import ImageSet
from krrst.distilled import DistilledSet
from krrst.infra.errors import KrrstError
from krrst.infra.speed import SpeedSettings, reference_speed
from krrst.models import fresh_model, list_models
from krrst.results import RESULT_FIELDS, append_results, read_results, row_key

NARROW = {"widths": (8, 16, 16), "image_size": 16}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _representation_set(m: int = 48, d: int = 8, seed: int = 0) -> DistilledSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(m, 3, 16, 16, generator=generator)
    # Learnable targets: a fixed random linear map of the images.
    projection = torch.randn(3 * 16 * 16, d, generator=generator) / math.sqrt(3 * 16 * 16)
    return DistilledSet(images=images, targets=images.flatten(1) @ projection, mean=MEAN, std=STD, method="toy")


def _colour_set(per_class: int, seed: int, size: int = 16, name: str = "colours") -> ImageSet:
    """Class c is an image whose channel c is bright: separable by mean colour."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    base = torch.full((len(labels), 3, size, size), 60.0)
    base[torch.arange(len(labels)), labels] = 190.0
    noise = torch.randint(-40, 41, base.shape, generator=generator).float()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, labels=labels, class_names=["r", "g", "b"], mean=MEAN, std=STD, name=name)


class MeanColour(nn.Module):
    """A 'network' whose features are the mean colour: the probes only need forward_features."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------- pre-training


def test_pretrain_drives_regression_loss_down_and_moves_weights():
    distilled = _representation_set()
    config = E.PretrainConfig(epochs=40, batch_size=16, lr=0.05, seed=3)
    losses: list[float] = []
    model = E.pretrain(distilled, "convnet3", config, progress=False, on_epoch=lambda epoch, loss: losses.append(loss),
                       **NARROW)
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0]

    init = fresh_model("convnet3", distilled.feature_dim, 3, **NARROW)
    trained, initial = model.state_dict(), init.state_dict()
    assert trained.keys() == initial.keys()
    moved = [name for name, value in trained.items()
             if value.is_floating_point() and not torch.equal(value, initial[name])]
    assert "head.weight" in moved and "blocks.0.0.weight" in moved

    # Independently of the logged losses: the trained network fits the targets far better than its init.
    init.eval()
    with torch.no_grad():
        before = nn.functional.mse_loss(init(distilled.images), distilled.targets)
        after = nn.functional.mse_loss(model(distilled.images), distilled.targets)
    assert after < 0.3 * before


def test_pretrain_is_reproducible_for_a_seed():
    distilled = _representation_set(m=20)
    config = E.PretrainConfig(epochs=3, batch_size=8, lr=0.05, seed=1)
    first = E.pretrain(distilled, "convnet3", config, progress=False, **NARROW).state_dict()
    second = E.pretrain(distilled, "convnet3", config, progress=False, **NARROW).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_pretrain_rejects_images_that_do_not_fit_the_architecture():
    distilled = _representation_set(m=4)  # 16x16 images
    with pytest.raises(KrrstError) as caught:
        E.pretrain(distilled, "convnet3", E.PretrainConfig(epochs=1), progress=False, widths=(8, 8, 8))
    assert "\n" not in str(caught.value) and "16x16" in str(caught.value)


@pytest.mark.parametrize("kind", ["hard_labels", "soft_labels"])
def test_pretrain_fits_label_sets(kind):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(6)
    images = torch.randn(len(labels), 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
    targets = labels if kind == "hard_labels" else nn.functional.one_hot(labels, 4).float()
    distilled = DistilledSet(images=images, targets=targets, mean=MEAN, std=STD, target_kind=kind)
    # Soft labels follow the iteration-based recipe: 90 iterations of 8 from 24 images = 30 epochs, as hard labels.
    config = E.PretrainConfig(epochs=30, batch_size=8, label_lr=0.05, soft_label_lr=3e-3, label_augment=False,
                              soft_label_iterations=90, soft_label_batch_size=8, soft_label_warmup=5)
    losses: list[float] = []
    model = E.pretrain(distilled, "convnet3", config, progress=False, on_epoch=lambda e, loss: losses.append(loss),
                       **NARROW)
    assert model.head.out_features == 4
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # batches of 8 with BatchNorm: the per-epoch loss is noisy
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean()
    assert accuracy >= 0.9


# --------------------------------------------------------------------------- speed: the fast path against the reference


FAST_PATHS = pytest.mark.parametrize(
    "fast, convolutions",
    [(dict(channels_last="on"), ("channels_last", "channels_last", None)),
     (dict(precision="bfloat16"), ("contiguous", "contiguous", torch.bfloat16))],
    ids=["channels_last", "bf16-autocast"],
)
# channels_last runs in float64 against the float64 reference; bf16 autocast on float32 weights against it too.
FAST_DTYPE = {"channels_last": torch.float64, "precision": torch.float32}


def _in_dtype(dtype: torch.dtype, function, *args, **kwargs):
    """`function(*args, **kwargs)` with `dtype` as torch's default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def float32_draws(monkeypatch):
    """Fresh networks and heads from float32 draws, then cast: float64 runs start from the float32 runs' weights."""
    def from_float32(build):
        def built(*args, **kwargs):
            return _in_dtype(torch.float32, build, *args, **kwargs).to(torch.get_default_dtype())
        return built

    def head_from_float32(model, *args):  # a head takes its network's dtype: float32 weights are exact in float64
        dtype = next(model.parameters()).dtype
        return reset_head(model.float(), *args).to(dtype)

    reset_head = E._seeded_reset_head
    monkeypatch.setattr(E, "fresh_model", from_float32(E.fresh_model))
    monkeypatch.setattr(E, "_seeded_reset_head", head_from_float32)


def _states(state: dict) -> dict:
    return {key: value.clone() for key, value in state.items()}


PLAIN = ("contiguous", "contiguous", None)


def test_speed_knobs_are_validated_in_one_line():
    with pytest.raises(KrrstError, match="pretrain.precision='fp16' is not valid; expected one of auto, float32, bf"):
        E.PretrainConfig(precision="fp16")
    with pytest.raises(KrrstError, match="finetune.channels_last='yes' is not valid; expected one of auto, on, off"):
        E.FinetuneConfig(channels_last="yes")
    with pytest.raises(KrrstError, match="linear.precision='half' is not valid"):
        E.LinearProbeConfig(precision="half")


def test_pretrain_reference_path_is_the_plain_float32_loop_bit_for_bit(conv_calls):
    distilled = _representation_set(m=40)
    config = reference_speed(E.PretrainConfig(epochs=2, batch_size=16, seed=2))
    model = E.pretrain(distilled, "convnet3", config, device="cpu", progress=False, **NARROW)
    assert set(conv_calls) == {PLAIN}

    expected = fresh_model("convnet3", distilled.feature_dim, config.seed, **NARROW).train()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(2):
        for batch in torch.randperm(40, generator=generator).split(16):  # 16, 16, 8
            loss = nn.functional.mse_loss(expected(distilled.images[batch]), distilled.targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), f"{key} differs from the plain loop"


@FAST_PATHS
@pytest.mark.parametrize("kind", ["representation", "hard_labels"])
def test_pretrain_fast_path_reaches_the_reference_state(kind, fast, convolutions, conv_calls, float32_draws):
    """After 2 epochs (6 steps) every weight and BatchNorm buffer is the float64 reference's.

    Within C * kappa * u, kappa measured by the float32 reference (see
    test_teacher.fast_path_tolerances).
    """
    distilled = _representation_set(m=40)
    if kind == "hard_labels":  # cross-entropy and the strong augmentation of label sets
        distilled = DistilledSet(images=distilled.images, targets=torch.arange(40) % 3, mean=MEAN, std=STD,
                                 target_kind="hard_labels", config={"num_classes": 3})
    reference = reference_speed(E.PretrainConfig(epochs=2, batch_size=16, label_lr=0.1))

    def pretrained(config, dtype):
        model = _in_dtype(dtype, E.pretrain, distilled, "convnet3", config, device="cpu", progress=False, **NARROW)
        assert model.blocks[0][0].weight.is_contiguous()  # returned plain, whatever the training layout
        return _states(model.state_dict())

    exact = pretrained(reference, torch.float64)
    initial = fresh_model("convnet3", 3 if kind == "hard_labels" else distilled.feature_dim, 0, **NARROW).state_dict()
    float32_errors = relative_errors(pretrained(reference, torch.float32), exact, initial)
    conv_calls.clear()
    state = pretrained(dataclasses.replace(reference, **fast), FAST_DTYPE[next(iter(fast))])
    # the fit check's probe forward runs before the knobs apply; the training forwards follow them
    assert set(conv_calls[3:]) == {convolutions}
    assert_states_match(state, exact, initial, fast_path_tolerances(fast, float32_errors))
    assert float(state["blocks.2.1.running_mean"].norm()) > 0.1, "BatchNorm's running statistics should have moved"


def _finetune_by_hand(model, train, test, config):
    """`finetune` written out: fresh head, SGD + cosine, crop/flip, float32 and contiguous throughout."""
    network = copy.deepcopy(model).requires_grad_(True)
    E._seeded_reset_head(network, 3, config.seed)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
    generator = torch.Generator().manual_seed(config.seed)
    batches = E._batch_stream(len(train.images), config.batch_size, generator, torch.device("cpu"))
    for _ in range(config.iterations):
        batch = next(batches)
        pixels = crop_flip(train.images[batch].float() / 255, config.padding, generator)
        inputs = normalize(pixels, train.mean, train.std)
        loss = nn.functional.cross_entropy(network(inputs), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return E.top1_accuracy(network, test.images, test.labels, train.mean, train.std)


def _pretrained(seed: int = 0) -> nn.Module:
    """A network as pre-training leaves it: trained weights, BatchNorm running statistics far from (0, 1)."""
    config = reference_speed(E.PretrainConfig(epochs=3, batch_size=16, seed=seed))
    return E.pretrain(_representation_set(m=40), "convnet3", config, device="cpu", progress=False, **NARROW)


def test_finetune_reference_path_is_the_plain_float32_loop_bit_for_bit(conv_calls):
    train, test = _colour_set(20, seed=0), _colour_set(10, seed=1)
    model = _pretrained()
    reference = reference_speed(E.FinetuneConfig(iterations=6, batch_size=16, lr=0.05))
    conv_calls.clear()
    reference_metrics = E.finetune(model, train, test, reference, device="cpu", progress=False)
    assert set(conv_calls) == {PLAIN}
    accuracy, test_loss = _finetune_by_hand(model, train, test, reference)
    assert (reference_metrics["accuracy"], reference_metrics["test_loss"]) == (accuracy, test_loss)  # bit for bit


@FAST_PATHS
def test_finetune_fast_path_reaches_the_reference_state(fast, convolutions, conv_calls, float32_draws, monkeypatch):
    """After 6 iterations from a pre-trained network, every weight and BatchNorm buffer is the float64 reference's.

    Within C * kappa * u, kappa measured by the float32 reference (see test_teacher.fast_path_tolerances).
    """
    train, test = _colour_set(20, seed=0), _colour_set(10, seed=1)
    model = _pretrained()
    reference = reference_speed(E.FinetuneConfig(iterations=6, batch_size=16, lr=0.05))
    trained = {}
    score = E.top1_accuracy

    def scoring_the_trained_network(network, *args, **kwargs):
        trained["state"] = _states(network.state_dict())
        return score(network, *args, **kwargs)

    monkeypatch.setattr(E, "top1_accuracy", scoring_the_trained_network)

    def finetuned(config, dtype):
        network = copy.deepcopy(model).to(dtype)
        _in_dtype(dtype, E.finetune, network, train, test, config, device="cpu", progress=False)
        return trained["state"]

    exact = finetuned(reference, torch.float64)
    initial = E._seeded_reset_head(copy.deepcopy(model), 3, reference.seed).state_dict()
    float32_errors = relative_errors(finetuned(reference, torch.float32), exact, initial)
    conv_calls.clear()
    state = finetuned(dataclasses.replace(reference, **fast), FAST_DTYPE[next(iter(fast))])
    assert set(conv_calls) == {convolutions}  # training and the test pass
    assert_states_match(state, exact, initial, fast_path_tolerances(fast, float32_errors))


@FAST_PATHS
def test_feature_extraction_fast_path_agrees_with_the_reference(fast, convolutions, conv_calls):
    """Eval-mode features of a pre-trained network (its BatchNorm running statistics in play) are the float64 ones.

    Within C * kappa * u as the training paths (see test_teacher.fast_path_tolerances).
    """
    images = _colour_set(20, seed=0).images
    model = _pretrained()
    cpu = torch.device("cpu")
    plain = E.extract_features(model, images, MEAN, STD, batch_size=32)
    reference = E.extract_features(model, images, MEAN, STD, 32, SpeedSettings.from_fields("float32", "off", cpu))
    assert torch.equal(reference, plain)
    exact = _in_dtype(torch.float64, E.extract_features, copy.deepcopy(model).double(), images, MEAN, STD, 32)
    kappa = float((plain.double() - exact).norm() / exact.norm()) / UNIT_ROUNDOFF[torch.float32]
    dtype = FAST_DTYPE[next(iter(fast))]
    speed = SpeedSettings.resolve(dataclasses.replace(reference_speed(E.LinearProbeConfig()), **fast), cpu)
    network = copy.deepcopy(model).to(dtype).to(memory_format=speed.memory_format)
    conv_calls.clear()
    features = _in_dtype(dtype, E.extract_features, network, images, MEAN, STD, 32, speed)
    assert set(conv_calls) == {convolutions} and features.dtype == dtype
    tolerance = fast_path_tolerances(fast, {"features": kappa * UNIT_ROUNDOFF[torch.float32]})["features"]
    assert tolerance < 1 and float((features.double() - exact).norm() / exact.norm()) <= tolerance
    # the probe on top: the colour classes stay perfectly separable either way
    probe = dataclasses.replace(reference_speed(E.LinearProbeConfig(iterations=40, batch_size=16)), **fast)
    conv_calls.clear()
    model = fresh_model("convnet3", None, 0, **NARROW)
    train, test = _colour_set(20, seed=0), _colour_set(10, seed=1)
    assert E.linear_probe(model, train, test, probe, device="cpu", progress=False)["accuracy"] == 1.0
    assert set(conv_calls) == {convolutions}


# --------------------------------------------------------------------------- fine-tuning on real data


def test_finetune_beats_chance_on_real_cifar10(cifar10_small):
    train, test = cifar10_small
    train = train.subset(E.few_label_split(train.labels, 0.25, seed=0))  # 500 real images, 50 per class
    model = fresh_model("convnet3", None, 0, widths=(16, 32, 64))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = E.FinetuneConfig(iterations=120, batch_size=64, lr=0.05, seed=0, eval_batch_size=500)
    metrics = E.finetune(model, train, test, config, progress=False)
    # Measured 0.41-0.43 over five seeds at 150 iterations; chance is 0.10.
    assert metrics["accuracy"] > 0.30
    assert metrics["train_size"] == 500 and metrics["num_classes"] == 10
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items()), "input model changed"


def test_finetune_uses_the_few_label_subset_and_resizes_to_the_network():
    train, test = _colour_set(20, seed=0, size=8), _colour_set(5, seed=1, size=8)
    model = fresh_model("convnet3", None, 0, **NARROW)  # a 16x16 network: the 8x8 targets are resized
    config = E.FinetuneConfig(iterations=2, batch_size=8)
    metrics = E.finetune(model, train, test, config, label_fraction=0.1, progress=False)
    assert metrics["train_size"] == 6  # round(0.1 * 20) = 2 per class
    assert metrics["image_size"] == 16


def test_finetune_trains_a_frozen_teacher_like_any_network():
    """Teachers are handed over frozen; fine-tuning (the full-ssl reference) must still train the backbone."""
    train, test = _colour_set(20, seed=0, size=16), _colour_set(5, seed=1, size=16)
    model = fresh_model("convnet3", None, 0, **NARROW)
    frozen = fresh_model("convnet3", None, 0, **NARROW).requires_grad_(False)
    config = E.FinetuneConfig(iterations=3, batch_size=8, lr=0.5)
    trainable_result = E.finetune(model, train, test, config, progress=False)
    frozen_result = E.finetune(frozen, train, test, config, progress=False)
    assert frozen_result["test_loss"] == trainable_result["test_loss"]
    assert not any(p.requires_grad for p in frozen.parameters()), "the caller's model is left as it was"


def test_soft_label_pretraining_counts_iterations_not_epochs():
    """KIP/FRePo sets: `soft_label_iterations` steps of `soft_label_batch_size`, whatever `epochs` says."""
    generator = torch.Generator().manual_seed(0)
    distilled = DistilledSet(images=torch.randn(10, 3, 16, 16, generator=generator), targets=torch.rand(10, 3),
                             mean=MEAN, std=STD, target_kind="soft_labels")
    config = E.PretrainConfig(epochs=1000, soft_label_iterations=7, soft_label_batch_size=4, soft_label_warmup=2)
    epochs: list[int] = []
    E.pretrain(distilled, "convnet3", config, progress=False, on_epoch=lambda e, loss: epochs.append(e), **NARROW)
    assert len(epochs) == 3  # 10 images in batches of 4: 3 steps per epoch, 7 iterations -> 3 whole epochs


def test_resize_images_keeps_uint8_and_constant_images():
    images = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    resized = E.resize_images(images, 16)
    assert resized.dtype == torch.uint8 and resized.shape == (2, 3, 16, 16)
    assert torch.all(resized == 77)
    assert E.resize_images(images, 8) is images


# --------------------------------------------------------------------------- linear probes


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_linear_probe_on_separable_features_is_perfect(solver):
    train, test = _colour_set(30, seed=0), _colour_set(30, seed=1)
    config = E.LinearProbeConfig(iterations=300, batch_size=32, lr=0.2, solver=solver, lbfgs_l2=1e-4)
    metrics = E.linear_probe(MeanColour(), train, test, config, progress=False)
    assert metrics["accuracy"] >= 0.99
    assert metrics["train_size"] == 90


def test_lbfgs_probe_agrees_with_sklearn_logistic_regression():
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(
        n_samples=600, n_features=20, n_informative=8, n_classes=4, n_clusters_per_class=1, class_sep=0.8,
        random_state=0,
    )
    x_train, y_train, x_test, y_test = x[:300], y[:300], x[300:], y[300:]
    c = 0.5
    reference = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x_train, y_train)
    config = E.LinearProbeConfig(solver="lbfgs", lbfgs_l2=1.0 / (2 * c * len(x_train)))
    features = torch.tensor(x_train, dtype=torch.float64)
    classifier = E.fit_linear_lbfgs(features, torch.tensor(y_train), 4, config)
    with torch.no_grad():
        ours = classifier(torch.tensor(x_test, dtype=torch.float64)).argmax(dim=1).numpy()
    theirs = reference.predict(x_test)
    assert abs((ours == y_test).mean() - (theirs == y_test).mean()) <= 0.02
    assert (ours == theirs).mean() >= 0.97
    # Same convex problem, same solution: the weights match closely.
    np.testing.assert_allclose(classifier.weight.detach().numpy() - classifier.weight.detach().numpy().mean(0),
                               reference.coef_ - reference.coef_.mean(0), atol=2e-3)


# --------------------------------------------------------------------------- few-label splits


def test_few_label_split_is_class_balanced_exact_and_deterministic():
    counts = [100, 50, 7, 1, 0, 3]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]
    expected = {0.1: [10, 5, 1, 1, 0, 1], 0.5: [50, 25, 4, 1, 0, 2], 0.05: [5, 3, 1, 1, 0, 1], 1.0: counts}
    for fraction, sizes in expected.items():
        split = E.few_label_split(labels, fraction, seed=7, num_classes=6)
        assert split.dtype == torch.long
        assert len(split.unique()) == len(split), "duplicates"
        assert torch.bincount(labels[split], minlength=6).tolist() == sizes
        assert torch.equal(split, E.few_label_split(labels, fraction, seed=7, num_classes=6))
    assert not torch.equal(E.few_label_split(labels, 0.1, seed=7), E.few_label_split(labels, 0.1, seed=8))
    small, large = E.few_label_split(labels, 0.1, seed=7), E.few_label_split(labels, 0.5, seed=7)
    assert set(small.tolist()) <= set(large.tolist())


def test_few_label_split_rejects_bad_fractions():
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(KrrstError):
            E.few_label_split(torch.tensor([0, 1]), fraction, seed=0)


# --------------------------------------------------------------------------- knowledge distillation


class ColourTeacher(nn.Module):
    """A fixed target-task classifier: the brightest channel wins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8.0 * x.mean(dim=(2, 3))


def test_knowledge_distillation_transfers_the_teacher_without_target_images():
    generator = torch.Generator().manual_seed(0)
    # "Distilled" images: noise with a random dominant colour; the teacher labels them, no target image is seen.
    tint = torch.randn(96, 3, 1, 1, generator=generator)
    images = torch.randn(96, 3, 16, 16, generator=generator) * 0.5 + 2.0 * tint
    student = fresh_model("convnet3", None, 0, **NARROW)
    test = _colour_set(30, seed=2)
    config = E.KDConfig(epochs=30, batch_size=32, lr=3e-3, seed=0)
    metrics = E.knowledge_distillation(ColourTeacher(), student, images, test, config, progress=False)
    assert metrics["num_classes"] == 3
    assert metrics["accuracy"] > 0.8


def test_kd_renormalises_a_set_to_the_targets_statistics():
    """The teacher was trained on target-normalised images: a set normalised with its source's is mapped there."""
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(6, 3, 16, 16, generator=generator, dtype=torch.float64)
    source_mean, source_std = (0.4, 0.45, 0.5), (0.2, 0.3, 0.25)
    as_stored = (unit - torch.tensor(source_mean).view(1, -1, 1, 1)) / torch.tensor(source_std).view(1, -1, 1, 1)
    distilled = DistilledSet(images=as_stored.float(), targets=torch.zeros(6, 4), mean=source_mean, std=source_std)
    target = _colour_set(2, seed=0)
    inputs, noise = E._kd_inputs(distilled, target, 0, None, torch.device("cpu"))
    expected = (unit - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    assert not noise
    # float32 storage: a relative error of a few float32 epsilons, amplified by std_source / std_target <= 1.2
    torch.testing.assert_close(inputs.double(), expected, rtol=0, atol=8 * torch.finfo(torch.float32).eps * 4)
    noise_inputs, noise = E._kd_inputs(None, target, 5, 12, torch.device("cpu"))
    assert noise and noise_inputs.shape == (5, 3, 12, 12)


def test_kd_for_none_learns_from_gaussian_noise_at_the_noise_lr(monkeypatch):
    seen, lrs = [], []

    class Recording(ColourTeacher):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x)

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, lr, **kwargs):
            lrs.append(lr)
            super().__init__(params, lr=lr, **kwargs)

    monkeypatch.setattr(E.torch.optim, "Adam", RecordingAdam)
    student = fresh_model("convnet3", None, 0, **NARROW)
    config = E.KDConfig(epochs=3, batch_size=8, noise_lr=0.25, lr=1e-4, seed=0)
    metrics = E.knowledge_distillation(Recording(), student, None, _colour_set(4, seed=2), config, noise_images=16,
                                       progress=False)
    assert lrs == [0.25] and 0.0 <= metrics["accuracy"] <= 1.0
    batches = seen[1:]  # the first call only reads the class count
    assert len(batches) == 3 * 2 and all(batch.shape == (8, 3, 16, 16) for batch in batches)
    noise = torch.cat(batches)
    # 6,144 draws of N(0, 1): mean within 5 standard errors of 0, variance within 10% of 1
    assert abs(float(noise.mean())) < 5 / math.sqrt(noise.numel()) and abs(float(noise.var()) - 1) < 0.1
    assert not torch.equal(batches[0], batches[1]), "fresh noise every batch"


def test_train_kd_teacher_returns_the_classifier_it_scored():
    train, test = _colour_set(20, seed=0), _colour_set(10, seed=1)
    config = E.KDConfig(teacher_arch="convnet3", teacher_epochs=6, teacher_batch_size=16, teacher_lr=0.05)
    classifier, metrics = E.train_kd_teacher(train, test, config, arch_options=NARROW, progress=False)
    images, labels = E._prepared_target(test, "test", 16, torch.device("cpu"))
    assert E.top1_accuracy(classifier, images, labels, MEAN, STD)[0] == metrics["accuracy"]
    assert metrics["accuracy"] > 0.8 and metrics["iterations"] == math.ceil(6 * 60 / 16)
    assert not any(parameter.requires_grad for parameter in classifier.parameters())


@pytest.mark.parametrize("layout", ["krrst", "torchvision-fc", "library", "compiled"])
def test_load_kd_teacher_reads_a_classifier_of_each_layout(tmp_path, layout):
    from krrst.infra.io import save_tensors

    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if layout == "library":
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torchvision.models.resnet18(num_classes=10)
        torch.save(model.state_dict(), tmp_path / "c.pt")
        loaded = E.load_kd_teacher(tmp_path / "c.pt", 10, "torchvision:resnet18")
    elif layout == "torchvision-fc":  # a CIFAR ResNet-18 saved with torchvision's names (fc., module.)
        model = fresh_model("resnet18", 10, 0)
        state = {("module." + k).replace("module.head.", "module.fc."): v for k, v in model.state_dict().items()}
        torch.save({"state_dict": state}, tmp_path / "c.pth")
        loaded = E.load_kd_teacher(tmp_path / "c.pth", 10)
    elif layout == "compiled":  # torch.compile inside DDP: both prefixes, under a "model" entry
        model = fresh_model("resnet18", 10, 0)
        torch.save({"model": {"module._orig_mod." + k: v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
        loaded = E.load_kd_teacher(tmp_path / "c.pt", 10)
    else:
        model = fresh_model("convnet3", 10, 0, widths=(4, 8, 8), image_size=32)
        save_tensors(tmp_path / "c.safetensors", model.state_dict(), {"spec": model.spec})
        loaded = E.load_kd_teacher(tmp_path / "c.safetensors", 10)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model.eval()(inputs))


# --------------------------------------------------------------------------- rows


def test_protocol_names():
    assert E.protocol_name("finetune") == "finetune"
    assert E.protocol_name("finetune", 0.1) == "finetune@10%"
    assert E.protocol_name("linear", 0.01) == "linear@1%"
    assert E.protocol_name("linear", 0.5) == "linear@50%"
    for bad in [("knowledge_distillation", 0.1), ("probe", 1.0), ("linear", 0.0)]:
        with pytest.raises(KrrstError):
            E.protocol_name(*bad)


def test_evaluate_set_rows_for_baselines_and_sets(tmp_path):
    train, test = _colour_set(10, seed=0, name="colours"), _colour_set(5, seed=1, name="colours")
    linear = E.LinearProbeConfig(iterations=20, batch_size=16)
    none_row = E.evaluate_set(None, "convnet3", train, test, protocol="linear", seed=2, linear_config=linear,
                              progress=False, arch_options=NARROW)
    assert tuple(none_row) == RESULT_FIELDS
    assert [none_row[key] for key in ("method", "arch", "protocol", "seed")] == ["none", "convnet3", "linear", 2]
    assert 0.0 <= none_row["accuracy"] <= 1.0 and none_row["wall_time_s"] > 0

    teacher = fresh_model("convnet3", None, 0, **NARROW)
    # Architecture options as keywords too (image_size there would be the targets' size, hence the dict above).
    keyword_row = E.evaluate_set(None, "convnet3", train, test, protocol="linear", seed=2, linear_config=linear,
                                 progress=False, arch_options={"image_size": 16}, widths=NARROW["widths"])
    assert keyword_row["accuracy"] == none_row["accuracy"]

    full_row = E.evaluate_set(None, "ignored", train, test, protocol="linear", label_fraction=0.5, pretrained=teacher,
                              linear_config=linear, progress=False)
    assert (full_row["method"], full_row["arch"], full_row["protocol"]) == ("full-ssl", "convnet3", "linear@50%")

    distilled = DistilledSet(**{**_representation_set(m=8).__dict__, "method": "krr-st", "source": "toy"})
    set_row = E.evaluate_set(distilled, "convnet3", train, test, protocol="finetune", seed=1,
                             pretrain_config=E.PretrainConfig(epochs=1, batch_size=8),
                             finetune_config=E.FinetuneConfig(iterations=2, batch_size=8), progress=False,
                             arch_options=NARROW)
    assert (set_row["method"], set_row["source"], set_row["target"]) == ("krr-st", "toy", "colours")

    append_results(tmp_path, [none_row, full_row, set_row])
    stored = read_results(tmp_path)
    assert [row_key(row) for row in stored] == [row_key(row) for row in (none_row, full_row, set_row)]


def test_evaluate_set_refuses_kd_without_its_inputs_before_pretraining(monkeypatch):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("pre-trained before checking the kd arguments")

    monkeypatch.setattr(E, "pretrain", no_pretraining)
    train, test = _colour_set(4, seed=0), _colour_set(2, seed=1)
    with pytest.raises(KrrstError, match=r"^protocol kd needs the target-task teacher classifier \(kd_teacher\)$"):
        E.evaluate_set(_representation_set(m=8), "convnet3", train, test, protocol="kd", progress=False)
    teacher = fresh_model("convnet3", None, 0, **NARROW)
    with pytest.raises(KrrstError, match=r"^protocol kd with a network given as it is needs the images"):
        E.evaluate_set(None, "convnet3", train, test, protocol="kd", pretrained=teacher, kd_teacher=ColourTeacher(),
                       progress=False)


@pytest.mark.parametrize("arch", list_models())
def test_architecture_transfer_every_registered_model_pretrains_and_finetunes(arch):
    """The same distilled set pre-trains any registered architecture, which then fine-tunes on a labelled target."""
    generator = torch.Generator().manual_seed(0)
    distilled = DistilledSet(images=torch.randn(8, 3, 32, 32, generator=generator),
                             targets=torch.randn(8, 6, generator=generator), mean=MEAN, std=STD)
    from krrst.models import model_options

    sized = {"image_size": 32} if "image_size" in model_options(arch) else {}  # ConvNets are built per resolution
    model = E.pretrain(distilled, arch, E.PretrainConfig(epochs=1, batch_size=8), progress=False, **sized)
    assert model.head.out_features == 6
    train, test = _colour_set(2, seed=0, size=32), _colour_set(1, seed=1, size=32)
    config = E.FinetuneConfig(iterations=1, batch_size=4, eval_batch_size=8)
    metrics = E.finetune(model, train, test, config, progress=False)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_classes"] == 3
