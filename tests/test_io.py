"""Atomic writes, safetensors round-trips and nested checkpoints."""

import json

import pytest
import torch

from krrst.infra import io
from krrst.infra.errors import KrrstError


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "results.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "temporary file left behind"


def test_save_state_round_trips_optimizer_and_generator(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(7)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": 12,
        "shape": (3, 4),
        "name": "x",
        "nothing": None,
    }
    io.save_state(tmp_path / "ckpt.safetensors", state)
    loaded = io.load_state(tmp_path / "ckpt.safetensors")
    assert loaded["step"] == 12 and loaded["shape"] == (3, 4) and loaded["name"] == "x" and loaded["nothing"] is None
    assert set(loaded["optimizer"]["state"]) == {0, 1}, "int keys of the optimiser state must survive"
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    replay = torch.Generator()
    replay.set_state(loaded["generator"])
    assert torch.equal(torch.rand(5, generator=replay), torch.rand(5, generator=generator))


def test_load_tensors_errors_are_one_line(tmp_path):
    with pytest.raises(KrrstError, match="not found"):
        io.load_tensors(tmp_path / "missing.safetensors", "checkpoint")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(KrrstError, match="not a readable safetensors") as info:
        io.load_tensors(bad, "checkpoint")
    assert "\n" not in str(info.value)
    io.save_tensors(tmp_path / "ok.safetensors", {"w": torch.ones(1000)}, {"k": 1})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:500])
    with pytest.raises(KrrstError, match=str(truncated.name)):
        io.load_tensors(truncated, "checkpoint")


def test_capture_env_records_versions_and_seed():
    env = io.capture_env(seed=3, device="cpu")
    assert env["seed"] == 3 and env["device"] == "cpu"
    assert env["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["command"], "the command line is recorded"


def test_describe_exception_keeps_the_type_of_a_bare_message():
    assert io.describe_exception(KeyError(101)) == "KeyError: 101"
    assert io.describe_exception(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
    assert io.describe_exception(EOFError()) == "EOFError"
    assert io.describe_exception(ValueError("x" * 500)) == "ValueError: " + "x" * 120


def test_exclusive_lock_refuses_a_second_holder_until_released(tmp_path):
    from krrst.infra.io import exclusive_lock

    with exclusive_lock(tmp_path / "run"):
        with pytest.raises(KrrstError, match=r"run directory .*run is in use by another krrst process"):
            with exclusive_lock(tmp_path / "run"):
                pass
    with exclusive_lock(tmp_path / "run"):  # released: taken again
        pass
    with pytest.raises(BlockingIOError, match="the block's own"):  # not mistaken for the lock being held
        with exclusive_lock(tmp_path / "run"):
            raise BlockingIOError("the block's own")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_written_file_takes_the_users_umask(tmp_path, umask):
    """Collaborators on a shared file system read a run's files as they read any other (0644 under umask 022)."""
    import os

    from krrst.infra.io import save_tensors, write_json

    previous = os.umask(umask)
    try:
        save_tensors(tmp_path / "set.safetensors", {"images": torch.zeros(2, 3)}, {"kind": "test"})
        write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(previous)
    for name in ("set.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
