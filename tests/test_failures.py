"""Bad numbers and bad paths across stages: NaN/inf never becomes a result, every refusal is one line.

Tiny data made here (16x16 noise, ConvNets of width 4-8, a few steps); the CLI tests use the shipped sample.
"""

import numpy as np
import pytest
import torch

import krrst.losses as losses_module
import krrst.mkdt as mkdt_module
import krrst.teacher as teacher_module
from krrst import pipeline
from krrst.cli import main
from krrst.data import ImageSet
from krrst.distill import DistillConfig, distill
from krrst.distilled import DistilledSet
from krrst.evaluate import FinetuneConfig, LinearProbeConfig, PretrainConfig, finetune, linear_probe, pretrain
from krrst.formats import load_authors_set, load_label_set
from krrst.infra.errors import KrrstError
from krrst.infra.finite import LossWatch, describe_nonfinite
from krrst.infra.io import load_state
from krrst.mkdt import MKDTConfig, mkdt_distill
from krrst.models import create_model
from krrst.results import read_results
from krrst.teacher import TeacherConfig, load_teacher, save_teacher, train_teacher

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NARROW = {"widths": (4, 8, 8), "image_size": 16}
SAMPLE = str(pipeline.sample_path())


def noise_source(n=64, labelled=True):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.arange(n) % 4 if labelled else None, list("abcd"), MEAN, STD, "noise")


def toy_set(**changes):
    generator = torch.Generator().manual_seed(1)
    values = {"images": torch.randn(8, 3, 16, 16, generator=generator),
              "targets": torch.randn(8, 6, generator=generator), "mean": MEAN, "std": STD, "method": "toy"}
    return DistilledSet(**{**values, **changes})


def nan_teacher():
    teacher = create_model("convnet3", **NARROW)
    with torch.no_grad():
        next(teacher.parameters())[0] = float("nan")
    return teacher


def nan_after(function, calls_before):
    """`function` whose result is multiplied by NaN from call `calls_before + 1` on: a loss that diverges mid-run."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        result = function(*args, **kwargs)
        return result * float("nan") if len(calls) > calls_before else result

    return wrapped


def one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"krrst {command}: error: "), err
    return err[0]


# --------------------------------------------------------------------------- the shared helpers


def test_nonfinite_counts_are_named_and_the_watch_keeps_the_first_bad_step():
    values = torch.zeros(4, 1024)
    values[:3] = float("nan")
    values[3, :2] = float("-inf")
    assert describe_nonfinite(values) == "3,072 NaN and 2 inf values"
    assert describe_nonfinite(torch.ones(3)) is None and describe_nonfinite(torch.arange(3)) is None
    watch = LossWatch("toy", "the lr", "cpu")
    for step, loss in enumerate((1.0, 2.0, float("inf"), float("nan")), 1):
        watch.update(torch.tensor(loss), step)
    assert watch.first() == (3, float("inf"))
    with pytest.raises(KrrstError, match=r"^toy diverged: the loss was inf at step 3; likely cause: the lr;"):
        watch.check()


# --------------------------------------------------------------------------- sets


@pytest.mark.parametrize("field, value, found", [("images", float("nan"), "3,072 NaN values in images"),
                                                 ("targets", float("inf"), "48 inf values in targets")])
def test_a_set_holding_nan_or_inf_is_refused_at_load(tmp_path, field, value, found):
    broken = toy_set()
    getattr(broken, field).fill_(value) if field == "targets" else broken.images[:4].fill_(value)  # 4 x 768
    path = tmp_path / "broken.safetensors"
    broken.save(path)
    with pytest.raises(KrrstError, match=f"^distilled set {path}: {found}$"):
        DistilledSet.load(path)


def test_other_methods_sets_and_the_authors_files_with_nan_are_refused(tmp_path):
    images = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    images[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "dsa.npz", images=images, labels=np.arange(4))
    with pytest.raises(KrrstError, match=r"dsa.npz: 1 NaN value in images$"):
        load_label_set(tmp_path / "dsa.npz", MEAN, STD)
    torch.save(torch.rand(4, 3, 8, 8), tmp_path / "x_syn.pt")
    torch.save(torch.full((4, 5), float("inf")), tmp_path / "y_syn.pt")
    with pytest.raises(KrrstError, match=r"synthetic targets file .*y_syn.pt: 20 inf values in targets$"):
        load_authors_set(tmp_path / "x_syn.pt", tmp_path / "y_syn.pt", MEAN, STD)


def test_cli_evaluate_of_a_nan_set_is_one_line_and_leaves_the_results_untouched(tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--target", "imagefolder", "--root", SAMPLE, "--widths", "4,8,8", "--max-per-class", "3", "--seeds",
              "1", "--protocol", "linear", "--set", "pretrain.epochs=1", "--set", "linear.iterations=2",
              "--out", str(out), "--no-progress", "--device", "cpu"]
    good = toy_set(images=torch.randn(8, 3, 32, 32), method="toy")
    good.save(tmp_path / "good.safetensors")
    assert main(["evaluate", "--distilled", str(tmp_path / "good.safetensors"), *common]) == 0
    before = (out / "results.csv").read_bytes()
    broken = toy_set(images=torch.full((8, 3, 32, 32), float("nan")), method="broken")
    broken.save(tmp_path / "broken.safetensors")
    capsys.readouterr()
    assert main(["evaluate", "--distilled", str(tmp_path / "broken.safetensors"), *common]) == 2
    assert one_error_line(capsys, "evaluate").endswith("broken.safetensors: 24,576 NaN values in images")
    assert (out / "results.csv").read_bytes() == before


def test_cli_evaluate_refuses_another_set_under_the_same_method_name_even_with_the_same_path_size_and_mtime(
        tmp_path, capsys):
    import hashlib
    import os

    out, path = tmp_path / "eval", tmp_path / "set.safetensors"
    common = ["--target", "imagefolder", "--root", SAMPLE, "--widths", "4,8,8", "--max-per-class", "3", "--seeds",
              "1", "--protocol", "linear", "--set", "pretrain.epochs=1", "--set", "linear.iterations=2",
              "--out", str(out), "--no-progress", "--device", "cpu"]
    toy_set(images=torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))).save(path)
    first = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert main(["evaluate", "--distilled", str(path), *common]) == 0
    assert [row["provenance"] for row in read_results(out)] == [first]
    before, stat = (out / "results.csv").read_bytes(), path.stat()
    # another set of the same shapes, written over the first one, its modification time put back
    toy_set(images=torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    second = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    capsys.readouterr()
    (tmp_path / "copy.safetensors").write_bytes(path.read_bytes())
    for candidate in (path, tmp_path / "copy.safetensors"):  # the same path, size and mtime; then another path
        assert main(["evaluate", "--distilled", str(candidate), *common]) == 2
        line = one_error_line(capsys, "evaluate")
        assert f"{out / 'results.csv'}: the rows of method 'toy' come from {first}, these from {second}" in line
        assert (out / "results.csv").read_bytes() == before


@pytest.mark.parametrize("setting", ["linear.lr=1e39", "distill.image_lr=nan"])
def test_a_config_number_that_is_not_finite_or_beyond_float32_is_one_line(tmp_path, capsys, setting):
    assert main(["run", "--preset", "demo", "--set", setting, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    field, value = setting.split("=")
    assert f"{field}='{value}' is not valid; expected a finite number within float32" in one_error_line(capsys, "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- teachers


def test_a_teacher_file_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_teacher(path, nan_teacher(), MEAN, STD)
    with pytest.raises(KrrstError, match=r"teacher file .*: 27 NaN values in its weights \(blocks\.0\.0\.weight\); its features would be NaN$"):
        load_teacher(path)


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_distilling_from_a_nan_teacher_names_the_teacher_not_the_kernel(init):
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=2, batch_size=16, pool_size=2,
                           pool_steps=1, validate_every=0, init=init)
    with pytest.raises(KrrstError, match=r"the teacher \(convnet3\)'s features of .* hold .*NaN.*its weights hold") as error:
        distill(noise_source(labelled=False), nan_teacher(), config, progress=False)
    assert "positive definite" not in str(error.value) and "ridge" not in str(error.value)


def test_mkdt_and_the_baselines_refuse_a_nan_teacher():
    from krrst.baselines import kmeans_coreset, random_subset

    config = MKDTConfig(num_images=4, image_size=16, widths=(4, 8, 8), experts=1, expert_epochs=1, steps=1,
                        max_start_epoch=1, expert_epochs_matched=1)
    for build in (lambda: mkdt_distill(noise_source(), nan_teacher(), config, progress=False),
                  lambda: random_subset(noise_source(), 4, nan_teacher()),
                  lambda: kmeans_coreset(noise_source(), 4, nan_teacher())):
        with pytest.raises(KrrstError, match=r"the teacher \(convnet3\)'s features of .* hold .*NaN"):
            build()


def test_distilling_with_a_teacher_without_n_x_d_features_is_refused_in_one_line():
    class SpatialTeacher(torch.nn.Module):  # a feature map, not a vector per image
        def forward(self, images):
            return images[:, :, :2, :2]

    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=1, batch_size=16, pool_size=2,
                           pool_steps=1, validate_every=0)
    with pytest.raises(KrrstError, match=r"^teacher must output N x d features, got shape \(8, 3, 2, 2\)$"):
        distill(noise_source(labelled=False), SpatialTeacher(), config, progress=False)


def test_cli_distill_with_a_nan_teacher_is_one_line(tmp_path, capsys):
    path = tmp_path / "teacher.safetensors"
    save_teacher(path, nan_teacher(), MEAN, STD)
    assert main(["distill", "--teacher", str(path), "--source", "imagefolder", "--root", SAMPLE, "--max-per-class",
                 "4", "--out", str(tmp_path / "d"), "--m", "4", "--heldout", "0", "--steps", "2",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "27 NaN values in its weights" in one_error_line(capsys, "distill")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- loops that diverge mid-run


def test_teacher_training_that_diverges_stops_at_the_log_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = TeacherConfig(arch="convnet3", convnet_widths=(4, 8, 8), projector_dims=(16, 16), steps=6, batch_size=16,
                           optimizer="adamw", lr=1e-3, warmup_epochs=0, log_every=2, checkpoint_every=2)
    train_teacher(noise_source(), config, out_dir=tmp_path, stop_at_step=2, progress=False)
    checkpoint = (tmp_path / "checkpoint.safetensors").read_bytes()
    monkeypatch.setattr(teacher_module, "barlow_twins_loss", nan_after(teacher_module.barlow_twins_loss, 0))
    with pytest.raises(KrrstError, match=r"^teacher training \(barlow_twins\) diverged: the loss was nan at step 3; "
                                         r"likely cause: teacher.lr too high"):
        train_teacher(noise_source(), config, out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == checkpoint
    assert load_state(tmp_path / "checkpoint.safetensors")["step"] == 2
    assert not (tmp_path / "teacher.safetensors").exists()


def test_distillation_that_diverges_stops_at_the_log_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=6, batch_size=16, pool_size=2,
                           pool_steps=3, log_every=2, checkpoint_every=2, validate_every=0)
    teacher = create_model("convnet3", **NARROW)
    distill(noise_source(labelled=False), teacher, config, out_dir=tmp_path, stop_at_step=2, progress=False)
    checkpoint = (tmp_path / "checkpoint.safetensors").read_bytes()
    real = losses_module.krr_predict_with_info

    def nan_predictions(*args):
        predictions, info = real(*args)
        return predictions * float("nan"), info

    monkeypatch.setattr(losses_module, "krr_predict_with_info", nan_predictions)
    with pytest.raises(KrrstError, match=r"^distillation diverged: the loss was nan at step 3; likely cause: "
                                         r"distill.image_lr"):
        distill(noise_source(labelled=False), teacher, config, out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == checkpoint
    assert not (tmp_path / "distilled.safetensors").exists()


def test_an_absurd_distillation_lr_is_named_not_taken_for_a_bad_kernel():
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=6, batch_size=16, pool_size=2,
                           pool_steps=3, log_every=3, validate_every=0, pool_lr=1e12)
    with pytest.raises(KrrstError, match=r"distillation diverged: the pool model picked at step 1 held NaN or inf "
                                         r"weights.*distill.pool_lr"):
        distill(noise_source(labelled=False), create_model("convnet3", **NARROW), config, progress=False)


def test_mkdt_matching_that_diverges_stops_at_the_log_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = MKDTConfig(num_images=4, image_size=16, widths=(4, 8, 8), experts=1, expert_epochs=2, syn_steps=2,
                        expert_epochs_matched=1, max_start_epoch=1, batch_syn=4, steps=6, log_every=2,
                        checkpoint_every=2, init="random")
    teacher = create_model("convnet3", **NARROW)
    mkdt_distill(noise_source(), teacher, config, out_dir=tmp_path, stop_at_step=2, progress=False)
    checkpoint = (tmp_path / "checkpoint.safetensors").read_bytes()
    monkeypatch.setattr(mkdt_module, "matching_loss", nan_after(mkdt_module.matching_loss, 0))
    with pytest.raises(KrrstError, match=r"^mkdt matching diverged: the loss was nan at step 3; likely cause: "
                                         r"mkdt.image_lr"):
        mkdt_distill(noise_source(), teacher, config, out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == checkpoint
    assert not (tmp_path / "distilled.safetensors").exists()


def test_mkdt_experts_that_diverge_are_named():
    config = MKDTConfig(num_images=4, image_size=16, widths=(4, 8, 8), experts=1, expert_epochs=1, steps=1,
                        max_start_epoch=1, expert_epochs_matched=1, expert_lr=1e12, expert_batch_size=16,
                        init="random")
    with pytest.raises(KrrstError, match=r"^mkdt expert training diverged: .* mkdt.expert_lr too high"):
        mkdt_distill(noise_source(), create_model("convnet3", **NARROW), config, progress=False)


def test_pretraining_finetuning_and_the_linear_probe_stop_on_an_absurd_lr():
    source = noise_source()
    with pytest.raises(KrrstError, match=r"^pre-training convnet3 on toy diverged: the loss was .* at epoch \d+; "
                                         r"likely cause: pretrain.lr too high"):
        pretrain(toy_set(), "convnet3", PretrainConfig(epochs=5, batch_size=8, lr=1e12), progress=False, **NARROW)
    with pytest.raises(KrrstError, match=r"^fine-tuning on noise diverged: .*finetune.lr too high"):
        finetune(create_model("convnet3", **NARROW), source, source, FinetuneConfig(iterations=5, batch_size=16, lr=1e12),
                 progress=False)
    with pytest.raises(KrrstError, match=r"^the linear probe \(sgd\) diverged: .*linear.lr too high"):
        linear_probe(create_model("convnet3", **NARROW), source, source,
                     LinearProbeConfig(iterations=5, batch_size=16, lr=3e38), progress=False)


def test_cli_evaluate_that_diverges_writes_no_row_and_no_network(tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--target", "imagefolder", "--root", SAMPLE, "--widths", "4,8,8", "--max-per-class", "3", "--seeds",
              "1", "--set", "pretrain.epochs=2", "--set", "finetune.iterations=2", "--out", str(out),
              "--no-progress", "--device", "cpu", "--distilled", str(tmp_path / "set.safetensors")]
    toy_set(images=torch.randn(8, 3, 32, 32)).save(tmp_path / "set.safetensors")
    assert main(["evaluate", *common]) == 0
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()
    networks = sorted(path.name for path in (out / "eval" / "pretrained").iterdir())
    capsys.readouterr()
    # other sets (method names) in the same folder: a diverged one adds no row and caches no network
    for method, setting, stage in (("lr-finetune", "finetune.lr=1e12", "fine-tuning on cifar10-sample"),
                                   ("lr-pretrain", "pretrain.lr=1e12", "pre-training convnet3 on lr-pretrain")):
        toy_set(images=torch.randn(8, 3, 32, 32), method=method).save(tmp_path / "set.safetensors")
        assert main(["evaluate", *common, "--set", setting, "--set", "finetune.iterations=6"]) == 2
        assert f"{stage} diverged" in one_error_line(capsys, "evaluate")
        assert (out / "results.csv").read_bytes() == before
    assert sorted(path.name for path in (out / "eval" / "pretrained").iterdir()) == sorted(networks + ["lr-finetune-convnet3-seed0.safetensors"])


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("command", [
    ["evaluate", "--baseline", "none", "--target", "imagefolder", "--root", SAMPLE],
    ["run", "--preset", "demo"],
    ["distill", "--teacher", "t.safetensors", "--source", "imagefolder", "--root", SAMPLE],
    ["teacher", "--source", "imagefolder", "--root", SAMPLE],
])
def test_out_naming_a_file_or_a_path_inside_one_is_one_line(tmp_path, capsys, command):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for out, found in ((existing, "is an existing file, not a folder"),
                       (existing / "run", f"lies inside {existing}, which is a file")):
        assert main([*command, "--out", str(out), "--device", "cpu"]) == 2
        assert f"--out {out} {found}" in one_error_line(capsys, command[0])
    assert existing.read_text() == "keep me"


def test_an_unwritable_out_and_a_report_file_that_is_a_folder_are_refused(tmp_path):
    from krrst.pipeline import check_output_paths

    (tmp_path / "run" / "report.html").mkdir(parents=True)
    with pytest.raises(KrrstError, match=r"report.html is a folder"):
        check_output_paths(tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):  # root may write anywhere
            with pytest.raises(KrrstError, match=rf"^--out {locked}/new: the folder {locked} is not writable"):
                check_output_paths(locked / "new")
    finally:
        locked.chmod(0o700)
