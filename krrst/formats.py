"""Other projects' files, converted at the edge into krrst's types.

- teachers (below): a library network or a foreign checkpoint becomes a krrst teacher;
- target-task classifiers for `kd` (`read_classifier_file`, `library_classifier`,
  `load_classifier_weights`; `krrst.evaluate.load_kd_teacher` puts them together);
- other methods' label-based sets (`load_label_set`: DC/DSA/DM, MTT, KIP/FRePo, KRR-ST's files)
  and the authors' released KRR-ST set (`load_authors_set`), each as a `DistilledSet`.

A krrst teacher is any `nn.Module` that maps a batch of images to N x d
features. This module builds one from what researchers bring:

- an architecture of torchvision (`torchvision:resnet50`) or timm
  (`timm:resnet50`, an optional extra), its classification head removed so
  that it returns its pooled penultimate feature;
- its weights from a state-dict file (safetensors, or a `.pt`/`.pth` read
  weights-only), from a Lightning `.ckpt` of solo-learn or lightly (the
  `backbone.` weights; projector, predictor, momentum copies and online
  classifier dropped), or from the library's own pretrained weights by name
  (online);
- a TorchScript file, taken as it is (it must return the features).

Each such teacher declares the input it was trained on (`TeacherInput`:
size and normalisation, e.g. 224 px with ImageNet statistics). Inside the
stages, `fit_to_source` wraps it so that it receives krrst's images (the
source's resolution and normalisation) the way it was trained; the student
and the synthetic set stay at the source's resolution.

Nothing here unpickles code: tensors come from safetensors, from
`torch.load(weights_only=True)`, or, for Lightning checkpoints whose
hyper-parameters hold other objects, from an unpickler that rebuilds tensors
and containers and turns every other object into an inert placeholder.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from krrst.distilled import DistilledSet
from krrst.infra.errors import KrrstError
from krrst.infra.finite import check_finite, first_nonfinite_tensor
from krrst.infra.io import describe_exception, load_tensors, torch_load_weights_only

LIBRARIES = ("torchvision", "timm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Keys that are not the backbone: SSL heads, momentum copies and online classifiers of solo-learn and lightly.
_NOT_BACKBONE = ("projector.", "predictor.", "prediction_head.", "projection_head.", "momentum_", "classifier.",
                 "head.", "fc.", "heads.", "queue", "prototypes.")
# What DDP (`module.`) and torch.compile (`_orig_mod.`) put before every key of any saved model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# SSL libraries' checkpoints may also keep the backbone inside `model.` or `encoder.`.
_SSL_WRAPPER_PREFIXES = (*_WRAPPER_PREFIXES, "model.", "encoder.")


class TeacherInput(NamedTuple):
    """What a teacher was trained on: square input size (None: any) and per-channel normalisation."""

    size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def is_library_arch(arch: str | None) -> bool:
    """True for `torchvision:NAME` and `timm:NAME`."""
    return bool(arch) and arch.partition(":")[0] in LIBRARIES and ":" in arch


# --------------------------------------------------------------------------- architectures


def library_backbone(arch: str, pretrained: bool = False, input_size: int | None = None) -> nn.Module:
    """`torchvision:NAME` or `timm:NAME` without its classification head: forward gives N x d pooled features.

    `pretrained=True` downloads the library's default weights (online only).
    The teacher's input (size, mean, std) comes from the library's pretrained
    configuration (timm) or is ImageNet's 224 px (torchvision); `input_size`
    overrides the size.
    """
    library, _, name = arch.partition(":")
    if library not in LIBRARIES:
        raise KrrstError(f"--teacher-arch {arch!r}: expected a registered model, torchvision:NAME or timm:NAME")
    models = _model_library(arch, f"--teacher-arch {arch}", hints=True)
    try:
        if library == "torchvision":
            model = models.get_model(name, weights="DEFAULT" if pretrained else None)
        else:
            model = models.create_model(name, pretrained=pretrained, num_classes=0)  # num_classes=0: pooled features
    except (OSError, RuntimeError) as exc:  # no network, or a broken download
        raise KrrstError(f"cannot fetch {library}'s pretrained {name} weights ({exc}); "
                         f"download them elsewhere and pass the file with --teacher") from None
    config = getattr(model, "pretrained_cfg", None) or {}  # timm's; torchvision's networks take ImageNet's 224 px
    mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
    declared = TeacherInput(int(config.get("input_size", (3, 224, 224))[-1]), mean, std)
    model.feature_dim = remove_head(model, arch) if library == "torchvision" else int(model.num_features)
    model.teacher_input = declared._replace(size=int(input_size or declared.size))
    model.spec = {"arch": arch, "input_size": model.teacher_input.size}  # what `save_teacher` records to rebuild it
    return model


def _model_library(arch: str, who: str, hints: bool) -> Any:
    """`torchvision.models` or `timm` (for any other library), once it is known to have `arch`'s network.

    `who` opens the one-line errors; with `hints` they also say where to find a valid name.
    """
    library, _, name = arch.partition(":")
    if library == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            resnets = ", ".join(n for n in available if n.startswith("resnet"))
            raise KrrstError(f"{who} is not a torchvision classification model"
                             + (f"; e.g. {resnets}" if hints else ""))
        return torchvision.models
    try:
        import timm
    except ImportError:
        raise KrrstError(f"{who} needs timm: pip install 'krrst[timm]'") from None
    if not timm.is_model(name):
        raise KrrstError(f"{who} is not a timm model" + (" (timm.list_models() names them)" if hints else ""))
    return timm


def last_linear(model: nn.Module) -> str | None:
    """The name of the model's last `nn.Linear` (a classifier's head), or None."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def remove_head(model: nn.Module, arch: str) -> int:
    """Replace the model's last `nn.Linear` (its classifier) by the identity; return the feature size it took."""
    last = last_linear(model)
    if last is None:
        raise KrrstError(f"{arch} has no final linear classifier to remove; export its feature extractor as "
                         f"TorchScript and pass that file instead")
    feature_dim = int(model.get_submodule(last).in_features)
    parent, _, child = last.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())  # get_submodule("") is the model itself
    return feature_dim


# --------------------------------------------------------------------------- files


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding compiled code (`code/`) and `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("constants.pkl") for name in names) and any("/code/" in name for name in names)


def load_torchscript(path: Path) -> nn.Module:
    """A TorchScript teacher (compiled TorchScript, not pickled Python); it must return N x d features."""
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a broken archive
        raise KrrstError(f"teacher file {path} is not a loadable TorchScript archive ({type(exc).__name__})") from None
    return _Scripted(model, f"torchscript:{path.name}")


class _Scripted(nn.Module):
    """A TorchScript module inside a plain one, which takes attributes and `requires_grad_` as every teacher does."""

    def __init__(self, scripted: nn.Module, arch: str):
        super().__init__()
        self.scripted = scripted
        self.spec = {"arch": arch}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images)


class _Inert:
    """Stands in for any pickled object that is not a tensor or a plain container: built, never run."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()


_ALLOWED_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size,
                    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice}


# torch's own functions that rebuild a tensor or parameter from storage; none of them calls an argument
_REBUILD_FUNCTIONS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state")


class _TensorsOnly(pickle.Unpickler):
    """Rebuilds tensors (torch's own rebuild functions) and containers; every other global becomes `_Inert`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch._utils" and name in _REBUILD_FUNCTIONS:
            return getattr(torch._utils, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert


# A `pickle_module` for `torch.load` whose unpickler never imports or calls the file's own objects.
_TENSORS_ONLY = types.SimpleNamespace(Unpickler=_TensorsOnly, load=pickle.load, __name__="krrst_tensors_only")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, as a flat state dict (`state_dict`/`model` wrappers opened)."""
    if path.suffix == ".safetensors":
        return load_tensors(path, "teacher file")[0]
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - other objects beside the tensors (a Lightning hyper-parameter config, ...)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TENSORS_ONLY)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise KrrstError(f"teacher file {path} is not a PyTorch checkpoint or safetensors file "
                             f"({type(exc).__name__})") from None
    loaded = unwrap_checkpoint(loaded, ("state_dict", "model", "teacher", "backbone"))
    if not isinstance(loaded, Mapping):
        raise KrrstError(f"teacher file {path} does not hold a state dict (got {type(loaded).__name__})")
    tensors = {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise KrrstError(f"teacher file {path} holds no tensors")
    return tensors


def unwrap_checkpoint(loaded: Any, wrappers: tuple[str, ...]) -> Any:
    """`loaded[wrapper]` for the first of `wrappers` under which a checkpoint dict keeps a dict, else `loaded`."""
    inner = (loaded[w] for w in wrappers if isinstance(loaded, Mapping) and isinstance(loaded.get(w), Mapping))
    return next(inner, loaded)


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without the wrapper prefixes it starts with (repeatedly: a compiled model inside DDP has two)."""
    while key.startswith(prefixes):
        key = key.split(".", 1)[1]
    return key


def backbone_state(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights out of an SSL library's state dict, under `model`'s names.

    solo-learn and lightly keep the backbone under `backbone.` beside the
    projector, the predictor, momentum copies and an online classifier: only
    `backbone.` is kept. lightly's backbone is often `nn.Sequential(*children)`,
    whose keys start with the child's index: they are renamed to the model's
    children in order.
    """
    if any(key.startswith("backbone.") for key in state):
        state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    cleaned = {strip_prefixes(key, _SSL_WRAPPER_PREFIXES): value for key, value in state.items()}
    expected = model.state_dict()
    if cleaned and all(key.split(".", 1)[0].isdigit() for key in cleaned):
        children = [name for name, _ in model.named_children()]
        cleaned = {f"{children[int(index)]}.{rest}": value
                   for key, value in cleaned.items() for index, rest in [key.split(".", 1)]
                   if int(index) < len(children)}
    return {key: value for key, value in cleaned.items() if key in expected or not key.startswith(_NOT_BACKBONE)}


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load `state` into `model` strictly; the first mismatch is one line naming the file, arch and key."""
    load_exactly(model, state, f"teacher file {path}", arch,
                 stem_hint="a 3x3 stem is a CIFAR-style ResNet: use --teacher-arch resnet18_pad2 (or resnet18)")


def load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], subject: str, fits: str,
                 stem_hint: str = "") -> None:
    """Load `state` into `model`, every key and shape as the model has them (BatchNorm's step counter may be
    absent); the first mismatch is one line, "`subject` does not fit `fits`: ...". `stem_hint` is added when a
    3x3 convolution meets the model's 7x7 one (a CIFAR-style stem)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    for what, keys in (("is missing", missing), ("is not in the model", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise KrrstError(f"{subject} does not fit {fits}: {keys[0]!r} {what}{more}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            stem = stem_hint and value.dim() == 4 and value.shape[-1] == 3 and expected[key].shape[-1] == 7
            raise KrrstError(f"{subject} does not fit {fits}: {key!r} has shape {tuple(value.shape)} in the file "
                             f"but {tuple(expected[key].shape)} in the model" + (f"; {stem_hint}" if stem else ""))
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()}, strict=False)


def load_library_teacher(path: Path | None, arch: str, input_size: int | None = None) -> nn.Module:
    """`arch` (torchvision:NAME / timm:NAME) with weights from `path`, or the library's pretrained ones if None."""
    model = library_backbone(arch, pretrained=path is None, input_size=input_size)
    if path is not None:
        load_backbone_weights(model, backbone_state(read_checkpoint(path), model), path, arch)
    return model


# --------------------------------------------------------------------------- the teacher's own preprocessing


class PreprocessedTeacher(nn.Module):
    """A teacher fed krrst's images the way it was trained.

    Input: images normalised with the source's statistics at the source's
    resolution (what every stage holds). They are mapped back to [0, 1],
    resized to the teacher's input size (bilinear, antialiased when shrinking)
    and normalised with the teacher's statistics. Output: N x d features.
    The statistics and size are buffers, so a run's teacher identity (its
    checksum) changes with them and a resume with another preprocessing is
    refused.
    """

    def __init__(self, backbone: nn.Module, wanted: TeacherInput, source_mean, source_std):
        super().__init__()
        self.backbone = backbone
        self.teacher_input = wanted
        self.spec = {**dict(getattr(backbone, "spec", {}) or {}), "input": list(wanted)}
        self.feature_dim = getattr(backbone, "feature_dim", None)
        statistics = {"source_mean": source_mean, "source_std": source_std, "teacher_mean": wanted.mean,
                      "teacher_std": wanted.std}
        for name, values in statistics.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_size", torch.tensor(float(wanted.size or 0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, h, w) source-normalised -> (N, d)
        unit = images * self.source_std.to(images.dtype) + self.source_mean.to(images.dtype)
        size = self.teacher_input.size
        if size and tuple(unit.shape[-2:]) != (size, size):
            unit = F.interpolate(unit, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=size < unit.shape[-1])
        inputs = (unit - self.teacher_mean.to(images.dtype)) / self.teacher_std.to(images.dtype)
        return self.backbone(inputs).flatten(1)


def fit_to_source(teacher: nn.Module, source_mean, source_std, image_size: int) -> nn.Module:
    """The teacher as a stage must call it on source images of `image_size` px normalised with the source's stats.

    A teacher that declares its own input (`teacher_input`: a library or
    TorchScript teacher) is wrapped in `PreprocessedTeacher` (re-wrapped when
    the source's statistics differ from the wrapper's). A krrst teacher takes
    the source's images as they are; one built for a fixed input size that
    differs from the source's is refused in one line.
    """
    if isinstance(teacher, PreprocessedTeacher):
        same = (torch.allclose(teacher.source_mean.flatten().cpu(), torch.tensor(source_mean, dtype=torch.float32))
                and torch.allclose(teacher.source_std.flatten().cpu(), torch.tensor(source_std, dtype=torch.float32)))
        if same:
            return teacher
        teacher = teacher.backbone
    wanted = getattr(teacher, "teacher_input", None)
    if wanted is not None:
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        return PreprocessedTeacher(teacher, TeacherInput(*wanted), source_mean, source_std).to(device).eval()
    spec = getattr(teacher, "spec", None) or {}
    built_for = spec.get("image_size") if isinstance(spec, Mapping) else None
    if built_for and int(built_for) != int(image_size):
        raise KrrstError(f"the teacher ({spec.get('arch')}) takes {built_for}x{built_for} images but the source's are "
                         f"{image_size}x{image_size}; load the source with --image-size {built_for}, or use a teacher "
                         f"trained at {image_size} px")
    return teacher



# --------------------------------------------------------------------------- target-task classifiers (kd)

# Where a classifier file keeps its state dict inside a checkpoint dict.
_CLASSIFIER_WRAPPERS = ("state_dict", "model", "classifier", "teacher")


def read_classifier_file(path: Path, option: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a classifier file (safetensors, or a weights-only .pt/.pth) and a krrst model spec if any."""
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = load_tensors(path, f"{option} file")
        return dict(tensors), dict(metadata.get("spec") or {})
    loaded = torch_load_weights_only(path, f"{option} file", "a weights-only PyTorch state dict or safetensors file",
                                     "as a state dict (torch.save(model.state_dict(), ...)) or as safetensors")
    loaded = unwrap_checkpoint(loaded, _CLASSIFIER_WRAPPERS)
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise KrrstError(f"{option} {path} does not hold a state dict of tensors (got {type(loaded).__name__})")
    return dict(loaded), {}


def library_classifier(arch: str, num_classes: int, option: str) -> nn.Module:
    """A torchvision or timm classification network with `num_classes` outputs, untrained."""
    library, _, name = arch.partition(":")
    models = _model_library(arch, f"{option} architecture {arch!r}", hints=False)
    if library == "torchvision":
        return models.get_model(name, weights=None, num_classes=num_classes)
    return models.create_model(name, pretrained=False, num_classes=num_classes)


def load_classifier_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str,
                            num_classes: int, target: str, option: str) -> None:
    """Load `state` into `model` strictly; the class count, then the first missing/unexpected/misshapen key.

    DDP's and torch.compile's key prefixes are dropped, and a torchvision-layout
    `fc.` head is read as the `head.` of a registered architecture.
    """
    expected = model.state_dict()
    cleaned = {}
    for key, value in state.items():
        key = strip_prefixes(key, _WRAPPER_PREFIXES)
        if key.startswith("fc.") and key not in expected and "head." + key[3:] in expected:
            key = "head." + key[3:]
        cleaned[key] = value
    head = last_linear(model)
    head_weight = cleaned.get(f"{head}.weight") if head else None
    if head_weight is not None and head_weight.dim() == 2 and head_weight.shape[0] != num_classes:
        raise KrrstError(f"{option} {path}: a classifier of {head_weight.shape[0]} classes, but {target} has "
                         f"{num_classes}; give a classifier trained on {target}")
    load_exactly(model, cleaned, f"{option} {path}", f"architecture {arch!r}")
    nonfinite = first_nonfinite_tensor(cleaned.items())
    if nonfinite is not None:
        raise KrrstError(f"{option} {path}: {nonfinite[1]} in its weights ({nonfinite[0]}); its logits would be NaN")


# --------------------------------------------------------------------------- other methods' distilled sets

LABEL_FILE_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")

# Names other projects use for the two tensors of a label-based set (DC/DSA/DM
# save `image_syn`/`label_syn`, MTT `images_best`/`labels_best`, KRR-ST `x_syn`/`y_syn`).
_IMAGE_KEYS = ("images", "image", "x", "x_syn", "image_syn", "images_best", "data", "images_all")
_LABEL_KEYS = ("labels", "label", "targets", "y", "y_syn", "label_syn", "labels_best", "labels_all")


def _read_label_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return dict(load_tensors(path, "label-based set")[0])
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
        except (ValueError, OSError) as exc:
            raise KrrstError(f"label-based set {path} is not a readable .npz file "
                             f"({describe_exception(exc)})") from None
    if suffix in (".pt", ".pth"):
        value = torch_load_weights_only(path, "label-based set", "a weights-only PyTorch file of tensors",
                                        "as tensors (images, labels) with torch.save, or as .safetensors/.npz")
        return _unpack_torch_value(value, path)
    raise KrrstError(f"label-based set {path}: unknown file type {suffix!r}; "
                     f"expected one of {', '.join(LABEL_FILE_SUFFIXES)}")


def _unpack_torch_value(value: Any, path: Path) -> dict[str, Any]:
    """A `.pt` holding a dict of tensors, an (images, labels) pair, or DC/DSA's {'data': [[images, labels], ...]}."""
    if isinstance(value, torch.Tensor):
        return {"images": value}
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return {"images": value[0], "labels": value[1]}
    if isinstance(value, dict):
        data = value.get("data")
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)) and len(data[0]) == 2:
            # DC/DSA/DM save one (images, labels) pair per experiment; the first is taken.
            return {"images": data[0][0], "labels": data[0][1]}
        return {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
    raise KrrstError(f"label-based set {path} holds a {type(value).__name__}; "
                     "expected tensors (a dict, or images and labels)")


def _pick(tensors: dict[str, Any], keys: tuple[str, ...], explicit: str | None, path: Path) -> torch.Tensor | None:
    if explicit is not None:
        if explicit not in tensors:
            raise KrrstError(f"label-based set {path} has no tensor {explicit!r}; "
                             f"it holds {', '.join(sorted(tensors)) or 'none'}")
        return tensors[explicit]
    return next((tensors[key] for key in keys if key in tensors), None)


def _label_set_tensors(path: Path, labels_path: str | os.PathLike | None, images_key: str | None,
                       labels_key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels tensors of a label-based set: by name, from one file or the two of MTT."""
    tensors = _read_label_file(path)
    images = _pick(tensors, _IMAGE_KEYS, images_key, path)
    if images is None:
        raise KrrstError(f"label-based set {path}: no images tensor (looked for {', '.join(_IMAGE_KEYS)}); "
                         f"it holds {', '.join(sorted(tensors)) or 'none'}; name it with images_key")
    label_file, label_tensors = path, tensors
    if labels_path is not None:  # MTT's labels_best.pt beside images_best.pt
        label_file = Path(labels_path)
        if not label_file.is_file():
            raise KrrstError(f"labels file not found: {label_file}")
        label_tensors = _read_label_file(label_file)
        if list(label_tensors) == ["images"]:  # a bare tensor in its own file
            label_tensors = {"labels": label_tensors["images"]}
    labels = _pick(label_tensors, _LABEL_KEYS, labels_key, label_file)
    if labels is None:
        raise KrrstError(f"label-based set {path}: no labels tensor (looked for {', '.join(_LABEL_KEYS)}); "
                         "name it with labels_key or give labels_path")
    return images, labels


def _channels_first(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], where: str) -> torch.Tensor:
    """Square m x C x H x W images, from that layout or JAX projects' m x H x W x C."""
    channels = len(mean)
    if len(std) != channels:
        raise KrrstError(f"{where}: mean has {channels} channels but std has {len(std)}")
    if images.dim() != 4:
        raise KrrstError(f"{where}: images must be m x {channels} x H x W, got shape {tuple(images.shape)}")
    if images.shape[1] != channels and images.shape[-1] == channels:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != channels or images.shape[2] != images.shape[3]:
        raise KrrstError(f"{where}: images must be m x {channels} x H x H (square), got shape {tuple(images.shape)}")
    return images


def _normalised(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], pixels: str,
                where: str) -> torch.Tensor:
    """Float images normalised with `mean`/`std`, from the pixel space `pixels` names (`auto`: guessed)."""
    if pixels == "auto":
        in_unit_range = images.numel() and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        pixels = "uint8" if images.dtype == torch.uint8 else "unit" if in_unit_range else "normalized"
    if pixels not in ("normalized", "unit", "uint8"):
        raise KrrstError(f"{where}: pixels={pixels!r} is not valid; expected auto, normalized, unit or uint8")
    images = images.float()
    if pixels != "normalized":
        unit = images / 255.0 if pixels == "uint8" else images
        images = (unit - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return images


def _label_set_targets(labels: torch.Tensor, num_classes: int | None, where: str) -> tuple[torch.Tensor, str, int]:
    """(labels, target kind, class count): m whole class indices are hard labels, m x K floats soft labels."""
    m = labels.shape[0]
    if labels.dim() == 1:
        if labels.dtype.is_floating_point and not bool(torch.all(labels == labels.round())):
            raise KrrstError(f"{where}: 1-D labels must be whole class indices, got fractional values")
        labels = labels.long()
        if m and labels.min() < 0:
            raise KrrstError(f"{where}: labels must be in [0, {num_classes or 'K'}), got {int(labels.min())}")
        if num_classes is not None and m and labels.max() >= num_classes:
            raise KrrstError(f"{where}: labels must be in [0, {num_classes}), got {int(labels.max())}")
        return labels, "hard_labels", num_classes if num_classes is not None else (int(labels.max()) + 1 if m else 0)
    if labels.dim() == 2:
        if not labels.dtype.is_floating_point:
            raise KrrstError(f"{where}: m x K labels must be float soft labels, got {labels.dtype}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise KrrstError(f"{where}: soft labels have {labels.shape[1]} classes, expected {num_classes}")
        return labels.float(), "soft_labels", labels.shape[1]
    raise KrrstError(f"{where}: labels must be m class indices or m x K soft labels, got shape {tuple(labels.shape)}")


def load_label_set(path: str | os.PathLike, mean: tuple[float, ...], std: tuple[float, ...], *,
                   labels_path: str | os.PathLike | None = None, num_classes: int | None = None,
                   pixels: Literal["auto", "normalized", "unit", "uint8"] = "auto", images_key: str | None = None,
                   labels_key: str | None = None, source: str = "", method: str | None = None) -> DistilledSet:
    """Load another method's distilled set (images + hard or soft labels) as a `DistilledSet`.

    `path` is a `.safetensors`, `.npz` or `.pt` file (read with
    `weights_only=True`: no code runs) holding the images and, unless
    `labels_path` names a second file (MTT's `images_best.pt` /
    `labels_best.pt`), the labels. Tensors are found under common names
    (`images`/`x`/`x_syn`/`image_syn`/`images_best`..., `labels`/`y`/`y_syn`/
    `label_syn`/`labels_best`...) or `images_key`/`labels_key`.

    Images: m x C x H x W, or m x H x W x C (JAX projects) which is
    transposed. `pixels` says their space: `normalized` (DC/DSA/DM/MTT keep
    normalised images), `unit` ([0, 1] pixels, e.g. KRR-ST's `x_syn.pt`),
    `uint8` ([0, 255]); `auto` takes uint8 tensors as `uint8`, float tensors
    inside [0, 1] as `unit`, anything else as `normalized`. Images are
    normalised with `mean`/`std` unless already normalised.

    Labels: m integer class indices (also float tensors holding whole
    numbers) -> `hard_labels`; m x K floats -> `soft_labels`. With
    `num_classes`, hard labels must lie in [0, num_classes) and soft labels
    have K = num_classes columns. Any mismatch is a one-line `KrrstError`.
    """
    path = Path(path)
    if not path.is_file():
        raise KrrstError(f"label-based set not found: {path}")
    images, labels = _label_set_tensors(path, labels_path, images_key, labels_key)
    where = f"label-based set {path}"
    check_finite(images, where, "images")
    check_finite(labels, f"labels file {labels_path}" if labels_path is not None else where, "labels")
    images = _channels_first(images, mean, std, where)
    if labels.shape[0] != images.shape[0]:
        raise KrrstError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    images = _normalised(images, mean, std, pixels, where)
    labels, target_kind, classes = _label_set_targets(labels, num_classes, where)
    return DistilledSet(images=images.contiguous(), targets=labels.contiguous(), mean=tuple(mean), std=tuple(std),
                        target_kind=target_kind, method=method or path.stem, source=source,
                        config={"num_classes": int(classes), "file": str(path)})


def load_authors_set(images_path: str | os.PathLike, targets_path: str | os.PathLike, mean: tuple[float, ...],
                     std: tuple[float, ...], source: str = "") -> DistilledSet:
    """Load the authors' released KRR-ST set (`x_syn.pt` in raw [0,1] pixels, `y_syn.pt`) as a `DistilledSet`.

    Read with `torch.load(weights_only=True)` (no code runs) and normalised
    with `mean`/`std`, because the public code kept images unnormalised.
    A file holding NaN or inf is a one-line `KrrstError`.
    """
    raw_images = _load_torch_tensor(images_path, "synthetic images")
    targets = _load_torch_tensor(targets_path, "synthetic targets")
    check_finite(raw_images, f"synthetic images file {images_path}", "images")
    check_finite(targets, f"synthetic targets file {targets_path}", "targets")
    if raw_images.dim() != 4:
        raise KrrstError(f"synthetic images {images_path}: expected m x C x H x W, got {tuple(raw_images.shape)}")
    images = _normalised(raw_images, mean, std, "unit", f"synthetic images {images_path}")
    return DistilledSet(images=images, targets=targets.float(), mean=mean, std=std, method=Path(images_path).stem,
                        source=source)


def _load_torch_tensor(path: str | os.PathLike, what: str) -> torch.Tensor:
    """Load one tensor from a `.pt` file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise KrrstError(f"{what} file not found: {path}")
    value = torch_load_weights_only(path, f"{what} file", "a weights-only PyTorch tensor file",
                                    "as a plain tensor (torch.save(tensor, ...))")
    if not isinstance(value, torch.Tensor):
        raise KrrstError(f"{what} file {path} holds a {type(value).__name__}, expected a tensor")
    return value
