"""The README's "Distil your own images" and "Use your own teacher" commands, run as written on material the test makes.

Only the scale is changed: the test appends options that shrink every stage to seconds (narrow networks, a few
steps, a ResNet-18 at 32 px for the ResNet-50 at 224 px). The commands, paths and file kinds are the README's.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from krrst.cli import main
from krrst.report import read_results

README = Path(__file__).resolve().parents[1] / "README.md"

SHRINK = {  # every stage at test scale
    "run.seeds": "1", "run.heldout_images": "8", "run.protocols": "finetune", "run.eval_widths": "4,8,8",
    "run.methods": "krr-st,random,none", "run.finegrained_iterations": "2",
    "teacher.arch": "convnet3", "teacher.convnet_widths": "4,8,8", "teacher.steps": "2", "teacher.batch_size": "16",
    "distill.num_images": "4", "distill.widths": "4,8,8", "distill.steps": "2", "distill.batch_size": "8",
    "distill.pool_size": "2", "distill.pool_steps": "2", "distill.validate_every": "0",
    "pretrain.epochs": "1", "pretrain.batch_size": "4", "finetune.iterations": "2", "finetune.batch_size": "8",
}


def readme_commands(section: str) -> list[list[str]]:
    """The `krrst` commands of the README section's bash blocks, continuation lines joined."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [shlex.split(line) for line in joined.splitlines() if line.strip().startswith("krrst ")]
    assert commands, f"no krrst command in README section {section!r}"
    return commands


def shrunk(argv: list[str]) -> list[str]:
    argv = [arg.replace("torchvision:resnet50", "torchvision:resnet18") for arg in argv[1:]]
    command = argv[0]
    if command == "run":
        return argv + [item for key, value in SHRINK.items() for item in ("--set", f"{key}={value}")] + [
            "--set", "run.teacher_input_size=32", "--device", "cpu", "--no-progress"]
    if command == "teacher":
        return argv + ["--teacher-input-size", "32", "--device", "cpu", "--no-progress"]
    if command == "distill":
        return argv + ["--m", "4", "--heldout", "0"] + [
            item for key, value in SHRINK.items() if key.startswith("distill.") for item in ("--set", f"{key}={value}")
        ] + ["--device", "cpu", "--no-progress"]
    raise AssertionError(f"unexpected command {command}")


@pytest.fixture
def users_folder(tmp_path, monkeypatch):
    """photos/ (unlabelled, nested, assorted sizes), pets/ (two classes), a solo-learn checkpoint of a ResNet."""
    generator = torch.Generator().manual_seed(0)

    def image(path, height, width):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(path)

    for index in range(40):
        image(tmp_path / "photos" / f"trip-{index % 3}" / f"IMG_{index:04d}.jpg", 30 + index % 7, 40)
    for pet in ("cat", "dog"):
        for index in range(10):
            image(tmp_path / "pets" / pet / f"{pet}{index}.png", 36, 36)
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(weights=None)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    state["projector.0.weight"] = torch.randn(64, 512)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "barlow-r50.ckpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_distil_your_own_images_runs_as_written(users_folder):
    (command,) = readme_commands("Distil your own images")
    assert main(shrunk(command)) == 0
    rows = read_results(users_folder / "runs" / "mine")
    assert {row["method"] for row in rows} == {"krr-st", "random", "none"}
    assert all(row["target"].startswith("pets") for row in rows)
    assert (users_folder / "runs" / "mine" / "report.html").is_file()


def test_use_your_own_teacher_runs_as_written(users_folder):
    commands = readme_commands("Use your own teacher")
    assert [argv[1] for argv in commands] == ["run", "teacher", "distill"]
    for argv in commands:
        assert main(shrunk(argv)) == 0, argv
    assert (users_folder / "teacher-r50" / "teacher.safetensors").is_file()
    assert (users_folder / "distill-r50" / "distilled.safetensors").is_file()
    assert read_results(users_folder / "runs" / "mine-r50")
