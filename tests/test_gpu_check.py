"""The GPU check script's smoke mode on CPU: its distillation-step section runs and compares the paths exactly."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_step_section_gives_the_reference_loss_and_direction_in_float64(tmp_path, monkeypatch):
    out = tmp_path / "gpu_check.json"
    rows = _gpu_check(monkeypatch).main(["--smoke", "--only", "step", "--device", "cpu", "--dtype", "float64",
                                         "--teacher-cache", "0", "--steps", "1", "--skip", "1", "--out", str(out)])

    assert [row["variant"] for row in rows] == ["reference", "fast"]
    assert all(row["status"] == "ok" for row in rows), rows
    fast = rows[1]
    assert "channels_last" in fast["speed"] and "float32" in fast["speed"]  # the CPU fast path: layout only
    assert math.isfinite(fast["loss"]) and fast["loss"] > 0
    # float64 throughout (kernel solve included): the layouts differ only in summation order, ~1e-16 relative,
    # amplified at most by the ridge solve's condition number (<= 1 + 1/ridge = 1e6), so 1e-8 leaves a 100x margin
    assert fast["loss_rel_diff"] < 1e-8, fast
    assert fast["grad_cosine"] > 1 - 1e-8, fast
    assert fast["steps_per_s"] > 0 and fast["gflop_per_step"] > 0
    assert fast["mfu"] is None and fast["peak_gib"] is None  # no GPU: no peak FLOPs, no CUDA memory counter
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
