"""Multi-GPU and multi-node runs on PyTorch's own engine: `torch.distributed`, started by `torchrun`.

`torchrun --nproc-per-node G [--nnodes N ...]` starts one process per GPU and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR; `init_distributed` joins that group (NCCL on GPUs, gloo on CPUs). Without
them everything here is a no-op on a single-process `DistributedContext`: callers need no special case.

Conventions: all ranks hold the same generators (seeds), draw the same global batch and keep their
`shard`; replicated tensors (teacher, X_s, Y_s) stay identical as their gradients are averaged
(DDP, `all_reduce_mean_`) before identical optimiser steps; collectives backpropagate the exact
adjoint of "sum over ranks of each rank's loss", which that averaging makes the mean; rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from krrst.infra.config import resolve_device
from krrst.infra.errors import KrrstError
from krrst.infra.io import exclusive_lock

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among `world_size`, its GPU index on the node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:  # rank 0: the one that writes files and prints
        return self.rank == 0

    def say(self, text: str) -> None:
        """Print `text` from rank 0 only: one line for the user, not one per rank."""
        self.on_main(lambda: print(text))

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Call `fn` on rank 0 only (write a file, print a line); the other ranks skip it and get None.

        Unlike `run_on_main` nothing is sent and no rank waits: for writes whose result the others do not need.
        """
        return fn() if self.is_main else None

    def quiet_elsewhere(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0, a no-op on the other ranks (one line per event, not one per rank)."""
        return log if self.is_main else (lambda _text: None)

    def only_on_main(self, flag: bool) -> bool:
        """`flag` on rank 0, False elsewhere: progress bars and other terminal output, once per group."""
        return flag and self.is_main

    def lock(self, path: str | os.PathLike, what: str = "run directory") -> AbstractContextManager:
        """`io.exclusive_lock` on `path`, held by rank 0 for the whole process group (the ranks share the folder)."""
        return exclusive_lock(path, what) if self.is_main else nullcontext()

    def my_jobs(self, jobs: Sequence[T]) -> list[T]:
        """This rank's share of `jobs`, dealt round-robin (jobs[rank], jobs[rank + W], ...): all of them alone."""
        return list(jobs)[self.rank :: self.world_size]

    def gather_on_main(self, items: list[T]) -> list[T]:
        """The other ranks' `items`, concatenated in rank order, on rank 0; [] on the other ranks and alone."""
        if self.world_size == 1 or not is_distributed():
            return []
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(items, gathered, dst=0)
        return [item for rank_items in gathered[1:] for item in rank_items] if self.is_main else []

    def shard(self, global_batch: int, what: str = "batch size") -> slice:
        """This process's contiguous, equal share of a global batch: rows [rank * b, (rank + 1) * b), b = B / W."""
        if global_batch % self.world_size:
            raise KrrstError(f"{what}={global_batch} cannot be split evenly over {self.world_size} processes; "
                             f"choose a multiple of the world size {self.world_size}")
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 10.0) -> DistributedContext:
    """Join the process group torchrun describes (its variables set, WORLD_SIZE > 1), else a single process.

    On a CUDA `device` (None/"auto": CUDA when present): cuda:LOCAL_RANK and NCCL, otherwise CPU and gloo.
    A collective waiting longer than `timeout_minutes` fails (raise it where ranks wait on uneven jobs).
    """
    device = resolve_device(device)
    if not all(name in os.environ for name in TORCHRUN_VARIABLES) or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistributedContext(device=device)
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KrrstError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                             f"start torchrun with --nproc-per-node at most {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        on_cuda, timeout = device.type == "cuda", datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": device} if on_cuda else {}))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_context(device: torch.device) -> DistributedContext:
    """This process's place in the process group already joined (a single process when there is none)."""
    if not is_distributed():
        return DistributedContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              device=device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP kept alive by an exception's traceback must go before its group (or exit aborts)
        dist.destroy_process_group()


def run_on_main(fn: Callable[[], T]) -> T:
    """Call `fn` on rank 0 only (e.g. read a checkpoint); every rank gets its result (`broadcast_object_list`).

    An exception there is raised on every rank (a `KrrstError` as itself), so no rank waits forever.
    """
    if not is_distributed():
        return fn()
    payload, failure = [None], None  # rank 0 fills them
    if dist.get_rank() == 0:
        try:
            payload = [(True, fn())]
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
            failure, payload = exc, [(False, (type(exc) is KrrstError, str(exc)))]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    ok, value = payload[0]
    if not ok:
        raise KrrstError(value[1]) if value[0] else RuntimeError(f"rank 0 failed: {value[1]}")
    return value


class _AllGather(torch.autograd.Function):
    """Concatenate equal-shaped tensors of all ranks; backward: the rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rows, tensor = tensor.shape[0], tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # Every rank's loss may use every slice: sum slice r's gradients over ranks (all-reduce, any backend).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors (one shape on every rank) concatenated along dim 0 in rank order; identity alone.

    Backward gives rank r the sum over ranks of the gradients of its slice: for
    a loss L every rank computes alike from the gathered rows (Barlow Twins),
    rank r gets world_size x dL/dz_r, which DDP's averaging makes exact.
    """
    return _AllGather.apply(tensor) if is_distributed() else tensor


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place: one all-reduce per (dtype, device) on a flat buffer."""
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in group])
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            for tensor, part in zip(group, flat.split([tensor.numel() for tensor in group])):
                tensor.copy_(part.view_as(tensor))


class _GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for gloo (torch's, and DDP with it, take GPUs only): global statistics by all-gathers."""

    _check_input_dim = nn.SyncBatchNorm._check_input_dim  # any N x C x ... input

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims, shape = [0, *range(2, input.dim())], [1, -1] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // input.shape[1])
        # Sum over ranks = sum of the gathered rows; its backward is the sum of the ranks' gradients.
        sums = all_gather_with_grad(torch.cat([input.sum(dims), count])[None]).sum(0)
        mean, count = sums[:-1] / sums[-1], sums[-1].detach()
        centred = input - mean.reshape(shape)
        var = all_gather_with_grad(centred.pow(2).sum(dims)[None]).sum(0) / count  # biased, as BatchNorm
        output = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            output = output * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1).clamp_min(1), factor)  # unbiased, as BatchNorm
        return output


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm of `module` use global-batch statistics, in place (no-op in a single process).

    NCCL: torch's `nn.SyncBatchNorm`, gloo: `_GlooSyncBatchNorm`; parameters, buffers and keys are kept.
    """
    if not is_distributed():
        return module
    if dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlooSyncBatchNorm):
        synced = _GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, name, getattr(module, name))
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
