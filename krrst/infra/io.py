"""Files: atomic writes, safetensors with JSON metadata, nested checkpoints, env capture.

Every checkpoint, distilled set and results file goes through `atomic_write`,
so a crash or Ctrl-C leaves either the old file or the new one, never half of
one. Tensors are stored in safetensors and everything else in JSON: nothing
is pickled, so loading a file never executes code.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from krrst.infra.errors import KrrstError

_METADATA_KEY = "krrst"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was.

    >>> with atomic_write("out.json") as tmp:
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp (and writers such as safetensors, which recreate the file) leave it readable by the owner only;
        # collaborators on a shared file system get the usual umask-based mode, as for any other file
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, in one line naming `option` and the path, a folder that cannot be written; returns it as a Path.

    Checked before any work starts, so a mistyped `--out` is not found hours
    later: an existing regular file, a path inside a file, a folder (or its
    nearest existing parent) the user cannot write. Nothing is created.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise KrrstError(f"{option} {path} is an existing file, not a folder; choose a folder")
    existing = next(folder for folder in (path, *path.parents) if folder.exists() or folder == folder.parent)
    if not existing.is_dir():
        raise KrrstError(f"{option} {path} lies inside {existing}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KrrstError(f"{option} {path}: the folder {existing} is not writable")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """`check_output_dir` for a file to be written: its folder must be writable and the path not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise KrrstError(f"{what} {path} is a folder; it must be a file (or absent)")
    check_output_dir(path.parent, f"the folder of {what}")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], fieldnames: tuple[str, ...]) -> None:
    """Write `rows` under the header `fieldnames`, atomically; a missing or None value is an empty cell."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")  # csv writes None as ""
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or unparsable file is a one-line `KrrstError`."""
    path = Path(path)
    if not path.is_file():
        raise KrrstError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KrrstError(f"{what} {path} is not valid JSON ({getattr(exc, 'msg', exc)})") from None


def describe_exception(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 120 characters), for "(...)" in a one-line error.

    The type is kept because some messages are meaningless alone: torch reports
    a text file as `KeyError: 101`, a missing cache field is `KeyError: 'count'`.
    """
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def torch_load_weights_only(path: str | os.PathLike, what: str, expected: str, resave: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; any failure is a one-line `KrrstError`.

    `what` names the file ("teacher file"), `expected` the accepted format and
    `resave` how to convert a rejected file. torch's own message for a rejected
    pickle recommends `weights_only=False`, which would run the file's code, so
    that message is replaced, never passed on.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:  # the machine's limit, not the file's fault
        raise
    except OSError as exc:
        raise KrrstError(f"cannot read {what} {path} ({describe_exception(exc)})") from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text:  # a real pickle that holds objects besides tensors
            raise KrrstError(f"{what} {path} is not {expected}: it holds pickled objects (UnpicklingError), and krrst "
                             f"never unpickles code; re-save it {resave}") from None
        # torch's text around the reason advises weights_only=False: keep the reason alone.
        _, marker, reason = text.partition("WeightsUnpickler error:")
        detail = (reason.strip().splitlines() or [""])[0][:120] if marker else describe_exception(exc)
        raise KrrstError(f"{what} {path} is not {expected} (UnpicklingError: {detail})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types (KeyError, RuntimeError, ...) for foreign bytes
        raise KrrstError(f"{what} {path} is not {expected} ({describe_exception(exc)})") from None


LOCK_NAME = ".lock"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold an advisory lock (POSIX `flock`) on the file `path` for the block.

    Held by another process: wait for it, or with `wait=False` raise
    `BlockingIOError`. The lock goes when the block ends or the process dies.
    Where the platform has no `fcntl` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str = "run directory") -> Iterator[None]:
    """Lock `directory/.lock` for the block; a second process is refused in one line, not made to wait.

    Two krrst processes writing one run directory would each take the other's
    files for their own (a cached network, a checkpoint, a claim).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    locked = False
    try:
        with file_lock(directory / LOCK_NAME, wait=False):
            locked = True
            yield
    except BlockingIOError:
        if locked:  # raised by the block itself, not by the lock
            raise
        raise KrrstError(f"{what} {directory} is in use by another krrst process; wait for it to end or choose "
                         "another --out") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save named tensors to a safetensors file with `metadata` as JSON, atomically."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    header = {_METADATA_KEY: json.dumps(metadata or {}, default=str)}
    with atomic_write(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], dict]:
    """Load `(tensors, metadata)` saved by `save_tensors`.

    A missing, truncated or non-safetensors file is a one-line `KrrstError`
    naming `what` and the path.
    """
    path = Path(path)
    if not path.is_file():
        raise KrrstError(f"{what} not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise KrrstError(f"{what} {path} is not a readable safetensors file ({describe_exception(exc)})") from None
    try:
        metadata = json.loads(header.get(_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        raise KrrstError(f"{what} {path} has corrupt krrst metadata") from None
    return tensors, metadata


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors."""
    if isinstance(value, torch.Tensor):
        name = prefix or "_"
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        # JSON keys are strings; optimiser state dicts use int keys, so record the key type.
        return {"__dict__": [[key, type(key).__name__, _flatten(item, f"{prefix}/{key}", tensors)]
                             for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(item, f"{prefix}/{index}", tensors) for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {prefix or '/'})")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_unflatten(item, tensors) for item in value["__tuple__"])
        if "__dict__" in value:
            key_types = {"int": int, "str": str, "float": float, "bool": lambda text: text in (True, "True")}
            return {key_types.get(type_name, str)(key): _unflatten(item, tensors)
                    for key, type_name, item in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(item, tensors) for item in value]
    return value


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a nested checkpoint (dicts, lists, tensors, JSON scalars) atomically.

    Tensors go into safetensors, the structure into its JSON metadata, so
    optimiser state dicts and `torch.Generator.get_state()` round-trip
    without pickle.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_tensors(path, tensors, {"state": skeleton})


def load_state(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint written by `save_state`."""
    tensors, metadata = load_tensors(path, what)
    if "state" not in metadata:
        raise KrrstError(f"{what} {path} was not written by krrst.infra.io.save_state (no 'state' metadata)")
    return _unflatten(metadata["state"], tensors)


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the source tree (with '+dirty' if modified), or None."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    git = functools.partial(subprocess.run, cwd=where, capture_output=True, text=True, timeout=5)
    try:
        commit = git(["git", "rev-parse", "HEAD"], check=True).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def capture_env(seed: int | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions, git commit, device, seed and command line: what `env.json` records."""
    import importlib.metadata as metadata

    versions = {}
    for package in ("krrst", "torch", "torchvision", "numpy", "kornia", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "device": str(device) if device is not None else None,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "command": sys.argv,
    }
