"""Tests of krrst.models: the registry, the common surface of every model, and the architectures."""

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from krrst.infra.errors import KrrstError
from krrst.models import (
    count_parameters,
    create_model,
    describe,
    from_torchvision_state_dict,
    list_models,
    model_options,
    register_model,
    reset_head,
)

ALL_MODELS = list_models()



def sized(arch: str, size: int) -> dict:
    """Options building `arch` for size x size inputs (ConvNets need image_size)."""
    return {"image_size": size} if "image_size" in model_options(arch) else {}


def test_registry_lists_the_paper_architectures():
    assert set(ALL_MODELS) >= {
        "convnet3", "convnet4", "resnet18", "resnet18_pad2", "resnet10", "vgg11_bn", "alexnet", "mobilenetv2",
    }
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.parametrize("arch", ALL_MODELS)
@pytest.mark.parametrize("size", [32, 64])
def test_shapes_features_and_head(arch, size):
    torch.manual_seed(0)
    model = create_model(arch, num_outputs=7, **sized(arch, size)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        out = model(x)
        assert features.shape == (2, model.feature_dim)
        assert out.shape == (2, 7)
        torch.testing.assert_close(out, model.head(features))
        # channels_last input gives the same result. In float64: two summation orders of a convolution's
        # K <= 3*3*512 products differ by <= K * u64 = 5e-13 relative per layer, over <= 20 layers: 1e-11.
        double, x64 = copy.deepcopy(model).double(), x.double()
        out64 = double(x64)
        out_cl = double(x64.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out_cl, out64, rtol=1e-10, atol=1e-10 * float(out64.abs().max()))

        reset_head(model, 3)
        assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
        assert model(x).shape == (2, 3) and model.spec["num_outputs"] == 3
        reset_head(model, None)
        torch.testing.assert_close(model(x), features)

    headless = create_model(arch, **sized(arch, size)).eval()
    assert isinstance(headless.head, nn.Identity)
    with torch.no_grad():
        assert headless(x).shape == (2, headless.feature_dim)


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_spec_round_trips_through_json(arch):
    model = create_model(arch, num_outputs=5)
    assert model.spec["arch"] == arch and model.spec["num_outputs"] == 5
    spec = json.loads(json.dumps(model.spec))
    rebuilt = create_model(**spec)
    assert rebuilt.spec == model.spec
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys


def test_spec_records_overrides():
    model = create_model("convnet3", 10, widths=(32, 64, 128), norm="instance")
    assert model.spec == {"arch": "convnet3", "num_outputs": 10, "widths": [32, 64, 128], "norm": "instance"}
    assert model.feature_dim == 128 * 4 * 4
    rebuilt = create_model(**json.loads(json.dumps(model.spec)))
    assert rebuilt.feature_dim == 2048
    assert isinstance(rebuilt.blocks[0][1], nn.GroupNorm)


# Parameter counts with a 10-class head, derived by hand (weights + biases):
#  convnet3: conv 3*128*9+128 + 128*256*9+256 + 256*512*9+512 = 1,478,912;
#            BN 2*(128+256+512) = 1,792; head 8192*10+10 = 81,930 -> 1,562,634
#  convnet4: convs 1,550,976; BN 1,920; head 81,930 -> 1,634,826
#  vgg11_bn: convs (with bias) 9,220,480; BN 2*(64+128+256*2+512*4) = 5,504;
#            head 512*10+10 = 5,130 -> 9,231,114
#  alexnet:  convs 9,728 + 614,592 + 442,624 + 442,560 + 331,968; BN 1,920;
#            head 3072*10+10 = 30,730 -> 1,874,122
#  resnet18 (CIFAR): the usual 11,173,962; resnet10: 4,903,242
#  mobilenetv2 (kuangliu's CIFAR MobileNetV2): the usual 2,296,922
EXPECTED_PARAMETERS = {
    "convnet3": 1_562_634,
    "convnet4": 1_634_826,
    "vgg11_bn": 9_231_114,
    "alexnet": 1_874_122,
    "resnet18": 11_173_962,
    "resnet18_pad2": 11_173_962,
    "resnet10": 4_903_242,
    "mobilenetv2": 2_296_922,
}


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_parameter_counts(arch):
    model = create_model(arch, num_outputs=10)
    assert count_parameters(model) == EXPECTED_PARAMETERS[arch]
    assert arch in describe(model) and str(model.feature_dim) in describe(model)


def test_feature_dims():
    dims = {arch: create_model(arch).feature_dim for arch in ALL_MODELS}
    assert dims == {
        "convnet3": 8192, "convnet4": 8192, "vgg11_bn": 512, "alexnet": 3072,
        "resnet18": 512, "resnet18_pad2": 512, "resnet10": 512, "mobilenetv2": 1280,
    }
    assert create_model("convnet3", widths=(32, 64, 128)).feature_dim == 2048
    assert create_model("convnet4", image_size=32).feature_dim == 512 * 2 * 2


def test_unknown_name_and_option_errors():
    with pytest.raises(KrrstError, match=r"^unknown model 'resnet19'; did you mean 'resnet18'.*\? valid models: alexnet"):
        create_model("resnet19")
    with pytest.raises(KrrstError, match="unknown option 'widht'.*widths"):
        create_model("convnet3", widht=(1, 2, 3))
    with pytest.raises(KrrstError, match="norm"):
        create_model("convnet3", norm="layer")
    with pytest.raises(KrrstError, match="widths"):
        create_model("convnet3", widths=(32, 64))
    with pytest.raises(KrrstError, match="num_outputs"):
        create_model("resnet10", num_outputs=0)


def test_convnet_rejects_other_input_size():
    model = create_model("convnet3").eval()
    with pytest.raises(KrrstError, match="image_size=64"):
        model(torch.zeros(1, 3, 64, 64))


def test_convnet_norm_options():
    assert isinstance(create_model("convnet3", norm="batch").blocks[0][1], nn.BatchNorm2d)
    assert isinstance(create_model("convnet3", norm="none").blocks[0][1], nn.Identity)


def test_register_model_adds_a_builder(monkeypatch):
    from krrst import models
    from krrst.infra.registry import Registry

    monkeypatch.setattr(models, "MODELS", Registry("model", sort=True))  # the test's model leaves with the test
    name = "test_tiny_linear"

    class Tiny(nn.Module):
        def __init__(self, num_outputs):
            super().__init__()
            self.feature_dim = 3
            self.head = nn.Identity() if num_outputs is None else nn.Linear(3, num_outputs)

        def forward_features(self, x):
            return x.mean(dim=(2, 3))

        def forward(self, x):
            return self.head(self.forward_features(x))

    @register_model(name)
    def tiny(num_outputs=None, scale: float = 1.0):
        return Tiny(num_outputs)

    assert name in list_models()
    assert create_model(name, 2, scale=2.0).spec == {"arch": name, "num_outputs": 2, "scale": 2.0}
    with pytest.raises(ValueError, match="registered twice"):
        register_model(name)(tiny)


# --------------------------------------------------------------------------- ResNet layout


def torchvision_cifar_resnet18(padding: int) -> nn.Module:
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=padding, bias=False)
    net.maxpool = nn.Identity()
    return net


def test_resnet18_pad2_loads_a_torchvision_state_dict_and_computes_the_same():
    torch.manual_seed(0)
    reference = torchvision_cifar_resnet18(padding=2).eval()
    # non-trivial BN statistics so that a mismatch would show
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}

    teacher = create_model("resnet18_pad2").eval()
    assert teacher.conv1.padding == (2, 2) and teacher.conv1.kernel_size == (3, 3)
    assert isinstance(teacher.maxpool, nn.Identity)
    result = teacher.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x))
        assert teacher.relu(teacher.bn1(teacher.conv1(x))).shape[-2:] == (34, 34)

    # with a head: only the head is missing; fc.* renamed to head.* loads strictly
    classifier = create_model("resnet18_pad2", num_outputs=10)
    result = classifier.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    classifier.load_state_dict(from_torchvision_state_dict(reference_with_fc(reference)))


def reference_with_fc(reference: nn.Module) -> dict:
    reference.fc = nn.Linear(512, 10)
    return {"module." + k: v for k, v in reference.state_dict().items()}


def test_resnet18_uses_the_usual_stem_and_the_same_key_layout():
    model = create_model("resnet18")
    assert model.conv1.padding == (1, 1) and model.conv1.stride == (1, 1)
    torchvision_keys = {k for k in torchvision_cifar_resnet18(1).state_dict() if not k.startswith("fc.")}
    assert {k for k in model.state_dict()} == torchvision_keys
    assert len(create_model("resnet10").layer1) == 1 and len(model.layer1) == 2
    assert create_model("resnet10", stem_padding=2).conv1.padding == (2, 2)


def test_convnet_global_average_pooling_gives_width_features():
    """pool="avg": the mean of the last map over space, with the same weights as the flattened ConvNet."""
    torch.manual_seed(0)
    flat = create_model("convnet3", widths=(4, 8, 16), image_size=16)
    pooled = create_model("convnet3", widths=(4, 8, 16), image_size=16, pool="avg")
    pooled.load_state_dict(flat.state_dict())
    assert pooled.feature_dim == 16 and flat.feature_dim == 16 * 2 * 2
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    flat, pooled = flat.double().eval(), pooled.double().eval()
    with torch.no_grad():
        maps = flat.blocks(x)
        torch.testing.assert_close(pooled.forward_features(x), maps.mean((2, 3)), rtol=1e-12, atol=1e-12)
    assert create_model(**pooled.spec).feature_dim == 16, "the option survives the spec round trip"
    with pytest.raises(KrrstError, match="option pool must be one of flatten, avg"):
        create_model("convnet3", pool="max")
