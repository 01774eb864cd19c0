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
                 interval: float | None = None, file: TextIO | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.interval = log_interval() if interval is None else interval
        self.file = file
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._print(now)

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**dict(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def line(self, now: float | None = None) -> str:
        """The progress line as it stands: stage, count of total, rate, elapsed, ETA, the latest postfix."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        units = f"{self.unit}s" if not self.unit.endswith("s") else self.unit
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
            if self.n > self.start_n:  # a loop that ran: its last state, however short it was
                self._print()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 leave: bool = True) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, nothing when `enabled` is False."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave,
                dynamic_ncols=True)
