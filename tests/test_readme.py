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
from krrst.results import read_results

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


# --------------------------------------------------------------------------- "Reproduce the paper": the presets' table

SOURCE_NAMES = {"CIFAR-100": "cifar100", "Tiny-ImageNet": "tinyimagenet", "ImageNet 64x64": "imagenet64"}
TARGET_NAMES = {"CIFAR-100": "cifar100", "CIFAR-10": "cifar10", "Tiny-ImageNet": "tinyimagenet", "Aircraft": "aircraft",
                "Cars": "cars", "CUB": "cub", "Dogs": "dogs", "Flowers": "flowers"}


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _expected(fields: tuple[str, ...], cell: str) -> dict[str, object]:
    """What a cell of the README's preset table claims, as {stage.field: value}."""
    if fields == ("run.source",):
        return {"run.source": SOURCE_NAMES[cell]}
    if fields == ("distill.arch", "distill.widths", "run.archs"):
        name, widths = (part.strip() for part in cell.split(","))
        arch = name.lower().replace("-", "")
        return {"distill.arch": arch, "distill.widths": [_number(w) for w in widths.split("-")], "run.archs": [arch]}
    if fields == ("distill.image_lr", "distill.target_lr"):
        return dict.fromkeys(fields, float(cell))
    if fields == ("distill.pool_size", "distill.pool_steps"):
        size, steps = re.fullmatch(r"(\d+) models, T = ([\d,]+)", cell).groups()
        return {"distill.pool_size": _number(size), "distill.pool_steps": _number(steps)}
    if fields == ("run.targets",):
        return {"run.targets": [TARGET_NAMES[name.strip()] for name in cell.split(",")]}
    if fields == ("pretrain.epochs", "pretrain.batch_size"):
        epochs, batch = re.fullmatch(r"([\d,]+) epochs, batch (\d+)", cell).groups()
        return {"pretrain.epochs": _number(epochs), "pretrain.batch_size": _number(batch)}
    if fields == ("finetune.iterations", "run.finegrained_iterations", "finetune.batch_size"):
        iterations, finegrained, batch = re.fullmatch(
            r"([\d,]+) iterations \(([\d,]+) on the fine-grained sets\), batch (\d+)", cell).groups()
        return dict(zip(fields, map(_number, (iterations, finegrained, batch))))
    (field,) = fields  # a plain count: image size, m, steps, batch, seeds
    return {field: _number(cell)}


def readme_preset_table() -> tuple[list[str], list[tuple[tuple[str, ...], list[str]]]]:
    """(presets, [(config fields, one cell per preset)]) of the table under "What the presets set"."""
    body = README.read_text().split("### What the presets set\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    presets = re.findall(r"`([\w-]+)`", lines[0])
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((tuple(re.findall(r"`([\w.]+)`", cells[0])), cells[1:]))
    return presets, rows


def test_readme_paper_presets_match_print_config(capsys):
    """Every value the README's "Reproduce the paper" table states is what `krrst run --print-config` resolves."""
    import json

    presets, rows = readme_preset_table()
    assert presets == ["cifar100", "tinyimagenet", "imagenet64"]
    assert len(rows) >= 11
    for index, preset in enumerate(presets):
        assert main(["run", "--preset", preset, "--print-config"]) == 0
        config = json.loads(capsys.readouterr().out)
        for fields, cells in rows:
            for key, value in _expected(fields, cells[index]).items():
                stage, field = key.split(".")
                assert config[stage][field] == value, f"README says {key}={value!r} for {preset}"


def test_readme_paper_commands_name_their_preset_and_root():
    """The copy-paste commands resolve (every --set is a valid key) and name the preset of their comment."""
    commands = readme_commands("Reproduce the paper")
    assert [argv[argv.index("--preset") + 1] for argv in commands] == [
        "cifar100", "tinyimagenet", "imagenet64", "authors", "cifar100"]
    for argv in commands:
        assert main(argv[1:] + ["--print-config"]) == 0, argv


# --------------------------------------------------------------------------- "Python API": the example as written

def test_python_api_example_runs_on_the_shipped_sample(capsys):
    """The README's Python API block runs after `pip install`, with only its step/epoch/iteration counts shrunk."""
    body = README.read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert "shared" not in code and "sample_path()" in code
    small, count = re.subn(r"\b(steps|epochs|iterations)=\d+", r"\1=2", code)
    assert count == 4, "the teacher's and the distillation's steps, the epochs and the iterations are what is shrunk"
    namespace: dict = {}
    exec(compile(small, "README.md (Python API)", "exec"), namespace)
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= accuracy <= 1.0
    assert len(namespace["synthetic"]) == 100
    assert len(namespace["source"]) == 4000 and len(namespace["test"]) == 1000


def test_citation_file_names_the_package_version():
    """CITATION.cff cites the version pyproject.toml builds, and the README's BibTeX the paper CITATION.cff prefers."""
    root = README.parent
    # pyproject's [project] version line (tomllib is Python 3.11+; the package supports 3.10)
    version = re.search(r'^version = "([^"]+)"$', (root / "pyproject.toml").read_text(), flags=re.M).group(1)
    citation = (root / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", citation, flags=re.M).group(1) == version
    title = re.search(r"^preferred-citation:\n(?:  .*\n)*?  title: (.+)$", citation, flags=re.M).group(1)
    bibtex = README.read_text().split("## Citation\n", 1)[1]
    assert f"title     = {{{title}}}" in bibtex
