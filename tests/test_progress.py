"""Progress on a terminal and in a log file: plain periodic lines when stderr is not a terminal."""

import io
import os
import re
import subprocess
import sys

import pytest
from tqdm.auto import tqdm

from krrst import pipeline
from krrst.infra.progress import LogProgress, log_interval, progress_bar
from krrst.models import create_model
from krrst.teacher import save_teacher


class _Clock:
    """A settable `time.perf_counter`."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_log_line_gives_stage_count_rate_eta_and_the_latest_loss(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("krrst.infra.progress.time.perf_counter", clock)
    out = io.StringIO()
    bar = LogProgress(1000, "distill", unit="step", initial=200, interval=30, file=out)
    clock.now += 10
    bar.set_postfix({"loss": "0.4312"}, refresh=False)
    bar.update(20)  # 10 s since the start: under the interval, no line yet
    assert out.getvalue() == ""
    clock.now += 30
    bar.update(80)  # 100 steps in 40 s: 2.5 steps/s, 700 left: ETA 280 s
    assert out.getvalue().splitlines() == [
        "[distill] 300/1,000 steps (30.0%) | 2.5 steps/s | elapsed 0:00:40 | ETA 0:04:40 | loss=0.4312"
    ]
    clock.now += 5
    bar.update(10)  # 5 s after the last line: quiet
    assert len(out.getvalue().splitlines()) == 1
    bar.close()  # the end always gets its line, and only one
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("[distill] 310/1,000 steps (31.0%) | 2.44 steps/s | elapsed 0:00:45 | ETA 0:04:42")


def test_a_loop_that_did_nothing_prints_nothing_and_no_total_prints_a_count(monkeypatch):
    out = io.StringIO()
    with LogProgress(10, "mkdt", unit="step", initial=10, interval=0, file=out):
        pass  # resumed at the end: nothing ran
    assert out.getvalue() == ""
    with LogProgress(None, "decode", unit="img", interval=0, file=out) as bar:
        bar.update(3)
    assert out.getvalue().splitlines()[0].startswith("[decode] 3 imgs | ")
    assert "ETA" not in out.getvalue()


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(progress_bar(5, "teacher"), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(5, "teacher"), LogProgress)
    disabled = progress_bar(5, "teacher", enabled=False)
    disabled.update()
    disabled.close()
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("value, expected", [("", 30.0), ("5", 5.0), ("0", 0.0), ("-3", 0.0), ("often", 30.0)])
def test_the_interval_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("KRRST_PROGRESS_INTERVAL", value)
    assert log_interval() == expected


def test_krrst_distill_with_stderr_in_a_file_writes_progress_lines_as_it_runs(tmp_path):
    """`krrst distill ... 2> log`: the log holds a line per interval (here every step), not silence until the end."""
    teacher = create_model("convnet3", widths=(4, 8, 8), image_size=32)
    save_teacher(tmp_path / "teacher.safetensors", teacher, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    argv = [sys.executable, "-m", "krrst.cli", "distill", "--teacher", str(tmp_path / "teacher.safetensors"),
            "--source", "imagefolder", "--root", str(pipeline.sample_path()), "--max-per-class", "4",
            "--out", str(tmp_path / "d"), "--m", "4", "--heldout", "0", "--steps", "6", "--device", "cpu",
            "--set", "distill.widths=4,8,8", "--set", "distill.batch_size=8", "--set", "distill.pool_size=2",
            "--set", "distill.pool_steps=2", "--set", "distill.validate_every=0", "--set", "distill.log_every=2"]
    env = {**os.environ, "KRRST_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=300)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text
    counts = [int(n) for n in re.findall(r"^\[distill\] (\d+)/6 steps \(", text, flags=re.MULTILINE)]
    assert counts[:6] == [1, 2, 3, 4, 5, 6], text  # one line per step as it happened, then the closing one
    assert re.search(r"^\[distill\] 6/6 steps \(100\.0%\) \| [\d.]+ steps/s \| elapsed .* \| loss=", text, re.M), text
    assert "\r" not in text, "no terminal control characters in a log file"
