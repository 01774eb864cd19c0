"""Progress of long loops, on a terminal and in a log file.

On a terminal, a loop shows a tqdm bar. When stderr is not a terminal (a job
under SLURM or nohup, `2> log`), tqdm would stay silent; `progress_bar` then
prints a plain line every `interval` seconds instead, and one when the loop
ends:

    [distill] 1,200/160,000 steps (0.8%) | 12.3 steps/s | elapsed 0:01:37 | ETA 3:35:18 | loss=0.4312

The interval is `KRRST_PROGRESS_INTERVAL` seconds (default 30; 0 prints every
update, for tests). Both kinds share tqdm's interface as the loops use it:
`update`, `set_postfix`, `close` and the context manager.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from tqdm.auto import tqdm

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "KRRST_PROGRESS_INTERVAL"

# Loops closed by an exception (Ctrl-C, an error) before their end, innermost first: "distill at 37/200 steps".
_stopped: list[str] = []


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else f"{unit}s"


def _note_if_stopped(desc: str, n: int, total: int | None, unit: str) -> None:
    """Record where a loop stood if it is being closed while an exception propagates (from a `finally`)."""
    if sys.exc_info()[0] is not None and (total is None or n < total):
        units = _plural(unit)
        _stopped.append(f"{desc} at {n:,}/{total:,} {units}" if total else f"{desc} at {n:,} {units}")


def stopped_loops(clear: bool = True) -> list[str]:
    """Where the loops an exception stopped stood, innermost first (and forget them)."""
    found = list(_stopped)
    if clear:
        _stopped.clear()
    return found


def log_interval() -> float:
    """Seconds between two plain progress lines (`KRRST_PROGRESS_INTERVAL`, default 30)."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """tqdm's loop interface, printing one plain line every `interval` seconds and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 interval: float | None = None, file: TextIO | None = None, silent: bool = False):
        self.total, self.desc, self.unit, self.silent = total, desc, unit, silent
        self.n = self.start_n = initial
        self.interval = log_interval() if interval is None else interval
        self.file = file
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent:
            return
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._print(now)

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**dict(ordered_dict or {}), **kwargs}

    def line(self, now: float | None = None) -> str:
        """The progress line as it stands: stage, count of total, rate, elapsed, ETA, the latest postfix."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        units = _plural(self.unit)
        count = f"{self.n:,}/{self.total:,} {units} ({100 * self.n / self.total:.1f}%)" if self.total \
            else f"{self.n:,} {units}"
        parts = [f"[{self.desc}] {count}", f"{rate:.3g} {units}/s", f"elapsed {_clock(elapsed)}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{key}={value}" for key, value in self.postfix.items()))
        return " | ".join(parts)

    def _print(self, now: float | None = None) -> None:
        print(self.line(now), file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _note_if_stopped(self.desc, self.n, self.total, self.unit)
            if self.n > self.start_n and not self.silent:  # a loop that ran: its last state, however short
                self._print()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Bar(tqdm):
    """tqdm that records where it stood when an exception closed it."""

    def close(self) -> None:
        if not getattr(self, "_noted", False):
            self._noted = True
            _note_if_stopped(self.desc.rstrip(": "), self.n, self.total, self.unit)
        super().close()


def progress_bar(total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 leave: bool = True) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, nothing shown when `enabled` is False.

    Every kind counts its steps, so a loop stopped by Ctrl-C or an error can
    say where it stood (`stopped_loops`).
    """
    if not enabled:
        return LogProgress(total, desc, unit, initial, silent=True)
    if not sys.stderr.isatty():
        return LogProgress(total, desc, unit, initial)
    return _Bar(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
