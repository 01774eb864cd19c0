"""torch.distributed helpers and the distributed teacher: 2 gloo processes on the CPU against 1-process references.

Each distributed test spawns two processes (torch.multiprocessing, gloo,
127.0.0.1 on a free port); the work each runs is a module-level function
that gets its `DistributedContext`. Assertions inside the children fail the
test through `mp.spawn`'s exception.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from krrst.data import ImageSet
from krrst.infra.distributed import (
    DistributedContext,
    all_gather_with_grad,
    all_reduce_mean_,
    convert_sync_batchnorm,
    init_distributed,
    is_distributed,
    run_on_main,
)
from krrst.infra.errors import KrrstError
from krrst.losses import barlow_twins_loss, simclr_loss
from krrst.teacher import TeacherConfig, read_loss_log, train_teacher

WORLD_SIZE = 2

# The tiny teacher of tests/test_teacher.py, narrower and on 16x16 noise: a CPU second per run.
TINY = TeacherConfig(
    arch="convnet3",
    convnet_widths=(8, 16, 32),
    batch_size=32,
    steps=4,
    lr=0.2,
    warmup_epochs=0.0,
    projector_dims=(64, 64),
    checkpoint_every=2,
    log_every=1,
    seed=5,
)


def _noise_images() -> ImageSet:
    images = torch.randint(0, 256, (96, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageSet(images=images, labels=None, class_names=[], mean=(0.5,) * 3, std=(0.25,) * 3, name="noise")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, port: int, work, args) -> None:
    """A torchrun-like process: the environment torchrun sets, one thread, the process group."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from krrst.infra.distributed import cleanup

    context = init_distributed("cpu")
    try:
        work(context, *args)
    finally:
        cleanup()


def _spawn(work, *args) -> None:
    mp.spawn(_child, args=(_free_port(), work, args), nprocs=WORLD_SIZE, join=True)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- collectives (2 processes)


def _check_collectives(context: DistributedContext) -> None:
    rank = context.rank
    assert (context.world_size, context.local_rank, context.device.type) == (2, rank, "cpu")
    assert context.is_main == (rank == 0) and is_distributed()

    # Barlow Twins over the global batch: each rank holds half of the rows.
    generator = torch.Generator().manual_seed(1)
    full_a = torch.randn(8, 5, dtype=torch.float64, generator=generator)
    full_b = full_a + 0.5 * torch.randn(8, 5, dtype=torch.float64, generator=generator)
    ref_a, ref_b = full_a.clone().requires_grad_(True), full_b.clone().requires_grad_(True)
    reference = barlow_twins_loss(ref_a, ref_b, lambda_offdiag=0.3, scale=0.1)
    reference.backward()
    rows = context.shard(8)
    z_a, z_b = full_a[rows].clone().requires_grad_(True), full_b[rows].clone().requires_grad_(True)
    # the teacher's composition: gather the rows (with their gradient), then the pure loss
    loss = barlow_twins_loss(all_gather_with_grad(z_a), all_gather_with_grad(z_b), lambda_offdiag=0.3, scale=0.1)
    assert abs(loss.item() - reference.item()) < 1e-12 * reference.item()
    # The objective is the mean of the ranks' (identical) losses: rank r gets exactly its slice.
    (loss / WORLD_SIZE).backward()
    assert torch.allclose(z_a.grad, ref_a.grad[rows], rtol=1e-10, atol=1e-14)
    assert torch.allclose(z_b.grad, ref_b.grad[rows], rtol=1e-10, atol=1e-14)
    # The same holds for SimCLR's NT-Xent on the gathered rows (global negatives), as train_teacher uses it.
    ref_a.grad = None
    reference = simclr_loss(ref_a, ref_b, temperature=0.5)
    reference.backward()
    z_a.grad = None
    loss = simclr_loss(all_gather_with_grad(z_a), all_gather_with_grad(z_b), temperature=0.5)
    assert abs(loss.item() - reference.item()) < 1e-12 * reference.item()
    (loss / WORLD_SIZE).backward()
    assert torch.allclose(z_a.grad, ref_a.grad[rows], rtol=1e-10, atol=1e-14)

    # all_gather_with_grad: rank order in the forward; backward sums every rank's gradient of the slice.
    x = torch.arange(6.0, dtype=torch.float64).reshape(3, 2).add(10 * rank).requires_grad_(True)
    gathered = all_gather_with_grad(x)
    assert torch.equal(gathered, torch.arange(6.0, dtype=torch.float64).reshape(3, 2).repeat(2, 1)
                       + torch.tensor([0.0] * 3 + [10.0] * 3, dtype=torch.float64)[:, None])
    weights = [torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    (gathered.pow(2) * weights[rank]).sum().backward()  # rank r's loss uses every row
    expected = 2 * gathered.detach()[3 * rank : 3 * rank + 3] * (weights[0] + weights[1])[3 * rank : 3 * rank + 3]
    assert torch.allclose(x.grad, expected, rtol=1e-12)

    # all_reduce_mean_ averages in place (one buffer per dtype), gradients as the distillation reduces them.
    p32, p64 = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    p32.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    p64.grad = torch.full((2, 2), 4.0 * rank, dtype=torch.float64)
    loss_value = torch.tensor(float(rank))
    all_reduce_mean_([p32.grad, p64.grad, loss_value])
    assert torch.equal(p32.grad, torch.tensor([1.5, 3.0, 4.5])) and torch.equal(p64.grad, torch.full((2, 2), 2.0))
    assert loss_value.item() == 0.5

    assert context.my_jobs(list("abcde")) == (["a", "c", "e"] if rank == 0 else ["b", "d"])
    # gather_on_main: the other ranks' rows on rank 0 (its own it appended already), nothing elsewhere.
    others = context.gather_on_main([f"row of rank {rank}"] * (rank + 1))
    assert others == (["row of rank 1", "row of rank 1"] if rank == 0 else [])

    # run_on_main: rank 0 runs it, every rank gets its result or its KrrstError.
    assert run_on_main(lambda: {"read by": context.rank}) == {"read by": 0}

    def refuse():
        raise KrrstError("checkpoint.safetensors already exists")

    with pytest.raises(KrrstError, match="already exists"):
        run_on_main(refuse)


def test_collectives_over_two_processes_match_single_process_references():
    _spawn(_check_collectives)


def _check_sync_batchnorm(context: DistributedContext) -> None:
    for shape in ((8, 4, 3, 3), (8, 4)):  # a conv feature map (BatchNorm2d) and a projector layer (BatchNorm1d)
        generator = torch.Generator().manual_seed(len(shape))
        full = 2 + 3 * torch.randn(*shape, dtype=torch.float64, generator=generator)
        weights = torch.randn(*shape, dtype=torch.float64, generator=generator)
        norm_class = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
        torch.manual_seed(0)
        reference = norm_class(4, momentum=0.3).double()
        nn.init.uniform_(reference.weight)
        nn.init.uniform_(reference.bias)
        synced = convert_sync_batchnorm(nn.Sequential(norm_class(4, momentum=0.3).double()))
        synced.load_state_dict({f"0.{key}": value for key, value in reference.state_dict().items()})
        assert type(synced[0]).__name__ == "_GlooSyncBatchNorm"

        x_ref = full.clone().requires_grad_(True)
        (reference(x_ref) * weights).sum().backward()
        rows = context.shard(8)
        x = full[rows].clone().requires_grad_(True)
        out = synced(x)
        (out * weights[rows]).sum().backward()  # rank r's part of the global sum
        with torch.no_grad():
            whole_batch = nn.functional.batch_norm(full, None, None, reference.weight, reference.bias, training=True)
        assert torch.allclose(out, whole_batch[rows], rtol=1e-12, atol=1e-12)
        assert torch.allclose(x.grad, x_ref.grad[rows], rtol=1e-10, atol=1e-12)
        assert torch.allclose(synced[0].running_mean, reference.running_mean, rtol=1e-12)
        assert torch.allclose(synced[0].running_var, reference.running_var, rtol=1e-12)
        # Parameter gradients are per-rank partial sums: their average x world size is the whole gradient.
        all_reduce_mean_([synced[0].weight.grad, synced[0].bias.grad])
        assert torch.allclose(WORLD_SIZE * synced[0].weight.grad, reference.weight.grad, rtol=1e-10)
        assert torch.allclose(WORLD_SIZE * synced[0].bias.grad, reference.bias.grad, rtol=1e-10)
        synced.eval()  # eval mode: the running statistics, as BatchNorm
        reference.eval()
        assert torch.allclose(synced(full[rows]), reference(full[rows]), rtol=1e-12)


def test_sync_batchnorm_over_two_halves_equals_batchnorm_over_the_whole_batch():
    _spawn(_check_sync_batchnorm)


# --------------------------------------------------------------------------- splitting work (one process)


def test_only_rank_0_says_a_line(capsys):
    for rank in range(3):
        DistributedContext(rank=rank, world_size=3).say(f"line from rank {rank}")
    assert capsys.readouterr().out == "line from rank 0\n"


def test_rank_0_alone_writes_logs_shows_progress_and_locks(tmp_path, capsys):
    written = []
    for rank in range(3):
        context = DistributedContext(rank=rank, world_size=3)
        assert context.on_main(lambda: written.append(rank) or "done") == ("done" if rank == 0 else None)
        context.quiet_elsewhere(print)(f"log line of rank {rank}")
        assert context.only_on_main(True) is (rank == 0) and context.only_on_main(False) is False
        assert context.my_jobs(list(range(7))) == list(range(rank, 7, 3))
    assert written == [0] and capsys.readouterr().out == "log line of rank 0\n"
    single = DistributedContext()
    assert single.my_jobs("abc") == ["a", "b", "c"] and single.gather_on_main(["mine"]) == []
    with single.lock(tmp_path):
        with pytest.raises(KrrstError, match="run directory"):  # a second process on the same folder
            with single.lock(tmp_path):
                pass
        with DistributedContext(rank=1, world_size=2).lock(tmp_path):  # rank 0 of its group holds the lock
            pass


def test_shard_splits_contiguously_and_names_the_sizes_when_it_cannot():
    assert [DistributedContext(rank=rank, world_size=3).shard(12) for rank in range(3)] == [
        slice(0, 4), slice(4, 8), slice(8, 12)]
    assert DistributedContext().shard(7) == slice(0, 7)
    with pytest.raises(KrrstError) as excinfo:
        DistributedContext(rank=1, world_size=4).shard(10, what="distill.batch_size")
    message = _one_line(excinfo)
    assert "distill.batch_size=10" in message and "4 processes" in message


def test_my_jobs_is_a_round_robin_partition():
    jobs = [(seed, target) for seed in range(3) for target in ("cifar10", "cub")]
    shares = [DistributedContext(rank=rank, world_size=4).my_jobs(jobs) for rank in range(4)]
    assert shares[1] == [jobs[1], jobs[5]]
    assert sorted(job for share in shares for job in share) == sorted(jobs)
    assert DistributedContext().my_jobs(jobs) == jobs


def test_single_process_context_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert context == DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert context.is_main and not is_distributed()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert init_distributed("cpu").world_size == 1 and not is_distributed()  # torchrun with one process
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert context.gather_on_main([{"a": 1}]) == [] and run_on_main(lambda: 5) == 5
    norm = nn.BatchNorm1d(3)
    assert convert_sync_batchnorm(norm) is norm
    values = torch.tensor([1.0, 2.0])
    all_reduce_mean_([values])
    assert torch.equal(values, torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------- the teacher (2 processes)


def _train_teacher_on_two_ranks(context: DistributedContext, out_root: Path) -> None:
    images = _noise_images()
    teacher = train_teacher(images, TINY, out_dir=out_root / "two", distributed=context, progress=False)
    assert not any(type(m).__name__.endswith("SyncBatchNorm") for m in teacher.modules())
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out_root / f"rank{context.rank}.st"))
    # Interrupted after step 2, to be resumed by one process.
    train_teacher(images, TINY, out_dir=out_root / "two_partial", distributed=context, stop_at_step=2, progress=False)
    # Rank 0 reads the checkpoint; its refusal reaches every rank.
    with pytest.raises(KrrstError, match="already exists; resume that run"):
        train_teacher(images, TINY, out_dir=out_root / "two", distributed=context, progress=False)
    odd = TeacherConfig(**{**TINY.__dict__, "batch_size": 33})
    with pytest.raises(KrrstError, match="teacher.batch_size=33"):
        train_teacher(images, odd, distributed=context, progress=False)


def test_two_rank_teacher_equals_one_process_on_the_global_batch_and_resumes_with_one(tmp_path):
    images = _noise_images()
    single = train_teacher(images, TINY, out_dir=tmp_path / "one", device="cpu", progress=False)
    _spawn(_train_teacher_on_two_ranks, tmp_path)

    rank0, rank1 = load_file(str(tmp_path / "rank0.st")), load_file(str(tmp_path / "rank1.st"))
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        assert torch.allclose(rank0[key].to(value.dtype), value, rtol=1e-4, atol=1e-5), f"{key} differs from 1 process"
    # ... and training moved the weights far more than that tolerance.
    initial = train_teacher(images, TINY, device="cpu", stop_at_step=0, progress=False).state_dict()
    assert max(float((initial[key] - value).abs().max()) for key, value in single.state_dict().items()) > 1e-2

    # Rank 0 wrote the files; the logged global loss is the single process's.
    for name in ("teacher.safetensors", "checkpoint.safetensors", "health.json", "loss.csv"):
        assert (tmp_path / "two" / name).is_file()
    one_log, two_log = read_loss_log(tmp_path / "one" / "loss.csv"), read_loss_log(tmp_path / "two" / "loss.csv")
    assert [row["step"] for row in two_log] == [1, 2, 3, 4]
    for one_row, two_row in zip(one_log, two_log):
        assert two_row["loss"] == pytest.approx(one_row["loss"], rel=1e-4)

    # A checkpoint written by 2 ranks resumes in 1 process to the same teacher.
    resumed = train_teacher(images, TINY, out_dir=tmp_path / "two_partial", resume=True, device="cpu", progress=False)
    for key, value in single.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5), f"{key} differs after resume"
