"""The results files of a run directory: `results.csv` (the record) and `results.json` (its mirror).

Every evaluation appends one row (`RESULT_FIELDS`). A row carries its
provenance: what the pre-training set came from (`sha256:<16 hex>` of a set
file, or the fingerprint of the config that built it), so rows of two
different sets are never mixed under one method name. Accuracies are stored
as fractions in [0, 1].

The stages build rows (`result_row`) and the pipeline stores them here;
`krrst.report` reads them to build the tables, plots and `report.html`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from krrst.infra.errors import KrrstError
from krrst.infra.io import atomic_write, file_lock, write_json

SETS_NAME = "sets.json"  # per method: images, storage_bytes, parameterization (written by the pipeline)
RESULT_FIELDS = ("method", "source", "target", "arch", "protocol", "seed", "accuracy", "wall_time_s", "provenance")
# Files written before rows carried their provenance: still read (provenance ""), upgraded on the next append.
LEGACY_RESULT_FIELDS = RESULT_FIELDS[:-1]

_TEXT_FIELDS = ("method", "source", "target", "arch", "protocol")


def result_row(*, method: str, source: str, target: str, arch: str, protocol: str, seed: int, accuracy: float,
               wall_time_s: float, provenance: str = "") -> dict[str, Any]:
    """One results row with exactly `RESULT_FIELDS` (accuracy a fraction in [0, 1]; `provenance` what the set
    came from, filled in by whoever knows it: the pipeline or the CLI)."""
    return {"method": str(method), "source": str(source), "target": str(target), "arch": str(arch),
            "protocol": str(protocol), "seed": int(seed), "accuracy": float(accuracy),
            "wall_time_s": float(wall_time_s), "provenance": str(provenance)}


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies an evaluation: (method, source, target, arch, protocol, seed). A re-run of the same
    evaluation replaces its row, and a resumed run skips the rows it has."""
    return (row["method"], row["source"], row["target"], row["arch"], row["protocol"], int(row["seed"]))


def _coerce_row(row: Any, where: str) -> dict[str, Any]:
    """Check one result row against RESULT_FIELDS and return it with canonical types."""
    if not isinstance(row, dict):
        raise KrrstError(f"{where}: a result row must be a dict with keys {', '.join(RESULT_FIELDS)}, "
                         f"got {type(row).__name__}")
    missing = [field for field in LEGACY_RESULT_FIELDS if field not in row]  # provenance may be left out: ""
    unknown = [str(key) for key in row if key not in RESULT_FIELDS]
    problems = [f"{kind} {', '.join(names)}" for kind, names in (("missing", missing), ("unknown", unknown)) if names]
    if problems:
        raise KrrstError(f"{where}: {'; '.join(problems)} (expected exactly {', '.join(RESULT_FIELDS)})")
    clean: dict[str, Any] = {}
    for field in _TEXT_FIELDS:
        value = row[field]
        if not isinstance(value, str):
            raise KrrstError(f"{where}: {field} must be a string, got {value!r}")
        if field != "source" and not value.strip():
            raise KrrstError(f"{where}: {field} must not be empty")
        clean[field] = value
    provenance = row.get("provenance", "")
    if not isinstance(provenance, str) or provenance != provenance.strip() or "\n" in provenance:
        raise KrrstError(f"{where}: provenance must be a string without surrounding spaces, got {provenance!r}")
    clean["seed"] = _as_int(row["seed"], "seed", where)
    clean["accuracy"] = _as_float(row["accuracy"], "accuracy", where)
    clean["wall_time_s"] = _as_float(row["wall_time_s"], "wall_time_s", where)
    if not 0.0 <= clean["accuracy"] <= 1.0:
        raise KrrstError(f"{where}: accuracy must be a fraction in [0, 1], got {clean['accuracy']!r} (not percent)")
    if clean["wall_time_s"] < 0:
        raise KrrstError(f"{where}: wall_time_s must be >= 0, got {clean['wall_time_s']!r}")
    clean["provenance"] = provenance
    return clean


def _as_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool):
        raise KrrstError(f"{where}: {field} must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        as_int = int(number)
        if as_int != number:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise KrrstError(f"{where}: {field} must be an integer, got {value!r}") from None
    return as_int


def _as_float(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool):
        raise KrrstError(f"{where}: {field} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KrrstError(f"{where}: {field} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise KrrstError(f"{where}: {field} must be finite, got {value!r}")
    return number


def _write_results(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite `results.csv`, then `results.json`, each atomically (the caller holds the results lock)."""
    with atomic_write(run_dir / "results.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    write_json(run_dir / "results.json", list(rows))


def _check_one_provenance(path: Path, rows: Iterable[dict], methods: Iterable[str]) -> None:
    """Refuse, in one line, a method of `methods` whose rows carry two provenances (empty: unknown, never a clash)."""
    methods = set(methods)
    seen: dict[str, str] = {}
    for row in rows:
        if row["method"] not in methods or not row["provenance"]:
            continue
        first = seen.setdefault(row["method"], row["provenance"])
        if row["provenance"] != first:
            raise KrrstError(
                f"{path}: the rows of method '{row['method']}' come from {first}, these from {row['provenance']} "
                "(another set under the same name); refusing to mix them: choose another --out"
            )


def check_provenance(run_dir: str | os.PathLike, provenance: dict[str, str]) -> None:
    """Refuse before any work to add rows of `{method: provenance}` that `append_results` would refuse."""
    path = Path(run_dir) / "results.csv"
    incoming = [{"method": method, "provenance": value} for method, value in provenance.items()]
    _check_one_provenance(path, [*read_results(run_dir), *incoming], provenance)


def method_provenance(rows: Iterable[dict]) -> dict[str, str]:
    """`{method: provenance}` for every method whose rows carry one (rows of older files carry none)."""
    return {row["method"]: row["provenance"] for row in rows if row["provenance"]}


def append_results(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    """Append evaluation rows to `run_dir/results.csv` and rewrite `run_dir/results.json`.

    Every row must have the keys of `RESULT_FIELDS` (`accuracy` as a fraction in [0, 1]; `provenance` may be
    left out, meaning unknown); otherwise a `KrrstError` names the missing or unknown key and nothing is
    written. Rows of a method whose rows already carry another provenance are refused the same way: they come
    from another set under the same name. A row for an evaluation already recorded (`row_key`) replaces the
    old row, so a re-run never counts a seed twice. A file of the older 8-column layout is rewritten in the
    current one. Both files are rewritten atomically: a crash leaves the previous files intact.
    """
    run_dir = Path(run_dir)
    new_rows = [_coerce_row(row, f"result row {index}") for index, row in enumerate(rows)]
    if not new_rows:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / ".results.lock"):  # read-modify-write of the results files between processes
        existing = read_results(run_dir)
        _check_one_provenance(run_dir / "results.csv", [*existing, *new_rows], {row["method"] for row in new_rows})
        new_keys = {row_key(row) for row in new_rows}
        kept = [row for row in existing if row_key(row) not in new_keys]
        merged: dict[tuple, dict[str, Any]] = {}
        for row in new_rows:  # within one call, the last row for an evaluation wins
            merged[row_key(row)] = row
        _write_results(run_dir, kept + list(merged.values()))


def remove_results(run_dir: str | os.PathLike, drop: Callable[[dict], bool]) -> int:
    """Remove the rows for which `drop(row)` holds from both results files (atomically); returns how many."""
    run_dir = Path(run_dir)
    with file_lock(run_dir / ".results.lock"):
        rows = read_results(run_dir)
        kept = [row for row in rows if not drop(row)]
        if len(kept) < len(rows):
            _write_results(run_dir, kept)
    return len(rows) - len(kept)


def read_results(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of `run_dir/results.csv` with types restored (seed int, accuracy and wall_time_s float).

    A missing file means no results yet (an empty list); a file with another
    header or an unparsable value is a one-line `KrrstError` naming the line.
    A file of the older layout (`LEGACY_RESULT_FIELDS`) reads with an empty
    provenance on every row.
    """
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = tuple(reader.fieldnames or ())
            if header not in (RESULT_FIELDS, LEGACY_RESULT_FIELDS):
                raise KrrstError(f"{path}: header is {','.join(header) or '(empty)'}, "
                                 f"expected {','.join(RESULT_FIELDS)}")
            rows = []
            for row in reader:
                if None in row or any(value is None for value in row.values()):
                    raise KrrstError(f"{path} line {reader.line_num}: expected {len(header)} columns")
                rows.append(_coerce_row(row, f"{path} line {reader.line_num}"))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KrrstError(f"{path} is not a readable CSV file ({exc})") from None
    return rows


def has_result(rows: Iterable[dict], **key: Any) -> bool:
    """Whether any row matches every given field, e.g. `has_result(rows, method="krr-st", seed=0)`.

    Lets the pipeline skip evaluations that are already finished. Values are
    compared after the same type coercion as stored rows (seed 1 == "1").
    """
    unknown = [name for name in key if name not in RESULT_FIELDS]
    if unknown:
        raise TypeError(f"has_result: unknown field {', '.join(unknown)} (valid: {', '.join(RESULT_FIELDS)})")
    wanted = {}
    for name, value in key.items():
        if name == "seed":
            wanted[name] = _as_int(value, name, "has_result")
        elif name in ("accuracy", "wall_time_s"):
            wanted[name] = _as_float(value, name, "has_result")
        else:
            wanted[name] = str(value)
    return any(all(row.get(name) == value for name, value in wanted.items()) for row in rows)
