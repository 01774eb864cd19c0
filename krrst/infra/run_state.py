"""The run scaffold: what every training loop needs, written once.

A loop (the teacher, the distillation, MKDT) opens a `RunState` and keeps
only its algorithm. The scaffold owns:

- resume: the checkpoint is read (on rank 0, then shared with the other ranks,
  so no shared file system is needed), and refused in one line when it was
  written with other settings or another source / teacher (`identity`); an
  existing checkpoint without `resume` is refused too, never overwritten;
- atomic checkpoints (`save`), every `checkpoint_every` steps and at the last;
- the loss log: rows are queued with device tensors (no host sync per step),
  synced once at each log point and appended to `loss.csv`; on resume the rows
  after the checkpoint's step are dropped, so the file always matches the state;
- the progress bar (a plain line in a log file), with the latest row as postfix;
- the step range (`steps()`), with `stop_at_step` for time-sliced runs;
- rank-0-only writes and messages: a loop never tests its rank.

    with RunState("distill", out_dir, config=config, total_steps=config.steps, resume=resume,
                   log_fields=("step", "loss"), log_every=config.log_every) as run:
        if run.saved: restore(run.saved)
        for step in run.steps():
            loss = ...
            run.log(step, loss=loss)
            if run.is_checkpoint_step(step): run.save(step, state())
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from krrst.infra import io
from krrst.infra.config import config_changes, config_to_dict, same_saved_value
from krrst.infra.distributed import DistributedContext, run_on_main
from krrst.infra.errors import KrrstError
from krrst.infra.progress import progress_bar

CHECKPOINT_NAME = "checkpoint.safetensors"
LOSS_CSV_NAME = "loss.csv"


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from `generator`."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def stage_seeds(seed: int, count: int) -> tuple[int, ...]:
    """`count` independent seeds drawn in sequence from `seed`: one added at the end leaves the others unchanged."""
    root = torch.Generator().manual_seed(seed)
    return tuple(draw_seed(root) for _ in range(count))


def every(step: int, period: int) -> bool:
    """Whether `step` is a multiple of `period` (never, for a period of 0)."""
    return period > 0 and step % period == 0


class RunningMean:
    """The mean of the values added since the last `take`, summed on the device (`take` syncs once)."""

    def __init__(self, device: torch.device | str):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        self.total += value.detach()
        self.count += 1

    def take(self, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> float | None:
        """The mean (None when nothing was added), then reset; `reduce` (e.g. a cross-rank mean) sees the sum first."""
        if reduce is not None:
            reduce([self.total])
        mean = (self.total / self.count).item() if self.count else None
        self.total.zero_()
        self.count = 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.total.item(), "loss_count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total.fill_(float(state.get("loss_sum", 0.0)))
        self.count = int(state.get("loss_count", 0))


class RunState:
    """Resume, checkpoints, the loss log, progress and rank-0 writes of one training loop.

    Args:
        stage: the loop's name in messages and on the progress bar ("distill").
        out_dir: the run folder; None keeps everything in memory (no resume).
        config: the stage's config dataclass, saved with every checkpoint.
        total_steps: the run's length; `stop_at_step` ends this call earlier,
            after checkpointing, as a kill would.
        log_fields: the columns of `loss.csv`; `elapsed_s` (wall seconds of this
            process's loop) is filled in by the scaffold when it is one.
        resume: continue from the checkpoint in `out_dir` (none there: start).
        resumable: config fields that may differ on resume (logging, cadence,
            memory layout: what changes neither the result nor a random stream).
        identity: what else a checkpoint must match (source, teacher, ...):
            `{"teacher": "convnet3:1.2e+03"}`; a key an older checkpoint lacks
            is not checked.
        kind: a tag saved with the checkpoint and checked on resume.
        checkpoint_every, log_every: cadence in steps (0: only at the end).
        progress: show progress (a bar on a terminal, plain lines in a log).
        unit, unit_scale: the bar counts `unit_scale` units per step (images).
        context: the torchrun process group's context; only its rank 0 writes
            and prints.
        guarded: other files of the run folder that, like the checkpoint, are
            refused without `resume` (a stage's saved intermediate results).

    `elapsed_s` counts from the first step this call runs: set-up before the
    loop (a teacher cache, MKDT's experts) is not in it.
    """

    def __init__(self, stage: str, out_dir: str | os.PathLike | None, *, config: Any, total_steps: int,
                 log_fields: Sequence[str], resume: bool = False, resumable: Sequence[str] = (),
                 identity: Mapping[str, Any] | None = None, kind: str | None = None, checkpoint_every: int = 0,
                 log_every: int = 1, stop_at_step: int | None = None, progress: bool = True, unit: str = "step",
                 unit_scale: int = 1, context: DistributedContext | None = None, guarded: Sequence[str] = ()):
        self.stage, self.config, self.total_steps = stage, config, total_steps
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_fields = tuple(log_fields)
        self.identity, self.kind = dict(identity or {}), kind
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.unit, self.unit_scale = unit, unit_scale
        self.is_writer = context is None or context.is_main
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
        self.log_path = self.out_dir / LOSS_CSV_NAME if self.out_dir is not None else None
        self.guarded = tuple(guarded)
        if resume and self.out_dir is None:
            raise KrrstError("--resume needs --out (the run folder holding checkpoint.safetensors)")
        # Rank 0 reads and checks the checkpoint, the other ranks receive it: no shared file system needed.
        self.saved: dict[str, Any] | None = run_on_main(lambda: self._read_checkpoint(resume, tuple(resumable)))
        self.start_step = int(self.saved["step"]) if self.saved is not None else 0
        self.last_step = (total_steps if stop_at_step is None
                          else max(self.start_step, min(int(stop_at_step), total_steps)))
        self._pending: list[dict[str, Any]] = []
        self._started = time.perf_counter()
        if self.saved is not None and self.start_step < total_steps:
            self.message(f"{stage}: resuming {self.out_dir} at step {self.start_step:,}/{total_steps:,}")
        elif self.saved is not None:
            self.message(f"{stage}: {self.out_dir} was finished ({total_steps:,} steps)")
        if self.is_writer and self.log_path is not None:
            # loss.csv keeps its header and the rows the checkpoint covers, no later ones
            kept = [row for row in self.rows() if row["step"] <= self.start_step] if self.start_step > 0 else []
            io.write_csv(self.log_path, kept, self.log_fields)
        # whether this process shows progress, for the stage's own inner bars too (warm-up, caches)
        self.show_progress = progress and self.is_writer
        self.bar: Any = None  # opened by `steps()`, after the stage's set-up has shown its own bars

    # ------------------------------------------------------------------ resume

    def _read_checkpoint(self, resume: bool, resumable: tuple[str, ...]) -> dict[str, Any] | None:
        path = self.checkpoint_path
        if path is None or (not resume and not self.is_writer):
            return None
        if not resume:
            for existing in (path, *(self.out_dir / name for name in self.guarded)):
                if existing.is_file():
                    raise KrrstError(f"{existing} already exists; resume that run (re-run the krrst command, or "
                                     "resume=True) or choose another --out")
        if not path.is_file():
            return None
        saved = io.load_state(path, f"{self.stage} checkpoint")
        if self.kind is not None and saved.get("kind", self.kind) != self.kind:
            raise KrrstError(f"{path} is not a krrst {self.stage} checkpoint (kind {saved.get('kind')!r})")
        changed = config_changes(saved.get("config", {}), self.config, resumable)
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
            raise KrrstError(f"--resume: {path} was written with another config ({details}); use the same settings "
                             "or a new --out")
        for key, value in self.identity.items():
            old = saved.get(key, value)
            if not same_saved_value(old, value):
                raise KrrstError(f"--resume: {path} was written with another {key} ({old} -> {value}); use the same "
                                 f"{key} or a new --out")
        return saved

    # ------------------------------------------------------------------ the loop

    def steps(self) -> Iterator[int]:
        """The steps this call runs, `start_step + 1 .. last_step`, advancing the progress bar after each."""
        self.bar = self.bar or progress_bar(self.total_steps * self.unit_scale, self.stage, unit=self.unit,
                                            initial=self.start_step * self.unit_scale, enabled=self.show_progress)
        self._started = time.perf_counter()
        for step in range(self.start_step + 1, self.last_step + 1):
            yield step
            self.bar.update(self.unit_scale)

    def is_log_step(self, step: int) -> bool:
        """Every `log_every` steps and at the run's end: the same rows whether or not the run was interrupted."""
        return step == self.total_steps or every(step, self.log_every)

    def is_checkpoint_step(self, step: int) -> bool:
        return self.out_dir is not None and (step == self.last_step or every(step, self.checkpoint_every))

    def log(self, step: int, **values: Any) -> None:
        """Queue one row of `loss.csv`; tensor values stay on the device until `flush`."""
        self._pending.append({"step": step, "elapsed_s": round(time.perf_counter() - self._started, 3), **values})

    def flush(self) -> list[dict[str, Any]]:
        """Sync the queued rows once, append them to `loss.csv` (rank 0), show the last; returns them."""
        rows, self._pending = self._pending, []
        if not rows:
            return rows
        tensors = [(row, key) for row in rows for key, value in row.items() if isinstance(value, torch.Tensor)]
        if tensors:
            values = torch.stack([row[key].detach().double().reshape(()) for row, key in tensors]).tolist()
            for (row, key), value in zip(tensors, values):
                row[key] = value
        if self.is_writer and self.log_path is not None:
            with open(self.log_path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=self.log_fields, extrasaction="ignore").writerows(rows)
                handle.flush()
                os.fsync(handle.fileno())
        shown = {key: f"{value:.4g}" for key, value in rows[-1].items()
                 if key not in ("step", "elapsed_s") and isinstance(value, float)}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        return rows

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Flush the log, then write `state` (plus step, config, identity, kind) atomically, on rank 0."""
        self.flush()
        if not self.is_writer or self.checkpoint_path is None:
            return
        header = {"step": step, "config": config_to_dict(self.config), **self.identity}
        if self.kind is not None:
            header["kind"] = self.kind
        io.save_state(self.checkpoint_path, {**state, **header})

    def write(self, write: Callable[[Path], None]) -> None:
        """Call `write(out_dir)` on rank 0 when there is a run folder (final outputs, plots, previews)."""
        if self.is_writer and self.out_dir is not None:
            write(self.out_dir)

    def message(self, text: str) -> None:
        """One line on stderr, from rank 0 only, without breaking a progress bar."""
        if self.is_writer:
            tqdm.write(text, file=sys.stderr)

    def rows(self) -> list[dict[str, Any]]:
        """The rows of `loss.csv` so far (empty without a run folder)."""
        return read_log(self.log_path) if self.log_path is not None and self.log_path.is_file() else []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "RunState":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `loss.csv`: `step` as int, other cells as float, empty cells as None.

    A row with missing cells (a line torn by a kill during an append) is skipped.
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            if None in raw or None in raw.values() or not raw.get("step", "").isdigit():
                continue  # too many cells, too few, or no step
            try:
                rows.append({key: int(value) if key == "step" else float(value) if value else None
                             for key, value in raw.items()})
            except ValueError:
                continue
    return rows
