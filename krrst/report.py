"""Results of evaluations and the user-facing report of a run directory.

Every evaluation appends one row (`RESULT_FIELDS`) to `results.csv` and
`results.json` in the run directory. A row carries its provenance: what the
pre-training set came from (`sha256:<16 hex>` of a set file, or the
fingerprint of the config that built it), so rows of two different sets are
never mixed under one method name. From those rows this module builds the
Markdown table of mean ± std over seeds (`results.md`), a bar chart
(`results.png`), loss-curve plots and `report.html`: one self-contained page
(images embedded as data URIs, inline CSS) that shows what a run did.

Accuracies are stored as fractions in [0, 1] and shown in percent.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Iterable, Sequence

from krrst.errors import KrrstError
from krrst.io import atomic_write, file_lock, read_json

SETS_NAME = "sets.json"  # per method: images, storage_bytes, parameterization (written by the pipeline)
RESULT_FIELDS = ("method", "source", "target", "arch", "protocol", "seed", "accuracy", "wall_time_s", "provenance")
# Files written before rows carried their provenance: still read (provenance ""), upgraded on the next append.
LEGACY_RESULT_FIELDS = RESULT_FIELDS[:-1]

_TEXT_FIELDS = ("method", "source", "target", "arch", "protocol")
# One evaluation is identified by these; a re-run of the same evaluation replaces its row.
_EVALUATION_KEY = ("method", "source", "target", "arch", "protocol", "seed")
_GROUP_KEY = ("method", "source", "target", "arch", "protocol")

# Methods shown first, in this order; unknown methods (external sets) follow
# alphabetically, then the no-pre-training floor and the full-data ceiling.
_LEADING_METHODS = ("krr-st", "random", "kmeans", "high-loss")
_TRAILING_METHODS = ("none", "full-ssl")
# Reference rows do not compete for the bold "best" mark: the full-data
# teacher is the ceiling the distilled sets are measured against.
REFERENCE_METHODS = ("full-ssl",)
_PROTOCOL_ORDER = ("linear", "finetune", "knowledge_distillation")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MISSING_CELL = "–"


# --------------------------------------------------------------------------- rows and files
def _coerce_row(row: Any, where: str) -> dict[str, Any]:
    """Check one result row against RESULT_FIELDS and return it with canonical types."""
    if not isinstance(row, dict):
        raise KrrstError(f"{where}: a result row must be a dict with keys {', '.join(RESULT_FIELDS)}, got {type(row).__name__}")
    missing = [field for field in LEGACY_RESULT_FIELDS if field not in row]  # provenance may be left out: ""
    unknown = [str(key) for key in row if key not in RESULT_FIELDS]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown {', '.join(unknown)}")
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


def _write_results_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


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

    Every row must have the keys of `RESULT_FIELDS` (`accuracy` as a
    fraction in [0, 1]; `provenance` may be left out, meaning unknown);
    otherwise a `KrrstError` names the missing or unknown key and nothing is
    written. Rows of a method whose rows already carry another provenance are
    refused the same way: they come from another set under the same name. A
    row for an evaluation already recorded (same method, source, target,
    arch, protocol and seed) replaces the old row, so a re-run never counts a
    seed twice. A file of the older 8-column layout is rewritten in the
    current one (its rows with an empty provenance). Both files are rewritten atomically
    (temporary file + rename): a crash leaves the previous files intact.
    `results.csv` is the record; `results.json` mirrors it.
    """
    run_dir = Path(run_dir)
    new_rows = [_coerce_row(row, f"result row {index}") for index, row in enumerate(rows)]
    if not new_rows:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / ".results.lock"):  # read-modify-write of the results files between processes
        existing = read_results(run_dir)
        _check_one_provenance(run_dir / "results.csv", [*existing, *new_rows], {row["method"] for row in new_rows})
        new_keys = {tuple(row[field] for field in _EVALUATION_KEY) for row in new_rows}
        kept = [row for row in existing if tuple(row[field] for field in _EVALUATION_KEY) not in new_keys]
        merged: dict[tuple, dict[str, Any]] = {}
        for row in new_rows:  # within one call, the last row for an evaluation wins
            merged[tuple(row[field] for field in _EVALUATION_KEY)] = row
        all_rows = kept + list(merged.values())
        with atomic_write(run_dir / "results.csv") as tmp:
            _write_results_csv(tmp, all_rows)
        with atomic_write(run_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(all_rows, indent=2) + "\n", encoding="utf-8")


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
                raise KrrstError(f"{path}: header is {','.join(header) or '(empty)'}, expected {','.join(RESULT_FIELDS)}")
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


# --------------------------------------------------------------------------- summaries and tables
def _method_sort_key(method: str) -> tuple[int, int, str]:
    if method in _LEADING_METHODS:
        return (0, _LEADING_METHODS.index(method), method)
    if method in _TRAILING_METHODS:
        return (2, _TRAILING_METHODS.index(method), method)
    return (1, 0, method)


def _protocol_sort_key(protocol: str) -> tuple[int, str, float]:
    """linear before finetune before KD; label fractions ascending, the full label set last."""
    base, _, fraction_text = protocol.partition("@")
    try:
        fraction = float(fraction_text.rstrip("%")) if fraction_text else math.inf
    except ValueError:
        fraction = math.inf
    rank = _PROTOCOL_ORDER.index(base) if base in _PROTOCOL_ORDER else len(_PROTOCOL_ORDER)
    return (rank, base, fraction)


def _first_appearance(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean, sample std (ddof=1; 0 for one seed) and n over seeds per (method, source, target, arch, protocol).

    Returns dicts with those five keys plus `mean`, `std` (fractions, like
    `accuracy`), `n`, `seeds` (sorted) and `wall_time_s` (mean), ordered by
    method (krr-st first, none and full-ssl last), target (first appearance)
    and protocol.
    """
    rows = list(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[field] for field in _GROUP_KEY), []).append(row)
    target_rank = {target: index for index, target in enumerate(_first_appearance(row["target"] for row in rows))}
    arch_rank = {arch: index for index, arch in enumerate(_first_appearance(row["arch"] for row in rows))}
    summaries = []
    for key, members in groups.items():
        accuracies = [float(member["accuracy"]) for member in members]
        n = len(accuracies)
        mean = math.fsum(accuracies) / n
        std = math.sqrt(math.fsum((value - mean) ** 2 for value in accuracies) / (n - 1)) if n > 1 else 0.0
        summary = dict(zip(_GROUP_KEY, key))
        summary.update(
            mean=mean,
            std=std,
            n=n,
            seeds=sorted(int(member["seed"]) for member in members),
            wall_time_s=math.fsum(float(member["wall_time_s"]) for member in members) / n,
        )
        summaries.append(summary)
    summaries.sort(
        key=lambda s: (
            arch_rank[s["arch"]],
            _method_sort_key(s["method"]),
            s["source"],
            target_rank[s["target"]],
            _protocol_sort_key(s["protocol"]),
        )
    )
    return summaries


def _format_cell(summary: dict, max_n: int) -> str:
    """`mean ± std`, with `(n=k)` when fewer seeds than the table's most; one seed has no spread to show."""
    if summary["n"] == 1:
        return f"{100 * summary['mean']:.1f} (n=1)"
    text = f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"
    return text + (f" (n={summary['n']})" if summary["n"] < max_n else "")


def _table_models(rows: Iterable[dict], arch: str | None = None) -> list[dict]:
    """One table per architecture: header labels and, per method row, cells (text, bold)."""
    rows = list(rows)
    if arch is not None:
        rows = [row for row in rows if row["arch"] == arch]
    summaries = summarize(rows)
    tables = []
    for table_arch in _first_appearance(s["arch"] for s in summaries):
        in_table = [s for s in summaries if s["arch"] == table_arch]
        columns = sorted(
            {(s["target"], s["protocol"]) for s in in_table},
            key=lambda col: (
                _first_appearance(s["target"] for s in in_table).index(col[0]),
                _protocol_sort_key(col[1]),
            ),
        )
        # A method evaluated from more than one source set gets one row per source.
        sources_per_method: dict[str, set[str]] = {}
        for s in in_table:
            sources_per_method.setdefault(s["method"], set()).add(s["source"])
        row_keys = _first_appearance((s["method"], s["source"]) for s in in_table)
        cells = {(s["method"], s["source"], s["target"], s["protocol"]): s for s in in_table}
        max_n = max(s["n"] for s in in_table)
        best: dict[tuple[str, str], float] = {}
        for column in columns:
            contenders = [
                round(100 * s["mean"], 1)
                for s in in_table
                if (s["target"], s["protocol"]) == column and s["method"] not in REFERENCE_METHODS
            ]
            if len(contenders) >= 2:
                best[column] = max(contenders)
        body = []
        for method, source in row_keys:
            label = f"{method} ({source})" if len(sources_per_method[method]) > 1 and source else method
            row_cells = []
            for column in columns:
                summary = cells.get((method, source, *column))
                if summary is None:
                    row_cells.append((_MISSING_CELL, False))
                    continue
                text = _format_cell(summary, max_n)
                is_best = (
                    column in best
                    and method not in REFERENCE_METHODS
                    and round(100 * summary["mean"], 1) == best[column]
                )
                row_cells.append((text, is_best))
            body.append((label, row_cells))
        seeds = sorted({seed for s in in_table for seed in s["seeds"]})
        tables.append(
            {
                "arch": table_arch,
                "columns": [f"{target} {protocol}" for target, protocol in columns],
                "rows": body,
                "max_n": max_n,
                "seeds": seeds,
                "has_reference": any(s["method"] in REFERENCE_METHODS for s in in_table),
            }
        )
    return tables


def _table_caption(table: dict) -> str:
    seeds = ", ".join(map(str, table["seeds"]))
    if table["max_n"] == 1:
        spread = f"one seed per cell (seed{'s' if len(table['seeds']) > 1 else ''} {seeds}), so no spread over seeds"
    else:
        spread = f"mean ± sample std over seeds ({table['max_n']} per cell unless marked n=, seeds {seeds})"
    caption = f"Top-1 accuracy (%), {spread}; arch {table['arch']}; best per column in bold"
    if table["has_reference"]:
        caption += f" ({', '.join(REFERENCE_METHODS)} is the ceiling and not ranked)"
    return caption + "."


def _markdown_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def markdown_table(rows: Iterable[dict], arch: str | None = None) -> str:
    """Markdown table(s) of mean ± std in percent: methods as rows, (target, protocol) as columns.

    The best mean per column (full-ssl excluded) is **bold**. With `arch`
    only that architecture's rows are shown; otherwise one table per
    architecture. Returns a note when there are no rows.
    """
    tables = _table_models(rows, arch)
    if not tables:
        return "No results" + (f" for arch {arch}" if arch else "") + ".\n"
    parts = []
    for table in tables:
        lines = [
            "| method | " + " | ".join(_markdown_escape(column) for column in table["columns"]) + " |",
            "|---|" + "---:|" * len(table["columns"]),
        ]
        for label, cells in table["rows"]:
            rendered = [f"**{text}**" if bold else text for text, bold in cells]
            lines.append(f"| {_markdown_escape(label)} | " + " | ".join(rendered) + " |")
        parts.append(_table_caption(table) + "\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def sets_table(sets: Any, provenance: dict[str, str] | None = None) -> str:
    """Markdown table of what each pre-training set holds: images, storage in MB and relative to KRR-ST's.

    `sets` is `sets.json` of a run directory: `{method: {"images", "storage_bytes", "parameterization"}}`
    (written by the pipeline). A malformed entry is a one-line `KrrstError`. With `provenance`
    (`method_provenance` of the results) a last column says what each set's rows came from.
    """
    if not isinstance(sets, dict):
        raise KrrstError(f"{SETS_NAME}: expected an object of methods, got {type(sets).__name__}")
    for method, entry in sets.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("images"), int)
                and isinstance(entry.get("storage_bytes"), int) and entry["storage_bytes"] > 0):
            raise KrrstError(f"{SETS_NAME}: entry {method!r} needs integer images and storage_bytes > 0, got {entry!r}")
    reference = sets.get("krr-st", {}).get("storage_bytes")
    lines = ["| set | images | parameterisation | storage (MB) |" + (" vs krr-st |" if reference else "")
             + (" provenance |" if provenance else ""),
             "|---|---:|---|---:|" + ("---:|" if reference else "") + ("---|" if provenance else "")]
    for method in sorted(sets, key=_method_sort_key):
        entry = sets[method]
        cells = [_markdown_escape(str(method)), str(entry["images"]),
                 _markdown_escape(str(entry.get("parameterization", "pixels"))), f"{entry['storage_bytes'] / 1e6:.2f}"]
        if reference:
            cells.append(f"{entry['storage_bytes'] / reference:.2f}x")
        if provenance:
            cells.append(_markdown_escape(provenance.get(method, _MISSING_CELL)))
        lines.append("| " + " | ".join(cells) + " |")
    return "Pre-training sets (storage: float32 values as stored, bases and predictors included).\n\n" + "\n".join(lines) + "\n"


def html_table(rows: Iterable[dict], arch: str | None = None) -> str:
    """The same table(s) as `markdown_table`, as escaped HTML."""
    tables = _table_models(rows, arch)
    if not tables:
        return '<p class="note">No results.</p>'
    parts = []
    for table in tables:
        head = "".join(f"<th>{html.escape(column)}</th>" for column in table["columns"])
        body = []
        for label, cells in table["rows"]:
            rendered = "".join(
                f'<td class="best"><strong>{html.escape(text)}</strong></td>' if bold else f"<td>{html.escape(text)}</td>"
                for text, bold in cells
            )
            body.append(f"<tr><th>{html.escape(label)}</th>{rendered}</tr>")
        parts.append(
            f"<table><caption>{html.escape(_table_caption(table))}</caption>"
            f"<thead><tr><th>method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots
def _new_figure(width: float, height: float):
    # A bare Figure renders through Agg without pyplot: no display, no global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _figure_png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_png(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _bar_chart_png(rows: Sequence[dict]) -> bytes:
    summaries = summarize(rows)
    if not summaries:
        raise KrrstError("bar chart: no results to plot")
    several_archs = len({s["arch"] for s in summaries}) > 1
    groups = _first_appearance((s["arch"], s["target"], s["protocol"]) for s in summaries)
    groups.sort(key=lambda g: (_first_appearance(s["arch"] for s in summaries).index(g[0]),
                               _first_appearance(s["target"] for s in summaries).index(g[1]),
                               _protocol_sort_key(g[2])))
    series = _first_appearance((s["method"], s["source"]) for s in summaries)
    sources_per_method: dict[str, set[str]] = {}
    for method, source in series:
        sources_per_method.setdefault(method, set()).add(source)
    by_key = {(s["method"], s["source"], s["arch"], s["target"], s["protocol"]): s for s in summaries}

    figure = _new_figure(max(6.0, 0.45 * len(groups) * max(1, len(series)) + 2.0), 4.5)
    axes = figure.add_subplot()
    bar_width = 0.8 / len(series)
    colors = [f"C{index % 10}" for index in range(len(series))]
    for index, (method, source) in enumerate(series):
        positions, means, stds = [], [], []
        for group_index, group in enumerate(groups):
            summary = by_key.get((method, source, *group))
            if summary is not None:
                positions.append(group_index - 0.4 + bar_width * (index + 0.5))
                means.append(100 * summary["mean"])
                stds.append(100 * summary["std"])
        label = f"{method} ({source})" if len(sources_per_method[method]) > 1 and source else method
        axes.bar(positions, means, width=bar_width, yerr=stds, capsize=3, color=colors[index], label=label)
    labels = [f"{target}\n{protocol}" + (f"\n{arch}" if several_archs else "") for arch, target, protocol in groups]
    axes.set_xticks(range(len(groups)), labels, fontsize=8)
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("Accuracy per method (mean ± std over seeds)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _figure_png_bytes(figure)


def bar_chart(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write a PNG bar chart of mean ± std accuracy per method per (target, protocol), atomically."""
    return _write_png(path, _bar_chart_png(list(rows)))


def _read_loss_rows(source: str | os.PathLike | Iterable[dict]) -> tuple[list[dict], str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise KrrstError(f"loss CSV not found: {path}")
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle)), str(path)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise KrrstError(f"loss CSV {path} is not a readable CSV file ({exc})") from None
    return list(source), "loss rows"


def _numeric(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _loss_curve_png(source: str | os.PathLike | Iterable[dict], title: str | None = None) -> bytes:
    rows, what = _read_loss_rows(source)
    if not rows:
        raise KrrstError(f"{what} holds no rows to plot")
    columns = _first_appearance(key for row in rows for key in row if key is not None)
    x_column = next((name for name in ("step", "iteration", "epoch") if name in columns), None)
    numeric_columns = [
        name for name in columns if name != x_column and any(_numeric(row.get(name)) is not None for row in rows)
    ]
    # Plot losses only: learning rates or timings on the same axis would flatten the curves.
    y_columns = [name for name in numeric_columns if "loss" in name.lower()] or numeric_columns
    if not y_columns:
        raise KrrstError(f"{what} has no numeric column to plot (columns: {', '.join(columns)})")
    figure = _new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    all_values = []
    for name in y_columns:
        points = [
            (_numeric(row.get(x_column)) if x_column else float(index), _numeric(row.get(name)))
            for index, row in enumerate(rows)
        ]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            xs, ys = zip(*points)
            marker = "o" if len(points) < 30 else None
            axes.plot(xs, ys, label=name, marker=marker, markersize=3)
            all_values.extend(ys)
    positive = [value for value in all_values if value > 0]
    if positive and len(positive) == len(all_values) and max(positive) / min(positive) > 50:
        axes.set_yscale("log")  # losses spanning decades read better on a log axis
    axes.set_xlabel(x_column or "row")
    axes.set_ylabel("loss")
    axes.set_title(title or (Path(what).name if what != "loss rows" else "loss"))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _figure_png_bytes(figure)


def loss_curve(csv_path_or_rows: str | os.PathLike | Iterable[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG of a loss CSV (or its rows as dicts): step against loss and, where present, val_loss.

    The x axis is `step` (else `iteration`, `epoch`, or the row number); every
    column whose name contains "loss" is a curve (all numeric columns when
    none does); empty cells (e.g. a validation loss logged every k steps)
    are skipped.
    """
    return _write_png(path, _loss_curve_png(csv_path_or_rows, title))


# --------------------------------------------------------------------------- report
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; font-size: .9em; color: #555; padding-bottom: .3em; }
td.best { background: #eaf6ea; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: .8em; overflow-x: auto; font-size: .85em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
img.preview { image-rendering: pixelated; }
.note { color: #8a5a00; background: #fff7e6; border-left: 3px solid #f0b400; padding: .3em .6em; }
.provenance { color: #555; font-size: .9em; }
"""


def _load_optional_json(path: Path, what: str, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return read_json(path, what)
    except KrrstError as exc:
        notes.append(str(exc))
        return None


def _provenance_line(run_dir: Path, rows: Sequence[dict], env: dict | None) -> str:
    from krrst import __version__

    parts = [f"{len(rows)} result rows from results.csv", f"krrst {__version__}"]
    sets = method_provenance(rows)
    if sets:
        parts.append("sets " + ", ".join(f"{method} {sets[method]}" for method in sorted(sets, key=_method_sort_key)))
    if isinstance(env, dict):
        if env.get("git_commit"):
            parts.append(f"commit {env['git_commit']}")
        device = env.get("cuda_device") or env.get("device")
        if device:
            parts.append(f"device {device}")
        versions = env.get("versions")
        if isinstance(versions, dict) and versions.get("torch"):
            parts.append(f"torch {versions['torch']}")
    return "Provenance: " + "; ".join(parts) + "."


def _format_duration(seconds: float) -> str:
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _env_value_text(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {item if item is not None else '(absent)'}" for name, item in value.items())
    if isinstance(value, (list, tuple)):
        return shlex.join(str(item) for item in value) if key == "command" else ", ".join(map(str, value))
    return "" if value is None else str(value)


def format_bytes(size: float) -> str:
    """`1234567` -> `"1.2 MB"` (decimal units, as the sets table's MB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _tree_bytes(path: Path) -> int:
    """Bytes of the files at or under `path`; symbolic links count as themselves, not as what they point to."""
    if path.is_symlink() or not path.is_dir():
        paths = [str(path)]
    else:
        paths = [os.path.join(folder, name) for folder, _, files in os.walk(path) for name in files]
    total = 0
    for name in paths:
        try:
            total += os.lstat(name).st_size
        except OSError:  # removed while we walk
            pass
    return total


def disk_usage_text(run_dir: str | os.PathLike, largest: int = 3) -> str:
    """One line: the bytes of the run folder's files, and of its `largest` subfolders.

    e.g. `runs/demo holds 2.4 MB (eval/ 1.1 MB, distill/ 0.9 MB, teacher/ 0.3 MB)`.
    """
    run_dir = Path(run_dir)
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    total = sum(_tree_bytes(entry) for entry in entries)
    folders = sorted(((_tree_bytes(entry), entry.name) for entry in entries if entry.is_dir() and not entry.is_symlink()),
                     reverse=True)
    shown = ", ".join(f"{name}/ {format_bytes(size)}" for size, name in folders[:largest] if size)
    return f"{run_dir} holds {format_bytes(total)}" + (f" ({shown})" if shown else "") + "\n"


def report_text(run_dir: str | os.PathLike) -> str:
    """What `krrst report RUN_DIR` prints: the Markdown results table(s) (or a note when there are none), then
    the folder's disk use (`disk_usage_text`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KrrstError(f"run directory not found: {run_dir}")
    rows = read_results(run_dir)
    table = markdown_table(rows) if rows else f"No results yet in {run_dir / 'results.csv'}.\n"
    return table + "\n" + disk_usage_text(run_dir)


def print_table(run_dir: str | os.PathLike) -> None:
    """Print `report_text(run_dir)` to stdout."""
    print(report_text(run_dir), end="")


def write_report(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `results.md`, `results.png` and `report.html` for a run directory; returns the paths written.

    Reads whatever the run holds (`config.json`, `env.json`, `timings.json`,
    `results.csv`, `distill/preview.png`, `distill/loss.csv`,
    `teacher/loss.csv`); a missing or unreadable piece is left out of the
    page with a note, never an error. `results.md` and `results.png` are only
    written when there are results. `report.html` is one self-contained page:
    images as base64 data URIs, inline CSS, every text HTML-escaped.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KrrstError(f"run directory not found: {run_dir}")
    written: dict[str, Path] = {}
    sections: list[str] = []
    read_notes: list[str] = []

    config = _load_optional_json(run_dir / "config.json", "config", read_notes)
    env = _load_optional_json(run_dir / "env.json", "env", read_notes)
    timings = _load_optional_json(run_dir / "timings.json", "timings", read_notes)

    def note(text: str) -> str:
        return f'<p class="note">{html.escape(text)}</p>'

    # Results: table and bar chart.
    try:
        rows = read_results(run_dir)
        results_error = None
    except KrrstError as exc:
        rows, results_error = [], str(exc)
    results_html = ["<h2>Results</h2>"]
    if results_error:
        results_html.append(note(f"results.csv could not be read: {results_error}"))
    elif not rows:
        results_html.append(note("No results yet (results.csv is absent or empty): the evaluation stage has not run."))
    else:
        provenance = _provenance_line(run_dir, rows, env if isinstance(env, dict) else None)
        markdown = markdown_table(rows)
        if (run_dir / SETS_NAME).is_file():
            try:
                markdown += "\n" + sets_table(read_json(run_dir / SETS_NAME, SETS_NAME), method_provenance(rows))
            except KrrstError as exc:
                read_notes.append(f"{SETS_NAME} left out: {exc}")
        with atomic_write(run_dir / "results.md") as tmp:
            tmp.write_text(f"# Results: {run_dir.name}\n\n{markdown}\n{provenance}\n", encoding="utf-8")
        written["results_md"] = run_dir / "results.md"
        results_html.append(html_table(rows))
        results_html.append(f'<p class="provenance">{html.escape(provenance)}</p>')
        try:
            chart = _bar_chart_png(rows)
        except Exception as exc:  # a plotting failure must not cost the user the rest of the report
            results_html.append(note(f"bar chart failed: {exc}"))
        else:
            written["results_png"] = _write_png(run_dir / "results.png", chart)
            results_html.append(f'<img src="{_data_uri(chart)}" alt="bar chart of accuracy per method">')
    sections.append("\n".join(results_html))

    # Distilled images.
    preview_path = run_dir / "distill" / "preview.png"
    preview_html = ["<h2>Distilled images</h2>"]
    if not preview_path.is_file():
        preview_html.append(note("No distill/preview.png: the distillation stage has not run."))
    else:
        data = preview_path.read_bytes()
        if not data.startswith(_PNG_SIGNATURE):
            preview_html.append(note("distill/preview.png is not a PNG file; left out."))
        else:
            preview_html.append(
                f'<img class="preview" src="{_data_uri(data)}" alt="grid of distilled images">'
            )
    sections.append("\n".join(preview_html))

    # Loss curves.
    loss_html = ["<h2>Loss curves</h2>"]
    for stage in ("teacher", "distill"):
        loss_path = run_dir / stage / "loss.csv"
        if not loss_path.is_file():
            loss_html.append(note(f"No {stage}/loss.csv: the {stage} stage has not run (or logged no loss)."))
            continue
        try:
            png = _loss_curve_png(loss_path, title=f"{stage} loss")
        except Exception as exc:  # a corrupt or empty log is reported, not fatal
            loss_html.append(note(f"{stage}/loss.csv could not be plotted: {exc}"))
        else:
            loss_html.append(f'<img src="{_data_uri(png)}" alt="{html.escape(stage)} loss curve">')
    sections.append("\n".join(loss_html))

    # Stage wall times.
    if timings is not None:
        timing_html = ["<h2>Stage wall times</h2>"]
        if isinstance(timings, dict) and all(_numeric(value) is not None for value in timings.values()):
            body = "".join(
                f"<tr><td>{html.escape(str(stage))}</td><td>{_format_duration(float(seconds))}</td>"
                f"<td>{float(seconds):.1f}</td></tr>"
                for stage, seconds in timings.items()
            )
            total = math.fsum(float(seconds) for seconds in timings.values())
            timing_html.append(
                "<table><thead><tr><th>stage</th><th>h:mm:ss</th><th>seconds</th></tr></thead>"
                f"<tbody>{body}<tr><th>total</th><th>{_format_duration(total)}</th><th>{total:.1f}</th></tr></tbody></table>"
            )
        else:
            timing_html.append(note("timings.json is not a mapping of stage to seconds; left out."))
        sections.append("\n".join(timing_html))

    # Config and environment.
    config_html = ["<h2>Config</h2>"]
    if config is None:
        config_html.append(note("No config.json in this run directory."))
    else:
        config_html.append(f"<pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>")
    sections.append("\n".join(config_html))

    env_html = ["<h2>Environment</h2>"]
    if env is None:
        env_html.append(note("No env.json in this run directory."))
    elif isinstance(env, dict):
        body = "".join(
            f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(_env_value_text(str(key), value))}</td></tr>"
            for key, value in env.items()
        )
        env_html.append(f'<table class="env"><tbody>{body}</tbody></table>')
    else:
        env_html.append(f"<pre>{html.escape(json.dumps(env, indent=2, default=str))}</pre>")
    sections.append("\n".join(env_html))

    if read_notes:
        sections.insert(0, "\n".join(note(text) for text in read_notes))

    title = f"krrst run: {run_dir.resolve().name}"
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<p class="provenance">Run directory: {html.escape(str(run_dir.resolve()))}</p>\n'
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    with atomic_write(run_dir / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    written["report_html"] = run_dir / "report.html"
    return written
