"""SSL teacher: optimiser and schedule, training, resume, loading, collapse checks (its losses: test_losses.py)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from krrst.augment import ssl_view_pair
from krrst.data import ImageSet
from krrst.infra.errors import KrrstError
from krrst.infra.io import load_state, save_state
from krrst.infra.speed import reference_speed
from krrst.losses import barlow_twins_loss
from krrst.models import create_model
from krrst.teacher import (
    LARS,
    TeacherConfig,
    _epoch_permutation,
    build_backbone,
    build_projector,
    check_not_collapsed,
    feature_health,
    knn_accuracy,
    learning_rate_at,
    load_teacher,
    read_loss_log,
    save_teacher,
    train_teacher,
    view_configs,
)

# A narrow ConvNet teacher and a small projector: a few CPU seconds per run.
TINY = TeacherConfig(
    arch="convnet3",
    convnet_widths=(16, 32, 64),
    batch_size=64,
    steps=20,
    lr=0.2,
    warmup_epochs=0.0,
    projector_dims=(256, 256),
    checkpoint_every=5,
    log_every=5,
    seed=3,
)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- optimiser and schedule


def test_lars_step_matches_formula():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    weight.grad = torch.tensor([[0.0, 1.0]])  # norm 1
    bias.grad = torch.tensor([2.0])
    optimizer = LARS([weight, bias], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    optimizer.step()
    trust = min(0.02 * 5 / (1 + 0.1 * 5 + 1e-8) / 0.5, 1.0)
    p, g = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    expected = p - 0.5 * trust * (g + 0.1 * p)
    assert torch.allclose(weight.detach(), expected, atol=1e-7)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: plain SGD, no decay


def test_learning_rate_schedule_warms_up_then_decays():
    config = TeacherConfig(lr=0.3, warmup_epochs=10, warmup_start_lr=3e-5, min_lr=0.0)
    assert learning_rate_at(0, 10_000, 100, config) == pytest.approx(3e-5)
    assert learning_rate_at(1000, 10_000, 100, config) == pytest.approx(0.3)
    assert learning_rate_at(10_000, 10_000, 100, config) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_at(500, 10_000, 100, config) == pytest.approx((3e-5 + 0.3) / 2, rel=1e-6)


# --------------------------------------------------------------------------- speed: the fast path against the reference

# A teacher of a few CPU seconds: 6 steps of 16 noise images, stopped at step 3 (no health check).
SPEED_TINY = TeacherConfig(
    arch="convnet3", convnet_widths=(8, 16, 16), batch_size=16, steps=6, lr=0.2, warmup_epochs=0.0,
    projector_dims=(32, 32), checkpoint_every=10**6, log_every=1, seed=1,
)


def _noise(n: int = 64, size: int = 16) -> ImageSet:
    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageSet(images=images, labels=None, class_names=[], mean=(0.5,) * 3, std=(0.25,) * 3, name="noise")


def _floats(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def test_speed_knobs_are_validated_in_one_line():
    with pytest.raises(KrrstError, match="teacher.precision='fp8' is not valid; expected one of auto, float32, bf"):
        TeacherConfig(precision="fp8")
    with pytest.raises(KrrstError, match="teacher.channels_last='yes' is not valid; expected one of auto, on, off"):
        TeacherConfig(channels_last="yes")


def test_reference_path_is_the_plain_float32_loop_bit_for_bit(conv_calls):
    """Knobs off, `train_teacher` is exactly the straightforward loop (float32, contiguous), written out here."""
    images, config = _noise(), reference_speed(SPEED_TINY)
    teacher = train_teacher(images, config, device="cpu", stop_at_step=3, progress=False)
    assert set(conv_calls) == {("contiguous", "contiguous", None)}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = build_backbone(config, 16)
        projector = build_projector(backbone.feature_dim, config.projector_dims)
    optimizer = LARS(list(backbone.parameters()) + list(projector.parameters()), lr=config.lr,
                     momentum=config.momentum, weight_decay=config.weight_decay, eta=config.lars_eta)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(images) // config.batch_size
    for step in range(3):
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_permutation(config.seed, epoch, len(images))
        batch = images.images[order[position * config.batch_size : (position + 1) * config.batch_size]]
        view_a, view_b = ssl_view_pair(batch, images.mean, images.std, generator, view_configs(config))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config.steps, steps_per_epoch, config)
        loss = barlow_twins_loss(projector(backbone(view_a)), projector(backbone(view_b)),
                                 config.lambda_offdiag, config.loss_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in backbone.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), f"{key} differs from the plain loop"


# Unit roundoff of each precision: the fast paths are held to the reference in units of these.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
SPEED_STEPS = 5  # steps of the fast-path comparisons: BatchNorm's running statistics have moved by then


@pytest.fixture
def float32_draws(monkeypatch):
    """The networks built from float32 draws, then cast to the default dtype.

    torch draws random numbers in the tensor's dtype, so a float64 run would
    start from other weights; this way the float64 reference and the float32
    paths start from the same weights (the view draws are float64 anyway).
    """
    import krrst.teacher as T

    def from_float32(build):
        def built(*args):
            dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            try:
                return build(*args).to(dtype)
            finally:
                torch.set_default_dtype(dtype)
        return built

    monkeypatch.setattr(T, "build_backbone", from_float32(T.build_backbone))
    monkeypatch.setattr(T, "build_projector", from_float32(T.build_projector))


def _teacher_state(images, config, out, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Backbone and projector weights and BatchNorm buffers after SPEED_STEPS steps, run in default `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        train_teacher(images, config, out_dir=out, device="cpu", stop_at_step=SPEED_STEPS, progress=False)
    finally:
        torch.set_default_dtype(previous)
    state = load_state(out / "checkpoint.safetensors", "teacher checkpoint")
    return {**{f"backbone.{k}": v for k, v in state["model"].items()},
            **{f"projector.{k}": v for k, v in state["projector"].items()}}


def relative_errors(state: dict, reference: dict, initial: dict) -> dict[str, float]:
    """||state - reference|| / ||reference - initial|| over the parameters and over BatchNorm's running statistics.

    Integer buffers (BatchNorm's step counters) must be equal. Each group is
    one vector so that a tensor moved by weight decay alone (a convolution
    bias before BatchNorm gets no gradient, only rounding noise) does not
    stand for the whole network.
    """
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        if not value.is_floating_point():
            assert torch.equal(state[key], value), key
    buffers = [key for key in reference if key.endswith(("running_mean", "running_var"))]
    groups = {"parameters": [key for key in reference if reference[key].is_floating_point() and key not in buffers],
              "buffers": buffers}
    errors = {}
    for group, keys in groups.items():
        flat = lambda tensors: torch.cat([tensors[key].double().flatten() for key in keys])  # noqa: E731
        errors[group] = float((flat(state) - flat(reference)).norm() / (flat(reference) - flat(initial)).norm())
    return errors


def assert_states_match(state: dict, reference: dict, initial: dict, tolerances: dict[str, float]) -> None:
    """`state` is `reference` to `tolerances[group]` (see `relative_errors`), and the bounds mean something."""
    for group, error in relative_errors(state, reference, initial).items():
        assert tolerances[group] < 1, f"{group}: tolerance {tolerances[group]:.3g} too loose to mean anything"
        assert error <= tolerances[group], f"{group}: relative error {error:.3g} > {tolerances[group]:.3g}"


def fast_path_tolerances(fast: dict, float32_errors: dict[str, float]) -> dict[str, float]:
    """C * kappa * u per group, kappa = the float32 reference's relative error / u32 (its conditioning).

    channels_last (compared in float64) sums each convolution's K = 3*3*16 =
    144 products in another order: C = K (Higham's gamma_K), u = 2^-53.
    bf16 autocast rounds both operands of every product to 8 significant bits
    (accumulating in float32), 2u per product where float32 rounds once, and
    the activations BatchNorm reads: C = 3, u = 2^-8.
    """
    kappas = {group: error / UNIT_ROUNDOFF[torch.float32] for group, error in float32_errors.items()}
    if "channels_last" in fast:
        return {group: 144 * kappa * UNIT_ROUNDOFF[torch.float64] for group, kappa in kappas.items()}
    return {group: 3 * kappa * UNIT_ROUNDOFF[torch.bfloat16] for group, kappa in kappas.items()}


@pytest.mark.parametrize(
    "fast, convolutions",
    [(dict(channels_last="on"), ("channels_last", "channels_last", None)),
     (dict(precision="bfloat16"), ("contiguous", "contiguous", torch.bfloat16))],
    ids=["channels_last", "bf16-autocast"],
)
def test_fast_path_reaches_the_reference_state(fast, convolutions, tmp_path, conv_calls, float32_draws):
    """After SPEED_STEPS steps every weight and BatchNorm buffer (backbone and projector) is the float64 reference's.

    Within C * kappa * u (`fast_path_tolerances`): kappa, how much this
    computation amplifies rounding, is measured by the float32 reference's
    error against the float64 one (tens here: Barlow Twins on a batch of 16).
    For bf16 that admits an update ~70% off, so it catches a missing,
    doubled or wrong-signed update or buffer, not a subtle one: bf16 on a
    batch of 16 is that ill-conditioned. channels_last is held to ~1e-12.
    """
    images = _noise()
    reference = reference_speed(SPEED_TINY)
    fast_config = dataclasses.replace(reference, **fast)
    fast_dtype = torch.float64 if "channels_last" in fast else torch.float32
    with torch.random.fork_rng(devices=[]):  # the weights every run starts from
        torch.manual_seed(reference.seed)
        backbone = build_backbone(reference, images.image_size)
        projector = build_projector(backbone.feature_dim, reference.projector_dims)
    initial = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"projector.{k}": v for k, v in projector.state_dict().items()}}
    exact = _teacher_state(images, reference, tmp_path / "float64", torch.float64)
    float32_errors = relative_errors(_teacher_state(images, reference, tmp_path / "float32"), exact, initial)
    conv_calls.clear()
    state = _teacher_state(images, fast_config, tmp_path / "fast", fast_dtype)
    assert set(conv_calls) == {convolutions}
    assert_states_match(state, exact, initial, fast_path_tolerances(fast, float32_errors))
    assert state["backbone.blocks.0.1.num_batches_tracked"] == 2 * SPEED_STEPS  # two views per step
    running_mean = state["backbone.blocks.2.1.running_mean"]
    assert float(running_mean.norm()) > 0.1, "BatchNorm's running statistics should have moved"


def _optimizer_settings():
    """(optimizer, settings) of every optimiser the stages build (teacher, pre-training, fine-tuning, probe)."""
    from krrst.evaluate import FinetuneConfig, LinearProbeConfig, PretrainConfig

    teacher, pre, fine, probe = TeacherConfig(), PretrainConfig(), FinetuneConfig(), LinearProbeConfig()
    sgd = lambda lr, momentum, weight_decay: (torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))  # noqa: E731
    return {
        "teacher-sgd": sgd(teacher.lr, teacher.momentum, teacher.weight_decay),
        "teacher-adamw": (torch.optim.AdamW, dict(lr=teacher.lr, weight_decay=teacher.weight_decay)),
        "pretrain-representation": sgd(pre.lr, pre.momentum, pre.weight_decay),
        "pretrain-hard-labels": sgd(pre.label_lr, pre.momentum, pre.label_weight_decay),
        "pretrain-soft-labels": (torch.optim.AdamW, dict(lr=pre.soft_label_lr, weight_decay=0.0)),
        "finetune": sgd(fine.lr, fine.momentum, fine.weight_decay),
        "linear-probe": sgd(probe.lr, probe.momentum, probe.weight_decay),
    }


@pytest.mark.parametrize("name", list(_optimizer_settings()))
def test_fused_optimiser_takes_the_per_tensor_step(name):
    """`fused_options` (CUDA) promises the per-tensor (foreach) update up to rounding: held here on torch's CPU kernels.

    In float64, over 5 steps of a decaying learning rate: each step's update
    is a handful of roundings of size u64 = 2^-53, so the two paths may
    differ by 8 u64 per step relative to how far the weights moved.
    """
    optimizer_class, settings = _optimizer_settings()[name]

    def trained(kernel: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_()
                   for shape in [(8, 3, 3, 3), (8,), (16, 8)]]  # a conv weight, a bias or BatchNorm scale, a linear
        initial = [weight.detach().clone() for weight in weights]
        optimizer = optimizer_class(weights, **settings, **kernel)
        for step in range(5):
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * (1 - step / 10)
            for weight in weights:
                weight.grad = torch.randn(weight.shape, dtype=weight.dtype, generator=generator)
            optimizer.step()
        return initial, [weight.detach() for weight in weights]

    try:
        _, fused = trained({"fused": True})
    except RuntimeError as error:  # a torch without CPU fused kernels
        pytest.skip(f"no fused {optimizer_class.__name__} on the CPU: {error}")
    initial, foreach = trained({"foreach": True})
    for start, fused_weight, foreach_weight in zip(initial, fused, foreach):
        moved = float((foreach_weight - start).norm())
        assert moved > 1e-4
        assert float((fused_weight - foreach_weight).norm()) <= 5 * 8 * 2.0**-53 * moved


def test_resume_may_change_channels_last_but_not_precision_source_size_or_kind(tmp_path):
    images = _noise()
    reference = reference_speed(SPEED_TINY)
    train_teacher(images, reference, out_dir=tmp_path, device="cpu", stop_at_step=1, progress=False)
    fast_layout = TeacherConfig(**{**reference.__dict__, "channels_last": "on"})
    train_teacher(images, fast_layout, out_dir=tmp_path, resume=True, device="cpu", stop_at_step=2, progress=False)
    bf16 = TeacherConfig(**{**reference.__dict__, "precision": "bfloat16"})
    with pytest.raises(KrrstError, match=r"checkpoint.safetensors was written with another config "
                                         r"\(precision: 'float32' -> 'bfloat16'\); use the same settings"):
        train_teacher(images, bf16, out_dir=tmp_path, resume=True, device="cpu", progress=False)
    with pytest.raises(KrrstError, match=r"checkpoint.safetensors was written with another num_images \(64 -> 48\); "
                                         r"use the same num_images or a new --out$"):
        train_teacher(_noise(48), reference, out_dir=tmp_path, resume=True, device="cpu", progress=False)
    with pytest.raises(KrrstError, match=r"checkpoint.safetensors is not a krrst teacher checkpoint \(kind 'x'\)$"):
        state = load_state(tmp_path / "checkpoint.safetensors")
        save_state(tmp_path / "checkpoint.safetensors", {**state, "kind": "x"})
        train_teacher(images, reference, out_dir=tmp_path, resume=True, device="cpu", progress=False)


# --------------------------------------------------------------------------- training on real images


@pytest.fixture(scope="module")
def tiny_run(cifar10_small, tmp_path_factory):
    """A 20-step teacher on 2,000 real CIFAR-10 images, with its run directory."""
    train, test = cifar10_small
    out = tmp_path_factory.mktemp("teacher")
    heldout = test.subset(torch.arange(300))
    teacher = train_teacher(train, TINY, out_dir=out, device="cpu", heldout=heldout, progress=False)
    return teacher, out


@pytest.mark.shared_data
def test_tiny_teacher_lowers_the_loss_and_writes_its_files(tiny_run):
    teacher, out = tiny_run
    rows = read_loss_log(out / "loss.csv")
    assert [row["step"] for row in rows] == list(range(1, 21))
    losses = [row["loss"] for row in rows]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.9 * first, f"loss did not go down: first steps {losses[:3]}, last steps {losses[-3:]}"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name in ("teacher.safetensors", "checkpoint.safetensors", "health.json"):
        assert (out / name).is_file()


@pytest.mark.shared_data
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cifar10_small, tiny_run, tmp_path):
    train, _ = cifar10_small
    uninterrupted, uninterrupted_dir = tiny_run
    # Interrupted after step 7 (the last checkpoint is step 7, written on stop) ...
    partial = train_teacher(train, TINY, out_dir=tmp_path, device="cpu", stop_at_step=7, progress=False)
    assert not torch.equal(partial.state_dict()["blocks.0.0.weight"], uninterrupted.state_dict()["blocks.0.0.weight"])
    assert not (tmp_path / "teacher.safetensors").exists()
    # ... and a crash left a loss row the checkpoint does not cover.
    with open(tmp_path / "loss.csv", "a") as handle:
        handle.write("8,123.0,0.1,9.9\n")
    with pytest.raises(KrrstError, match="already exists; resume that run"):
        train_teacher(train, TINY, out_dir=tmp_path, device="cpu", progress=False)
    resumed = train_teacher(
        train, TINY, out_dir=tmp_path, resume=True, device="cpu", heldout=train.subset(torch.arange(100)),
        progress=False,
    )
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), f"{key} differs after resume"
    assert read_loss_log(tmp_path / "loss.csv") == [
        {**row, "elapsed_s": resumed_row["elapsed_s"]}
        for row, resumed_row in zip(read_loss_log(uninterrupted_dir / "loss.csv"), read_loss_log(tmp_path / "loss.csv"))
    ]
    assert len(read_loss_log(tmp_path / "loss.csv")) == 20


@pytest.mark.shared_data
def test_resume_refuses_changed_settings(cifar10_small, tmp_path):
    train, _ = cifar10_small
    train_teacher(train, TINY, out_dir=tmp_path, device="cpu", stop_at_step=1, progress=False)
    changed = TeacherConfig(**{**TINY.__dict__, "lr": 0.5})
    with pytest.raises(KrrstError, match=r"^--resume: .*checkpoint.safetensors was written with another config "
                                         r"\(lr: 0.2 -> 0.5\); use the same settings or a new --out$") as excinfo:
        train_teacher(train, changed, out_dir=tmp_path, resume=True, device="cpu", progress=False)
    _one_line_error(excinfo)


# --------------------------------------------------------------------------- health checks


class ConstantNetwork(nn.Module):
    """Ignores its input: every image gets the same features."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 32), self.value)


class MostlyDeadNetwork(nn.Module):
    """Two live feature dimensions out of 64: dimensional collapse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 64)
        out[:, :2] = x.mean(dim=(2, 3))[:, :2]
        return out


@pytest.mark.shared_data
def test_collapse_check_fires_on_constant_networks_and_passes_on_the_trained_teacher(cifar10_small, tiny_run):
    _, test = cifar10_small
    images = test.images[:200]
    for network in (ConstantNetwork(0.0), ConstantNetwork(3.0), MostlyDeadNetwork()):
        health = feature_health(network, images, test.mean, test.std)
        assert health["collapsed"]
        with pytest.raises(KrrstError, match="collapsed") as excinfo:
            check_not_collapsed(health)
        _one_line_error(excinfo)
    teacher, out = tiny_run
    health = feature_health(teacher, images, test.mean, test.std)
    assert not health["collapsed"] and health["dead_fraction"] < 0.5 and health["effective_rank"] > 10
    check_not_collapsed(health)


@pytest.mark.shared_data
def test_knn_accuracy_matches_a_brute_force_vote(cifar10_small, tiny_run):
    train, test = cifar10_small
    teacher, _ = tiny_run
    small_train, small_test = train.subset(torch.arange(0, 2000, 4)), test.subset(torch.arange(0, 1000, 10))
    accuracy = knn_accuracy(teacher, small_train, small_test, k=5)
    from krrst.teacher import teacher_features

    tr = torch.nn.functional.normalize(teacher_features(teacher, small_train.images, train.mean, train.std), dim=1)
    te = torch.nn.functional.normalize(teacher_features(teacher, small_test.images, test.mean, test.std), dim=1)
    correct = 0
    for i in range(te.shape[0]):
        sims = (tr @ te[i]).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:5]
        votes: dict[int, float] = {}
        for j in order:
            label = int(small_train.labels[j])
            votes[label] = votes.get(label, 0.0) + math.exp(sims[j] / 0.07)
        correct += max(votes, key=votes.get) == int(small_test.labels[i])
    assert accuracy == pytest.approx(correct / te.shape[0])
    assert accuracy > 0.1  # above chance after 20 steps on real images


# --------------------------------------------------------------------------- loading teachers


@pytest.mark.shared_data
def test_load_teacher_round_trips_our_file(cifar10_small, tiny_run):
    _, test = cifar10_small
    teacher, out = tiny_run
    loaded = load_teacher(out / "teacher.safetensors")
    batch = test.images[:16].float() / 255
    assert torch.equal(loaded(batch), teacher(batch))
    assert loaded.spec["arch"] == "convnet3" and loaded.spec["widths"] == [16, 32, 64]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_teacher_reads_a_torchvision_pad2_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    reference.maxpool = nn.Identity()
    # non-trivial BatchNorm statistics, so that a mis-mapped buffer would show
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {key: value for key, value in reference.state_dict().items() if not key.startswith("fc.")}
    path = tmp_path / "authors_teacher.pt"
    torch.save({f"module.{key}": value for key, value in state.items()}, path)

    loaded = load_teacher(path)
    assert loaded.spec["arch"] == "resnet18_pad2"
    reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-5)


def test_load_teacher_refuses_another_architecture(tmp_path):
    convnet = create_model("convnet3", widths=(8, 8, 8))
    ours = tmp_path / "teacher.safetensors"
    save_teacher(ours, convnet, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(KrrstError) as excinfo:
        load_teacher(ours, arch="resnet18")
    message = _one_line_error(excinfo)
    assert "convnet3" in message and "resnet18" in message and str(ours) in message

    # A bare state dict of a ConvNet, declared as a ResNet-18:
    plain = tmp_path / "weights.pt"
    torch.save(convnet.state_dict(), plain)
    with pytest.raises(KrrstError) as excinfo:
        load_teacher(plain, arch="resnet18")
    message = _one_line_error(excinfo)
    assert "convnet3" in message and "resnet18" in message and "missing" in message

    # Same keys, a BatchNorm narrower than its conv: the first mismatching shape is named.
    damaged = create_model("convnet3", widths=(16, 8, 8)).state_dict()
    damaged["blocks.0.1.weight"] = torch.ones(4)
    bad = tmp_path / "bad.pt"
    torch.save(damaged, bad)
    with pytest.raises(KrrstError, match=r"'blocks.0.1.weight' has shape \(4,\) in the file but \(16,\)") as excinfo:
        load_teacher(bad, arch="convnet3")
    _one_line_error(excinfo)


@pytest.mark.parametrize("suffix, norm", [(".safetensors", "batch"), (".pt", "batch"), (".pt", "instance"),
                                          (".safetensors", "none")])
def test_load_teacher_reads_a_plain_convnet_state_dict_of_any_widths(tmp_path, suffix, norm):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = create_model("convnet3", widths=(8, 16, 32), norm=norm)
    for module in reference.modules():
        if isinstance(module, nn.GroupNorm):  # not the initial affine, so a default one would show
            module.weight.data.uniform_(0.5, 1.5)
    # non-trivial BatchNorm statistics, so that a default-initialised buffer would show
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    path = tmp_path / f"plain_convnet3{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))

    loaded = load_teacher(path, arch="convnet3")
    assert loaded.spec["widths"] == [8, 16, 32] and loaded.spec["norm"] == norm
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference.eval()(x))


def test_load_teacher_reads_a_state_dict_without_batchnorm_step_counters(tmp_path):
    """Some writers drop BatchNorm's num_batches_tracked; the weights and statistics are all there."""
    torch.manual_seed(0)
    reference = create_model("convnet3", widths=(8, 16, 32)).eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    state = {key: value for key, value in reference.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "no_counters.pt")
    loaded = load_teacher(tmp_path / "no_counters.pt", arch="convnet3")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert loaded.spec["norm"] == "batch" and torch.equal(loaded(x), reference(x))


def test_load_teacher_says_when_widths_cannot_be_inferred(tmp_path):
    resnet = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18").state_dict(), resnet)
    with pytest.raises(KrrstError) as excinfo:
        load_teacher(resnet, arch="convnet3")
    message = _one_line_error(excinfo)
    assert "cannot infer its widths" in message and "'blocks.0.0.weight' is missing" in message
    assert "resnet18" in message and str(resnet) in message  # what the keys look like instead

    flat = create_model("convnet3", widths=(8, 8, 8)).state_dict()
    flat["blocks.1.0.weight"] = flat["blocks.1.0.weight"].flatten(1)
    flattened = tmp_path / "flat.pt"
    torch.save(flat, flattened)
    with pytest.raises(KrrstError, match=r"'blocks.1.0.weight' has shape \(8, 72\); expected 3 conv weights"):
        load_teacher(flattened, arch="convnet3")


class _Pickled:
    """An object torch.load(weights_only=True) must refuse rather than construct."""

    def __init__(self):
        self.state = {"w": torch.zeros(1)}


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("text.pt", b"hello", "(KeyError: 101)"),  # torch's whole message for a text file is "101"
        ("random.pth", bytes([0x13, 0x37]) + torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.uint8).numpy().tobytes(),
         "(UnpicklingError: Unsupported operand"),  # corrupt bytes: no advice to re-save
        ("pickled.pt", None, "holds pickled objects (UnpicklingError)"),
    ],
)
def test_load_teacher_names_foreign_pytorch_files_without_suggesting_unsafe_loading(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        torch.save(_Pickled(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(KrrstError) as excinfo:
        load_teacher(path, arch="convnet3")
    message = _one_line_error(excinfo)
    assert message.startswith(f"teacher file {path} is not a weights-only PyTorch checkpoint or safetensors file")
    assert reason in message and "weights_only" not in message
    advised = "never unpickles" in message and "re-save it as a state dict" in message
    assert advised == (name == "pickled.pt"), message


@pytest.mark.parametrize("name", ["teacher.safetensors", "teacher.pt"])
def test_load_teacher_reports_a_corrupt_file_in_one_line(tmp_path, name):
    path = tmp_path / name
    good = tmp_path / ("good" + path.suffix)
    model = create_model("convnet3", widths=(8, 8, 8))
    if path.suffix == ".pt":
        torch.save(model.state_dict(), good)
    else:
        save_teacher(good, model, mean=(0.5,) * 3, std=(0.25,) * 3)
    path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated download
    with pytest.raises(KrrstError) as excinfo:
        load_teacher(path, arch="convnet3")
    message = _one_line_error(excinfo)
    assert str(path) in message


def test_load_teacher_reads_a_plain_safetensors_state_dict_given_its_arch(tmp_path):
    from safetensors.torch import save_file

    model = create_model("resnet18")
    path = tmp_path / "backbone.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_teacher(path, arch="resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))
    with pytest.raises(KrrstError, match="--teacher-arch") as excinfo:
        load_teacher(path)
    assert "resnet18_pad2" in _one_line_error(excinfo)  # lists the valid names


@pytest.mark.shared_data
def test_simclr_teacher_runs_behind_the_same_interface(cifar10_small, tmp_path):
    from krrst.teacher import SIMCLR_CIFAR_OVERRIDES

    train, _ = cifar10_small
    config = TeacherConfig(**{**TINY.__dict__, **SIMCLR_CIFAR_OVERRIDES, "steps": 3, "lr": 0.2})
    teacher = train_teacher(train, config, out_dir=tmp_path, device="cpu", heldout=train.subset(torch.arange(100)),
                            progress=False)
    losses = [row["loss"] for row in read_loss_log(tmp_path / "loss.csv")]
    # NT-Xent starts near log(2N - 1) for near-random embeddings (N = 64 images per step)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(2 * 64 - 1)) < 1.0
    assert load_teacher(tmp_path / "teacher.safetensors").feature_dim == teacher.feature_dim


def test_a_convnet_teacher_can_take_a_pooled_representation(tmp_path):
    from krrst.teacher import build_backbone, load_teacher, save_teacher

    config = TeacherConfig(arch="convnet3", convnet_widths=(4, 8, 16), convnet_pool="avg")
    backbone = build_backbone(config, 16)
    assert backbone.feature_dim == 16
    save_teacher(tmp_path / "t.safetensors", backbone, (0.5,) * 3, (0.25,) * 3, config)
    assert load_teacher(tmp_path / "t.safetensors").feature_dim == 16, "the pooling is part of the saved spec"
    with pytest.raises(KrrstError, match="teacher.convnet_pool is set but model 'resnet18' has no pool option"):
        build_backbone(TeacherConfig(arch="resnet18", convnet_pool="avg"), 32)
