"""The whole pipeline on a shortened demo config: files, resume at every stage boundary, reproducibility, errors."""

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from krrst import DistilledSet, pipeline
from krrst.augment import normalize
from krrst.cli import main
from krrst.distill import distill, initial_indices
from krrst.infra.errors import KrrstError
from krrst.infra.io import load_tensors, read_json
from krrst.models import fresh_model
from krrst.results import read_results

# A demo run shrunk to seconds: 200 source images, a few steps per stage, one seed.
TINY = {
    "run.source_per_class": "20",
    "run.heldout_images": "40",
    "run.target_train_per_class": "10",
    "run.target_test_per_class": "10",
    "run.seeds": "1",
    "run.protocols": "finetune,linear@50%",
    "teacher.steps": "3",
    "teacher.batch_size": "32",
    "distill.steps": "3",
    "distill.num_images": "10",
    "distill.batch_size": "32",
    "distill.pool_size": "2",
    "distill.pool_steps": "3",
    "distill.validate_every": "2",
    "distill.validation_images": "20",
    "pretrain.epochs": "2",
    "finetune.iterations": "3",
    "finetune.batch_size": "32",
    "linear.iterations": "3",
}


def tiny_config(**extra):
    return pipeline.resolve_config("demo", {**TINY, **extra})


def run_tiny(out_dir, **extra):
    return pipeline.run(tiny_config(**extra), out_dir, preset="demo", device="cpu", progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    rows = run_tiny(out)
    return out, rows


def test_run_directory_holds_every_output(finished_run):
    out, rows = finished_run
    for name in ("config.json", "env.json", "timings.json", "results.json"):
        json.loads((out / name).read_text())
    assert (out / "results.csv").read_text().startswith("method,")
    assert "<html" in (out / "report.html").read_text().lower()
    assert (out / "results.png").stat().st_size > 0 and (out / "distill" / "preview.png").stat().st_size > 0
    assert (out / "distill" / "loss.png").stat().st_size > 0 and (out / "teacher" / "loss.csv").exists()
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and env["device"] == "cpu" and env["seed"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "demo" and config["distill"]["steps"] == 3, "the fully resolved config is recorded"
    distilled = DistilledSet.load(out / "distill" / "distilled.safetensors")
    assert len(distilled) == 10 and distilled.images.shape[1:] == (3, 32, 32)
    methods = {"krr-st", "random", "kmeans", "none"}
    assert {row["method"] for row in rows} == methods
    assert len(rows) == len(methods) * 2, "every method x protocol for one seed"
    table = (out / "results.md").read_text()
    for method in methods:
        assert f"| {method} |" in table
    sets = json.loads((out / "sets.json").read_text())
    assert set(sets) == {"krr-st", "random", "kmeans"}, "what each pre-training set holds"
    assert sets["krr-st"] == {"images": 10, "storage_bytes": 4 * 10 * (3 * 32 * 32 + distilled.feature_dim),
                              "parameterization": "pixels"}
    assert sets["random"]["storage_bytes"] == sets["krr-st"]["storage_bytes"]
    assert "| krr-st | 10 | pixels |" in table


def test_run_rows_carry_the_fingerprint_of_the_stage_that_built_their_set(finished_run):
    out, rows = finished_run
    stage = {name: read_json(out / name / "fingerprint.json")["fingerprint"] for name in ("distill", "baselines")}
    expected = {"krr-st": f"distill:{stage['distill']}", "random": f"baselines:{stage['baselines']}",
                "kmeans": f"baselines:{stage['baselines']}", "none": pipeline.baseline_provenance("none")}
    assert {row["method"]: row["provenance"] for row in read_results(out)} == expected
    sets_rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| krr-st | 10 |")]
    assert len(sets_rows) == 1 and sets_rows[0].endswith(f" 1.00x | distill:{stage['distill']} |"), sets_rows


def test_random_baseline_is_the_images_krrst_started_from(finished_run):
    out, _ = finished_run
    config = tiny_config(**{"distill.image_lr": "1e-12", "distill.target_lr": "1e-12", "distill.steps": "1"})
    source, heldout = pipeline.load_source(config.run, Path("."))
    random_set = DistilledSet.load(out / "baselines" / "random.safetensors")
    start = initial_indices(len(source), config.distill)
    assert torch.allclose(random_set.images, normalize(source.images[start], source.mean, source.std))
    # With negligible learning rates the distilled set stays at its initialisation: the same images.
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    unchanged = distill(source, teacher, config.distill, device="cpu", progress=False)
    assert torch.allclose(unchanged.images, random_set.images, atol=1e-6)


def test_same_seed_gives_identical_outputs(finished_run, tmp_path):
    out, rows = finished_run
    again = run_tiny(tmp_path / "again")
    first, _ = load_tensors(out / "distill" / "distilled.safetensors")
    second, _ = load_tensors(tmp_path / "again" / "distill" / "distilled.safetensors")
    assert torch.equal(first["images"], second["images"]) and torch.equal(first["targets"], second["targets"])
    key = lambda row: (row["method"], row["protocol"], row["seed"])  # noqa: E731
    assert [(key(r), r["accuracy"]) for r in sorted(rows, key=key)] == [
        (key(r), r["accuracy"]) for r in sorted(again, key=key)
    ]


class Killed(BaseException):
    """Stands for Ctrl-C / a crash at a stage boundary."""


@pytest.mark.parametrize("stage", ["distill", "baselines", "evaluate"])
def test_resume_after_kill_at_stage_boundary(finished_run, tmp_path, monkeypatch, stage):
    out, rows = finished_run

    target = {"distill": (pipeline, "distill"), "baselines": (pipeline, "kmeans_coreset"),
              "evaluate": (pipeline, "evaluate_set")}[stage]
    original = getattr(*target)
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if stage == "evaluate" and len(calls) < 3:
            return original(*args, **kwargs)  # die in the middle of the evaluation, after two rows
        raise Killed()

    monkeypatch.setattr(*target, dies)
    with pytest.raises(Killed):
        run_tiny(tmp_path / "killed")
    monkeypatch.setattr(*target, original)
    if stage == "evaluate":
        assert len(read_results(tmp_path / "killed")) == 2, "finished rows are kept"
    resumed = run_tiny(tmp_path / "killed")
    key = lambda row: (row["method"], row["protocol"], row["seed"])  # noqa: E731
    assert sorted((key(r), r["accuracy"]) for r in resumed) == sorted((key(r), r["accuracy"]) for r in rows)


def test_rerun_skips_finished_stages(finished_run, monkeypatch):
    out, rows = finished_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "train_teacher", must_not_run)
    monkeypatch.setattr(pipeline, "distill", must_not_run)
    assert len(run_tiny(out)) == len(rows)


def test_changed_config_is_refused_without_force(finished_run):
    out, _ = finished_run
    with pytest.raises(KrrstError, match="another config.*distill.steps.*--force"):
        run_tiny(out, **{"distill.steps": "4"})


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["run", "--preset", "nope"], "unknown preset 'nope'; valid presets: cifar100"),
        (["run", "--preset", "demo", "--set", "distill.stepz=1"], "unknown config key 'distill.stepz'"),
        (["run", "--preset", "demo", "--set", "distill.steps=many"], "distill.steps='many' is not valid"),
        (["run", "--preset", "demo", "--set", "nostage=1"], "must be stage.field"),
        (["run", "--preset", "cpu-mini", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")],
         "does not exist"),
        (["distill", "--source", "imagefolder", "--root", str(tmp_path / "missing.zip"), "--teacher",
          str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "d")], "not found"),
        (["evaluate", "--target", "cifar10", "--root", ".", "--out", str(tmp_path / "e")], "exactly one of"),
        (["report", str(tmp_path)], "holds no results.csv"),
        (["teacher", "--source", "imagefolder", "--root", str(tmp_path), "--out", str(tmp_path / "t"),
          "--teacher", str(tmp_path / "t.pt"), "--preset", "demo"], "no effect when importing --teacher"),
        (["evaluate", "--baseline", "none", "--target", "cifar10", "--root", ".", "--arch", "convnet9",
          "--out", str(tmp_path / "e")], "unknown --arch 'convnet9'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)


def test_cli_root_error_names_the_option_and_root(tmp_path, capsys):
    assert main(["run", "--preset", "cpu-mini", "--root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "run.source_root" in err and "cifar10-jpeg.zip" in err and "--root" in err


def test_a_run_that_failed_before_any_stage_takes_the_corrected_config(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KrrstError, match="run.source_root"):
        pipeline.run(tiny_config(**{"run.source_root": "missing.zip"}), out, preset="demo", device="cpu",
                     progress=False, log=lambda _: None)
    assert (out / "config.json").exists() and not any((out / name).exists() for name in pipeline.STAGE_DIRS)
    pipeline.prepare_run_dir(out, tiny_config(), "demo", force=False)  # the fixed config is taken without --force
    assert read_json(out / "config.json")["run"]["source_root"] == tiny_config().run.source_root
    (out / "teacher").mkdir()  # once a stage computed something, a changed config needs --force
    (out / "teacher" / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(KrrstError, match="run.source_root.*--force"):
        pipeline.prepare_run_dir(out, tiny_config(**{"run.source_root": "missing.zip"}), "demo", force=False)


def test_claims_of_older_versions_still_match(tmp_path):
    """Before claims named their parts they hashed the bare list of values; such folders resume."""
    identity = {"--distilled/--baseline": ["set.safetensors", 10, 1], "--set": {"pretrain": "x"}, "--widths": [8],
                "--image-size": 32, "--target": "imagefolder", "--max-per-class": None}
    claim = tmp_path / "eval" / "krr-st.fingerprint.json"
    claim.parent.mkdir(parents=True)
    # the on-disk form of those claims: sha256 of the JSON of [values], sorted keys, its first 16 hex digits
    old = hashlib.sha256(json.dumps([list(identity.values())], sort_keys=True).encode()).hexdigest()[:16]
    claim.write_text(json.dumps({"fingerprint": old}))
    (tmp_path / "eval" / "pretrained").mkdir()
    (tmp_path / "eval" / "pretrained" / "krr-st-convnet3-seed0.safetensors").write_bytes(b"")
    pipeline.claim_evaluation(tmp_path, "krr-st", identity)  # the same values: accepted
    with pytest.raises(KrrstError, match=r"another set or config \(differs in --widths\)"):
        pipeline.claim_evaluation(tmp_path, "krr-st", {**identity, "--widths": [16]})


def test_a_cached_network_without_rows_keeps_the_claim(tmp_path):
    """An evaluation interrupted after pre-training has a network of its config: another config is refused."""
    identity = {"--target": "imagefolder", "--widths": [8]}
    pipeline.claim_evaluation(tmp_path, "krr-st", identity)
    pretrained = tmp_path / "eval" / "pretrained"
    pretrained.mkdir()
    (pretrained / "krr-st-basis-convnet3-seed0.safetensors").write_bytes(b"")  # another method's network
    pipeline.claim_evaluation(tmp_path, "krr-st", {**identity, "--widths": [16]})
    (pretrained / "krr-st-convnet3-seed0.safetensors").write_bytes(b"")
    with pytest.raises(KrrstError, match=r"differs in --widths"):
        pipeline.claim_evaluation(tmp_path, "krr-st", identity)


def test_a_changed_config_is_refused_only_once_something_was_computed(tmp_path):
    first, second = tiny_config(), tiny_config(**{"distill.steps": "4"})

    def prepare(config):
        pipeline.prepare_run_dir(tmp_path, config, "demo", force=False)

    prepare(first)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "fingerprint.json").write_text("{}")
    prepare(second)  # a stage that wrote only its fingerprint computed nothing: the new config is taken
    prepare(first)
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(KrrstError, match=r"holds a run of another config \(differs in distill\.steps\)"):
        prepare(second)  # rows are results, even with the stage folders deleted
    (tmp_path / "results.csv").unlink()
    (tmp_path / "teacher" / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(KrrstError, match="holds a run of another config"):
        prepare(second)


@pytest.mark.parametrize("key", ["teacher.arch", "distill.arch", "mkdt.arch", "run.archs"])
def test_unknown_architectures_are_refused_before_any_stage(key):
    with pytest.raises(KrrstError, match=rf"^{key}: unknown model 'resnet81'; did you mean 'resnet18' or .*\? valid models: alexnet"):
        tiny_config(**{key: "resnet81"})


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    from krrst.infra.io import exclusive_lock

    out = tmp_path / "busy"
    with exclusive_lock(out):  # another open file description: as another process would hold it
        with pytest.raises(KrrstError, match=r"run directory .*busy is in use by another krrst process"):
            run_tiny(out)
    assert not (out / "config.json").exists(), "the refused run wrote nothing"


def test_widths_option_rejects_malformed_lists(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--baseline", "none", "--target", "cifar10", "--root", ".", "--out", "x", "--widths", "8,x"])
    assert "expected comma-separated positive integers, e.g. 32,64,128; got '8,x'" in capsys.readouterr().err


def test_set_help_examples_are_accepted_by_their_command():
    """Each command's --set example is a key that command takes (the teacher's once said distill.steps)."""
    import argparse

    from krrst.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    stages = {"teacher": ("teacher",), "distill": ("distill", "mkdt"), "evaluate": ("pretrain", "finetune", "linear"),
              "run": tuple(pipeline.STAGE_CONFIGS)}
    for command, allowed in stages.items():
        option = next(a for a in subparsers.choices[command]._actions if a.dest == "overrides")
        example = option.help.rsplit("--set ", 1)[1]
        stage, _, field = example.partition("=")[0].partition(".")
        assert stage in allowed, (command, example)
        assert field in {f.name for f in dataclasses.fields(pipeline.STAGE_CONFIGS[stage])}, (command, example)


def test_print_config_and_help(capsys):
    assert main(["run", "--preset", "demo", "--set", "distill.steps=7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["distill"]["steps"] == 7 and printed["preset"] == "demo"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for command in ("datasets", "models", "teacher", "distill", "evaluate", "report", "run", "demo"):
        assert command in help_text


def test_adding_a_method_and_a_seed_keeps_finished_work(tmp_path, monkeypatch):
    out = tmp_path / "grow"
    first = run_tiny(out, **{"run.methods": "krr-st,random,none"})
    assert not (out / "baselines" / "kmeans.safetensors").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("distillation ran again although its config did not change")

    monkeypatch.setattr(pipeline, "distill", must_not_run)
    grown = pipeline.run(tiny_config(**{"run.methods": "krr-st,random,kmeans,none", "run.seeds": "2"}), out,
                         preset="demo", force=True, device="cpu", progress=False, log=lambda _: None)
    assert (out / "baselines" / "kmeans.safetensors").exists(), "the new baseline is built"
    assert {row["method"] for row in grown} == {"krr-st", "random", "kmeans", "none"}
    assert {row["seed"] for row in grown} == {0, 1}
    kept = {(r["method"], r["protocol"], r["seed"]): r["accuracy"] for r in grown}
    assert all(kept[(r["method"], r["protocol"], r["seed"])] == r["accuracy"] for r in first), "earlier rows kept"


def test_inconsistent_image_sizes_are_refused_before_any_work():
    with pytest.raises(KrrstError, match="distill.image_size=64 differs from run.image_size=32"):
        tiny_config(**{"distill.image_size": "64"})


def test_cli_evaluate_appends_rows_and_refuses_another_set(finished_run, tmp_path, capsys):
    out, _ = finished_run
    common = ["--target", "imagefolder", "--root", str(pipeline.sample_path()), "--widths", "16,32,64",
              "--max-per-class", "5", "--seeds", "1", "--protocol", "linear", "--set", "pretrain.epochs=1",
              "--set", "linear.iterations=2", "--out", str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]
    distilled = out / "distill" / "distilled.safetensors"
    assert main(["evaluate", "--distilled", str(distilled), *common]) == 0
    rows = read_results(tmp_path / "eval")
    assert [(r["method"], r["protocol"], r["seed"]) for r in rows] == [("krr-st", "linear", 0)]
    assert (tmp_path / "eval" / "results.md").exists()
    assert main(["evaluate", "--distilled", str(distilled), *common]) == 0, "a re-run skips the finished row"
    assert len(read_results(tmp_path / "eval")) == 1
    other = tmp_path / "other.safetensors"
    changed = DistilledSet.load(distilled)
    changed.images = changed.images.flip(-1)
    changed.save(other)
    capsys.readouterr()
    before = (tmp_path / "eval" / "results.csv").read_bytes()
    assert main(["evaluate", "--distilled", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert f"the rows of method 'krr-st' come from {pipeline.set_provenance(distilled)}, these from " \
           f"{pipeline.set_provenance(other)}" in err
    assert (tmp_path / "eval" / "results.csv").read_bytes() == before


def test_cli_evaluate_typo_does_not_block_the_folder(finished_run, tmp_path, capsys):
    """A start that fails on a mistyped option leaves no claim a corrected command would trip over."""
    out, _ = finished_run
    distilled = str(out / "distill" / "distilled.safetensors")
    common = ["--root", str(pipeline.sample_path()), "--widths", "16,32,64", "--seeds", "1", "--protocol", "linear",
              "--set", "pretrain.epochs=1", "--set", "linear.iterations=2", "--out", str(tmp_path / "eval"),
              "--no-progress", "--device", "cpu", "--distilled", distilled]
    assert main(["evaluate", "--target", "imagefoldr", "--max-per-class", "5", *common]) == 2
    assert "unknown dataset 'imagefoldr'" in capsys.readouterr().err
    # a claim left by a start that failed before any row or network (an older version claimed first)
    pipeline.claim_evaluation(tmp_path / "eval", "krr-st", {"--target": "imagefoldr"})
    assert main(["evaluate", "--target", "imagefolder", "--max-per-class", "4", *common]) == 0
    assert len(read_results(tmp_path / "eval")) == 1
    capsys.readouterr()
    assert main(["evaluate", "--target", "imagefolder", "--max-per-class", "5", *common]) == 2, "rows are protected"
    assert "differs in --max-per-class" in capsys.readouterr().err


def test_a_config_field_added_at_its_default_keeps_old_fingerprints():
    """Run directories of an older version stay finished when a later version adds a config field."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Old:
        steps: int = 100
        lr: float = 0.1
        log_every: int = 10

    @dataclasses.dataclass(frozen=True)
    class New(Old):
        compile: bool = False  # added later, default = the old behaviour

    def fingerprint(config):
        return pipeline._fingerprint(pipeline._without(config, ("log_every",)))

    assert fingerprint(Old(steps=5)) == fingerprint(New(steps=5))
    assert fingerprint(Old(steps=5, log_every=1)) == fingerprint(Old(steps=5)), "logging cadence is left out"
    assert fingerprint(New(steps=5, compile=True)) != fingerprint(Old(steps=5)), "a non-default value counts"
    assert fingerprint(Old(steps=5)) != fingerprint(Old(steps=6))


# A tiny MKDT: 2 experts of 2 epochs, 2 outer steps of 2 unrolled steps.
TINY_MKDT = {"mkdt.widths": "8,8,8", "mkdt.experts": "2", "mkdt.expert_epochs": "2", "mkdt.syn_steps": "2",
             "mkdt.expert_epochs_matched": "1", "mkdt.max_start_epoch": "1", "mkdt.steps": "2",
             "mkdt.num_images": "10", "mkdt.batch_syn": "10", "mkdt.image_lr": "10"}


def test_mkdt_and_the_high_loss_subset_run_through_the_pipeline(finished_run, tmp_path):
    out, _ = finished_run
    teacher = str(out / "teacher" / "teacher.safetensors")
    rows = run_tiny(tmp_path / "run", **TINY_MKDT, **{"run.methods": "mkdt,high-loss", "run.protocols": "linear@50%",
                                                      "run.teacher_path": teacher})
    assert {row["method"] for row in rows} == {"mkdt", "high-loss"}
    mkdt_set = DistilledSet.load(tmp_path / "run" / "mkdt" / "distilled.safetensors")
    assert mkdt_set.method == "mkdt" and len(mkdt_set) == 10
    high_loss = DistilledSet.load(tmp_path / "run" / "baselines" / "high-loss.safetensors")
    assert high_loss.method == "high-loss" and len(high_loss) == 10


def test_protocol_suites_set_the_published_protocols_and_an_explicit_set_wins():
    mkdt = pipeline.resolve_config("demo", {}, protocol="mkdt")
    assert mkdt.run.protocols == ("linear@1%", "linear@5%", "linear@10%", "linear@50%")
    assert mkdt.pretrain.epochs == 20 and mkdt.linear.solver == "lbfgs"
    krrst = pipeline.resolve_config("demo", {"pretrain.epochs": "7"}, protocol="krrst")
    assert krrst.run.protocols == ("finetune",) and krrst.pretrain.epochs == 7
    with pytest.raises(KrrstError, match="unknown --protocol 'mtt'; valid protocols: krrst, mkdt"):
        pipeline.resolve_config("demo", {}, protocol="mtt")


def test_cli_distill_runs_mkdt_and_evaluate_expands_a_protocol_suite(finished_run, tmp_path, monkeypatch):
    out, _ = finished_run
    sample = str(pipeline.sample_path())
    mkdt_args = [f"--set={key}={value}" for key, value in TINY_MKDT.items() if key != "mkdt.num_images"]
    assert main(["distill", "--method", "mkdt", "--source", "imagefolder", "--root", sample, "--max-per-class", "4",
                 "--teacher", str(out / "teacher" / "teacher.safetensors"), "--out", str(tmp_path / "mkdt"),
                 "--m", "6", "--heldout", "0", "--init", "random", "--no-progress", "--device", "cpu",
                 "--set", "mkdt.batch_syn=6", *mkdt_args]) == 0
    distilled = DistilledSet.load(tmp_path / "mkdt" / "distilled.safetensors")
    assert distilled.method == "mkdt" and len(distilled) == 6 and distilled.config["init"] == "random"

    seen = {}

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(pipeline, "evaluate_methods", recording)
    assert main(["evaluate", "--distilled", str(tmp_path / "mkdt" / "distilled.safetensors"), "--target",
                 "imagefolder", "--root", sample, "--max-per-class", "2", "--protocol", "mkdt", "--out",
                 str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]) == 0
    assert seen["protocols"] == ["linear@1%", "linear@5%", "linear@10%", "linear@50%"]
    assert seen["pretrain_config"].epochs == 20 and seen["linear_config"].solver == "lbfgs"


def test_a_run_directory_of_an_older_version_is_not_refused_for_fields_added_since(finished_run, tmp_path):
    """config.json written before a field existed: the field counts as its default, not as a change."""
    import shutil

    out, _ = finished_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["distill"]["compile_mode"], saved["pretrain"]["channels_last"]
    saved.pop("mkdt")
    (old / "config.json").write_text(json.dumps(saved))
    pipeline.prepare_run_dir(old, tiny_config(), "demo", force=False)  # no KrrstError
    with pytest.raises(KrrstError, match="differs in distill.steps"):
        pipeline.prepare_run_dir(old, tiny_config(**{"distill.steps": "4"}), "demo", force=False)


def test_parameterization_label_names_the_kind_and_the_fixed_views():
    from krrst.pipeline import _parameterization_label

    images, targets = torch.zeros(8, 3, 4, 4), torch.zeros(8, 5)
    plain = DistilledSet(images=images, targets=targets, mean=(0, 0, 0), std=(1, 1, 1))
    assert _parameterization_label(plain) == "pixels"
    views = DistilledSet(images=images, targets=targets, mean=(0, 0, 0), std=(1, 1, 1),
                         config={"synthetic": {"kind": "basis", "views": ["identity", "rot90", "rot180", "rot270"]}})
    assert _parameterization_label(views) == "basis, 4 fixed views"


def checkpoint_files(out):
    """The resume-only files present in a run directory, as `stage/name`."""
    return sorted(f"{stage}/{name}" for stage, (_, names) in pipeline.STAGE_CHECKPOINTS.items() for name in names
                  if (out / stage / name).exists())


def fail_every_stage(monkeypatch):
    """Make every stage's work raise: a re-run that calls any of it fails."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("train_teacher", "distill", "mkdt_distill", "kmeans_coreset", "random_subset_of", "pretrain",
                 "evaluate_set"):
        monkeypatch.setattr(pipeline, name, must_not_run)  # the pipeline calls each stage through its own names


def test_a_finished_run_holds_no_checkpoints_and_a_rerun_skips_every_stage(finished_run, monkeypatch):
    out, rows = finished_run
    assert checkpoint_files(out) == [], "checkpoints of finished stages are removed"
    for stage in ("teacher", "distill"):
        final = pipeline.STAGE_CHECKPOINTS[stage][0]
        assert (out / stage / final).is_file() and (out / stage / "loss.csv").is_file(), "outputs are kept"
    fail_every_stage(monkeypatch)
    lines = []
    again = pipeline.run(tiny_config(), out, preset="demo", device="cpu", progress=False, log=lines.append)
    assert again == read_results(out) and sorted(map(str, again)) == sorted(map(str, rows)), "rows unchanged"
    assert f"{out} holds " in lines[-1], "the run ends with the folder's disk use"


def test_keep_checkpoints_keeps_them_and_flipping_it_reruns_nothing(tmp_path, monkeypatch):
    out = tmp_path / "kept"
    settings = {**TINY_MKDT, "run.methods": "krr-st,mkdt,none", "run.protocols": "linear@50%"}
    rows = run_tiny(out, **settings, **{"run.keep_checkpoints": "true"})
    everything = ["distill/checkpoint.safetensors", "mkdt/checkpoint.safetensors", "mkdt/trajectories.safetensors",
                  "teacher/checkpoint.safetensors"]
    assert checkpoint_files(out) == everything
    fail_every_stage(monkeypatch)
    lines = []
    again = pipeline.run(tiny_config(**settings, **{"run.note": "a note changes no stage"}), out, preset="demo",
                         device="cpu", progress=False, log=lines.append)
    assert sorted(map(str, again)) == sorted(map(str, rows)), "no --force needed, no stage re-run, rows unchanged"
    assert checkpoint_files(out) == [], "a finished run re-run without keep_checkpoints sheds them"
    assert "a note changes no stage" in (out / "report.html").read_text()
    assert sum("removed its checkpoints" in line for line in lines) == 3, lines
    for stage in ("teacher", "distill", "mkdt"):
        assert (out / stage / pipeline.STAGE_CHECKPOINTS[stage][0]).is_file()


def test_checkpoints_stay_until_the_final_output_exists(tmp_path):
    stage = tmp_path / "distill"
    stage.mkdir()
    for name in ("checkpoint.safetensors", "loss.csv", "other.safetensors"):
        (stage / name).write_bytes(b"x")
    pipeline._drop_checkpoints(stage, log=lambda _: None)
    assert (stage / "checkpoint.safetensors").exists(), "an unfinished stage resumes from it"
    (stage / "distilled.safetensors").write_bytes(b"x")
    pipeline._drop_checkpoints(stage, log=lambda _: None)
    assert sorted(path.name for path in stage.iterdir()) == ["distilled.safetensors", "loss.csv", "other.safetensors"]


def test_flipping_run_download_needs_no_force(tmp_path):
    """Whether a missing dataset may be fetched changes no result: a started run takes it without --force."""
    out = tmp_path / "run"
    pipeline.prepare_run_dir(out, tiny_config(), "demo", force=False)
    (out / "results.csv").write_text("started\n")
    pipeline.prepare_run_dir(out, tiny_config(**{"run.download": "true"}), "demo", force=False)
    with pytest.raises(KrrstError, match=r"differs in distill\.steps"):
        pipeline.prepare_run_dir(out, tiny_config(**{"distill.steps": "4"}), "demo", force=False)


# kd on the tiny run: two epochs of KD, one epoch of the target classifier (a narrow ConvNet, as in the demo preset).
TINY_KD = {"run.methods": "krr-st,random,none", "run.protocols": "kd", "kd.epochs": "2", "kd.batch_size": "8",
           "kd.teacher_epochs": "1", "kd.teacher_batch_size": "32"}


def test_kd_runs_for_krrst_random_and_none_and_trains_the_target_classifier_once(tmp_path, monkeypatch):
    import krrst.evaluate

    trained, distilled_through, students = [], [], {}
    train_kd_teacher, knowledge_distillation = pipeline.train_kd_teacher, krrst.evaluate.knowledge_distillation

    def counting_teacher(*args, **kwargs):
        trained.append(args[0].name)
        return train_kd_teacher(*args, **kwargs)

    def recording_kd(teacher, student, images, test, config, **kwargs):
        distilled_through.append((images.method if images is not None else None, kwargs["noise_images"]))
        students[(images.method if images is not None else "none", config.seed)] = copy.deepcopy(student.state_dict())
        return knowledge_distillation(teacher, student, images, test, config, **kwargs)

    monkeypatch.setattr(pipeline, "train_kd_teacher", counting_teacher)
    monkeypatch.setattr(krrst.evaluate, "knowledge_distillation", recording_kd)
    out = tmp_path / "run"
    rows = run_tiny(out, **TINY_KD, **{"run.seeds": "2"})
    assert sorted((r["method"], r["protocol"], r["seed"]) for r in rows) == [
        (method, "kd", seed) for method in ("krr-st", "none", "random") for seed in (0, 1)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert len(trained) == 1, "one target: its classifier is trained once for every method and seed"
    # each student learns from its own set's images only; none from Gaussian noise of the sets' size
    assert sorted(distilled_through, key=str) == sorted(
        [("krr-st", 10), ("krr-st", 10), ("random", 10), ("random", 10), (None, 10), (None, 10)], key=str)
    cached = list((out / "eval" / "kd-teacher").glob("*.safetensors"))
    assert len(cached) == 1
    # the student starts from the network pre-trained on its set; none's from a fresh one of that seed
    for seed in (0, 1):
        pretrained, _ = load_tensors(out / "eval" / "pretrained" / f"krr-st-convnet3-seed{seed}.safetensors")
        assert all(torch.equal(students[("krr-st", seed)][key], value) for key, value in pretrained.items())
        fresh = fresh_model("convnet3", None, seed, **pipeline.eval_overrides("convnet3", (32, 64, 128), 32))
        assert all(torch.equal(students[("none", seed)][key], value) for key, value in fresh.state_dict().items())
    # a third seed resumes: the cached classifier is reused, not trained again
    grown = pipeline.run(tiny_config(**TINY_KD, **{"run.seeds": "3"}), out, preset="demo", force=True, device="cpu",
                         progress=False, log=lambda _: None)
    assert len(trained) == 1 and len(grown) == 9


def test_kd_takes_no_label_fraction_and_a_teacher_file_is_one_targets():
    with pytest.raises(KrrstError, match="kd .knowledge distillation. uses no target labels, so it takes no label"):
        tiny_config(**{"run.protocols": "kd@10%"})
    with pytest.raises(KrrstError, match=r"kd.teacher_path \(--kd-teacher\) is the classifier of one target, but "
                                         r"run.targets names 2"):
        tiny_config(**{"run.protocols": "kd", "kd.teacher_path": "teacher.pt",
                       "run.targets": "imagefolder=@sample,cifar10"})


def test_adding_or_changing_kd_keeps_the_other_protocols_rows(tmp_path, monkeypatch):
    """The kd settings govern the kd rows only: adding kd, or changing its settings, re-runs kd alone."""
    import krrst.evaluate as evaluate_module

    out = tmp_path / "run"
    small_kd = {"run.methods": "krr-st,none", "kd.epochs": "1", "kd.teacher_epochs": "1", "kd.batch_size": "16"}

    def run(**extra):
        return pipeline.run(tiny_config(**{**small_kd, **extra}), out, preset="demo", force=True, device="cpu",
                            progress=False, log=lambda _: None)

    def accuracies(rows):
        return {(r["method"], r["protocol"], r["seed"]): r["accuracy"] for r in rows if r["protocol"] != "kd"}

    before = accuracies(run())
    with monkeypatch.context() as patch:  # a finished row recomputed would call the probe again
        patch.setattr(evaluate_module, "linear_probe", lambda *a, **k: pytest.fail("a finished row was recomputed"))
        with_kd = run(**{"run.protocols": "finetune,linear@50%,kd"})
    assert accuracies(with_kd) == before, "adding kd kept every other row"
    assert {r["method"] for r in with_kd if r["protocol"] == "kd"} == {"krr-st", "none"}

    calls = []
    real_kd = evaluate_module.knowledge_distillation
    monkeypatch.setattr(evaluate_module, "knowledge_distillation",
                        lambda *args, **kwargs: calls.append(1) or real_kd(*args, **kwargs))
    monkeypatch.setattr(evaluate_module, "linear_probe", lambda *a, **k: pytest.fail("a finished row was recomputed"))
    changed = run(**{"kd.epochs": "2", "run.protocols": "finetune,linear@50%,kd"})
    assert accuracies(changed) == before
    assert len(calls) == 2 and len([r for r in changed if r["protocol"] == "kd"]) == 2, "kd rows recomputed, once each"


def test_a_hugging_face_hub_name_reaches_the_reader_as_it_is(monkeypatch, tmp_path):
    """`--set run.source=hf --set run.source_root=user/dataset`: a hub name, not a folder under --root."""
    seen = []

    def recording(name, root, split, **kwargs):
        seen.append((name, root))
        raise KrrstError("stop here")

    monkeypatch.setattr(pipeline, "load_images", recording)
    config = tiny_config(**{"run.source": "hf", "run.source_root": "someone/photos"})
    with pytest.raises(KrrstError, match="stop here"):
        pipeline.load_source(config.run, tmp_path)
    assert seen == [("hf", "someone/photos")]
    with pytest.raises(KrrstError, match="does not exist"):  # other readers still want the folder
        pipeline.load_source(tiny_config(**{"run.source_root": "someone/photos"}).run, tmp_path)


def _changed_fields(config: "pipeline.PipelineConfig") -> dict[str, object]:
    """`stage.field -> value` for every field that differs from the defaults."""
    default = pipeline.PipelineConfig().to_dict()
    return {f"{stage}.{field}": value for stage, fields in config.to_dict().items()
            for field, value in fields.items() if value != default[stage][field]}


def test_the_authors_preset_sets_exactly_the_quirks_of_their_public_code():
    assert _changed_fields(pipeline.resolve_config("authors")) == {
        "teacher.arch": "resnet18_pad2",  # their teacher's stem convolution has padding 2
        "distill.pool_counter_reset": False,  # their pool's step counters never return to 0
        "finetune.batch_size": 128,  # their fine-tuning batch
    }
    assert _changed_fields(pipeline.resolve_config("cifar100")) == {}, "the default is the paper as written"
    # --set wins over the preset, as over every preset
    assert pipeline.resolve_config("authors", {"distill.pool_counter_reset": "true"}).distill.pool_counter_reset


def test_the_64px_presets_carry_the_public_codes_distillation_settings():
    convnet4 = {"distill.arch": "convnet4", "distill.widths": [64, 128, 256, 512], "distill.image_size": 64,
                "distill.image_lr": 1e-5, "distill.target_lr": 1e-5, "run.image_size": 64, "run.archs": ["convnet4"]}
    tiny = _changed_fields(pipeline.resolve_config("tinyimagenet"))
    assert {key: tiny[key] for key in convnet4} == convnet4 and tiny["distill.num_images"] == 2000
    imagenet = _changed_fields(pipeline.resolve_config("imagenet64"))
    assert {key: imagenet[key] for key in convnet4} == convnet4 and "distill.num_images" not in imagenet  # 1,000
    assert tiny["run.targets"] == ["tinyimagenet", "cifar10", "aircraft", "cars", "cub", "dogs", "flowers"]


def test_a_mistyped_preset_method_or_protocol_suite_gets_did_you_mean():
    with pytest.raises(KrrstError, match=r"^unknown preset 'autors'; did you mean 'authors'\? valid presets: cifar100"):
        pipeline.resolve_config("autors")
    with pytest.raises(KrrstError, match=r"^run.methods: unknown method 'kmean'; did you mean 'kmeans'\?"):
        pipeline.resolve_config("demo", {"run.methods": "krr-st,kmean"})
    with pytest.raises(KrrstError, match=r"^unknown --protocol 'mkd'; did you mean 'mkdt'\? valid protocols"):
        pipeline.resolve_config("demo", protocol="mkd")
