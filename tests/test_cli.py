"""The command line: standalone commands resume by re-running them, and say where an interrupt left them."""

import pytest
import torch

import krrst.distill as distill_module
import krrst.teacher as teacher_module
from krrst import pipeline
from krrst.cli import main
from krrst.distilled import DistilledSet
from krrst.models import create_model
from krrst.teacher import TEACHER_FILE, save_teacher

SAMPLE = str(pipeline.sample_path())
DATA = ["--source", "imagefolder", "--root", SAMPLE, "--max-per-class", "4", "--device", "cpu", "--no-progress"]
DISTILL = ["--m", "4", "--heldout", "0", "--steps", "6", "--set", "distill.widths=4,8,8", "--set", "distill.batch_size=8",
           "--set", "distill.pool_size=2", "--set", "distill.pool_steps=2", "--set", "distill.validate_every=0",
           "--set", "distill.log_every=2", "--set", "distill.checkpoint_every=2"]
TEACHER = ["--set", "teacher.arch=convnet3", "--set", "teacher.convnet_widths=4,8,8", "--set", "teacher.steps=6",
           "--set", "teacher.batch_size=8", "--set", "teacher.checkpoint_every=2", "--set", "teacher.log_every=2"]


def _interrupt_on_call(monkeypatch, owner, name, call):
    """Make `owner.name` raise KeyboardInterrupt on its `call`-th call, as Ctrl-C would."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.fixture
def teacher_file(tmp_path):
    save_teacher(tmp_path / "teacher.safetensors", create_model("convnet3", widths=(4, 8, 8), image_size=32),
                 (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return str(tmp_path / "teacher.safetensors")


def test_distill_resumes_by_re_running_the_same_command(tmp_path, teacher_file, monkeypatch, capsys):
    command = ["distill", *DATA, "--teacher", teacher_file, *DISTILL]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    expected = DistilledSet.load(tmp_path / "whole" / "distilled.safetensors")
    capsys.readouterr()

    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, distill_module.ModelPool, "train_step", 5)  # inside outer step 5
        assert main([*command, "--out", str(tmp_path / "cut")]) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("krrst distill: interrupted (distill at 4/6 steps); the last checkpoint is kept: re-run the same "
                     "command to resume")
    assert not (tmp_path / "cut" / "distilled.safetensors").exists()

    assert main([*command, "--out", str(tmp_path / "cut")]) == 0  # no --resume needed
    assert f"resuming {tmp_path / 'cut'} at step 4/6" in capsys.readouterr().err
    resumed = DistilledSet.load(tmp_path / "cut" / "distilled.safetensors")
    assert torch.equal(resumed.images, expected.images) and torch.equal(resumed.targets, expected.targets)

    assert main([*command, "--out", str(tmp_path / "cut"), "--resume"]) == 0  # a finished run: said, left alone
    assert "was finished (6 steps)" in capsys.readouterr().err
    assert torch.equal(DistilledSet.load(tmp_path / "cut" / "distilled.safetensors").images, expected.images)


def test_teacher_resumes_by_re_running_the_same_command(tmp_path, monkeypatch, capsys):
    command = ["teacher", *DATA, *TEACHER]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    expected = (tmp_path / "whole" / TEACHER_FILE).read_bytes()
    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, teacher_module, "_flush_losses", 2)  # at the second log point (step 4)
        assert main([*command, "--out", str(tmp_path / "cut")]) == 130
    assert "krrst teacher: interrupted (teacher" in capsys.readouterr().err
    assert main([*command, "--out", str(tmp_path / "cut")]) == 0
    assert "teacher: resuming" in capsys.readouterr().err
    resumed = torch.load if False else None  # noqa: F841 - the files are compared as bytes below
    from krrst.io import load_tensors

    whole, _ = load_tensors(tmp_path / "whole" / TEACHER_FILE)
    cut, _ = load_tensors(tmp_path / "cut" / TEACHER_FILE)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[key], cut[key]) for key in whole)
    assert expected  # the uninterrupted file exists and was read
