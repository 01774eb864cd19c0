"""KRR-ST distillation: pool schedule by counting, lr conversion, a real tiny run, resume and crash safety."""

import copy
import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import krrst.distill as distill_module
import krrst.infra.io
import krrst.losses as losses_module
from krrst.augment import apply_crop_flip, normalize
from krrst.data import ImageSet
from krrst.distill import (
    CHECKPOINT_NAME,
    DISTILLED_NAME,
    DistillConfig,
    ModelPool,
    SpeedSettings,
    _outer_optimizer,
    build_teacher_cache,
    distill,
    make_step_loss,
    reference_config,
    unused_fields,
)
from krrst.distilled import DistilledSet
from krrst.infra.errors import KrrstError
from krrst.infra.io import load_state
from krrst.losses import krr_st_loss
from krrst.models import create_model, fresh_model
from krrst.parameterize import PixelSet

# ---------------------------------------------------------------------------- the model pool

TINY = {"widths": (4, 4, 4), "image_size": 8}


def _tiny_set(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=generator), torch.randn(6, 5, generator=generator)


def _batches_seen(model) -> int:
    """Training forward passes the model has taken (BatchNorm counts them)."""
    return int(model.blocks[0][1].num_batches_tracked)


def _flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_pool_counter_resets_at_T():
    images, targets = _tiny_set()
    pool = ModelPool("convnet3", 5, TINY, size=2, steps_per_model=3, seed=0)
    counters, reinitialised, trained = [], [], []
    for _ in range(8):
        before, before_weights = pool.models[0], _flat_weights(pool.models[0])
        pool.train_step(0, images, targets)
        counters.append(pool.counters[0])
        reinitialised.append(pool.models[0] is not before)
        trained.append(not torch.equal(_flat_weights(pool.models[0]), before_weights) and not reinitialised[-1])
    assert counters == [1, 2, 3, 0, 1, 2, 3, 0]
    assert reinitialised == [False, False, False, True, False, False, False, True]
    assert trained == [True, True, True, False, True, True, True, False]
    assert _batches_seen(pool.models[0]) == 0  # the re-initialised model is untrained
    assert pool.counters[1] == 0 and _batches_seen(pool.models[1]) == 0  # the other model was left alone


def test_pool_quirk_never_resets_so_every_later_pick_is_fresh():
    images, targets = _tiny_set()
    pool = ModelPool("convnet3", 5, TINY, size=1, steps_per_model=3, counter_reset=False, seed=0)
    counters, batches_seen_at_pick, seen_weights = [], [], []
    for _ in range(8):
        index = pool.pick()
        batches_seen_at_pick.append(_batches_seen(pool.models[index]))
        seen_weights.append(_flat_weights(pool.models[index]))
        pool.train_step(index, images, targets)
        counters.append(pool.counters[index])
    assert counters == [1, 2, 3, 3, 3, 3, 3, 3]
    # picks 1-4 see a model trained 0, 1, 2, 3 steps; from then on an untrained one, new each time
    assert batches_seen_at_pick == [0, 1, 2, 3, 0, 0, 0, 0]
    later = seen_weights[4:]
    assert all(not torch.equal(a, b) for i, a in enumerate(later) for b in later[i + 1 :])


def test_pool_with_T_zero_gives_a_fresh_network_at_every_pick():
    images, targets = _tiny_set()
    pool = ModelPool("convnet3", 5, TINY, size=3, steps_per_model=0, seed=0)
    pool.warm_up(images, targets)  # nothing to warm up
    seen = []
    for _ in range(9):
        index = pool.pick()
        model = pool.models[index]
        assert _batches_seen(model) == 0
        seen.append(_flat_weights(model))
        pool.train_step(index, images, targets)
        assert pool.counters[index] == 0
        assert pool.models[index] is not model
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :])


def test_pool_warm_up_trains_each_model_between_1_and_T_minus_1_steps():
    images, targets = _tiny_set()
    pool = ModelPool("convnet3", 5, TINY, size=6, steps_per_model=7, seed=3)
    pool.warm_up(images, targets)
    assert all(1 <= count < 7 for count in pool.counters)
    assert [_batches_seen(model) for model in pool.models] == pool.counters
    assert len(set(pool.counters)) > 1  # random lengths, not one constant


def test_pool_picks_are_uniform_and_seeded():
    pool = ModelPool("convnet3", 5, TINY, size=4, steps_per_model=3, seed=1)
    picks = [pool.pick() for _ in range(4000)]
    counts = [picks.count(i) for i in range(4)]
    assert all(abs(count - 1000) < 120 for count in counts), counts  # > 4 sigma
    again = ModelPool("convnet3", 5, TINY, size=4, steps_per_model=3, seed=1)
    assert [again.pick() for _ in range(4000)] == picks
    assert torch.equal(_flat_weights(again.models[2]), _flat_weights(pool.models[2]))


def test_pool_state_round_trips_through_a_checkpoint(tmp_path):
    images, targets = _tiny_set()
    pool = ModelPool("convnet3", 5, TINY, size=3, steps_per_model=4, seed=2)
    pool.warm_up(images, targets)
    for _ in range(5):
        pool.train_step(pool.pick(), images, targets)
    krrst.infra.io.save_state(tmp_path / "pool.safetensors", {"pool": pool.state_dict()})
    restored = ModelPool("convnet3", 5, TINY, size=3, steps_per_model=4, seed=99)
    restored.load_state_dict(load_state(tmp_path / "pool.safetensors")["pool"])
    for _ in range(6):  # crosses re-initialisations: the generator state must match too
        index = pool.pick()
        assert restored.pick() == index
        pool.train_step(index, images, targets)
        restored.train_step(index, images, targets)
    assert restored.counters == pool.counters
    for a, b in zip(pool.models, restored.models):
        assert torch.equal(_flat_weights(a), _flat_weights(b))


# ---------------------------------------------------------------------------- config and lr


def test_defaults_and_config_errors():
    assert DistillConfig().num_images == 1000 and DistillConfig().widths == (128, 256, 512)
    with pytest.raises(KrrstError, match="distill.kernel_dtype"):
        DistillConfig(kernel_dtype="float16")
    with pytest.raises(KrrstError, match="distill.num_images"):
        DistillConfig(num_images=0)
    with pytest.raises(KrrstError, match="distill.teacher_cache_views must be >= 0, got -1"):
        DistillConfig(teacher_cache_views=-1)
    with pytest.raises(KrrstError, match="distill.padding <= 127"):
        DistillConfig(teacher_cache_views=2, padding=128)
    assert DistillConfig(teacher_cache_views=8).teacher_cache_views == 8


def test_image_lr_in_normalised_units_reproduces_raw_pixel_adamw():
    """AdamW on raw pixels at lr η == our AdamW on normalised pixels at η / std_c, channel by channel."""
    config = DistillConfig(image_lr=1e-2, target_lr=1e-2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 3, 5, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    raw_optimizer = torch.optim.AdamW([raw], lr=config.image_lr, weight_decay=0.0)
    normalised = ((raw.detach() - mean_t) / std_t)
    synthetic = PixelSet(normalised, torch.zeros(4, 2, dtype=torch.float64))
    channels, targets = synthetic.image_channels, synthetic.target_values
    ours = _outer_optimizer(synthetic, config, std)
    for _ in range(5):
        gradient_normalised = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
        raw.grad = gradient_normalised / std_t  # chain rule: d/dx_raw = d/dx_norm / std
        for c, leaf in enumerate(channels):
            leaf.grad = gradient_normalised[:, c : c + 1].clone()
        targets.grad = torch.zeros_like(targets)
        raw_optimizer.step()
        ours.step()
    expected = (raw.detach() - mean_t) / std_t
    # equal up to Adam's ε, which is in parameter units (1e-8 against gradients of order 1)
    torch.testing.assert_close(torch.cat(channels, 1).detach(), expected, rtol=0, atol=1e-6)
    moved = (expected - normalised).abs().amax(dim=(0, 2, 3))
    assert moved[0] > moved[2] * 1.3  # the channels really moved by different amounts


# ---------------------------------------------------------------------------- real runs


def _teacher(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model("convnet3", None, widths=(16, 32, 64))


RUN = DistillConfig(
    num_images=10, widths=(8, 16, 32), steps=6, batch_size=32, pool_size=2, pool_steps=2,
    image_lr=1e-2, target_lr=1e-2, log_every=2, checkpoint_every=3, validate_every=3, validation_images=40,
    validation_models=2, seed=3,
)


@pytest.fixture(scope="module")
def uninterrupted_run(cifar10_small, tmp_path_factory):
    train, test = cifar10_small
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    result = distill(train, _teacher(), RUN, out_dir=out_dir, heldout=test, progress=False)
    return result, out_dir


def _history(out_dir):
    with open(out_dir / "loss.csv") as handle:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


@pytest.mark.shared_data
def test_tiny_distillation_on_cifar10_lowers_training_and_validation_loss(cifar10_small, tmp_path):
    train, test = cifar10_small
    config = DistillConfig(
        num_images=20, widths=(16, 32, 64), steps=50, batch_size=64, pool_size=3, pool_steps=10,
        image_lr=1e-2, target_lr=1e-2, log_every=5, validate_every=25, checkpoint_every=25,
        validation_images=200, seed=0,
    )
    result = distill(train, _teacher(), config, out_dir=tmp_path, heldout=test, progress=False)

    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    losses = [float(row["loss"]) for row in rows if row["loss"]]
    assert len(losses) == 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses
    validation = {int(row["step"]): float(row["val_loss"]) for row in rows if row["val_loss"]}
    assert sorted(validation) == [0, 25, 50]
    reference = float(rows[0]["val_reference"])
    assert validation[50] < 0.9 * validation[0] < 0.9 * reference

    assert isinstance(result, DistilledSet)
    assert result.images.shape == (20, 3, 32, 32) and result.targets.shape == (20, 1024)
    assert (result.target_kind, result.method, result.source, result.teacher_arch, result.step) == (
        "representation", "krr-st", train.name, "convnet3", 50)
    assert result.mean == train.mean and result.config["num_images"] == 20
    loaded = DistilledSet.load(tmp_path / DISTILLED_NAME)
    assert torch.equal(loaded.images, result.images) and torch.equal(loaded.targets, result.targets)
    for name in (CHECKPOINT_NAME, "loss.png", "preview.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert load_state(tmp_path / CHECKPOINT_NAME)["step"] == 50


class _Interrupted(Exception):
    pass


@pytest.mark.shared_data
def test_resume_reaches_the_same_set_as_an_uninterrupted_run(cifar10_small, uninterrupted_run, tmp_path, monkeypatch):
    train, test = cifar10_small
    expected, expected_dir = uninterrupted_run
    real_save = krrst.infra.io.save_state

    def save_then_stop(path, state):
        real_save(path, state)
        if state["step"] == 3:
            raise _Interrupted

    monkeypatch.setattr(krrst.infra.io, "save_state", save_then_stop)
    with pytest.raises(_Interrupted):
        distill(train, _teacher(), RUN, out_dir=tmp_path, heldout=test, progress=False)
    monkeypatch.setattr(krrst.infra.io, "save_state", real_save)
    assert not (tmp_path / DISTILLED_NAME).exists()

    resumed = distill(train, _teacher(), RUN, out_dir=tmp_path, resume=True, heldout=test, progress=False)
    assert torch.equal(resumed.images, expected.images)
    assert torch.equal(resumed.targets, expected.targets)
    assert _history(tmp_path) == _history(expected_dir)  # same losses, validation values and lrs


@pytest.mark.shared_data
def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(
    cifar10_small, uninterrupted_run, tmp_path, monkeypatch
):
    train, test = cifar10_small
    expected, _ = uninterrupted_run
    real_save_file = krrst.infra.io.save_file
    calls = []

    def save_file_that_dies_on_the_second_checkpoint(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as handle:  # half a file, then the "power cut"
            handle.write(b"\x00" * 1000)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(krrst.infra.io, "save_file", save_file_that_dies_on_the_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        distill(train, _teacher(), RUN, out_dir=tmp_path, heldout=test, progress=False)
    monkeypatch.setattr(krrst.infra.io, "save_file", real_save_file)

    assert load_state(tmp_path / CHECKPOINT_NAME)["step"] == 3
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = distill(train, _teacher(), RUN, out_dir=tmp_path, resume=True, heldout=test, progress=False)
    assert torch.equal(resumed.images, expected.images) and torch.equal(resumed.targets, expected.targets)


@pytest.mark.shared_data
def test_resume_refuses_a_different_config_and_a_wrong_source(cifar10_small, uninterrupted_run, tmp_path):
    train, test = cifar10_small
    _, run_dir = uninterrupted_run
    (tmp_path / CHECKPOINT_NAME).write_bytes((run_dir / CHECKPOINT_NAME).read_bytes())
    with pytest.raises(KrrstError, match=r"another config \(ridge: 1e-06 -> 0.001\)"):
        distill(train, _teacher(), dataclasses.replace(RUN, ridge=1e-3), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(KrrstError, match=r"another source \(\['cifar10-jpeg', 2000\] -> \['cifar10-jpeg', 1000\]\)"):
        distill(test, _teacher(), RUN, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(KrrstError, match="another teacher"):
        distill(train, _teacher(seed=1), RUN, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(KrrstError, match="already exists; resume that run"):
        distill(train, _teacher(), RUN, out_dir=tmp_path, resume=False, progress=False)
    # options of a parameterisation the run does not use may differ (they cannot change it)
    unused = dataclasses.replace(RUN, pyramid_levels=(4,), image_rank=3, predictor_hidden=5)
    assert set(unused_fields(unused)) >= {"pyramid_levels", "image_rank", "target_rank", "predictor_hidden"}
    resumed = distill(train, _teacher(), unused, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == RUN.steps
    basis = dataclasses.replace(RUN, parameterization="basis", image_rank=4, target_rank=4)
    assert "image_rank" not in unused_fields(basis)


@pytest.mark.shared_data
def test_source_of_the_wrong_size_is_a_clear_error(cifar10_small):
    train, _ = cifar10_small
    with pytest.raises(KrrstError, match="distill.image_size=64"):
        distill(train, _teacher(), dataclasses.replace(RUN, image_size=64), progress=False)
    with pytest.raises(KrrstError, match="must be an ImageSet"):
        distill(train.images, _teacher(), RUN, progress=False)


# ---------------------------------------------------------------------------- teacher-target cache

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _random_source(count=12, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def _small_teacher(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model("convnet3", None, widths=(4, 8, 8), image_size=8).eval()


def _assert_within_target_perturbation(loss, reference_loss, target_change):
    """`loss` = mean((p - t - δ)^2) against `reference_loss` = mean((p - t)^2) with the same predictions p.

    By Cauchy-Schwarz |loss - reference| <= 2 sqrt(reference) rms(δ) + rms(δ)^2, whatever the CPU; the slack covers
    float32 rounding of the two means (1e-5 of the loss, far above n x 6e-8 for these sizes).
    """
    rms = target_change.double().pow(2).mean().sqrt()
    bound = 2 * reference_loss.double().sqrt() * rms + rms**2 + 1e-5 * reference_loss.double()
    assert abs(loss.double() - reference_loss.double()) <= bound, (float(loss), float(reference_loss), float(bound))


def test_teacher_cache_holds_the_teacher_features_of_the_replayed_views():
    images, teacher = _random_source(), _small_teacher()
    cache = build_teacher_cache(teacher, images, 3, 2, MEAN, STD, torch.Generator().manual_seed(5), chunk=7)
    assert cache.features.shape == (12, 3, 8 * 1 * 1) and cache.features.dtype == torch.float16
    assert cache.offsets_y.dtype == torch.uint8 and cache.flips.dtype == torch.bool and cache.flips.shape == (12, 3)
    assert int(cache.offsets_y.max()) <= 4 and len(torch.unique(cache.offsets_x)) > 1 and cache.flips.any()
    again = build_teacher_cache(teacher, images, 3, 2, MEAN, STD, torch.Generator().manual_seed(5), chunk=5)
    assert torch.equal(again.offsets_x, cache.offsets_x) and torch.equal(again.flips, cache.flips)

    # every (image, view) of a batch, with repeats: the cached targets are the teacher's features of the crop
    indices, views = torch.tensor([0, 3, 3, 11, 7, 0]), torch.tensor([2, 0, 1, 1, 2, 0])
    crop = cache.crop_params(indices, views)
    real_images = normalize(apply_crop_flip(images[indices], crop, 2), MEAN, STD)
    with torch.no_grad():
        uncached = teacher(real_images)
    cached = cache.targets(indices, views)
    assert cached.dtype == torch.float32
    # fp16 storage: a relative error up to 2^-11 = 4.9e-4 per value (1e-3 = 2 roundoffs; atol for values near 0)
    torch.testing.assert_close(cached, uncached, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(cache.targets(indices, (views + 1) % 3), uncached, atol=1e-2)  # views differ

    # and so the KRR-ST loss of a step is the uncached loss, to fp16 tolerance
    generator = torch.Generator().manual_seed(1)
    synthetic_features = torch.randn(4, 6, generator=generator)
    synthetic_targets = torch.randn(4, 8, generator=generator)
    real_features = torch.randn(6, 6, generator=generator)
    loss_cached = krr_st_loss(synthetic_features, synthetic_targets, real_features, cached, 1e-6)
    loss_uncached = krr_st_loss(synthetic_features, synthetic_targets, real_features, uncached, 1e-6)
    _assert_within_target_perturbation(loss_cached, loss_uncached, cached - uncached)


@pytest.mark.shared_data
def test_cached_distillation_replays_views_without_running_the_teacher(cifar10_small, monkeypatch):
    """In the loop every step's targets are the teacher's features of that step's batch, yet the teacher never runs."""
    train, _ = cifar10_small
    teacher, events = _teacher(), []
    teacher.register_forward_pre_hook(lambda module, args: events.append(("teacher", None)))
    real_apply, real_make_step_loss = distill_module.apply_crop_flip, distill_module.make_step_loss

    def recording_apply(*args):
        events.append(("crop", real_apply(*args)))
        return events[-1][1]

    def recording_make_step_loss(*args):
        step_loss = real_make_step_loss(*args)

        def recording_step_loss(*step_args):
            events.append(("loss", step_args))
            return step_loss(*step_args)

        events.append(("step_loss", step_loss))
        return recording_step_loss

    monkeypatch.setattr(distill_module, "apply_crop_flip", recording_apply)
    monkeypatch.setattr(distill_module, "make_step_loss", recording_make_step_loss)
    config = dataclasses.replace(RUN, steps=3, teacher_cache_views=2, validation_models=0)
    distill(train, teacher, config, progress=False)

    step_loss = next(value for kind, value in events if kind == "step_loss")
    first_loop_crop = next(i for i, (kind, _) in enumerate(events) if kind == "loss") - 1
    in_loop = events[first_loop_crop:]
    assert [kind for kind, _ in in_loop] == ["crop", "loss"] * 3  # no teacher forward inside the loop
    teacher.eval()
    for (_, crops), (_, loss_args) in zip(in_loop[0::2], in_loop[1::2]):
        model, synthetic_images, synthetic_targets, real_images, real_targets = loss_args
        with torch.no_grad():
            uncached_targets = teacher(normalize(crops, train.mean, train.std))
            torch.testing.assert_close(real_targets, uncached_targets, rtol=1e-3, atol=1e-3)
            cached_loss, _ = step_loss(*loss_args)
            uncached_loss, _ = step_loss(model, synthetic_images, synthetic_targets, real_images, uncached_targets)
            _assert_within_target_perturbation(cached_loss, uncached_loss, real_targets - uncached_targets)


@pytest.mark.shared_data
def test_cached_distillation_lowers_the_loss_and_resumes_exactly(cifar10_small, tmp_path):
    train, _ = cifar10_small
    config = DistillConfig(
        num_images=20, widths=(16, 32, 64), steps=30, batch_size=64, pool_size=3, pool_steps=10,
        image_lr=1e-2, target_lr=1e-2, log_every=5, validate_every=0, checkpoint_every=15, seed=0,
        teacher_cache_views=2,
    )
    expected = distill(train, _teacher(), config, out_dir=tmp_path / "whole", progress=False)
    losses = [float(row["loss"]) for row in _history(tmp_path / "whole") if row["loss"]]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses

    # stopped after step 15's checkpoint, as a kill there would (a real kill: test_resume_reaches_the_same_set_as_an_uninterrupted_run)
    distill(train, _teacher(), config, out_dir=tmp_path / "resumed", progress=False, stop_at_step=15)
    resumed = distill(train, _teacher(), config, out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert torch.equal(resumed.images, expected.images) and torch.equal(resumed.targets, expected.targets)
    assert _history(tmp_path / "resumed") == _history(tmp_path / "whole")

    # the cache changes the trajectory: resuming with it switched off is refused
    with pytest.raises(KrrstError, match="teacher_cache_views: 2 -> 0"):
        distill(train, _teacher(), dataclasses.replace(config, teacher_cache_views=0),
                out_dir=tmp_path / "resumed", resume=True, progress=False)


# --------------------------------------------------------------------------- fast path vs reference path


def _step_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    model = fresh_model("convnet3", 10, seed, widths=(8, 16, 16), image_size=16).eval()
    synthetic_images = torch.randn(12, 3, 16, 16, generator=generator, requires_grad=True)
    synthetic_targets = torch.randn(12, 10, generator=generator, requires_grad=True)
    real_images = torch.randn(20, 3, 16, 16, generator=generator)
    real_targets = torch.randn(20, 10, generator=generator)
    return model, synthetic_images, synthetic_targets, real_images, real_targets


@pytest.fixture
def float64_default():
    """Run a stage in float64: both sides of a fast-vs-reference comparison then differ only by float64 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Why float64, and why these tolerances. In float32 the two paths differ by the rounding of convolutions that sum in
# another order (NHWC kernels, fused inductor kernels, other CPUs' vector widths): a relative 1e-7 in the features,
# which the ridge solve amplifies by the condition number of K + ridge I (1e3 to 1e5 for these kernels), so a float32
# comparison can only promise about 1e-3 and would hide a real bug of that size. In float64 the same reordering costs
# ~1e-16 x (terms per sum, < 1e3) x condition number (< 1e5) < 1e-8, while every bug this guards against (train-mode
# BatchNorm, a stale weight, a missed re-initialisation) moves the loss by 1e-3 or more. Hence 1e-8 below.
FLOAT64_RTOL = 1e-8
# bf16 keeps 8 bits of mantissa: every rounded input, weight and activation carries a relative error up to
# u = 2^-8 = 3.9e-3. Through three convolution blocks the features carry about 3u = 1.2e-2; the loss, a squared
# residual, moves by up to twice that, and the gradient's direction by the same order: 3e-2 (about 8u) bounds both.
BF16_RTOL = 3e-2

TINY_POOL = dict(num_images=12, image_size=16, widths=(8, 16, 16), pool_size=2, pool_steps=6, kernel_dtype="float64")


def _warmed_up_step(float64: bool):
    """The state a real run reaches: a pool after its warm-up, the picked model with trained BatchNorm statistics.

    Returns the pool's template (`models[0]`, left in train mode by the warm-up, as in `distill`), the picked model
    (`models[1]`, in eval mode, as the loop puts it) and the step's inputs.
    """
    dtype = torch.float64 if float64 else torch.float32
    generator = torch.Generator().manual_seed(3)
    synthetic_images = torch.randn(12, 3, 16, 16, generator=generator, dtype=dtype).requires_grad_()
    synthetic_targets = torch.randn(12, 10, generator=generator, dtype=dtype).requires_grad_()
    real_images = torch.randn(20, 3, 16, 16, generator=generator, dtype=dtype)
    real_targets = torch.randn(20, 10, generator=generator, dtype=dtype)
    pool = ModelPool("convnet3", 10, {"widths": (8, 16, 16), "image_size": 16}, size=2, steps_per_model=6, seed=1)
    pool.models = [model.to(dtype) for model in pool.models]
    pool.optimizers = [pool._optimizer(model) for model in pool.models]
    pool.warm_up(2 * synthetic_images.detach() + 1, synthetic_targets.detach())  # BN statistics far from 0 and 1
    picked = pool.models[1].eval()
    assert pool.models[0].training and picked.blocks[0][1].running_mean.abs().max() > 0.1
    return pool.models[0], picked, (synthetic_images, synthetic_targets, real_images, real_targets)


def _step(config: DistillConfig, template, picked, inputs):
    """One step's loss and its gradient w.r.t. (X_s, Y_s) on `config`'s path."""
    speed = SpeedSettings.resolve(config, torch.device("cpu"))
    template, picked = (model.to(memory_format=speed.memory_format) for model in (template, picked))
    step_loss = make_step_loss(config, speed, template)
    template.train()  # the pool goes on training its models after the loss is made (warm-up, train_step)
    loss, info = step_loss(picked, *inputs)
    assert int(info) == 0
    gradients = torch.autograd.grad(loss, inputs[:2])
    return loss.detach(), torch.cat([g.flatten() for g in gradients])


def _state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_same_direction(fast_gradient, reference_gradient, rtol):
    cosine = F.cosine_similarity(fast_gradient.double(), reference_gradient.double(), dim=0)
    assert cosine > 1 - rtol, float(cosine)
    relative_norm = fast_gradient.double().norm() / reference_gradient.double().norm()
    assert abs(relative_norm - 1) < rtol, float(relative_norm)


@pytest.mark.parametrize("fast", [dict(channels_last="on"), dict(compile=True)], ids=["channels_last", "compile"])
def test_fast_step_equals_the_reference_step_on_a_warmed_up_pool(fast):
    """In float64, in a warmed-up pool, with the template in train mode: same loss, same gradient, picked model intact.

    The compiled path once ran its template's mode (train, after the warm-up) instead of the picked model's, so it used
    batch statistics and wrote them into the picked model's running buffers.
    """
    reference = reference_config(DistillConfig(**TINY_POOL))
    template, picked, inputs = _warmed_up_step(float64=True)
    before = _state(picked)
    reference_loss, reference_gradient = _step(reference, template, picked, inputs)
    fast_loss, fast_gradient = _step(dataclasses.replace(reference, **fast), template, picked, inputs)
    torch.testing.assert_close(fast_loss, reference_loss, rtol=FLOAT64_RTOL, atol=0)
    _assert_same_direction(fast_gradient, reference_gradient, FLOAT64_RTOL)
    after = _state(picked)
    for name, value in before.items():  # bitwise: an eval-mode step reads the model and writes nothing
        assert torch.equal(after[name], value), f"the step changed the picked model's {name}"
    assert not picked.training


def test_bf16_step_stays_within_bf16_rounding_of_the_float64_step():
    reference = reference_config(DistillConfig(**TINY_POOL))
    template, picked, inputs = _warmed_up_step(float64=True)
    reference_loss, reference_gradient = _step(reference, template, picked, inputs)
    # the same pool and inputs in float32 under bf16 autocast (autocast leaves float64 alone)
    template32, picked32 = (copy.deepcopy(model).float() for model in (template, picked))
    inputs32 = tuple(x.detach().float().requires_grad_(x.requires_grad) for x in inputs)
    fast_loss, fast_gradient = _step(dataclasses.replace(reference, precision="bfloat16"), template32, picked32, inputs32)
    torch.testing.assert_close(fast_loss.double(), reference_loss, rtol=BF16_RTOL, atol=0)
    _assert_same_direction(fast_gradient, reference_gradient, BF16_RTOL)


def _distil_recording_the_pool(monkeypatch, config, source, teacher):
    pools = []

    class RecordingPool(ModelPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(distill_module, "ModelPool", RecordingPool)
    result = distill(source, copy.deepcopy(teacher), config, progress=False)
    return result, pools[-1]


@pytest.mark.parametrize("fast", [dict(channels_last="on"), dict(compile=True)], ids=["channels_last", "compile"])
def test_fast_path_reaches_the_reference_run_state_after_several_steps(fast, float64_default, monkeypatch):
    """A whole float64 run: warm-up, picks, a re-initialisation at T, pool training; then set and pool compared."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=generator)
    source = ImageSet(images, None, [], MEAN, STD, "noise")
    teacher = fresh_model("convnet3", None, 5, widths=(4, 8, 8), image_size=16)
    reference = reference_config(DistillConfig(**{**TINY_POOL, "num_images": 8, "pool_steps": 3}, steps=8,
                                               batch_size=16, log_every=2, validate_every=0))
    expected, expected_pool = _distil_recording_the_pool(monkeypatch, reference, source, teacher)
    result, pool = _distil_recording_the_pool(monkeypatch, dataclasses.replace(reference, **fast), source, teacher)
    assert expected.images.dtype == torch.float64
    torch.testing.assert_close(result.images, expected.images, rtol=0, atol=FLOAT64_RTOL * expected.images.abs().max())
    torch.testing.assert_close(result.targets, expected.targets, rtol=0, atol=FLOAT64_RTOL * expected.targets.abs().max())
    assert pool.counters == expected_pool.counters
    for index, (model, expected_model) in enumerate(zip(pool.models, expected_pool.models)):
        for (name, value), (_, expected_value) in zip(model.state_dict().items(), expected_model.state_dict().items()):
            if not value.is_floating_point():
                assert torch.equal(value, expected_value), f"model {index} {name}"
                continue
            bound = FLOAT64_RTOL * max(float(expected_value.abs().max()), 1.0)
            torch.testing.assert_close(value, expected_value, rtol=0, atol=bound, msg=f"model {index} {name}")


def test_fused_outer_optimizer_takes_the_multi_tensor_update():
    """The fused AdamW used on CUDA against the CPU's multi-tensor AdamW, in float64, on the set's parameter groups."""
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    config = DistillConfig(num_images=6, image_size=8, image_lr=1e-2, target_lr=3e-2, weight_decay=1e-2)
    sets = [PixelSet(images.clone(), targets.clone()) for _ in range(2)]
    optimizers = [_outer_optimizer(sets[0], config, STD)]
    optimizers.append(torch.optim.AdamW(sets[1].param_groups(config.image_lr, config.target_lr, STD),
                                        weight_decay=config.weight_decay, fused=True))
    for step in range(5):
        direction = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
        for synthetic, optimizer in zip(sets, optimizers):
            optimizer.zero_grad()
            ((synthetic.images() * direction).sum() + synthetic.targets().pow(2).sum()).backward()
            optimizer.step()
    for multi, fused in zip(sets[0].parameters(), sets[1].parameters()):
        torch.testing.assert_close(fused, multi, rtol=1e-12, atol=1e-14)  # same arithmetic, float64 rounding
    assert not torch.equal(sets[0].images(), images), "the optimiser moved the set"


def test_the_reference_path_has_the_plain_krr_st_loss():
    """The step loss of the reference path is krr_st_loss of the model's features, nothing else."""
    model, synthetic_images, synthetic_targets, real_images, real_targets = inputs = _step_inputs(1)
    config = reference_config(DistillConfig(num_images=12, image_size=16, widths=(8, 16, 16), ridge=1e-3))
    loss, _ = make_step_loss(config, SpeedSettings.resolve(config, torch.device("cpu")), model)(*inputs)
    expected = krr_st_loss(model.forward_features(synthetic_images), synthetic_targets,
                           model.forward_features(real_images), real_targets, 1e-3)
    assert torch.equal(loss, expected)


def test_a_failed_solve_stops_the_run_at_the_next_log_without_syncing_every_step(monkeypatch):
    """Cholesky status stays on the device; the loop raises one clear error at the next check."""
    real = losses_module.krr_predict_with_info
    calls = []

    def failing(*args):
        predictions, info = real(*args)
        calls.append(1)
        return predictions, info + (1 if len(calls) == 2 else 0)

    monkeypatch.setattr(losses_module, "krr_predict_with_info", failing)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = ImageSet(images, None, [], MEAN, STD, "noise")
    teacher = create_model("convnet3", widths=(4, 4, 4), image_size=16)
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=6, batch_size=16, pool_size=2,
                           pool_steps=1, log_every=4, validate_every=0)
    with pytest.raises(KrrstError, match=r"not positive definite at some step in \(0, 4\]"):
        distill(source, teacher, config, progress=False)
    assert len(calls) == 4  # the run went on to the check at step 4, not stopping inside step 2


def test_speed_knobs_are_resolved_per_device_and_validated():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = DistillConfig()
    assert SpeedSettings.resolve(auto, cpu) == (None, torch.channels_last, False, "default")
    assert SpeedSettings.resolve(auto, cuda) == (torch.bfloat16, torch.channels_last, False, "default")
    assert SpeedSettings.resolve(reference_config(auto), cuda) == (None, torch.contiguous_format, False, "default")
    assert reference_config(DistillConfig(teacher_cache_views=8, compile=True)).teacher_cache_views == 0
    with pytest.raises(KrrstError, match="distill.precision='fp8' is not valid; expected one of auto, float32, bfloat16"):
        DistillConfig(precision="fp8")
    with pytest.raises(KrrstError, match="distill.channels_last='yes'"):
        DistillConfig(channels_last="yes")


# --------------------------------------------------------------------------- parameterisations, views, initialisations


@pytest.mark.shared_data
def test_basis_parameterisation_distils_resumes_and_records_its_storage(cifar10_small, tmp_path):
    train, _ = cifar10_small
    config = dataclasses.replace(RUN, num_images=12, steps=6, parameterization="basis", image_rank=6, target_rank=4,
                                 validation_models=0, checkpoint_every=3)
    expected = distill(train, _teacher(), config, out_dir=tmp_path / "whole", progress=False)
    summary = expected.config["synthetic"]
    assert summary["kind"] == "basis" and summary["image_rank"] == 6 and summary["target_rank"] == 4
    d = expected.targets.shape[1]
    hand_count = 12 * 6 + 6 * 3 * 32 * 32 + 3 * 32 * 32 + 12 * 4 + 4 * d + d  # coefficients, bases, means
    assert summary["storage_bytes"] == 4 * hand_count
    # every image lies in the span of the 6 basis images around the mean: rank of the centred set <= 6
    centred = expected.images.flatten(1) - expected.images.flatten(1).mean(0)
    assert torch.linalg.matrix_rank(centred.double(), rtol=1e-5) <= 6
    losses = [float(row["loss"]) for row in _history(tmp_path / "whole") if row["loss"]]
    assert all(torch.isfinite(torch.tensor(losses)))

    # stopped after step 3's checkpoint, as a kill there would (a real kill: test_resume_reaches_the_same_set_as_an_uninterrupted_run)
    distill(train, _teacher(), config, out_dir=tmp_path / "resumed", progress=False, stop_at_step=3)
    resumed = distill(train, _teacher(), config, out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert torch.equal(resumed.images, expected.images) and torch.equal(resumed.targets, expected.targets)


@pytest.mark.shared_data
def test_pyramid_parameterisation_distils_resumes_and_records_its_storage(cifar10_small, tmp_path):
    train, _ = cifar10_small
    config = dataclasses.replace(RUN, num_images=12, steps=6, parameterization="pyramid", pyramid_levels=(4, 8),
                                 validation_models=0, checkpoint_every=3)
    expected = distill(train, _teacher(), config, out_dir=tmp_path / "whole", progress=False)
    summary = expected.config["synthetic"]
    assert summary["kind"] == "pyramid" and summary["levels"] == [4, 8] and expected.images.shape == (12, 3, 32, 32)
    d = expected.targets.shape[1]
    assert summary["storage_bytes"] == 4 * (12 * 3 * (4 * 4 + 8 * 8) + 12 * d)  # levels, targets
    # no content above the finest level: every channel lies in the span of the upsampled 4x4 and 8x8 grids
    def upsampled_grid(side):
        return F.interpolate(torch.eye(side * side, dtype=torch.float64).view(-1, 1, side, side), size=(32, 32),
                             mode="bilinear", align_corners=False).flatten(1)

    def residual(images, sides):
        grid = torch.cat([upsampled_grid(side) for side in sides])  # (sum r²) x 1024
        rows = images.double().flatten(2).flatten(0, 1)  # one row per image and channel
        fit = torch.linalg.lstsq(grid.T, rows.T).solution.T @ grid
        return ((rows - fit).norm() / rows.norm()).item()

    assert residual(expected.images, (4, 8)) < 1e-5
    assert residual(expected.images, (4,)) > 1e-2, "the 8x8 level carries content of its own"
    losses = [float(row["loss"]) for row in _history(tmp_path / "whole") if row["loss"]]
    assert all(torch.isfinite(torch.tensor(losses)))

    # stopped after step 3's checkpoint, as a kill there would
    distill(train, _teacher(), config, out_dir=tmp_path / "resumed", progress=False, stop_at_step=3)
    resumed = distill(train, _teacher(), config, out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert torch.equal(resumed.images, expected.images) and torch.equal(resumed.targets, expected.targets)

    # the levels are read only for a pyramid, and are checked against the image size there
    assert DistillConfig(image_size=8).pyramid_levels == (8, 16)
    with pytest.raises(KrrstError, match=r"distill.pyramid_levels must be strictly increasing sides in \[1, "
                                         r"distill.image_size=8\], e.g. 8,16; got 8,16"):
        DistillConfig(image_size=8, parameterization="pyramid")
    for bad in ((), (16, 8), (0, 8), (8, 8)):
        with pytest.raises(KrrstError, match="distill.pyramid_levels"):
            DistillConfig(parameterization="pyramid", pyramid_levels=bad)
    with pytest.raises(KrrstError, match=r"^unknown distill.parameterization 'pixel'; did you mean 'pixels'\? "
                                         r"valid parameterisations: pixels, basis, pyramid$"):
        DistillConfig(parameterization="pixel")
    # the options of the parameterisations a config does not use are the ones it leaves unread
    assert set(unused_fields(DistillConfig(parameterization="basis", image_rank=2, target_rank=2))) == {
        "pyramid_levels", "predictor_hidden", "predictor_lr"}


@pytest.mark.shared_data
def test_fixed_augmentations_put_every_view_in_the_set_and_fit_the_predictor(cifar10_small, monkeypatch):
    train, _ = cifar10_small
    predictor_losses = []
    real_loss = distill_module.augmentation_predictor_loss

    def recording_loss(*args):
        predictor_losses.append(real_loss(*args))
        return predictor_losses[-1]

    monkeypatch.setattr(distill_module, "augmentation_predictor_loss", recording_loss)
    config = dataclasses.replace(RUN, steps=20, fixed_augmentations=("rot90", "hflip"), predictor_lr=1e-4,
                                 validation_models=0)
    result = distill(train, _teacher(), config, progress=False)
    m = config.num_images
    assert len(result) == 3 * m and result.config["synthetic"]["views"] == ["identity", "rot90", "hflip"]
    plain, rotated, flipped = result.images.split(m)
    assert torch.equal(rotated, torch.rot90(plain, 1, dims=(-2, -1))) and torch.equal(flipped, plain.flip(-1))
    # the views' targets are predicted, not copies of the plain image's
    assert not torch.allclose(result.targets[m : 2 * m], result.targets[:m])
    assert len(predictor_losses) == 20
    first, last = (float(torch.stack(predictor_losses[part]).detach().mean()) for part in (slice(0, 5), slice(-5, None)))
    assert last < 0.9 * first, ("the predictor learns on real views", first, last)
    with pytest.raises(KrrstError, match="cannot be combined with distill.teacher_cache_views"):
        DistillConfig(fixed_augmentations=("rot90",), teacher_cache_views=2)
    with pytest.raises(KrrstError, match="unknown fixed augmentation 'rot45'"):
        DistillConfig(fixed_augmentations=("rot45",))


@pytest.mark.shared_data
@pytest.mark.parametrize("init", ["kmeans", "high-loss"])
def test_initialisations_start_from_the_images_they_choose(cifar10_small, init, monkeypatch):
    """With 0 steps the set is the chosen real images; the choice is the baselines' function's, seeded."""
    train, _ = cifar10_small
    chosen = []
    import krrst.baselines as baselines

    # the k-means coreset's last step inside baselines; the high-loss selection as distill calls it
    module, name = (baselines, "nearest_distinct") if init == "kmeans" else (distill_module, "high_loss_indices")
    real = getattr(module, name)

    def recording(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(module, name, recording)
    config = dataclasses.replace(RUN, steps=0, init=init, validation_models=0)
    result = distill(train, _teacher(), config, progress=False)
    expected_images = normalize(train.images[chosen[0].cpu()], train.mean, train.std)
    torch.testing.assert_close(result.images, expected_images)
    random_start = distill(train, _teacher(), dataclasses.replace(config, init="random"), progress=False)
    assert not torch.equal(result.images, random_start.images)
    again = distill(train, _teacher(), config, progress=False)
    assert torch.equal(again.images, result.images), "seeded"


def test_distill_leaves_the_callers_teacher_contiguous():
    """channels_last is a distillation detail: the teacher passed in is handed back in its own layout."""
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    teacher = create_model("convnet3", widths=(4, 4, 4), image_size=16)
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=2, batch_size=16, pool_size=2,
                           pool_steps=1, validate_every=0, channels_last="on")
    distill(ImageSet(images, None, [], MEAN, STD, "noise"), teacher, config, progress=False)
    assert all(p.is_contiguous() for p in teacher.parameters())


@pytest.mark.shared_data
def test_final_targets_teacher_relabels_the_distilled_images_with_the_teacher(cifar10_small):
    train, _ = cifar10_small
    config = dataclasses.replace(RUN, steps=4, validation_models=0)
    learned = distill(train, _teacher(), config, progress=False)
    relabelled = distill(train, _teacher(), dataclasses.replace(config, final_targets="teacher"), progress=False)
    assert torch.equal(relabelled.images, learned.images), "the distillation itself is unchanged"
    teacher = _teacher().eval()
    with torch.no_grad():
        torch.testing.assert_close(relabelled.targets, teacher(relabelled.images), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(learned.targets, relabelled.targets, atol=1e-3), "the learned targets had drifted"
    with pytest.raises(KrrstError, match="distill.final_targets='mean' is not valid"):
        DistillConfig(final_targets="mean")


@pytest.mark.shared_data
def test_final_targets_teacher_stays_within_the_sets_storage(cifar10_small, monkeypatch):
    """A basis set stores the best rank-k_t fit of the teacher's targets; fixed views take the predictor's."""
    train, _ = cifar10_small
    teacher = _teacher().eval()
    basis_config = dataclasses.replace(RUN, num_images=12, steps=2, parameterization="basis", image_rank=6,
                                       target_rank=3, validation_models=0, final_targets="teacher")
    basis = distill(train, _teacher(), basis_config, progress=False)
    with torch.no_grad():
        exact = teacher(basis.images)
    centred = exact - exact.mean(0)
    residual = (basis.targets - exact).pow(2).sum()
    torch.testing.assert_close(residual, torch.linalg.svdvals(centred.double())[3:].pow(2).sum().float(),
                               rtol=1e-3, atol=1e-4)
    assert torch.linalg.matrix_rank(basis.targets - basis.targets.mean(0), rtol=1e-4) == 3

    # basis + fixed views, a few steps: the plain view carries the projected teacher targets, the rotated view
    # the (trained) predictor's targets from them, not the teacher's of the rotated images
    predictors = []

    class RecordedPredictor(distill_module.AugmentationPredictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            predictors.append(self)

    monkeypatch.setattr(distill_module, "AugmentationPredictor", RecordedPredictor)
    views_config = dataclasses.replace(basis_config, steps=3, fixed_augmentations=("rot90",), predictor_lr=1e-2)
    views = distill(train, _teacher(), views_config, progress=False)
    plain, rotated = views.images.split(views_config.num_images)
    plain_targets, rotated_targets = views.targets.split(views_config.num_images)
    with torch.no_grad():
        exact = teacher(plain)
        centred = exact - exact.mean(0)
        # the best rank-3 fit: its residual is the tail of the spectrum (a check that, unlike comparing the fit
        # itself, does not depend on how well separated the third and fourth singular values happen to be)
        plain_residual = (plain_targets - exact).double().pow(2).sum()
        optimum = torch.linalg.svdvals(centred.double())[3:].pow(2).sum()
        torch.testing.assert_close(plain_residual, optimum, rtol=1e-3, atol=1e-4)
        assert torch.linalg.matrix_rank(plain_targets - plain_targets.mean(0), rtol=1e-4) == 3
        torch.testing.assert_close(rotated_targets, predictors[0](plain_targets)[len(plain):], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(rotated_targets, plain_targets, atol=1e-3), "the predictor was trained"
        assert not torch.allclose(rotated_targets, teacher(rotated), atol=1e-3), "not the teacher's view targets"
    assert views.config["synthetic"]["storage_bytes"] == (
        basis.config["synthetic"]["storage_bytes"] + predictors[0].storage_bytes()
    )


def test_the_trained_validation_signal_trains_copies_as_the_pool_trains_its_models():
    """validation_train_steps = k: each validation network is a copy trained k full-batch SGD steps on the set
    (the pool's settings), then the held-out KRR loss; the networks themselves stay untouched (float64 oracle)."""
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            generator = torch.Generator().manual_seed(0)
            heldout = torch.randn(24, 3, 16, 16, generator=generator)
            heldout_targets = torch.randn(24, 6, generator=generator)
            images, targets = torch.randn(8, 3, 16, 16, generator=generator), torch.randn(8, 6, generator=generator)
            config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), validation_models=2,
                                   validation_train_steps=3, pool_lr=0.05, pool_momentum=0.9, pool_weight_decay=1e-3)
            signal = distill_module.ValidationSignal(config, heldout, heldout_targets, seed=5)
            before = [copy.deepcopy(model.state_dict()) for model in signal.models]
            value = signal(images, targets)

            expected = []
            for model in signal.models:
                trained = copy.deepcopy(model).train()
                optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
                for _ in range(3):
                    optimizer.zero_grad()
                    torch.nn.functional.mse_loss(trained(images), targets).backward()
                    optimizer.step()
                trained.eval()
                with torch.no_grad():
                    expected.append(krr_st_loss(trained.forward_features(images), targets,
                                                trained.forward_features(heldout), heldout_targets, config.ridge))
            assert value == pytest.approx(torch.stack(expected).mean().item(), rel=1e-10)
            assert all(torch.equal(a, b) for state, model in zip(before, signal.models)
                       for a, b in zip(state.values(), model.state_dict().values()))
            assert signal(images, targets) == pytest.approx(value, rel=1e-12)  # the same networks each time
            fresh = distill_module.ValidationSignal(dataclasses.replace(config, validation_train_steps=0), heldout,
                                                    heldout_targets, seed=5)
            assert fresh(images, targets) != pytest.approx(value, rel=1e-3)
        finally:
            torch.set_default_dtype(torch.float32)
