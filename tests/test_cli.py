"""The command line: standalone commands resume by re-running them, and say where an interrupt left them."""

import pytest
import torch

import krrst.distill as distill_module
import krrst.teacher as teacher_module
from krrst import pipeline
from krrst.cli import main
from krrst.distilled import DistilledSet
from krrst.formats import load_authors_set
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
        _interrupt_on_call(patch, teacher_module, "barlow_twins_loss", 5)  # inside step 5 of 6 (checkpoint: 4)
        assert main([*command, "--out", str(tmp_path / "cut")]) == 130
    assert "krrst teacher: interrupted (teacher" in capsys.readouterr().err
    assert main([*command, "--out", str(tmp_path / "cut")]) == 0
    assert "teacher: resuming" in capsys.readouterr().err
    from krrst.infra.io import load_tensors

    whole, _ = load_tensors(tmp_path / "whole" / TEACHER_FILE)
    cut, _ = load_tensors(tmp_path / "cut" / TEACHER_FILE)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[key], cut[key]) for key in whole)
    assert expected  # the uninterrupted file exists and was read


# ----------------------------------------------------------------------------- a command line that guides


def _error_line(capsys, argv):
    """The one stderr line of a command refused with exit status 2."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["run", "--preset", "cpu-mnii", "--print-config"], "did you mean 'cpu-mini'?"),
    (["run", "--preset", "Demo", "--print-config"], "did you mean 'demo'?"),  # a case mistake
    (["run", "--preset", "demo", "--set", "distill.step=3", "--print-config"], "did you mean 'distill.steps'?"),
    (["run", "--preset", "demo", "--set", "distil.steps=3", "--print-config"], "did you mean 'distill.steps'?"),
    (["run", "--preset", "demo", "--set", "run.archs=resnet81", "--print-config"], "did you mean 'resnet18'"),
    (["evaluate", "--baseline", "none", "--target", "cifar10", "--root", ".", "--arch", "Resnet18", "--out", "e"],
     "did you mean 'resnet18'?"),
    (["evaluate", "--baseline", "none", "--target", "cifar10", "--root", ".", "--out", "e", "--protocol", "linaer@1%"],
     "did you mean 'linear'?"),
    (["evaluate", "--baseline", "none", "--target", "imagefoldr", "--root", ".", "--out", "e"],
     "did you mean 'imagefolder'"),
    (["teacher", "--source", "CIFAR10", "--root", ".", "--out", "t"], "did you mean 'cifar10'?"),
    (["distill", *DATA, "--teacher", "t.pt", "--teacher-arch", "resnet81", "--out", "d"], "did you mean 'resnet18'"),
])
def test_a_mistyped_name_gets_did_you_mean(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in _error_line(capsys, argv)
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists(), "refused before any output"


def test_a_mistyped_key_names_its_close_matches_instead_of_every_key(capsys):
    err = _error_line(capsys, ["run", "--preset", "demo", "--set", "distill.step=3", "--print-config"])
    assert "distill.steps" in err and "distill.image_lr" not in err
    err = _error_line(capsys, ["run", "--preset", "demo", "--set", "distill.qqqqqq=3", "--print-config"])
    assert "valid keys: distill.num_images" in err, "with nothing close, every key is listed"


def test_an_unknown_option_shows_the_command_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", *DATA, "--teacher", "t.pt", "--out", "d", "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: krrst distill ") and "krrst distill: error: unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        main(["distil"])
    err = capsys.readouterr().err
    assert err.startswith("usage: krrst [-h]") and "unknown command 'distil'" in err and "did you mean 'distill'?" in err


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"krrst {version('krrst')}"


@pytest.mark.parametrize("command", ["datasets", "models", "teacher", "distill", "evaluate", "report", "run", "demo"])
def test_every_help_has_examples_of_its_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    examples = out.split("examples:\n", 1)[1].splitlines()
    assert 2 <= len(examples) <= 4 and any(line.strip().startswith(f"krrst {command}") for line in examples)
    if command == "evaluate":
        assert "(default: 3)" in out and "(default: finetune)" in out, "defaults are shown"


def test_help_builds_without_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom krrst.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _print_config(capsys, *argv):
    import json

    assert main(["run", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_shortcuts_reach_the_config(capsys):
    config = _print_config(capsys, "--preset", "demo", "--steps", "7", "--m", "9", "--download")
    assert (config["distill"]["steps"], config["distill"]["num_images"], config["run"]["download"]) == (7, 9, True)
    config = _print_config(capsys, "--preset", "demo", "--steps", "7", "--set", "distill.steps=8")
    assert config["distill"]["steps"] == 8, "--set wins over a shortcut"


def test_run_and_evaluate_protocols_mean_the_same(capsys):
    assert _print_config(capsys, "--preset", "demo", "--protocol", "linear@1%")["run"]["protocols"] == ["linear@1%"]
    config = _print_config(capsys, "--preset", "demo", "--protocol", "mkdt", "--protocol", "finetune")
    assert config["run"]["protocols"] == ["linear@1%", "linear@5%", "linear@10%", "linear@50%", "finetune"]
    assert config["pretrain"]["epochs"] == 20 and config["linear"]["solver"] == "lbfgs"
    err = _error_line(capsys, ["run", "--preset", "demo", "--protocol", "krrst", "--protocol", "mkdt"])
    assert "set pretrain.epochs differently" in err


def test_config_file_round_trip_and_set_wins(tmp_path, capsys):
    import json

    printed = _print_config(capsys, "--preset", "demo", "--set", "distill.steps=17", "--set", "run.seeds=2")
    (tmp_path / "config.json").write_text(json.dumps(printed))
    assert _print_config(capsys, "--config", str(tmp_path / "config.json")) == printed
    changed = _print_config(capsys, "--config", str(tmp_path / "config.json"), "--set", "distill.steps=5")
    assert changed["distill"]["steps"] == 5 and changed["run"]["seeds"] == 2
    assert {**changed, "distill": printed["distill"]} == printed and changed["preset"] == "demo"

    printed["distill"]["step"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(printed))
    err = _error_line(capsys, ["run", "--config", str(tmp_path / "bad.json"), "--print-config"])
    assert err == (f"krrst run: error: --config {tmp_path / 'bad.json'}: unknown config key 'distill.step'; did you "
                   "mean 'distill.steps'? (`krrst run --print-config` lists every key)")


def test_report_says_a_missing_folder_does_not_exist(tmp_path, capsys):
    assert "does not exist" in _error_line(capsys, ["report", str(tmp_path / "nothere")])
    assert "holds no results.csv" in _error_line(capsys, ["report", str(tmp_path)])


def _captured_evaluation(monkeypatch, argv):
    """Run `krrst evaluate` up to its evaluation and return the set it would pre-train on."""
    seen = {}
    monkeypatch.setattr(pipeline, "evaluate_methods", lambda out, sets, *args, **kwargs: seen.update(sets))
    monkeypatch.setattr("krrst.report.write_report", lambda *args, **kwargs: None)
    monkeypatch.setattr("krrst.report.report_text", lambda *args: "")
    assert main(["evaluate", *argv]) == 0
    (method, network), = seen.items()
    return method, network


@pytest.mark.parametrize("stats", [None, ["--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3"]])
def test_evaluate_reads_the_authors_x_syn_and_y_syn(tmp_path, monkeypatch, capsys, stats):
    from krrst.data import load_images

    generator = torch.Generator().manual_seed(0)
    torch.save(torch.rand(4, 3, 32, 32, generator=generator), tmp_path / "x_syn.pt")
    torch.save(torch.randn(4, 8, generator=generator), tmp_path / "y_syn.pt")
    argv = ["--distilled", str(tmp_path / "x_syn.pt"), "--target", "imagefolder", "--root", SAMPLE,
            "--max-per-class", "2", "--seeds", "1", "--out", str(tmp_path / "eval"), "--device", "cpu", *(stats or [])]
    method, network = _captured_evaluation(monkeypatch, argv)
    if stats:
        mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    else:  # the target's statistics, said on stderr
        target = load_images("imagefolder", SAMPLE, "train", max_per_class=2)
        mean, std = tuple(target.mean), tuple(target.std)
        assert "with the target's mean/std" in capsys.readouterr().err
    expected = load_authors_set(tmp_path / "x_syn.pt", tmp_path / "y_syn.pt", mean, std)
    assert method == "x_syn" and network.target_kind == "representation"
    assert torch.equal(network.images, expected.images) and torch.equal(network.targets, expected.targets)


def test_evaluate_reads_another_methods_label_set(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.tensor([0, 1, 2, 1])}, tmp_path / "dsa.pt")
    argv = ["--distilled", str(tmp_path / "dsa.pt"), "--target", "imagefolder", "--root", SAMPLE, "--max-per-class",
            "2", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--out", str(tmp_path / "eval"), "--device", "cpu"]
    method, network = _captured_evaluation(monkeypatch, argv)
    assert method == "dsa" and network.target_kind == "hard_labels"
    torch.testing.assert_close(network.images, (images.double() / 255 - 0.5) / 0.25, check_dtype=False)


def _classifier_file(path, num_classes, widths=(4, 8, 8)):
    """A krrst model file of a ConvNet classifier (its metadata names the architecture), as the kd cache writes."""
    from krrst.infra.io import save_tensors

    model = create_model("convnet3", num_outputs=num_classes, widths=widths, image_size=32)
    save_tensors(path, model.state_dict(), {"spec": model.spec})
    return model


KD_EVAL = ["--baseline", "none", "--target", "imagefolder", "--root", SAMPLE, "--max-per-class", "2", "--seeds", "1",
           "--widths", "4,8,8", "--protocol", "kd", "--m", "8", "--set", "kd.epochs=1", "--set", "kd.batch_size=8",
           "--device", "cpu", "--no-progress"]


def test_evaluate_kd_distils_a_teacher_file(tmp_path, capsys):
    from krrst.results import read_results

    _classifier_file(tmp_path / "classifier.safetensors", 10)
    assert main(["evaluate", *KD_EVAL, "--kd-teacher", str(tmp_path / "classifier.safetensors"),
                 "--out", str(tmp_path / "eval")]) == 0
    rows = read_results(tmp_path / "eval")
    assert [(r["method"], r["protocol"], r["seed"]) for r in rows] == [("none", "kd", 0)]
    assert not (tmp_path / "eval" / "eval" / "kd-teacher").exists(), "a teacher file is used, none is trained"


def test_a_bad_kd_teacher_is_one_line_naming_the_file_and_the_mismatch(tmp_path, capsys):
    wrong_classes = tmp_path / "five.safetensors"
    _classifier_file(wrong_classes, 5)
    err = _error_line(capsys, ["evaluate", *KD_EVAL, "--kd-teacher", str(wrong_classes), "--out", str(tmp_path / "a")])
    assert f"--kd-teacher {wrong_classes}: a classifier of 5 classes, but target " in err and "has 10" in err
    wrong_arch = tmp_path / "convnet.pt"
    torch.save(create_model("convnet3", num_outputs=10, widths=(4, 8, 8), image_size=32).state_dict(), wrong_arch)
    err = _error_line(capsys, ["evaluate", *KD_EVAL, "--kd-teacher", str(wrong_arch), "--kd-teacher-arch", "resnet18",
                               "--out", str(tmp_path / "b")])
    assert f"--kd-teacher {wrong_arch} does not fit architecture 'resnet18': " in err and "is missing" in err
    named = _error_line(capsys, ["evaluate", *KD_EVAL, "--kd-teacher", str(wrong_classes), "--kd-teacher-arch",
                                 "resnet18", "--out", str(tmp_path / "c")])
    assert f"--kd-teacher {wrong_classes} holds a 'convnet3' classifier, not 'resnet18'" in named
    assert not any((tmp_path / name / "results.csv").exists() for name in "abc"), "refused before any work"
    without_kd = [arg for arg in KD_EVAL if arg not in ("--protocol", "kd")]
    assert "--kd-teacher and --kd-teacher-arch go with --protocol kd" in _error_line(capsys, [
        "evaluate", *without_kd, "--kd-teacher", str(wrong_classes), "--out", str(tmp_path / "d")])


def test_run_kd_teacher_options_reach_the_kd_config(capsys):
    config = _print_config(capsys, "--preset", "demo", "--protocol", "kd", "--kd-teacher", "c10.pt",
                           "--kd-teacher-arch", "resnet18_pad2")
    assert config["run"]["protocols"] == ["kd"]
    assert (config["kd"]["teacher_path"], config["kd"]["teacher_arch"]) == ("c10.pt", "resnet18_pad2")
    assert "did you mean 'resnet18'" in _error_line(capsys, ["run", "--preset", "demo", "--protocol", "kd",
                                                             "--kd-teacher-arch", "resnet81", "--print-config"])


def test_evaluate_reads_a_labelled_folder_with_its_split_fraction_and_skips_corrupt_files(tmp_path, capsys):
    from PIL import Image

    from krrst.results import read_results

    generator = torch.Generator().manual_seed(0)
    for pet in ("cat", "dog"):
        (tmp_path / "pets" / pet).mkdir(parents=True)
        for index in range(10):
            pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(tmp_path / "pets" / pet / f"{index}.png")
    (tmp_path / "pets" / "dog" / "broken.jpg").write_bytes(b"not an image")
    command = ["evaluate", "--baseline", "none", "--target", "folder", "--root", str(tmp_path / "pets"),
               "--widths", "4,8,8", "--seeds", "1", "--out", str(tmp_path / "eval"), "--device", "cpu",
               "--no-progress", "--set", "finetune.iterations=2", "--set", "finetune.batch_size=4",
               "--test-fraction", "0.3"]
    assert main(command) == 2
    assert "broken.jpg" in capsys.readouterr().err  # named, with how to skip it
    assert main([*command, "--skip-corrupt"]) == 0
    (row,) = read_results(tmp_path / "eval")
    assert "test 30%" in row["target"], row["target"]


def test_the_choices_the_parser_offers_are_the_registered_names():
    """The parser keeps its choices literal (`--help` must not import torch); they must match the registries."""
    from krrst.cli import build_parser
    from krrst.pipeline import METHODS, PRESETS, SUBSET_METHODS

    commands = build_parser().commands

    def choices(command: str, option: str) -> tuple:
        action = next(a for a in commands[command]._actions if option in a.option_strings)
        return tuple(action.choices)

    assert choices("distill", "--method") == METHODS.select(lambda kind: kind == "distilled")
    assert choices("distill", "--init") == SUBSET_METHODS
    assert choices("evaluate", "--baseline") == (*SUBSET_METHODS, "none", "full")  # full: rows named full-ssl
    for command, option in (("distill", "--preset"), ("run", "--preset")):
        text = next(a for a in commands[command]._actions if option in a.option_strings).help
        assert all(name in text for name in PRESETS), f"{command} {option}'s help leaves out a preset"


def test_evaluate_baselines_say_what_they_need(tmp_path, teacher_file, capsys):
    command = ["evaluate", "--target", "imagefolder", "--root", SAMPLE, "--out", str(tmp_path / "e"), "--device", "cpu"]
    for baseline in ("random", "kmeans", "high-loss", "full"):
        assert _error_line(capsys, [*command, "--baseline", baseline]) == (
            f"krrst evaluate: error: --baseline {baseline} needs the teacher: pass --teacher PATH")
    assert _error_line(capsys, [*command, "--baseline", "kmeans", "--teacher", teacher_file]) == (
        "krrst evaluate: error: --baseline kmeans needs --source NAME and --source-root PATH to pick images from")
    assert "unknown dataset 'imagefoldr'" in _error_line(capsys, [
        *command, "--baseline", "random", "--teacher", teacher_file, "--source", "imagefoldr", "--source-root", SAMPLE])


def test_output_piped_into_head_ends_quietly():
    """A reader that closes the pipe before krrst writes (`| head`, `| true`): no traceback, exit status 0."""
    import subprocess
    import sys

    shell = f"{sys.executable} -c 'import sys; from krrst.cli import main; sys.exit(main())' " \
            "run --preset demo --print-config | true; exit ${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stderr == "" and done.returncode == 0, done.stderr
