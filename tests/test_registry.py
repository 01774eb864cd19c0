import pytest

from krrst.infra.errors import KrrstError
from krrst.infra.registry import Registry


def _colours() -> Registry[int]:
    colours: Registry[int] = Registry("colour")
    colours.register("red", 1)
    colours.register("green", 2)
    return colours


def test_hit_as_a_call_and_as_a_decorator():
    colours = _colours()

    @colours.register("blue")
    def blue():
        return 3

    assert colours.get("red") == 1 and colours.get("blue") is blue and blue() == 3
    assert colours.names() == ["red", "green", "blue"]  # registration order
    assert "green" in colours and "purple" not in colours and len(colours) == 3 and list(colours) == colours.names()
    assert colours.select(lambda value: not callable(value) and value > 1) == ("green",)


def test_miss_suggests_the_close_name_and_lists_the_valid_ones_in_one_line():
    with pytest.raises(KrrstError) as excinfo:
        _colours().get("gren")
    assert str(excinfo.value) == "unknown colour 'gren'; did you mean 'green'? valid colours: red, green"
    with pytest.raises(KrrstError) as excinfo:
        _colours().get("Red", what="--colour")  # a case mistake, named by the option the user typed
    assert str(excinfo.value) == "unknown --colour 'Red'; did you mean 'red'? valid colours: red, green"
    message = str(_colours().unknown("zzz", see="krrst colours"))
    assert message == "unknown colour 'zzz'; valid colours (krrst colours): red, green"


def test_duplicate_registration_is_refused():
    colours = _colours()
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        colours.register("red", 9)
    with pytest.raises(ValueError, match="registered twice"):
        colours.register("green")(lambda: None)
    assert colours.get("red") == 1


def test_sorted_listing_and_plural():
    names = Registry("entry", plural="entries", sort=True)
    names.register("b", 0)
    names.register("a", 0)
    assert names.names() == ["a", "b"]
    assert str(names.unknown("c")) == "unknown entry 'c'; valid entries: a, b"


def test_the_library_registries_hold_what_users_name():
    from krrst.data import DATASETS
    from krrst.models import MODELS
    from krrst.pipeline import BASE_PROTOCOLS, METHODS, PRESETS, PROTOCOL_SUITES

    assert "resnet18" in MODELS and "cifar100" in DATASETS and "kmeans" in METHODS
    assert {"finetune", "linear", "kd"} == set(BASE_PROTOCOLS) and {"krrst", "mkdt"} == set(PROTOCOL_SUITES)
    assert {"cifar100", "demo", "cpu-mini", "authors"} <= set(PRESETS)
