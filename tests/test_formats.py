"""Other projects' files: teachers from torchvision, timm, solo-learn, lightly and TorchScript (and their own
preprocessing), other methods' label sets, the authors' KRR-ST set."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

from krrst.cli import main
from krrst.data import ImageSet
from krrst.distill import DistillConfig, distill
from krrst.formats import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessedTeacher,
    TeacherInput,
    fit_to_source,
    load_authors_set,
    load_label_set,
)
from krrst.infra.errors import KrrstError
from krrst.models import create_model
from krrst.teacher import TEACHER_FILE, load_teacher, teacher_features, teacher_identity

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# the label sets' statistics: 0.5 and 0.25 make the expected normalisation plain
LABEL_MEAN, LABEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _resnet(name="resnet18", seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    for module in model.modules():  # non-trivial running statistics, as a trained network has
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _penultimate(model, images):
    """The reference: the library model's pooled features before its classifier, in float64."""
    model = copy.deepcopy(model).double()
    model.fc = nn.Identity()
    with torch.no_grad():
        return model(images.double())


def _images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _features(teacher, images):
    with torch.no_grad():
        return teacher.double()(images.double())


# --------------------------------------------------------------------------- architectures and files


def test_a_torchvision_resnet18_state_dict_gives_its_pooled_penultimate_features(tmp_path):
    model = _resnet()
    torch.save(model.state_dict(), tmp_path / "r18.pt")  # a 7x7 stem and its fc, as torchvision writes it
    teacher = load_teacher(tmp_path / "r18.pt", arch="torchvision:resnet18")
    assert teacher.feature_dim == 512 and teacher.teacher_input == TeacherInput(224, IMAGENET_MEAN, IMAGENET_STD)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = _images()
    torch.testing.assert_close(_features(teacher, images), _penultimate(model, images), rtol=1e-12, atol=1e-12)


def test_a_torchvision_resnet50_from_safetensors(tmp_path):
    model = _resnet("resnet50")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "r50.safetensors")
    teacher = load_teacher(tmp_path / "r50.safetensors", arch="torchvision:resnet50")
    assert teacher.feature_dim == 2048
    images = _images(1)
    torch.testing.assert_close(_features(teacher, images), _penultimate(model, images), rtol=1e-12, atol=1e-12)


def test_a_timm_model_by_name_with_its_own_input_configuration(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'krrst[timm]')")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(model.state_dict(), tmp_path / "timm-r18.pth")
    teacher = load_teacher(tmp_path / "timm-r18.pth", arch="timm:resnet18")
    config = model.pretrained_cfg
    assert teacher.teacher_input == TeacherInput(config["input_size"][-1], tuple(config["mean"]), tuple(config["std"]))
    images = _images()
    with torch.no_grad():
        expected = copy.deepcopy(model).double().forward_head(model.double().forward_features(images.double()),
                                                               pre_logits=True)
    torch.testing.assert_close(_features(teacher, images), expected, rtol=1e-12, atol=1e-12)


class _OmegaConfLike:
    """Stands for the config objects Lightning checkpoints pickle (solo-learn stores an OmegaConf DictConfig)."""

    def __init__(self, marker):
        self.marker = marker


class _Payload:
    """A pickled object whose unpickling would run code: krrst must never run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_solo_learn_checkpoint_keeps_the_backbone_and_never_runs_pickled_code(tmp_path):
    model = _resnet()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    state.update({"projector.0.weight": torch.randn(2048, 512), "classifier.weight": torch.randn(10, 512),
                  "momentum_backbone.conv1.weight": torch.randn(64, 3, 7, 7)})
    pwned = tmp_path / "pwned"
    torch.save({"epoch": 399, "state_dict": state, "hyper_parameters": {"cfg": _OmegaConfLike(1)},
                "callbacks": {"payload": _Payload(str(pwned))}}, tmp_path / "barlow.ckpt")
    teacher = load_teacher(tmp_path / "barlow.ckpt", arch="torchvision:resnet18")
    assert not pwned.exists(), "the checkpoint's pickled code ran"
    images = _images()
    torch.testing.assert_close(_features(teacher, images), _penultimate(model, images), rtol=1e-12, atol=1e-12)


def test_a_lightly_checkpoint_with_a_sequential_backbone(tmp_path):
    model = _resnet()
    backbone = nn.Sequential(*list(model.children())[:-1])  # lightly's recipe: the ResNet without its fc
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["projection_head.layers.0.weight"] = torch.randn(128, 512)
    torch.save({"state_dict": state}, tmp_path / "simclr.ckpt")
    teacher = load_teacher(tmp_path / "simclr.ckpt", arch="torchvision:resnet18")
    images = _images()
    torch.testing.assert_close(_features(teacher, images), _penultimate(model, images), rtol=1e-12, atol=1e-12)


def test_a_torchscript_teacher_is_taken_as_it_is(tmp_path):
    model = _resnet()
    model.fc = nn.Identity()
    torch.jit.trace(model, _images(1)).save(str(tmp_path / "teacher.ts"))
    teacher = load_teacher(tmp_path / "teacher.ts")
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), model(images), rtol=0, atol=0)
    assert getattr(teacher, "teacher_input", None) is None  # fed the source's images, unless told its input
    sized = load_teacher(tmp_path / "teacher.ts", input_size=96)
    assert sized.teacher_input == TeacherInput(96, IMAGENET_MEAN, IMAGENET_STD)


def test_foreign_teacher_mistakes_are_one_line(tmp_path):
    cifar_stem = _resnet()
    cifar_stem.conv1 = nn.Conv2d(3, 64, 3, 1, 2, bias=False)  # solo-learn's CIFAR ResNet
    torch.save(cifar_stem.state_dict(), tmp_path / "cifar.pt")
    with pytest.raises(KrrstError, match=r"'conv1.weight' has shape \(64, 3, 3, 3\).*use --teacher-arch resnet18_pad2"):
        load_teacher(tmp_path / "cifar.pt", arch="torchvision:resnet18")
    torch.save({"layer9.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(KrrstError, match=r"other.pt does not fit torchvision:resnet18: 'conv1.weight' is missing"):
        load_teacher(tmp_path / "other.pt", arch="torchvision:resnet18")
    with pytest.raises(KrrstError, match="torchvision:resnet51 is not a torchvision classification model"):
        load_teacher(tmp_path / "other.pt", arch="torchvision:resnet51")
    with pytest.raises(KrrstError, match="teacher file not found"):
        load_teacher(tmp_path / "missing.pt", arch="torchvision:resnet18")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(KrrstError, match="junk.ckpt is not a PyTorch checkpoint"):
        load_teacher(tmp_path / "junk.ckpt", arch="torchvision:resnet18")
    with pytest.raises(KrrstError, match="needs --teacher-arch torchvision:NAME or timm:NAME"):
        load_teacher(None)


# --------------------------------------------------------------------------- the teacher's own preprocessing


def test_the_wrapper_feeds_the_teacher_its_size_and_statistics():
    backbone = _resnet()
    backbone.fc = nn.Identity()
    backbone.teacher_input = TeacherInput(48, IMAGENET_MEAN, IMAGENET_STD)
    teacher = fit_to_source(backbone, MEAN, STD, 32)
    assert isinstance(teacher, PreprocessedTeacher)
    assert fit_to_source(teacher, MEAN, STD, 32) is teacher, "already fitted to this source"
    images = _images(3, 32)  # source-normalised, source size
    # the wrapper keeps its statistics as float32 buffers: the reference takes the same float32 values
    mean, std = (torch.tensor(v).double().view(1, 3, 1, 1) for v in (MEAN, STD))
    unit = images.double() * std + mean
    resized = F.interpolate(unit, size=(48, 48), mode="bilinear", align_corners=False)
    t_mean, t_std = (torch.tensor(v).double().view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        expected = copy.deepcopy(backbone).double()((resized - t_mean) / t_std)
        torch.testing.assert_close(copy.deepcopy(teacher).double()(images.double()), expected, rtol=1e-12, atol=1e-12)
    other = fit_to_source(teacher, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32)
    assert other is not teacher and other.backbone is backbone, "another source: re-wrapped, not wrapped twice"


def test_a_krrst_teacher_built_for_another_size_is_refused():
    teacher = create_model("convnet3", widths=(4, 8, 8), image_size=32)
    assert fit_to_source(teacher, MEAN, STD, 32) is teacher  # krrst teachers take the source's images as they are
    with pytest.raises(KrrstError, match=r"takes 32x32 images but the source's are 64x64; load the source with "
                                         r"--image-size 32"):
        fit_to_source(teacher, MEAN, STD, 64)


def _noise_source(n=48, size=16):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(images, None, [], MEAN, STD, "noise")


def _small_library_teacher(input_size=24):
    backbone = _resnet()
    backbone.fc = nn.Identity()
    backbone.spec = {"arch": "torchvision:resnet18", "input_size": input_size}
    backbone.feature_dim = 512
    backbone.teacher_input = TeacherInput(input_size, IMAGENET_MEAN, IMAGENET_STD)
    return backbone.requires_grad_(False)


def test_distillation_and_baselines_give_the_library_teacher_its_preprocessing(monkeypatch, tmp_path):
    source, teacher = _noise_source(), _small_library_teacher()
    seen = []
    teacher.conv1.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    config = DistillConfig(num_images=4, image_size=16, widths=(4, 8, 8), steps=2, batch_size=8, pool_size=2,
                           pool_steps=2, validate_every=0, teacher_cache_views=2)
    result = distill(source, teacher, config, out_dir=tmp_path / "d", progress=False)
    assert result.images.shape[-1] == 16 and result.targets.shape[1] == 512, "set at the source's size, 512-d targets"
    assert seen and set(seen) == {(24, 24)}, "the teacher saw its own input size, the cache included"
    features = teacher_features(teacher, source.images[:4], MEAN, STD)
    assert features.shape == (4, 512)

    # the preprocessing is part of the teacher's identity: resuming with another input size is refused
    other = _small_library_teacher(input_size=32)
    with pytest.raises(KrrstError, match="another teacher"):
        distill(source, other, config, out_dir=tmp_path / "d", resume=True, progress=False)
    assert teacher_identity(fit_to_source(teacher, MEAN, STD, 16)) != teacher_identity(fit_to_source(other, MEAN, STD, 16))


def test_cli_imports_a_torchvision_teacher_and_distils_with_it(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(24):  # loose photographs of assorted sizes, no classes
        pixels = torch.randint(0, 256, (20 + index, 24, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(photos / f"img_{index:03d}.jpg")
    torch.save(_resnet().state_dict(), tmp_path / "r18.pt")
    data = ["--source", "folder", "--root", str(photos), "--image-size", "16"]
    assert main(["teacher", *data, "--teacher", str(tmp_path / "r18.pt"), "--teacher-arch", "torchvision:resnet18",
                 "--teacher-input-size", "32", "--out", str(tmp_path / "t"), "--device", "cpu", "--no-progress"]) == 0
    imported = load_teacher(tmp_path / "t" / TEACHER_FILE)
    assert imported.spec["arch"] == "torchvision:resnet18" and imported.teacher_input.size == 32
    direct = load_teacher(tmp_path / "r18.pt", arch="torchvision:resnet18", input_size=32)
    images = _images(2, 16)
    torch.testing.assert_close(_features(fit_to_source(imported, MEAN, STD, 16), images),
                               _features(fit_to_source(direct, MEAN, STD, 16), images), rtol=0, atol=0)
    assert main(["distill", *data, "--teacher", str(tmp_path / "t" / TEACHER_FILE), "--out", str(tmp_path / "d"),
                 "--m", "4", "--heldout", "0", "--steps", "2", "--device", "cpu", "--no-progress",
                 "--set", "distill.widths=4,8,8", "--set", "distill.batch_size=8", "--set", "distill.pool_size=2",
                 "--set", "distill.validate_every=0"]) == 0
    assert (tmp_path / "d" / "distilled.safetensors").is_file()


def test_pretrained_weights_without_a_network_are_one_line(monkeypatch):
    import urllib.error

    real = torchvision.models.get_model

    def offline(name, weights=None, **kwargs):
        if weights is not None:
            raise urllib.error.URLError("Name or service not known")
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(KrrstError, match=r"cannot fetch torchvision's pretrained resnet18 weights .*pass the file "
                                         r"with --teacher"):
        load_teacher(None, arch="torchvision:resnet18")


# --------------------------------------------------------------------------- label-based sets from other projects


def test_load_label_set_reads_the_common_file_layouts(tmp_path):
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(5, 3, 8, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 1, 0])

    save_file({"x_syn": unit, "y_syn": labels}, str(tmp_path / "krr.safetensors"))
    loaded = load_label_set(tmp_path / "krr.safetensors", LABEL_MEAN, LABEL_STD, num_classes=3)
    assert loaded.target_kind == "hard_labels" and loaded.method == "krr"
    torch.testing.assert_close(loaded.images, (unit - 0.5) / 0.25)  # [0,1] pixels are normalised on load
    assert torch.equal(loaded.targets, labels) and loaded.config["num_classes"] == 3

    normalised = torch.randn(5, 3, 8, 8, generator=generator)
    torch.save({"data": [[normalised, labels]], "accs_all_exps": {}}, tmp_path / "dsa.pt")  # DC/DSA's layout
    loaded = load_label_set(tmp_path / "dsa.pt", LABEL_MEAN, LABEL_STD)
    torch.testing.assert_close(loaded.images, normalised)

    soft = torch.softmax(torch.randn(5, 3, generator=generator), dim=1)
    np.savez(tmp_path / "frepo.npz", images=normalised.permute(0, 2, 3, 1).numpy(), labels=soft.numpy())  # NHWC
    loaded = load_label_set(tmp_path / "frepo.npz", LABEL_MEAN, LABEL_STD, num_classes=3)
    assert loaded.target_kind == "soft_labels"
    torch.testing.assert_close(loaded.images, normalised)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (torch.zeros(5, 8, 8), torch.zeros(5, dtype=torch.long), "m x 3 x H x W"),
        (torch.zeros(5, 4, 8, 8), torch.zeros(5, dtype=torch.long), "square"),
        (torch.zeros(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4]), "[0, 3)"),
        (torch.zeros(5, 3, 8, 8), torch.tensor([0, -1, 2, 1, 0]), "labels must be in"),
        (torch.zeros(5, 3, 8, 8), torch.zeros(4, dtype=torch.long), "5 images but 4 labels"),
        (torch.zeros(5, 3, 8, 8), torch.zeros(5, 4), "4 classes, expected 3"),
    ],
)
def test_load_label_set_rejects_bad_files_in_one_line(tmp_path, images, labels, message):
    path = tmp_path / "bad.safetensors"
    save_file({"images": images, "labels": labels}, str(path))
    with pytest.raises(KrrstError) as caught:
        load_label_set(path, LABEL_MEAN, LABEL_STD, num_classes=3)
    assert "\n" not in str(caught.value)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_load_label_set_pt_files_are_read_without_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"images": torch.zeros(2, 3, 4, 4), "labels": torch.zeros(2), "hook": _OmegaConfLike(1)}, path)
    with pytest.raises(KrrstError, match="krrst never unpickles code") as caught:
        load_label_set(path, LABEL_MEAN, LABEL_STD)
    assert "weights_only=False" not in str(caught.value) and "\n" not in str(caught.value)

def test_load_label_set_reads_mtts_two_files_uint8_pixels_and_named_tensors(tmp_path):
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "images_best.pt")
    torch.save(torch.tensor([2.0, 0.0, 1.0, 2.0]), tmp_path / "labels_best.pt")  # whole numbers in a float tensor
    loaded = load_label_set(tmp_path / "images_best.pt", LABEL_MEAN, LABEL_STD, labels_path=tmp_path / "labels_best.pt",
                            source="cifar10", method="mtt")
    torch.testing.assert_close(loaded.images, (pixels.float() / 255.0 - 0.5) / 0.25)
    assert loaded.targets.dtype == torch.long and loaded.targets.tolist() == [2, 0, 1, 2]
    assert (loaded.method, loaded.source, loaded.config["num_classes"]) == ("mtt", "cifar10", 3)
    as_normalised = load_label_set(tmp_path / "images_best.pt", LABEL_MEAN, LABEL_STD, pixels="normalized",
                                   labels_path=tmp_path / "labels_best.pt")
    torch.testing.assert_close(as_normalised.images, pixels.float())

    save_file({"a": torch.rand(2, 3, 4, 4), "b": torch.tensor([0, 1])}, str(tmp_path / "named.safetensors"))
    loaded = load_label_set(tmp_path / "named.safetensors", LABEL_MEAN, LABEL_STD, images_key="a", labels_key="b")
    assert loaded.targets.tolist() == [0, 1] and loaded.target_kind == "hard_labels"
    for options, message in [({}, "no images tensor"), ({"images_key": "c"}, "has no tensor 'c'; it holds a, b"),
                             ({"images_key": "a", "pixels": "raw"}, "pixels='raw' is not valid")]:
        with pytest.raises(KrrstError, match=message):
            load_label_set(tmp_path / "named.safetensors", LABEL_MEAN, LABEL_STD, labels_key="b", **options)
    save_file({"images": torch.rand(2, 3, 4, 4), "labels": torch.tensor([0.5, 1.0])}, str(tmp_path / "frac.safetensors"))
    with pytest.raises(KrrstError, match="whole class indices"):
        load_label_set(tmp_path / "frac.safetensors", LABEL_MEAN, LABEL_STD)
    (tmp_path / "set.txt").write_text("x")
    with pytest.raises(KrrstError, match="unknown file type '.txt'"):
        load_label_set(tmp_path / "set.txt", LABEL_MEAN, LABEL_STD)


# --------------------------------------------------------------------------- the authors' KRR-ST set


def test_authors_files_are_normalised_on_load(tmp_path):
    raw = torch.rand(3, 3, 8, 8)
    torch.save(raw, tmp_path / "x_syn.pt")
    torch.save(torch.randn(3, 512), tmp_path / "y_syn.pt")
    distilled = load_authors_set(tmp_path / "x_syn.pt", tmp_path / "y_syn.pt", LABEL_MEAN, LABEL_STD, "cifar100")
    expected = (raw - torch.tensor(LABEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(LABEL_STD).view(1, 3, 1, 1)
    assert torch.allclose(distilled.images, expected) and distilled.feature_dim == 512
    assert (distilled.method, distilled.source, distilled.target_kind) == ("x_syn", "cifar100", "representation")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    with pytest.raises(KrrstError, match="corrupt.pt is not a weights-only PyTorch tensor file"):
        load_authors_set(tmp_path / "corrupt.pt", tmp_path / "y_syn.pt", LABEL_MEAN, LABEL_STD)
    # torch's whole message for a text file is "101": the exception type makes it a message.
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(KrrstError, match=r"text.pt is not a weights-only PyTorch tensor file \(KeyError: 101\)$"):
        load_authors_set(tmp_path / "text.pt", tmp_path / "y_syn.pt", LABEL_MEAN, LABEL_STD)
    # weights_only=True refuses arbitrary pickled objects instead of executing them, and the
    # error does not pass on torch's advice to retry with weights_only=False.
    torch.save(_OmegaConfLike(1), tmp_path / "evil.pt")
    refused = r"evil.pt is not a weights-only .*holds pickled objects \(UnpicklingError\), and krrst never unpickles code"
    with pytest.raises(KrrstError, match=refused) as info:
        load_authors_set(tmp_path / "evil.pt", tmp_path / "y_syn.pt", LABEL_MEAN, LABEL_STD)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(KrrstError, match="synthetic targets file not found"):
        load_authors_set(tmp_path / "x_syn.pt", tmp_path / "absent.pt", LABEL_MEAN, LABEL_STD)
    torch.save({"x": raw}, tmp_path / "dict.pt")
    with pytest.raises(KrrstError, match="holds a dict, expected a tensor"):
        load_authors_set(tmp_path / "dict.pt", tmp_path / "y_syn.pt", LABEL_MEAN, LABEL_STD)
