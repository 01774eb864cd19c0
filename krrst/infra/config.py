"""Configs and devices: the rules every stage's config dataclass follows.

Each stage has one frozen dataclass of hyper-parameters, shared by the CLI and
the Python API. This module turns dicts and `key=value` strings into those
dataclasses, refusing unknown keys and ill-typed values with a message that
lists what is valid, and picks the device once (CUDA when present, else CPU).

Numbers are checked here, once for every stage: a float must be finite and
within float32 range (the tensors it reaches are float32; `1e39` would only
fail later, deep inside a loop), an integer within int64 range.

A mistyped name gets "did you mean" from `close_matches`: a key here, a
registered name (a preset, an architecture) in `krrst.infra.registry`.
Nothing here imports torch until a device is resolved, so the command line
can build its parser and `--help` without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, TypeVar

from krrst.infra.errors import KrrstError

if TYPE_CHECKING:
    import torch

ConfigT = TypeVar("ConfigT")

FLOAT32_MAX = (2 - 2**-23) * 2.0**127  # torch.finfo(torch.float32).max, about 3.4e38, without importing torch
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def close_matches(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names a mistyped `name` most likely meant: a difference of case only first, else difflib's."""
    valid = list(valid)
    by_lower = {option.lower(): option for option in valid}
    same_but_case = [option for option in valid if option.lower() == name.lower()]
    return same_but_case or [by_lower[match] for match in difflib.get_close_matches(name.lower(), list(by_lower), n=n)]


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """`"; did you mean 'demo'?"` for a name close to a valid one, else `""`."""
    return _did_you_mean(close_matches(name, valid))


def _did_you_mean(matches: list[str]) -> str:
    return f"; did you mean {' or '.join(repr(match) for match in matches)}?" if matches else ""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU; otherwise the named device, checked."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise KrrstError(f"--device {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KrrstError(f"--device {device!r} asked for CUDA but no GPU is available; use --device cpu or auto")
    return resolved


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value against a type annotation (str values are parsed)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, where)
            except KrrstError as exc:
                errors.append(str(exc))
        raise KrrstError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if isinstance(value, str):  # "3" for a choice 3
            value = next((choice for choice in args if str(choice) == value), value)
        if value in args:
            return value
        raise KrrstError(f"{where}={value!r} is not valid; expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.strip().strip("()[]").split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise KrrstError(f"{where}={value!r} is not valid; expected a comma-separated list")
        items = [_coerce(item, args[0] if args else str, where) for item in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise KrrstError(f"{where}={value!r} is not valid; expected true or false")
    if annotation is int:
        return check_number(_as_integer(value, where), where, shown=value)
    if annotation is float:
        if isinstance(value, bool):
            raise KrrstError(f"{where}={value!r} is not valid; expected a number")
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        except (TypeError, ValueError):
            raise KrrstError(f"{where}={value!r} is not valid; expected a number") from None
        return check_number(number, where, shown=value)
    if annotation is str:
        return str(value)
    return value


def _as_integer(value: Any, where: str) -> int:
    """An int from an int, an integral float or a string such as "100" or "1e3" (exact for long digit strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())  # exact, however many digits
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        as_float = math.nan
    if isinstance(value, bool) or not as_float.is_integer():
        raise KrrstError(f"{where}={value!r} is not valid; expected an integer")
    return int(as_float)


def check_number(value: Any, where: str, shown: Any = None) -> Any:
    """`value` itself when it is a number a stage can use: a finite float within float32 range, an int within
    int64's; otherwise a one-line `KrrstError` naming `where` (e.g. "linear.lr") and `shown` (what the user
    typed, by default `value`). Other values pass through."""
    if isinstance(value, bool):
        return value
    text = repr(value if shown is None else shown)
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise KrrstError(f"{where}={text} is not valid; expected a finite number within float32 range "
                         f"(|x| <= {FLOAT32_MAX:.4g})")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise KrrstError(f"{where}={text} is not valid; expected an integer within int64 range (|x| < 2**63)")
    return value


def check_numeric_fields(config: Any, stage: str) -> None:
    """`check_number` on every numeric field of a config dataclass (and on the items of tuple/list fields).

    For a config built directly rather than through `apply_overrides`: a
    `__post_init__` calls it with its stage name.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            check_number(item, f"{stage}.{field.name}")


def config_from_dict(cls: type[ConfigT], mapping: Mapping[str, Any], where: str = "") -> ConfigT:
    """Build a config dataclass from a dict; unknown keys and bad values are `KrrstError`s."""
    return apply_overrides(cls(), mapping, where)


def apply_overrides(config: ConfigT, overrides: Mapping[str, Any], where: str = "") -> ConfigT:
    """A copy of `config` with `overrides` applied (values may be strings, as from `--set`)."""
    hints = typing.get_type_hints(type(config))
    types_by_name = {field.name: hints[field.name] for field in dataclasses.fields(config)}
    prefix = f"{where}." if where else ""
    changes = {}
    for key, value in overrides.items():
        if key not in types_by_name:
            raise unknown_key(prefix + key, [prefix + name for name in types_by_name])
        changes[key] = _coerce(value, types_by_name[key], prefix + key)
    return dataclasses.replace(config, **changes)


def suggest_keys(key: str, valid_keys: Iterable[str]) -> list[str]:
    """The `stage.field` keys a mistyped `key` most likely meant: the field compared within its stage (a mistyped
    stage is matched first), and a bare field name (`steps`) looked up in every stage."""
    keys_by_stage: dict[str, dict[str, str]] = {}  # stage -> field -> its full key
    for valid in valid_keys:
        stage, _, field = valid.rpartition(".")
        keys_by_stage.setdefault(stage, {})[field] = valid
    stage, dot, field = key.rpartition(".")
    if stage in keys_by_stage:
        stages = [stage]
    else:
        stages = close_matches(stage, keys_by_stage) if dot else list(keys_by_stage)
    same_field = [keys_by_stage[stage][field] for stage in stages if field in keys_by_stage[stage]]
    return same_field or [keys_by_stage[stage][close] for stage in stages
                          for close in close_matches(field, keys_by_stage[stage])]


def did_you_mean_key(key: str, valid_keys: Iterable[str]) -> str:
    """`did_you_mean` for `stage.field` keys (see `suggest_keys`)."""
    return _did_you_mean(suggest_keys(key, valid_keys))


def unknown_key(key: str, valid_keys: list[str]) -> KrrstError:
    """An unknown config key: the keys it most likely meant when there are some, else every valid key."""
    hint = did_you_mean_key(key, valid_keys)
    if hint:
        return KrrstError(f"unknown config key {key!r}{hint} (`krrst run --print-config` lists every key)")
    return KrrstError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def same_saved_value(saved: Any, value: Any) -> bool:
    """Whether a value read back from JSON equals a current one: tuples and lists compare equal, since JSON turns
    one into the other."""
    saved, value = (list(item) if isinstance(item, (list, tuple)) else item for item in (saved, value))
    return saved == value


def config_changes(saved: Mapping[str, Any], config: Any, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """`(field, saved value, current value)` for every field of `config` that differs from a saved dict.

    Fields in `ignore` (logging, checkpoint cadence) may change freely; a field
    missing from `saved` (added to the dataclass since) counts as its default.
    Tuples and lists compare equal (`same_saved_value`).
    """
    saved = {**config_to_dict(type(config)()), **saved}
    return [(key, saved[key], value) for key, value in config_to_dict(config).items()
            if key not in ignore and not same_saved_value(saved[key], value)]


def read_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """`(preset, {"stage.field": value})` from a JSON file shaped as `krrst run --print-config` prints it:
    an optional "preset" and one object of fields per stage. The keys are checked where the config is resolved."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KrrstError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KrrstError(f"--config {path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise KrrstError(f"--config {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    example = '{"preset": "demo", "distill": {"steps": 100}}'
    if not isinstance(data, dict):
        raise KrrstError(f"--config {path}: expected a JSON object of stages, e.g. {example}")
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise KrrstError(f"--config {path}: \"preset\" must be a preset name, got {preset!r}")
    overrides: dict[str, Any] = {}
    for stage, fields in data.items():
        if not isinstance(fields, dict):
            raise KrrstError(f"--config {path}: {stage!r} must be an object of fields, e.g. {example}")
        overrides.update({f"{stage}.{field}": value for field, value in fields.items()})
    return preset, overrides


def parse_assignments(assignments: list[str] | None, option: str = "--set") -> dict[str, str]:
    """Parse `["a.b=1", "c=x"]` into `{"a.b": "1", "c": "x"}`; malformed items are errors."""
    parsed: dict[str, str] = {}
    for item in assignments or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KrrstError(f"{option} {item!r} is not valid; expected key=value, e.g. distill.steps=100")
        parsed[key.strip()] = value.strip()
    return parsed
