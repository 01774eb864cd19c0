"""Tests of MKDT: expert trajectories, the unrolled matching loss and its gradients, the distillation loop."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from krrst import mkdt as M
from krrst.augment import normalize
from krrst.baselines import high_loss_indices
from krrst.data import ImageSet
from krrst.distill import network_options
from krrst.distilled import DistilledSet
from krrst.infra.distributed import DistributedContext
from krrst.infra.errors import KrrstError
from krrst.models import create_model

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
TINY = dict(widths=(4, 4, 4), image_size=8, experts=2, expert_epochs=3, expert_batch_size=8, syn_steps=4,
            expert_epochs_matched=1, max_start_epoch=2, batch_syn=4, num_images=8, log_every=1)


def _source(n: int = 32, seed: int = 0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(30, 226, (n, 3, 1, 1), generator=generator)
    images = (colours + torch.randint(-25, 26, (n, 3, 8, 8), generator=generator)).clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, labels=None, class_names=[], mean=MEAN, std=STD, name="toy")


def _teacher(d: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, d))


def _config(**overrides) -> M.MKDTConfig:
    return M.MKDTConfig(**{**TINY, **overrides})


def _network(config: M.MKDTConfig, num_outputs: int, seed: int = 0) -> nn.Module:
    """A network of the config's architecture (a student's shape), in train mode."""
    torch.manual_seed(seed)
    return create_model(config.arch, num_outputs, **network_options(config)).train()


# --------------------------------------------------------------------------- gradients of the unroll


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_unrolled_gradients_match_central_finite_differences(norm):
    config = _config(widths=(2, 2, 2), norm=norm)
    student = _network(config, 3, seed=1).double()
    generator = torch.Generator().manual_seed(0)
    start = M.flat_parameters(student)
    target = start + 0.05 * torch.randn(start.shape, generator=generator, dtype=torch.float64)
    images = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    lr = torch.tensor(0.3, dtype=torch.float64)

    def loss(images, targets, lr):
        # 3 steps on batches of 2: two permutations, so batch order matters and must replay identically
        return M.matching_loss(student, start, target, images, targets, lr, syn_steps=3, batch_syn=2,
                               generator=torch.Generator().manual_seed(7))

    leaves = [leaf.clone().requires_grad_(True) for leaf in (images, targets, lr)]
    gradients = torch.autograd.grad(loss(*leaves), leaves)
    assert all(g.abs().sum() > 0 for g in gradients)
    eps = 1e-6
    for which in range(3):
        direction = torch.randn(leaves[which].shape, generator=generator, dtype=torch.float64)
        plus = [leaf.detach() + (eps * direction if i == which else 0) for i, leaf in enumerate(leaves)]
        minus = [leaf.detach() - (eps * direction if i == which else 0) for i, leaf in enumerate(leaves)]
        numeric = (loss(*plus) - loss(*minus)).item() / (2 * eps)
        analytic = float((gradients[which] * direction).sum())
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_matching_loss_against_a_hand_computed_step():
    config = _config()
    student = _network(config, 3)
    start = M.flat_parameters(student)
    target = start + 0.01
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, generator=generator)

    def loss(lr, steps, target):
        return M.matching_loss(student, start, target, images, targets, torch.tensor(lr), syn_steps=steps,
                               batch_syn=4, generator=torch.Generator().manual_seed(0)).item()

    assert loss(0.0, 2, target) == pytest.approx(1.0)  # no movement: the normalised distance is 1
    theta = start.clone().requires_grad_(True)
    named = list(student.named_parameters())
    weights = {name: piece.view_as(p) for (name, p), piece in zip(named, theta.split([p.numel() for _, p in named]))}
    outputs = torch.func.functional_call(student, weights, (images,))
    (gradient,) = torch.autograd.grad(nn.functional.mse_loss(outputs, targets), theta)
    one_step = (start - 0.1 * gradient).detach()
    expected = ((one_step - target).pow(2).sum() / (start - target).pow(2).sum()).item()
    assert loss(0.1, 1, target) == pytest.approx(expected, rel=1e-5)
    assert loss(0.1, 1, one_step) == pytest.approx(0.0, abs=1e-8)


# --------------------------------------------------------------------------- experts


def test_expert_trajectories_have_every_checkpoint_and_learn(tmp_path):
    source, teacher = _source(), _teacher()
    config = _config(norm="batch")  # instance norm would hide the mean colours the teacher sees
    trajectories = M.train_expert_trajectories(source.images, MEAN, STD, teacher, config, device="cpu", progress=False)
    student = _network(config, 4)
    num_params = sum(p.numel() for p in student.parameters())
    assert len(trajectories) == 2 and all(len(t) == 4 for t in trajectories)
    assert all(c.shape == (num_params,) and c.dtype == torch.float32 for t in trajectories for c in t)
    assert not torch.equal(trajectories[0][0], trajectories[1][0])  # independently seeded experts

    targets = teacher(normalize(source.images, MEAN, STD)).detach()
    for trajectory in trajectories:  # knowledge distillation: the regression loss falls along the trajectory
        losses = []
        for checkpoint in (trajectory[0], trajectory[-1]):
            nn.utils.vector_to_parameters(checkpoint, student.parameters())
            losses.append(nn.functional.mse_loss(student(normalize(source.images, MEAN, STD)), targets).item())
        assert losses[1] < 0.5 * losses[0]

    again = M.train_expert_trajectories(source.images, MEAN, STD, teacher, config, device="cpu", progress=False)
    assert all(torch.equal(a, b) for ta, tb in zip(trajectories, again) for a, b in zip(ta, tb))
    M.save_trajectories(tmp_path / "experts.safetensors", trajectories, config)
    loaded = M.load_trajectories(tmp_path / "experts.safetensors")
    assert [len(t) for t in loaded] == [4, 4]
    assert all(torch.equal(a, b) for ta, tb in zip(trajectories, loaded) for a, b in zip(ta, tb))
    DistilledSet(images=torch.zeros(1, 3, 8, 8), targets=torch.zeros(1, 4), mean=MEAN, std=STD).save(tmp_path / "x")
    with pytest.raises(KrrstError, match="not a krrst MKDT trajectory file"):
        M.load_trajectories(tmp_path / "x")

    # every 3 steps instead of every epoch: 3 epochs x 4 steps = 12 steps -> θ_0 + 4 checkpoints
    by_steps = M.train_expert_trajectories(
        source.images, MEAN, STD, teacher, _config(norm="batch", experts=1, expert_interval=3), device="cpu",
        progress=False,
    )
    assert len(by_steps) == 1 and len(by_steps[0]) == 5
    # augmented experts run the teacher on every view: still a valid trajectory
    augmented = M.train_expert_trajectories(
        source.images, MEAN, STD, teacher, _config(norm="batch", experts=1, expert_padding=2), device="cpu",
        progress=False,
    )
    assert len(augmented[0]) == 4 and not torch.equal(augmented[0][-1], trajectories[0][-1])


# --------------------------------------------------------------------------- the loop


def test_matching_loss_falls_over_outer_steps(tmp_path):
    # one expert, one start epoch and full batches: a deterministic objective, so its descent shows
    config = _config(experts=1, max_start_epoch=1, batch_syn=8, steps=25, image_lr=100.0, lr_lr=1e-3, init="random")
    result = M.mkdt_distill(_source(), _teacher(), config, out_dir=tmp_path, device="cpu", progress=False)
    with open(tmp_path / M.LOSS_CSV_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == list(range(1, 26))
    losses = [float(row["loss"]) for row in rows]
    assert losses[-1] < 0.7 * losses[0]
    assert result.config["syn_lr"] == pytest.approx(float(rows[-1]["syn_lr"]))


def test_mkdt_distill_returns_and_writes_a_distilled_set(tmp_path):
    source, teacher = _source(), _teacher()
    config = _config(steps=3, log_every=2)
    trajectories = M.train_expert_trajectories(source.images, MEAN, STD, teacher, config, device="cpu", progress=False)
    result = M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False,
                            trajectories=trajectories)
    assert isinstance(result, DistilledSet) and result.method == "mkdt" and result.target_kind == "representation"
    assert result.images.shape == (8, 3, 8, 8) and result.targets.shape == (8, 4)
    assert result.mean == MEAN and result.std == STD and result.step == 3
    loaded = DistilledSet.load(tmp_path / M.DISTILLED_NAME)
    torch.testing.assert_close(loaded.images, result.images)
    torch.testing.assert_close(loaded.targets, result.targets)
    with open(tmp_path / M.LOSS_CSV_NAME) as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 3]

    # no steps: the set is the high-loss real images (scored by the experts' last checkpoints) and g of them
    initial = M.mkdt_distill(source, teacher, _config(steps=0), device="cpu", progress=False, trajectories=trajectories)
    indices = torch.tensor(initial.config["init_indices"])
    scorers = []
    for trajectory in trajectories:
        scorer = _network(config, 4)
        nn.utils.vector_to_parameters(trajectory[-1], scorer.parameters())
        scorers.append(scorer)
    targets = teacher(normalize(source.images, MEAN, STD)).detach()
    expected = high_loss_indices(source.images, targets, 8, mean=MEAN, std=STD, models=scorers, batch_size=8)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(initial.images, normalize(source.images[indices], MEAN, STD))
    torch.testing.assert_close(initial.targets, targets[indices])

    # fixed targets: target_lr = 0 keeps Y_s = g(X_s init) while the images move
    fixed = M.mkdt_distill(source, teacher, _config(steps=2, target_lr=0.0, init="random"), device="cpu",
                           progress=False, trajectories=trajectories)
    fixed_indices = torch.tensor(fixed.config["init_indices"])
    torch.testing.assert_close(fixed.targets, targets[fixed_indices])
    assert not torch.allclose(fixed.images, normalize(source.images[fixed_indices], MEAN, STD))


# --------------------------------------------------------------------------- validation and cost


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_images": 0}, "num_images must be >= 1"),
        ({"max_start_epoch": 3, "expert_epochs_matched": 2, "expert_epochs": 3}, "exceeds mkdt.expert_epochs=3"),
        ({"init": "kmeans"}, "expected high-loss or random"),
        ({"optimizer": "lbfgs"}, "expected sgd or adam"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"image_lr": 0.0}, "image_lr must be > 0"),
        ({"target_lr": -1.0}, "target_lr must be >= 0"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(KrrstError, match=message):
        _config(**overrides)


def test_mkdt_distill_errors():
    source, teacher = _source(), _teacher()
    with pytest.raises(KrrstError, match="exceeds the 32 source images"):
        M.mkdt_distill(source, teacher, _config(num_images=33), device="cpu", progress=False)
    with pytest.raises(KrrstError, match="mkdt.image_size=8"):
        M.mkdt_distill(source, teacher, _config(image_size=16), device="cpu", progress=False)
    with pytest.raises(KrrstError, match="must be an MKDTConfig"):
        M.mkdt_distill(source, teacher, {"steps": 1}, device="cpu", progress=False)
    short = [[torch.zeros(10)] * 2]
    with pytest.raises(KrrstError, match="needs 3"):
        M.mkdt_distill(source, teacher, _config(), device="cpu", progress=False, trajectories=short)
    with pytest.raises(KrrstError, match="has 10 parameters"):
        M.mkdt_distill(source, teacher, _config(), device="cpu", progress=False, trajectories=[[torch.zeros(10)] * 3])


def test_mkdt_cost_counts_passes_and_flops():
    config = _config(widths=(2, 2, 2), steps=10)
    cost = M.mkdt_cost(config, num_source=32, feature_dim=3)
    assert cost["expert_train_images"] == 2 * 3 * 32
    assert cost["init_forward_images"] == 2 * 32
    assert cost["teacher_forward_images"] == 32
    assert cost["matching_unrolled_images"] == 10 * 4 * 4
    # conv FLOPs 2·Cin·Cout·9·H·W per block (8x8, 4x4, 2x2 inputs) + the head 2·features·d
    forward = 2 * 9 * (3 * 2 * 64 + 2 * 2 * 16 + 2 * 2 * 4) + 2 * 2 * 3
    assert cost["student_forward_flops"] == forward
    assert cost["student_flops"] == forward * (3 * 192 + 64 + 9 * 160)
    assert M.mkdt_cost(_config(expert_padding=2, init="random"), num_source=32)["teacher_forward_images"] == 32 + 192


# --------------------------------------------------------------------------- resume


def _rows(path):
    """loss.csv without the wall-clock column, which differs between sessions."""
    with open(path / M.LOSS_CSV_NAME) as handle:
        return [{key: value for key, value in row.items() if key != "elapsed_s"} for row in csv.DictReader(handle)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_resumed_run_reaches_the_uninterrupted_set_bitwise(tmp_path, optimizer):
    source, teacher = _source(), _teacher()
    # log_every=2 with a stop at 3: the row at step 4 averages steps 3 and 4, across the interruption
    config = _config(steps=6, checkpoint_every=3, log_every=2, lr_lr=1e-3, optimizer=optimizer)
    whole = M.mkdt_distill(source, teacher, config, out_dir=tmp_path / "a", device="cpu", progress=False)
    stopped = M.mkdt_distill(source, teacher, config, out_dir=tmp_path / "b", device="cpu", progress=False,
                             stop_at_step=3)
    assert stopped.step == 3 and not (tmp_path / "b" / M.DISTILLED_NAME).exists()
    resumed = M.mkdt_distill(source, teacher, config, out_dir=tmp_path / "b", resume=True, device="cpu",
                             progress=False)
    assert resumed.step == 6
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.targets, whole.targets)
    assert resumed.config["syn_lr"] == whole.config["syn_lr"] != config.init_lr
    assert resumed.config["init_indices"] == whole.config["init_indices"]
    saved = DistilledSet.load(tmp_path / "b" / M.DISTILLED_NAME)
    assert torch.equal(saved.images, whole.images) and torch.equal(saved.targets, whole.targets)
    assert (tmp_path / "b" / "preview.png").read_bytes().startswith(b"\x89PNG")
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    assert [int(row["step"]) for row in _rows(tmp_path / "a")] == [2, 4, 6]


def test_resume_loads_the_saved_experts_instead_of_retraining_them(tmp_path, monkeypatch, capsys):
    source, teacher = _source(), _teacher()
    config = _config(steps=4, checkpoint_every=2, init="random")
    train = M.train_expert_trajectories
    calls = []

    def train_once(*args, **kwargs):
        if calls:
            raise AssertionError("the experts were trained again")
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(M, "train_expert_trajectories", train_once)
    M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, stop_at_step=2)
    saved = M.load_trajectories(tmp_path / M.TRAJECTORIES_NAME)
    expected = train(source.images, MEAN, STD, teacher, config, device="cpu", progress=False)
    assert all(torch.equal(a, b) for ta, tb in zip(saved, expected) for a, b in zip(ta, tb))
    resumed = M.mkdt_distill(source, teacher, config, out_dir=tmp_path, resume=True, device="cpu", progress=False)

    # killed before the first checkpoint: a new matching run, with the saved experts, to the same set
    (tmp_path / M.CHECKPOINT_NAME).unlink()
    capsys.readouterr()
    again = M.mkdt_distill(source, teacher, config, out_dir=tmp_path, resume=True, device="cpu", progress=False)
    assert capsys.readouterr().err.strip().endswith("holds expert trajectories and no matching checkpoint; matching starts from them")
    assert torch.equal(again.images, resumed.images) and torch.equal(again.targets, resumed.targets)
    assert len(calls) == 1


def test_stop_at_step_leaves_a_loadable_checkpoint(tmp_path, capsys):
    from krrst.infra import io

    source, teacher = _source(), _teacher()
    config = _config(steps=5, checkpoint_every=0, log_every=2)
    M.mkdt_distill(source, teacher, config, out_dir=tmp_path, resume=True, device="cpu", progress=False,
                   stop_at_step=3)
    assert "resuming" not in capsys.readouterr().err  # resume=True on an empty folder starts afresh, silently
    state = io.load_state(tmp_path / M.CHECKPOINT_NAME)
    assert state["step"] == 3 and state["config"] == M.config_to_dict(config)
    assert state["source"] == ["toy", 32] and state["images"].shape == (8, 3, 8, 8)
    assert state["targets"].shape == (8, 4) and state["syn_lr"].shape == () and state["init_indices"].shape == (8,)
    assert state["generator"].dtype == torch.uint8 and set(state["optimizer"]["state"]) == {0, 1, 2}
    assert state["loss_sum"] > 0 and state["loss_count"] == 1  # step 3's loss, for the row at step 4
    assert not (tmp_path / M.DISTILLED_NAME).exists()
    assert [int(row["step"]) for row in _rows(tmp_path)] == [2]


def test_resume_refuses_another_runs_checkpoint_or_experts_in_one_line(tmp_path):
    source, teacher = _source(), _teacher()
    config = _config(steps=4, checkpoint_every=2)
    M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, stop_at_step=2)

    def resume(config=config, source=source, teacher=teacher, **kwargs):
        return M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, **kwargs)

    def refused(match, **kwargs):
        with pytest.raises(KrrstError, match=match) as error:
            resume(**kwargs)
        assert "\n" not in str(error.value)

    checkpoint, experts = str(tmp_path / M.CHECKPOINT_NAME), str(tmp_path / M.TRAJECTORIES_NAME)
    refused(f"^{checkpoint} already exists; resume that run")
    refused(f"^--resume: {checkpoint} was written with another config \\(syn_steps: 4 -> 3\\); use the same settings "
            "or a new --out$", config=_config(steps=4, checkpoint_every=2, syn_steps=3), resume=True)
    refused(r"another config \(steps: 4 -> 6\)", config=_config(steps=6, checkpoint_every=2), resume=True)
    refused(r"another source \(\['toy', 32\] -> \['toy', 31\]\); use the same source or a new --out$",
            source=_source(31), resume=True)
    refused(r"another teacher \(Sequential:\S+ -> Sequential:\S+\); use the same teacher", teacher=_teacher(d=5),
            resume=True)
    (tmp_path / M.CHECKPOINT_NAME).unlink()  # the saved experts are checked alike
    refused(f"^--resume: {experts} was written with another config \\(seed: 0 -> 1\\); use the same settings or a "
            "new --out$", config=_config(steps=4, checkpoint_every=2, seed=1), resume=True)
    refused(f"^--resume: {experts} was written with another source \\(\\['toy', 32\\] -> \\['toy', 31\\]\\)",
            source=_source(31), resume=True)
    refused(f"^{experts} already exists; resume that run")  # saved experts alone are not overwritten either
    # logging and checkpoint cadence may change
    assert resume(config=_config(steps=4, checkpoint_every=1, log_every=3), resume=True).step == 4


def test_resume_refuses_a_checkpoint_matched_against_other_experts(tmp_path):
    """A run started with caller-given experts (not saved) cannot silently continue against retrained ones."""
    source, teacher = _source(), _teacher()
    config = _config(steps=4, checkpoint_every=2)
    given = M.train_expert_trajectories(source.images, source.mean, source.std, teacher,
                                        _config(steps=4, checkpoint_every=2, seed=7), device="cpu", progress=False)
    M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, stop_at_step=2,
                   trajectories=given)
    assert not (tmp_path / M.TRAJECTORIES_NAME).exists()
    with pytest.raises(KrrstError, match="was matched against other expert trajectories"):
        M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, resume=True)
    resumed = M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, resume=True,
                             trajectories=given)
    assert resumed.step == 4


def test_a_rank_that_does_not_write_resumes_from_the_same_files(tmp_path):
    """torchrun: every rank resumes from rank 0's files; only rank 0 writes."""
    source, teacher = _source(), _teacher()
    config = _config(steps=6, checkpoint_every=3)
    whole = M.mkdt_distill(source, teacher, config, device="cpu", progress=False)
    M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False, stop_at_step=3)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    other_rank = M.mkdt_distill(source, teacher, config, out_dir=tmp_path, device="cpu", progress=False,
                                resume=True, distributed=DistributedContext(rank=1, world_size=2))
    assert torch.equal(other_rank.images, whole.images) and torch.equal(other_rank.targets, whole.targets)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before, "wrote nothing"


def test_only_rank_0_shows_progress(tmp_path, monkeypatch, capsys):
    """The teacher-feature and expert bars, like the loop's, are drawn by rank 0 alone (one line, not one per rank)."""
    monkeypatch.setenv("KRRST_PROGRESS_INTERVAL", "0")  # a plain line per update in a captured stream
    source, teacher, config = _source(), _teacher(), _config(steps=2)
    for rank in (1, 0):
        M.mkdt_distill(source, teacher, config, out_dir=tmp_path / f"rank{rank}", device="cpu", progress=True,
                       distributed=DistributedContext(rank=rank, world_size=2))
        shown = capsys.readouterr().err
        for bar in ("teacher features", "mkdt experts"):
            assert (bar in shown) == (rank == 0), (rank, bar, shown)
