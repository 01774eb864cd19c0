"""Config dataclasses: unknown keys and bad values are clear errors; strings are parsed by type."""

import dataclasses
import re
from typing import Literal

import pytest
import torch

from krrst.infra.config import (
    apply_overrides,
    config_changes,
    config_from_dict,
    config_to_dict,
    parse_assignments,
    resolve_device,
)
from krrst.infra.errors import KrrstError


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    steps: int = 10
    lr: float = 0.1
    widths: tuple[int, ...] = (32, 64)
    arch: str = "convnet3"
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    limit: int | None = None


def test_strings_are_parsed_by_annotation():
    config = config_from_dict(
        ToyConfig, {"steps": "20", "lr": "1e-3", "widths": "16,32,64", "kind": "b", "flag": "true", "limit": "none"}
    )
    assert config == ToyConfig(steps=20, lr=1e-3, widths=(16, 32, 64), kind="b", flag=True, limit=None)
    assert apply_overrides(config, {"limit": "5"}).limit == 5
    assert config_to_dict(config)["widths"] == (16, 32, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stepz": 1}, "unknown config key 'distill.stepz'.*distill.steps"),
        ({"steps": "ten"}, "distill.steps='ten'.*integer"),
        ({"steps": "1.5"}, "integer"),
        ({"kind": "c"}, "expected one of a, b"),
        ({"flag": "maybe"}, "true or false"),
        ({"lr": "fast"}, "number"),
    ],
)
def test_bad_keys_and_values_are_clear_errors(overrides, message):
    with pytest.raises(KrrstError, match=message):
        apply_overrides(ToyConfig(), overrides, "distill")


def test_parse_assignments():
    assert parse_assignments(["distill.steps=5", "seed = 3"]) == {"distill.steps": "5", "seed": "3"}
    with pytest.raises(KrrstError, match="key=value"):
        parse_assignments(["steps"])


def test_resolve_device_defaults_to_what_exists():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(KrrstError, match="--device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(KrrstError, match="no GPU"):
            resolve_device("cuda")


def test_config_changes_ignores_listed_fields_and_defaults_missing_ones():
    saved = {"steps": 10, "lr": 0.2, "widths": [32, 64], "arch": "convnet3", "kind": "a", "flag": False}  # no "limit"
    current = ToyConfig(lr=0.3, flag=True)
    assert config_changes(saved, current, ignore=("flag",)) == [("lr", 0.2, 0.3)]
    assert config_changes(saved, ToyConfig(lr=0.2), ignore=()) == [], "lists equal tuples; a missing field is its default"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e39", "-3.5e38", float("nan"),
                                   pytest.param(10**400, id="int-1e400")])
def test_floats_that_are_not_finite_or_beyond_float32_are_refused_naming_the_field(value):
    with pytest.raises(KrrstError, match=r"^linear\.lr=.* is not valid; expected a finite number within float32 range"):
        apply_overrides(ToyConfig(), {"lr": value}, "linear")


def test_the_float32_limit_itself_and_long_integers_are_exact():
    limit = float(torch.finfo(torch.float32).max)
    assert apply_overrides(ToyConfig(), {"lr": repr(limit)}).lr == limit
    assert apply_overrides(ToyConfig(), {"limit": str(2**63 - 1)}).limit == 2**63 - 1, "no rounding through float"
    with pytest.raises(KrrstError, match=r"^run\.limit='9223372036854775808' is not valid; expected an integer within int64"):
        apply_overrides(ToyConfig(), {"limit": str(2**63)}, "run")
    with pytest.raises(KrrstError, match=r"^run\.steps='1e30' is not valid; expected an integer within int64"):
        apply_overrides(ToyConfig(), {"steps": "1e30"}, "run")


def test_check_numeric_fields_walks_tuples_and_names_the_stage():
    from krrst.infra.config import check_numeric_fields

    @dataclasses.dataclass(frozen=True)
    class Scales:
        factors: tuple[float, ...] = (1.0, float("inf"))

    check_numeric_fields(ToyConfig(), "toy")
    with pytest.raises(KrrstError, match=r"^toy\.factors=inf is not valid"):
        check_numeric_fields(Scales(), "toy")


def test_close_matches_put_a_case_mistake_first_and_find_typos():
    from krrst.infra.config import close_matches, did_you_mean

    assert close_matches("Demo", ["cifar100", "demo", "cpu-mini"]) == ["demo"]
    assert close_matches("cpu-mnii", ["cifar100", "demo", "cpu-mini"]) == ["cpu-mini"]
    assert close_matches("zzz", ["cifar100", "demo"]) == [] and did_you_mean("zzz", ["demo"]) == ""
    assert did_you_mean("dem", ["demo"]) == "; did you mean 'demo'?"


@pytest.mark.parametrize("key, expected", [
    ("distill.step", ["distill.steps"]),  # the field, compared within its stage
    ("distil.steps", ["distill.steps"]),  # a mistyped stage
    ("steps", ["teacher.steps", "distill.steps"]),  # a bare field: every stage that has it
    ("distill.zzzzzz", []),  # a shared "distill." prefix is no match
])
def test_suggest_keys(key, expected):
    from krrst.infra.config import suggest_keys

    valid = ["teacher.steps", "teacher.lr", "distill.steps", "distill.seed", "distill.pool_steps"]
    assert suggest_keys(key, valid) == expected


def test_unknown_key_lists_every_key_only_when_nothing_is_close():
    with pytest.raises(KrrstError, match=r"^unknown config key 'toy\.step'; did you mean 'toy\.steps'\? "):
        apply_overrides(ToyConfig(), {"step": 1}, "toy")
    with pytest.raises(KrrstError, match=r"^unknown config key 'toy\.qqqq'; valid keys: toy\.steps, toy\.lr"):
        apply_overrides(ToyConfig(), {"qqqq": 1}, "toy")


def test_read_config_file(tmp_path):
    from krrst.infra.config import read_config_file

    path = tmp_path / "config.json"
    path.write_text('{"preset": "demo", "distill": {"steps": 5, "widths": [8, 16]}, "run": {}}')
    assert read_config_file(path) == ("demo", {"distill.steps": 5, "distill.widths": [8, 16]})
    for text, message in [("{", "not valid JSON"), ("[1]", "expected a JSON object"),
                          ('{"distill": 3}', "'distill' must be an object"), ('{"preset": 1}', "preset")]:
        path.write_text(text)
        with pytest.raises(KrrstError, match=rf"^--config {re.escape(str(path))}: .*{message}"):
            read_config_file(path)
    with pytest.raises(KrrstError, match="no such file"):
        read_config_file(tmp_path / "missing.json")


def test_config_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, krrst.infra.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_configs_built_in_python_refuse_numbers_that_are_not_finite():
    from krrst.distill import DistillConfig
    from krrst.evaluate import FinetuneConfig, LinearProbeConfig, PretrainConfig
    from krrst.mkdt import MKDTConfig
    from krrst.teacher import TeacherConfig

    for config, field, stage in ((DistillConfig, "image_lr", "distill"), (TeacherConfig, "lr", "teacher"),
                                 (MKDTConfig, "expert_lr", "mkdt"), (PretrainConfig, "lr", "pretrain"),
                                 (FinetuneConfig, "lr", "finetune"), (LinearProbeConfig, "lr", "linear")):
        config()  # the defaults pass
        with pytest.raises(KrrstError, match=rf"{stage}\.{field}"):
            config(**{field: float("nan")})
