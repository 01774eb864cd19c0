"""The run scaffold on a toy loop: resume equals an uninterrupted run, refusals, the log file, rank-0 writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from krrst.infra.distributed import DistributedContext
from krrst.infra.errors import KrrstError
from krrst.infra.progress import stopped_loops
from krrst.infra.run_state import RunningMean, RunState, every, read_log, stage_seeds


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    steps: int = 12
    lr: float = 0.1
    log_every: int = 3
    checkpoint_every: int = 4


def toy_run(out_dir, config=ToyConfig(), *, resume=False, stop_at_step=None, identity=None, fail_at=None):
    """SGD on a noisy least-squares problem whose batches come from a checkpointed generator."""
    weights = torch.zeros(3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    mean = RunningMean("cpu")
    with RunState("toy", out_dir, config=config, total_steps=config.steps, log_fields=("step", "loss", "elapsed_s"),
                  resume=resume, resumable=("log_every",), identity=identity or {"source": "toy:100"},
                  checkpoint_every=config.checkpoint_every, log_every=config.log_every, stop_at_step=stop_at_step,
                  progress=False) as run:
        if run.saved is not None:
            weights = run.saved["weights"].clone()
            generator.set_state(run.saved["generator"])
            mean.load_state_dict(run.saved)
        for step in run.steps():
            inputs = torch.randn(8, 3, generator=generator, dtype=torch.float64)
            targets = inputs @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
            residual = inputs @ weights - targets
            weights = weights - config.lr * 2 * inputs.T @ residual / len(inputs)
            mean.add(residual.pow(2).mean())
            if step == fail_at:
                raise RuntimeError("killed")
            if run.is_log_step(step):
                run.log(step, loss=mean.take())
                run.flush()
            if run.is_checkpoint_step(step):
                run.save(step, {"weights": weights, "generator": generator.get_state(), **mean.state_dict()})
    return weights


def losses(path):
    return [(row["step"], row["loss"]) for row in read_log(path / "loss.csv")]


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = toy_run(tmp_path / "full")
    toy_run(tmp_path / "split", stop_at_step=5)  # a stop is not a row: the mean since step 3 is checkpointed
    assert losses(tmp_path / "split") == losses(tmp_path / "full")[:1]
    resumed = toy_run(tmp_path / "split", resume=True)
    assert torch.equal(resumed, full)
    assert [step for step, _ in losses(tmp_path / "full")] == [3, 6, 9, 12]
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert losses(tmp_path / "full")[-1][1] < losses(tmp_path / "full")[0][1]  # the toy loop learns


def test_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        toy_run(tmp_path, fail_at=11)  # rows at 3, 6, 9 logged; checkpoints at 4, 8
    assert "toy at 10/12 steps" in stopped_loops()
    assert [step for step, _ in losses(tmp_path)] == [3, 6, 9]
    resumed = toy_run(tmp_path, resume=True)
    assert [step for step, _ in losses(tmp_path)] == [3, 6, 9, 12]
    assert torch.equal(resumed, toy_run(tmp_path / "full"))
    assert losses(tmp_path) == losses(tmp_path / "full")


def test_a_torn_last_line_is_skipped(tmp_path):
    toy_run(tmp_path)
    with open(tmp_path / "loss.csv", "a") as handle:
        handle.write("1")  # a kill during an append leaves part of a row
    assert [step for step, _ in losses(tmp_path)] == [3, 6, 9, 12]


def test_refusals_name_the_file_and_the_difference(tmp_path):
    toy_run(tmp_path, stop_at_step=4)
    with pytest.raises(KrrstError, match=r"checkpoint.safetensors already exists; resume that run"):
        toy_run(tmp_path)
    with pytest.raises(KrrstError, match=r"another config \(lr: 0.1 -> 0.2\)"):
        toy_run(tmp_path, ToyConfig(lr=0.2), resume=True)
    with pytest.raises(KrrstError, match=r"another source \(toy:100 -> toy:99\)"):
        toy_run(tmp_path, resume=True, identity={"source": "toy:99"})
    with pytest.raises(KrrstError, match="--resume needs --out"):
        toy_run(None, resume=True)
    toy_run(tmp_path, ToyConfig(log_every=2), resume=True)  # a resumable field may change


def test_a_rank_other_than_0_writes_nothing(tmp_path):
    other_rank = DistributedContext(rank=1, world_size=2)
    with RunState("toy", tmp_path, config=ToyConfig(), total_steps=4, log_fields=("step", "loss"),
                  context=other_rank, progress=False) as run:
        for step in run.steps():
            run.log(step, loss=torch.tensor(1.0))
            if run.is_checkpoint_step(step):
                run.save(step, {"x": torch.zeros(1)})
        run.write(lambda folder: (folder / "out.txt").write_text("x"))
    assert list(tmp_path.iterdir()) == []


def test_without_a_folder_nothing_is_written_and_rows_still_flush():
    with RunState("toy", None, config=ToyConfig(), total_steps=3, log_fields=("step", "loss"),
                  progress=False) as run:
        for step in run.steps():
            run.log(step, loss=torch.tensor(float(step)))
        assert not run.is_checkpoint_step(3)
        assert [row["loss"] for row in run.flush()] == [1.0, 2.0, 3.0]


def test_running_mean_and_cadence_and_seeds():
    mean = RunningMean("cpu")
    assert mean.take() is None
    for value in (1.0, 2.0, 6.0):
        mean.add(torch.tensor(value))
    assert mean.take() == 3.0 and mean.take() is None
    assert [every(step, 3) for step in (0, 3, 4)] == [True, True, False] and not every(5, 0)
    assert stage_seeds(7, 3) == stage_seeds(7, 4)[:3]  # a seed added at the end leaves the others alone
    assert len(set(stage_seeds(7, 4))) == 4


def test_a_guarded_file_is_refused_without_resume_like_the_checkpoint(tmp_path):
    (tmp_path / "experts.safetensors").write_bytes(b"saved work")
    with pytest.raises(KrrstError, match=r"experts.safetensors already exists; resume that run"):
        RunState("toy", tmp_path, config=ToyConfig(), total_steps=2, log_fields=("step",), guarded=(
            "experts.safetensors",))
    with RunState("toy", tmp_path, config=ToyConfig(), total_steps=2, log_fields=("step",), resume=True,
                  guarded=("experts.safetensors",), progress=False) as run:
        assert run.saved is None and list(run.steps()) == [1, 2]  # resuming with no checkpoint yet: a fresh start
    assert (tmp_path / "experts.safetensors").read_bytes() == b"saved work"
