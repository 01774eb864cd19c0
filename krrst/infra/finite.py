"""Finite checks: NaN and inf stop where they enter, and a diverging loop stops at its next log point.

Two tools, shared by every stage:

- `check_finite(tensor, where, what)` at a boundary where numbers enter (a
  set file, a teacher's first features): a one-line `KrrstError` such as
  "distilled set x.safetensors: 3,072 NaN values in images".
- `LossWatch` inside a training loop: `update(loss, step)` keeps the first
  non-finite step on the device (no host synchronisation per step) and
  `check()` reads it once, at a log or checkpoint point, raising one line that
  names the stage, the step and the likely cause. A loop calls `check()`
  before every checkpoint and before returning, so nothing is written from a
  diverged state.
"""

from __future__ import annotations

import torch

from krrst.infra.errors import KrrstError


def describe_nonfinite(tensor: torch.Tensor) -> str | None:
    """`"3,072 NaN values"`, `"2 NaN and 5 inf values"`, or None when every value is finite (one sync)."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int((~finite).sum()) - nan
    parts = [f"{count:,} {name}" for count, name in ((nan, "NaN"), (inf, "inf")) if count]
    return " and ".join(parts) + (" value" if nan + inf == 1 else " values")


def check_finite(tensor: torch.Tensor, where: str, what: str) -> None:
    """Raise `KrrstError("{where}: {counts} in {what}")` when `tensor` holds NaN or inf."""
    found = describe_nonfinite(tensor)
    if found is not None:
        raise KrrstError(f"{where}: {found} in {what}")


def first_nonfinite_tensor(tensors) -> tuple[str, str] | None:
    """`(name, counts)` of the first named tensor (e.g. a state dict's items) holding NaN or inf, else None."""
    for name, tensor in tensors:
        found = describe_nonfinite(tensor.detach()) if isinstance(tensor, torch.Tensor) else None
        if found is not None:
            return name, found
    return None


class LossWatch:
    """The first step whose loss is NaN or inf, kept on the device until a log point reads it.

    >>> watch = LossWatch("fine-tuning", "finetune.lr too high for this batch size", device)
    >>> for step in range(1, steps + 1):
    ...     loss = ...; watch.update(loss, step)
    ...     if step % log_every == 0:
    ...         watch.check()       # one sync, at the log point only
    """

    def __init__(self, stage: str, cause: str, device: torch.device | str, unit: str = "step"):
        self.stage, self.cause, self.unit = stage, cause, unit
        self._first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self._first_value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record `step` if `loss` is the first non-finite one; no host synchronisation."""
        loss = loss.detach().float().sum()
        self.note(~torch.isfinite(loss), step, loss)

    def note(self, bad: torch.Tensor, step: int, value: torch.Tensor | None = None) -> None:
        """Record `step` (and `value`) if the boolean `bad` is the first true one; no host synchronisation."""
        first = bad & (self._first_step < 0)
        self._first_step = torch.where(first, step, self._first_step)
        if value is not None:
            self._first_value = torch.where(first, value.detach().float().reshape(()), self._first_value)

    def first(self) -> tuple[int, float] | None:
        """`(step, loss)` of the first non-finite loss so far, or None (one sync)."""
        step = int(self._first_step)
        return (step, float(self._first_value)) if step >= 0 else None

    def check(self) -> None:
        """Raise one line naming the stage, the step and the likely cause if any loss so far was NaN or inf."""
        found = self.first()
        if found is not None:
            step, value = found
            raise KrrstError(f"{self.stage} diverged: the loss was {value} at {self.unit} {step}; likely cause: "
                             f"{self.cause}; nothing was saved from the diverged state")
