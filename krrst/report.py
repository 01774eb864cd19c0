"""The user-facing report of a run directory: tables, plots and `report.html`.

From the rows of `results.csv` (`krrst.results`: every evaluation's row and
its provenance) this module builds the Markdown table of mean ± std over
seeds (`results.md`), a bar chart (`results.png`), loss-curve plots and
`report.html`: one self-contained page (images embedded as data URIs, inline
CSS) that shows what a run did. It sits beside the pipeline: no stage imports it.

Accuracies are stored as fractions in [0, 1] and shown in percent.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import os
import shlex
import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from krrst.infra.errors import KrrstError
from krrst.infra.io import atomic_write, read_json
from krrst.results import SETS_NAME, method_provenance, read_results

if TYPE_CHECKING:
    import torch

_GROUP_KEY = ("method", "source", "target", "arch", "protocol")

# Methods shown first, in this order; unknown methods (external sets) follow
# alphabetically, then the no-pre-training floor and the full-data ceiling.
_LEADING_METHODS = ("krr-st", "random", "kmeans", "high-loss")
_TRAILING_METHODS = ("none", "full-ssl")
# Reference rows do not compete for the bold "best" mark: the full-data
# teacher is the ceiling the distilled sets are measured against.
REFERENCE_METHODS = ("full-ssl",)
_PROTOCOL_ORDER = ("linear", "finetune", "kd")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MISSING_CELL = "–"


# --------------------------------------------------------------------------- summaries and tables
def _method_sort_key(method: str) -> tuple[int, int, str]:
    base = method.rsplit(":", 1)[-1]  # merged runs name methods `<run>:<method>`: krr-st of every run first
    if base in _LEADING_METHODS:
        return (0, _LEADING_METHODS.index(base), method)
    if base in _TRAILING_METHODS:
        return (2, _TRAILING_METHODS.index(base), method)
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


def _first_appearance(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, (math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else 0.0)


def _series_labels(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A label per (method, source), in order of first appearance: the method, with its source where it has several."""
    keys = _first_appearance(keys)
    sources = Counter(method for method, _ in keys)
    return {(method, source): f"{method} ({source})" if sources[method] > 1 and source else method
            for method, source in keys}


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
    targets = _first_appearance(row["target"] for row in rows)
    archs = _first_appearance(row["arch"] for row in rows)
    summaries = []
    for key, members in groups.items():
        mean, std = _mean_std([float(member["accuracy"]) for member in members])
        summaries.append({**dict(zip(_GROUP_KEY, key)), "mean": mean, "std": std, "n": len(members),
                          "seeds": sorted(int(member["seed"]) for member in members),
                          "wall_time_s": math.fsum(float(member["wall_time_s"]) for member in members) / len(members)})
    summaries.sort(key=lambda s: (archs.index(s["arch"]), _method_sort_key(s["method"]), s["source"],
                                  targets.index(s["target"]), _protocol_sort_key(s["protocol"])))
    return summaries


def _format_cell(summary: dict, max_n: int) -> str:
    """`mean ± std`, with `(n=k)` when fewer seeds than the table's most; one seed has no spread to show."""
    if summary["n"] == 1:
        return f"{100 * summary['mean']:.1f} (n=1)"
    text = f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"
    return text + (f" (n={summary['n']})" if summary["n"] < max_n else "")


def _table_models(rows: Iterable[dict], arch: str | None = None) -> list[dict]:
    """One table per architecture: its caption, column labels and, per method row, cells (text, bold)."""
    summaries = summarize(row for row in rows if arch is None or row["arch"] == arch)
    tables = []
    for table_arch in _first_appearance(s["arch"] for s in summaries):
        in_table = [s for s in summaries if s["arch"] == table_arch]
        targets = _first_appearance(s["target"] for s in in_table)
        columns = sorted({(s["target"], s["protocol"]) for s in in_table},
                         key=lambda column: (targets.index(column[0]), _protocol_sort_key(column[1])))
        cells = {(s["method"], s["source"], s["target"], s["protocol"]): s for s in in_table}
        max_n = max(s["n"] for s in in_table)
        contenders: dict[tuple[str, str], list[float]] = {}
        for s in in_table:
            if s["method"] not in REFERENCE_METHODS:
                contenders.setdefault((s["target"], s["protocol"]), []).append(round(100 * s["mean"], 1))
        best = {column: max(means) for column, means in contenders.items() if len(means) >= 2}
        body = []
        # A method evaluated from more than one source set gets one row per source.
        for (method, source), label in _series_labels((s["method"], s["source"]) for s in in_table).items():
            row_cells = []
            for column in columns:
                summary = cells.get((method, source, *column))
                if summary is None:
                    row_cells.append((_MISSING_CELL, False))
                    continue
                is_best = method not in REFERENCE_METHODS and round(100 * summary["mean"], 1) == best.get(column)
                row_cells.append((_format_cell(summary, max_n), is_best))
            body.append((label, row_cells))
        seeds = sorted({seed for s in in_table for seed in s["seeds"]})
        listed = ", ".join(map(str, seeds))
        if max_n == 1:
            spread = f"one seed per cell (seed{'s' if len(seeds) > 1 else ''} {listed}), so no spread over seeds"
        else:
            spread = f"mean ± sample std over seeds ({max_n} per cell unless marked n=, seeds {listed})"
        caption = f"Top-1 accuracy (%), {spread}; arch {table_arch}; best per column in bold"
        if any(s["method"] in REFERENCE_METHODS for s in in_table):
            caption += f" ({', '.join(REFERENCE_METHODS)} is the ceiling and not ranked)"
        tables.append({"caption": caption + ".", "columns": [f"{target} {protocol}" for target, protocol in columns],
                       "rows": body})
    return tables


def _markdown_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def _markdown(header: Sequence[str], align: str, body: Iterable[Sequence[str]]) -> str:
    """Markdown table lines of already-escaped cells; `align` holds an `l` or `r` per column."""
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *body)]
    separator = "|" + "".join("---:|" if side == "r" else "---|" for side in align)
    return "\n".join([lines[0], separator, *lines[1:]]) + "\n"


def markdown_table(rows: Iterable[dict], arch: str | None = None) -> str:
    """Markdown table(s) of mean ± std in percent: methods as rows, (target, protocol) as columns.

    The best mean per column (full-ssl excluded) is **bold**. With `arch`
    only that architecture's rows are shown; otherwise one table per
    architecture. Returns a note when there are no rows.
    """
    tables = _table_models(rows, arch)
    if not tables:
        return "No results" + (f" for arch {arch}" if arch else "") + ".\n"
    return "\n".join(
        table["caption"] + "\n\n" + _markdown(
            ["method", *map(_markdown_escape, table["columns"])], "l" + "r" * len(table["columns"]),
            [[_markdown_escape(label), *(f"**{text}**" if bold else text for text, bold in cells)]
             for label, cells in table["rows"]])
        for table in tables)


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
    body = []
    for method in sorted(sets, key=_method_sort_key):
        entry = sets[method]
        cells = [_markdown_escape(str(method)), str(entry["images"]),
                 _markdown_escape(str(entry.get("parameterization", "pixels"))), f"{entry['storage_bytes'] / 1e6:.2f}"]
        if reference:
            cells.append(f"{entry['storage_bytes'] / reference:.2f}x")
        if provenance:
            cells.append(_markdown_escape(provenance.get(method, _MISSING_CELL)))
        body.append(cells)
    header = ["set", "images", "parameterisation", "storage (MB)"] + ["vs krr-st"] * bool(reference)
    return ("Pre-training sets (storage: float32 values as stored, bases and predictors included).\n\n"
            + _markdown(header + ["provenance"] * bool(provenance),
                        "lrlr" + "r" * bool(reference) + "l" * bool(provenance), body))


def html_table(rows: Iterable[dict], arch: str | None = None) -> str:
    """The same table(s) as `markdown_table`, as escaped HTML."""
    tables = _table_models(rows, arch)
    if not tables:
        return _note("No results.")
    return "\n".join(_html_table(["method", *table["columns"]],
                                  [[label, *((text, "best") if bold else text for text, bold in cells)]
                                   for label, cells in table["rows"]], table["caption"], row_headers=True)
                      for table in tables)


# --------------------------------------------------------------------------- paired differences
# The floors each method is compared with, in order: a method is compared with every reference listed at or
# after its own place (random with none, but none not with random: that is the same pair, negated).
DEFAULT_REFERENCES = ("random", "none")
CONFIDENCE = 0.95


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom `df` >= 1.

    Exact finite sums in theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3 and 26.7.4):
    odd df: (2/pi) [theta + sin(theta) (cos(theta) + 2/3 cos^3(theta) + ...
                    + (2.4...(df-3))/(1.3...(df-2)) cos^(df-2)(theta))];
    even df: sin(theta) [1 + 1/2 cos^2(theta) + ... + (1.3...(df-3))/(2.4...(df-2)) cos^(df-2)(theta)].
    """
    theta = math.atan(t / math.sqrt(df))
    if df == 1:
        return 2 * theta / math.pi
    odd = df % 2 == 1
    cos_squared = math.cos(theta) ** 2
    # the sum in brackets: each term is the one before times (k-1)/k cos^2(theta)
    term = total = math.cos(theta) if odd else 1.0
    for k in range(3 if odd else 2, df - 1, 2):
        term *= (k - 1) / k * cos_squared
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total) if odd else math.sin(theta) * total


def t_quantile(df: int, probability: float = 0.975) -> float:
    """The `probability` quantile (> 0.5) of Student's t with `df` degrees of freedom, without scipy.

    Bisection on the exact distribution function `_t_central_mass` (to float
    precision): t_quantile(1) = tan(0.475 pi) = 12.706, t_quantile(2) = 4.303,
    t_quantile(10) = 2.228, and 1.960 as df grows.
    """
    if df < 1 or not 0.5 < probability < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < probability < 1, got {df}, {probability}")
    mass = 2 * probability - 1
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < mass:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if _t_central_mass(middle, df) < mass else (low, middle)
    return (low + high) / 2


def paired_summary(differences: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of paired differences, its t-interval and the wins: `{n, mean, low, high, wins, losses}`.

    The interval is mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) with s the
    sample std (ddof=1); with one pair there is none (`low`, `high` None).
    `wins` counts the positive differences, `losses` the negative ones.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("paired_summary needs at least one difference")
    mean, std = _mean_std(differences)
    low = high = None
    if n > 1:
        half = t_quantile(n - 1, (1 + confidence) / 2) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "low": low, "high": high,
            "wins": sum(value > 0 for value in differences), "losses": sum(value < 0 for value in differences)}


def paired_comparisons(rows: Iterable[dict], references: Sequence[str] = DEFAULT_REFERENCES) -> list[dict]:
    """Each method against each reference, paired by (target, arch, protocol, seed), in accuracy points.

    A method is compared with every reference listed after it in `references` (the reference itself excluded),
    so with ("random", "none") KRR-ST meets both, random meets none, and none meets nothing; a merged method
    `<run>:<method>` counts as its `<method>` there. Rows pair when they share target, arch, protocol and seed:
    the same label subset, initialisation and batch order. Returns one dict per (reference, method, source,
    target, arch, protocol) with at least one pair: those keys, `seeds`, `differences` (100 x (method -
    reference) per seed) and `paired_summary`'s fields, ordered by reference, arch, target, protocol and method.
    """
    rows = list(rows)
    ours: dict[tuple, dict[int, float]] = {}  # (method, source, target, arch, protocol) -> {seed: accuracy}
    floors: dict[tuple, dict[str, float]] = {}  # (method, target, arch, protocol, seed) -> {source: accuracy}
    for row in rows:
        ours.setdefault(tuple(row[field] for field in _GROUP_KEY), {})[row["seed"]] = row["accuracy"]
        floors.setdefault((row["method"], row["target"], row["arch"], row["protocol"], row["seed"]),
                          {})[row["source"]] = row["accuracy"]
    methods = sorted({row["method"] for row in rows}, key=_method_sort_key)
    targets = _first_appearance(row["target"] for row in rows)
    archs = _first_appearance(row["arch"] for row in rows)
    groups = sorted(_first_appearance((row["source"], row["target"], row["arch"], row["protocol"]) for row in rows),
                    key=lambda g: (archs.index(g[2]), targets.index(g[1]), _protocol_sort_key(g[3]), g[0]))
    comparisons = []
    for index, reference in enumerate(references):
        # merged runs name methods `<run>:<method>`: e2:none is not compared with e1:random either
        later = {name.rsplit(":", 1)[-1] for name in references[index:]}
        for (source, target, arch, protocol), method in itertools.product(groups, methods):
            if method.rsplit(":", 1)[-1] in later:
                continue
            paired_seeds, differences = [], []
            for seed, value in sorted(ours.get((method, source, target, arch, protocol), {}).items()):
                floor = floors.get((reference, target, arch, protocol, seed), {})
                # the reference's row of the same source, else its only row (e.g. none, which has no source)
                floor_value = floor.get(source, next(iter(floor.values())) if len(floor) == 1 else None)
                if floor_value is not None:
                    paired_seeds.append(seed)
                    differences.append(100 * (value - floor_value))
            if differences:
                comparisons.append({"reference": reference, "method": method, "source": source, "target": target,
                                    "arch": arch, "protocol": protocol, "seeds": paired_seeds,
                                    "differences": differences, **paired_summary(differences)})
    return comparisons


def _interval_text(comparison: dict) -> str:
    return "–" if comparison["low"] is None else f"[{comparison['low']:+.1f}, {comparison['high']:+.1f}]"


def _comparison_labels(comparisons: Sequence[dict]) -> list[str]:
    """Per comparison: its protocol, after its target where targets differ and before its arch where archs differ."""
    several_targets = len({c["target"] for c in comparisons}) > 1
    several_archs = len({c["arch"] for c in comparisons}) > 1
    return [" ".join([c["target"]] * several_targets + [c["protocol"]] + [c["arch"]] * several_archs)
            for c in comparisons]


def _paired_rows(comparisons: Sequence[dict]) -> list[list[str]]:
    """Per comparison: method, reference, protocol, mean difference, interval, wins / seeds, each seed's difference."""
    return [[c["method"], c["reference"], label, f"{c['mean']:+.2f}", _interval_text(c), f"{c['wins']}/{c['n']}",
             ", ".join(f"{d:+.1f}" for d in c["differences"])]
            for c, label in zip(comparisons, _comparison_labels(comparisons))]


def paired_markdown(comparisons: Sequence[dict]) -> str:
    """Markdown table of `paired_comparisons`: mean difference, 95% t-interval, wins / paired seeds."""
    if not comparisons:
        return ""
    header = ["method", "against", "protocol", "mean difference (points)", "95% t-interval", "wins / seeds", "per seed"]
    body = [[*map(_markdown_escape, cells[:3]), *cells[3:]] for cells in _paired_rows(comparisons)]
    return (f"Paired differences (method minus reference, accuracy points, paired by seed; "
            f"{CONFIDENCE:.0%} t-interval over the paired seeds).\n\n" + _markdown(header, "lllrrrl", body))


def _results_markdown(rows: Sequence[dict], comparisons: Sequence[dict]) -> str:
    """The accuracy table(s), then the paired differences where there are any."""
    paired = paired_markdown(comparisons)
    return markdown_table(rows) + ("\n" + paired if paired else "")


# --------------------------------------------------------------------------- plots
def _new_figure(width: float, height: float):
    # A bare Figure renders through Agg without pyplot: no display, no global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _figure_png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _bar_chart_png(rows: Sequence[dict]) -> bytes:
    summaries = summarize(rows)
    if not summaries:
        raise KrrstError("bar chart: no results to plot")
    archs = _first_appearance(s["arch"] for s in summaries)
    targets = _first_appearance(s["target"] for s in summaries)
    groups = sorted(_first_appearance((s["arch"], s["target"], s["protocol"]) for s in summaries),
                    key=lambda g: (archs.index(g[0]), targets.index(g[1]), _protocol_sort_key(g[2])))
    series = _series_labels((s["method"], s["source"]) for s in summaries)
    by_key = {(s["method"], s["source"], s["arch"], s["target"], s["protocol"]): s for s in summaries}

    figure = _new_figure(max(6.0, 0.45 * len(groups) * max(1, len(series)) + 2.0), 4.5)
    axes = figure.add_subplot()
    bar_width = 0.8 / len(series)
    for index, ((method, source), label) in enumerate(series.items()):
        shown = [(position, by_key[(method, source, *group)]) for position, group in enumerate(groups)
                 if (method, source, *group) in by_key]
        axes.bar([position - 0.4 + bar_width * (index + 0.5) for position, _ in shown],
                 [100 * s["mean"] for _, s in shown], width=bar_width, yerr=[100 * s["std"] for _, s in shown],
                 capsize=3, color=f"C{index % 10}", label=label)
    labels = [f"{target}\n{protocol}" + (f"\n{arch}" if len(archs) > 1 else "") for arch, target, protocol in groups]
    axes.set_xticks(range(len(groups)), labels, fontsize=8)
    axes.set(ylabel="top-1 accuracy (%)", title="Accuracy per method (mean ± std over seeds)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _figure_png_bytes(figure)


def bar_chart(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write a PNG bar chart of mean ± std accuracy per method per (target, protocol), atomically."""
    return _write(path, _bar_chart_png(list(rows)))


def _read_loss_rows(source: str | os.PathLike | Iterable[dict]) -> tuple[list[dict], str]:
    if not isinstance(source, (str, os.PathLike)):
        return list(source), "loss rows"
    path = Path(source)
    if not path.is_file():
        raise KrrstError(f"loss CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle)), str(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KrrstError(f"loss CSV {path} is not a readable CSV file ({exc})") from None


def _numeric(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _points(rows: Sequence[dict], x_column: str | None, y_column: str) -> list[tuple[float, float]]:
    """(x, y) of the rows where both are numbers; x is the row's number when `x_column` is None."""
    points = [(_numeric(row.get(x_column)) if x_column else float(index), _numeric(row.get(y_column)))
              for index, row in enumerate(rows)]
    return [(x, y) for x, y in points if x is not None and y is not None]


def _loss_curve_png(source: str | os.PathLike | Iterable[dict], title: str | None = None) -> bytes:
    rows, what = _read_loss_rows(source)
    if not rows:
        raise KrrstError(f"{what} holds no rows to plot")
    columns = _first_appearance(key for row in rows for key in row if key is not None)
    x_column = next((name for name in ("step", "iteration", "epoch") if name in columns), None)
    numeric_columns = [name for name in columns
                       if name != x_column and any(_numeric(row.get(name)) is not None for row in rows)]
    # Plot losses only: learning rates or timings on the same axis would flatten the curves.
    y_columns = [name for name in numeric_columns if "loss" in name.lower()] or numeric_columns
    if not y_columns:
        raise KrrstError(f"{what} has no numeric column to plot (columns: {', '.join(columns)})")
    figure = _new_figure(6.5, 3.8)
    axes = figure.add_subplot()
    all_values = []
    for name in y_columns:
        points = _points(rows, x_column, name)
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, label=name, marker="o" if len(points) < 30 else None, markersize=3)
            all_values.extend(ys)
    positive = [value for value in all_values if value > 0]
    if positive and len(positive) == len(all_values) and max(positive) / min(positive) > 50:
        axes.set_yscale("log")  # losses spanning decades read better on a log axis
    axes.set(xlabel=x_column or "row", ylabel="loss",
             title=title or (Path(what).name if what != "loss rows" else "loss"))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _figure_png_bytes(figure)


def loss_curve(csv_path_or_rows: str | os.PathLike | Iterable[dict], path: str | os.PathLike,
               title: str | None = None) -> Path:
    """Write a PNG of a loss CSV (or its rows as dicts): step (else `iteration`, `epoch`, or the row number)
    against every column whose name contains "loss" (all numeric columns when none does); empty cells are skipped."""
    return _write(path, _loss_curve_png(csv_path_or_rows, title))


def _paired_plot_png(comparisons: Sequence[dict]) -> bytes:
    """Dot plot of paired differences: the mean with its t-interval, each seed's difference, 0 marked.

    One panel per reference, each on its own axis scaled to its differences
    (against no pre-training they can be ten times those against random).
    """
    references = _first_appearance(c["reference"] for c in comparisons)
    # one colour per method, krr-st first (C0)
    methods = sorted({c["method"] for c in comparisons}, key=_method_sort_key)
    colors = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    labelled = list(zip(comparisons, _comparison_labels(comparisons)))
    most = max(sum(c["reference"] == reference for c in comparisons) for reference in references)
    figure = _new_figure(5.2 * len(references) + 0.6, 1.1 + 0.36 * most)
    for index, reference in enumerate(references):
        axes = figure.add_subplot(1, len(references), index + 1)
        members = [c for c in comparisons if c["reference"] == reference]
        labels = [label for c, label in labelled if c["reference"] == reference]
        values = [0.0]
        for row, c in enumerate(members):
            y = len(members) - 1 - row
            color = colors[c["method"]]
            axes.scatter(c["differences"], [y] * c["n"], s=14, color=color, alpha=0.45, linewidths=0, zorder=2)
            interval = [] if c["low"] is None else [c["low"], c["high"]]
            xerr = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]] if interval else None
            axes.errorbar(c["mean"], y, xerr=xerr, fmt="o", color=color, capsize=3, markersize=6, zorder=3)
            values += interval + list(c["differences"])
            axes.annotate(f"{c['wins']}/{c['n']}", xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                          textcoords="offset points", va="center", fontsize=8, color="#555")
        span = max(values) - min(values) or 1.0
        axes.set(xlim=(min(values) - 0.08 * span, max(values) + 0.08 * span), ylim=(-0.6, len(members) - 0.4),
                 xlabel=f"minus {reference} (accuracy points)")
        axes.axvline(0.0, color="#333", linewidth=0.9, zorder=1)
        axes.set_yticks(range(len(members)), [f"{label} · {c['method']}" for c, label in zip(members, labels)][::-1],
                        fontsize=8)
        for row in range(1, len(members)):  # a rule between protocols
            if labels[row] != labels[row - 1]:
                axes.axhline(len(members) - row - 0.5, color="#ddd", linewidth=0.8)
        axes.set_title(f"against {reference}   (wins/seeds at right)", fontsize=9)
        axes.grid(axis="x", alpha=0.3)
    return _figure_png_bytes(figure)


def _pixels(distilled) -> torch.Tensor:
    """A set's images in grey levels 0-255 (float64, unclamped: distillation may leave the pixel range)."""
    import torch

    mean = torch.tensor(distilled.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(distilled.std, dtype=torch.float64).view(1, -1, 1, 1)
    return 255 * (distilled.images.double() * std + mean)


def image_change(start, final) -> dict[str, float]:
    """How far distillation moved the images, in grey levels (0-255): mean, 99th percentile and max of |final - start|.

    `start` and `final` are `DistilledSet`s of the same shape, pixel by pixel
    (the real images distillation started from and what it made of them).
    """
    change = (_pixels(final) - _pixels(start)).abs().flatten()
    return {"mean": float(change.mean()), "p99": float(change.quantile(0.99)) if change.numel() <= 16_000_000
            else float(change[:: change.numel() // 1_000_000 + 1].quantile(0.99)), "max": float(change.max())}


def target_drift(targets, teacher_final, teacher_start=None) -> dict[str, float]:
    """Relative MSEs of representations, against the spread of the teacher's representations of the final images.

    `drift` = sum (targets - teacher_final)^2 / sum (teacher_final - its mean)^2: how far the set's targets
    are from what the teacher says of its images (0: they are the teacher's; 1: as far as the mean predictor).
    With `teacher_start` (the teacher's representations of the images distillation started from), `moved` =
    sum (teacher_final - teacher_start)^2 on the same scale: how far the images moved in the teacher's eyes.
    """
    final = teacher_final.double()
    spread = float((final - final.mean(0, keepdim=True)).pow(2).sum())
    result = {"drift": float((targets.double() - final).pow(2).sum()) / spread}
    if teacher_start is not None:
        result["moved"] = float((final - teacher_start.double()).pow(2).sum()) / spread
    return result


def _change_grid_png(start, final, count: int = 12) -> tuple[bytes, float]:
    """The real start images, the distilled images and |difference| (heat map) for `count` images spread over the set.

    Returns the PNG and the colour scale's top in grey levels (the 99th percentile of the shown differences).
    """
    import torch

    indices = torch.linspace(0, len(final) - 1, min(count, len(final))).round().long().unique()
    before, after = _pixels(start)[indices], _pixels(final)[indices]
    difference = (after - before).abs().mean(1)  # k x H x W, averaged over channels
    top = max(float(difference.flatten().quantile(0.99)), 1e-6)
    figure = _new_figure(0.95 * len(indices) + 1.2, 3.3)
    grid = figure.subplots(3, len(indices), squeeze=False)
    for column, index in enumerate(indices.tolist()):
        for row, picture in enumerate((before[column], after[column])):
            grid[row][column].imshow((picture.clamp(0, 255) / 255).permute(1, 2, 0).numpy(), interpolation="nearest")
        grid[2][column].imshow(difference[column].numpy(), cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        grid[0][column].set_title(f"#{index}", fontsize=7)
    for row, label in enumerate(("real", "distilled", "|Δ|")):
        grid[row][0].set_ylabel(label, fontsize=8)
    for axes in grid.flat:
        axes.set(xticks=[], yticks=[])
    return _figure_png_bytes(figure), top


def _distill_curves_png(rows: Sequence[dict]) -> bytes:
    """Three panels from distill/loss.csv: the losses with the mean-predictor reference, the lr, seconds per step."""
    figure = _new_figure(11.0, 3.4)
    loss_axes, lr_axes, time_axes = figure.subplots(1, 3)
    for name, label, style in (("loss", "training KRR loss", "-"), ("val_loss", "held-out KRR loss", "-o"),
                               ("val_reference", "mean predictor (held-out)", "--")):
        points = _points(rows, "step", name)
        if points:
            loss_axes.plot(*zip(*points), style, label=label, markersize=3,
                           color="#777" if name == "val_reference" else None)
    loss_axes.set(xlabel="outer step", ylabel="loss", title="KRR-ST loss")
    loss_axes.legend(fontsize=7, loc="center right")
    rates = _points(rows, "step", "lr")
    if rates:
        lr_axes.plot(*zip(*rates))
    lr_axes.set(xlabel="outer step", ylabel="lr factor" if not rates else "lr", title="learning-rate schedule")
    per_step = seconds_per_step(rows)
    if per_step:
        time_axes.plot(*zip(*per_step), color="C2")
    time_axes.set(xlabel="outer step", ylabel="seconds per step", title="wall time per step")
    time_axes.set_ylim(bottom=0)
    for axes in (loss_axes, lr_axes, time_axes):
        axes.grid(alpha=0.3)
    return _figure_png_bytes(figure)


def seconds_per_step(rows: Sequence[dict]) -> list[tuple[float, float]]:
    """(step, seconds per step) between consecutive log rows, from their `elapsed_s` (a resume restarts the clock:
    the interval across it is left out)."""
    points = _points(rows, "step", "elapsed_s")
    return [(step, (elapsed - last_elapsed) / (step - last_step))
            for (last_step, last_elapsed), (step, elapsed) in zip(points, points[1:])
            if step > last_step and elapsed >= last_elapsed]


# --------------------------------------------------------------------------- report
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1em; margin: 1.2em 0 .3em; }
nav { font-size: .9em; margin: .6em 0 1em; } nav a { margin-right: .9em; color: #2a5db0; text-decoration: none; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; font-size: .9em; color: #555; padding-bottom: .3em; }
td.best { background: #eaf6ea; }
td.pos { color: #1a7f37; } td.neg { color: #b42318; } td.l, th.l { text-align: left; }
img.half { max-width: 560px; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: .8em; overflow-x: auto; font-size: .85em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
img.preview { image-rendering: pixelated; }
.note { color: #8a5a00; background: #fff7e6; border-left: 3px solid #f0b400; padding: .3em .6em; }
.lead { font-size: 1.02em; background: #f4f8fd; border-left: 3px solid #2a5db0; padding: .4em .7em; }
.provenance, .method { color: #555; font-size: .9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
details { margin: .6em 0; } summary { cursor: pointer; color: #2a5db0; }
"""


def _load_optional(path: Path, what: str, notes: list[str]) -> Any:
    """A JSON file of the run (or a distilled set, `.safetensors`); None when it is absent or unreadable
    (then a note says why)."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".safetensors":
            from krrst.distilled import DistilledSet

            return DistilledSet.load(path)
        return read_json(path, what)
    except KrrstError as exc:
        notes.append(str(exc))
        return None


def _provenance_line(rows: Sequence[dict], env: Any) -> str:
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
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _env_value_text(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {item if item is not None else '(absent)'}" for name, item in value.items())
    if isinstance(value, (list, tuple)):
        return shlex.join(str(item) for item in value) if key == "command" else ", ".join(map(str, value))
    return "" if value is None else str(value)


def format_bytes(size: float) -> str:
    """`1234567` -> `"1.2 MB"` (decimal units, as the sets table's MB)."""
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"


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
    folders = sorted(((_tree_bytes(entry), entry.name) for entry in entries
                      if entry.is_dir() and not entry.is_symlink()), reverse=True)
    shown = ", ".join(f"{name}/ {format_bytes(size)}" for size, name in folders[:largest] if size)
    return f"{run_dir} holds {format_bytes(total)}" + (f" ({shown})" if shown else "") + "\n"


def _p(css_class: str, text: str) -> str:
    return f'<p class="{css_class}">{html.escape(text)}</p>'


def _note(text: str) -> str:
    return _p("note", text)


def _img(png: bytes, alt: str, css_class: str = "") -> str:
    extra = f' class="{css_class}"' if css_class else ""
    return f'<img{extra} src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{html.escape(alt)}">'


def _html_table(header: Sequence[Any], body: Iterable[Sequence[Any]], caption: str = "",
                row_headers: bool = False) -> str:
    """An escaped HTML table; a cell given as (text, css_class) gets that class (`best` also bolds it).
    With `row_headers` each row's first cell is a `<th>`."""
    def cell(value: Any, tag: str = "td") -> str:
        text, css = value if isinstance(value, tuple) else (value, "")
        attribute = f' class="{css}"' if css else ""
        text = f"<strong>{html.escape(str(text))}</strong>" if css == "best" else html.escape(str(text))
        return f"<{tag}{attribute}>{text}</{tag}>"

    head = f"<thead><tr>{''.join(cell(name, 'th') for name in header)}</tr></thead>" if header else ""
    rows = "".join("<tr>" + "".join(cell(value, "th" if row_headers and index == 0 else "td")
                                    for index, value in enumerate(row)) + "</tr>" for row in body)
    caption_html = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{caption_html}{head}<tbody>{rows}</tbody></table>"


_INTERVAL_METHOD = (
    "Each difference is the method's accuracy minus the reference's on the same seed (same label subset, "
    "initialisation and batch order), in points. Interval: the mean ± t(0.975, n−1) · s/√n over the n paired "
    "seeds (a Student t-interval; the t quantile is computed exactly for integer degrees of freedom, "
    "Abramowitz & Stegun 26.7.3–4, by bisection). Wins: seeds on which the method is above the reference. "
    "With one seed there is no interval."
)


def _headline_lead(comparisons: Sequence[dict]) -> str:
    """One sentence per reference for KRR-ST (else the first method): each protocol's mean, interval and wins;
    the differences whose interval is clear of 0 in bold."""
    focus = next((c["method"] for c in comparisons if c["method"].rsplit(":", 1)[-1] == "krr-st"),
                 comparisons[0]["method"])
    sentences = []
    for reference in _first_appearance(c["reference"] for c in comparisons):
        items = []
        for c in comparisons:
            if c["method"] == focus and c["reference"] == reference:
                text = html.escape(f"{c['target']} {c['protocol']} {c['mean']:+.1f} {_interval_text(c)} "
                                   f"({c['wins']}/{c['n']} seeds)")
                clear = c["low"] is not None and (c["low"] > 0 or c["high"] < 0)
                items.append(f"<strong>{text}</strong>" if clear else text)
        if items:
            sentences.append(f"{html.escape(focus)} minus {html.escape(reference)}: " + "; ".join(items) + ".")
    return (f'<p class="lead">{" ".join(sentences)} In bold: intervals clear of 0; the others do not tell the two '
            "apart on these seeds.</p>")


def _headline_html(comparisons: Sequence[dict]) -> tuple[str, bytes | None]:
    """The page's headline section and its figure (None without paired differences)."""
    title = '<h2 id="headline">Headline: paired differences</h2>'
    if not comparisons:
        why = "No paired differences: no method shares seeds with random or none (the references)."
        return title + "\n" + _note(why), None
    body = [[(method, "l"), (reference, "l"), (label, "l"),
             (mean, "pos" if c["mean"] > 0 else "neg" if c["mean"] < 0 else ""), *rest]
            for c, (method, reference, label, mean, *rest) in zip(comparisons, _paired_rows(comparisons))]
    header = (("method", "l"), ("minus", "l"), ("protocol", "l"), "mean (points)", f"{CONFIDENCE:.0%} t-interval",
              "wins / seeds", "per seed")
    png = _paired_plot_png(comparisons)
    method = _INTERVAL_METHOD if max(c["n"] for c in comparisons) > 1 else (
        "Each difference is the method's accuracy minus the reference's on the same seed, in points; one seed "
        "per pair, so no interval over seeds.")
    return "\n".join([title, _headline_lead(comparisons),
                      _html_table(header, body, "Method minus reference, top-1 accuracy points, paired by seed."),
                      _img(png, "paired differences with 95% t-intervals"), _p("method", method)]), png


def _floor_notes(rows: Sequence[dict], comparisons: Sequence[dict], references: Sequence[str]) -> list[str]:
    """Where a column's best mean is a reference's (no pre-training, random), what the paired differences say."""
    notes = []
    summaries = summarize(rows)
    for column in _first_appearance((s["source"], s["target"], s["arch"], s["protocol"]) for s in summaries):
        ranked = [s for s in summaries if (s["source"], s["target"], s["arch"], s["protocol"]) == column
                  and s["method"] not in REFERENCE_METHODS]
        best = max(ranked, key=lambda s: s["mean"], default=None)
        if best is None or best["method"] not in references:
            continue
        _, target, arch, protocol = column
        said = "; ".join(f"{c['method']} {c['mean']:+.1f} {_interval_text(c)} ({c['wins']}/{c['n']} seeds above)"
                         for c in comparisons if c["reference"] == best["method"]
                         and (c["target"], c["arch"], c["protocol"]) == (target, arch, protocol))
        notes.append(f"{target} {protocol}: the highest mean is {best['method']}'s ({100 * best['mean']:.1f}%)"
                     + (f"; paired differences against it: {said}" if said else "")
                     + ". An interval that holds 0 means the methods are not told apart on these seeds.")
    return notes


def _accuracy_html(rows: Sequence[dict], comparisons: Sequence[dict], references: Sequence[str]) -> str:
    parts = ['<h2 id="accuracy">Accuracy</h2>', html_table(rows)]
    return "\n".join(parts + [_p("method", text) for text in _floor_notes(rows, comparisons, references)])


def _run_teacher(run_dir: Path, config: Any, notes: list[str]):
    """The run's teacher (its own `teacher/teacher.safetensors`, else `run.teacher_path` when that is a file here)."""
    from krrst.teacher import TEACHER_FILE, load_teacher

    run = config.get("run", {}) if isinstance(config, dict) else {}
    candidates = [run_dir / "teacher" / TEACHER_FILE]
    if run.get("teacher_path") and run["teacher_path"] != "pretrained":
        candidates.append(Path(run["teacher_path"]))
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        notes.append("the teacher file was not found (neither teacher/teacher.safetensors nor run.teacher_path, "
                     "which is read relative to the run's --root), so the targets' drift is not computed")
        return None
    try:
        return load_teacher(path, arch=run.get("teacher_arch") or None, device="cpu",
                            input_size=run.get("teacher_input_size") or None)
    except (KrrstError, OSError, RuntimeError) as exc:
        notes.append(f"the teacher {path} could not be loaded ({exc}), so the targets' drift is not computed")
        return None


def teacher_representations(teacher, distilled) -> torch.Tensor:
    """The teacher's representations of a set's images (m x d, float32), fed as a stage feeds it (`fit_to_source`)."""
    import torch

    from krrst.formats import fit_to_source

    model = fit_to_source(teacher, distilled.mean, distilled.std, distilled.image_size).eval()
    with torch.no_grad():
        return torch.cat([model(chunk).float().flatten(1) for chunk in distilled.images.split(256)])


def _images_html(run_dir: Path, config: Any) -> str:
    parts = ['<h2 id="images">What distillation changed</h2>']
    notes: list[str] = []
    distill = config.get("distill", {}) if isinstance(config, dict) else {}
    final = _load_optional(run_dir / "distill" / "distilled.safetensors", "distilled set", notes)
    start = _load_optional(run_dir / "baselines" / "random.safetensors", "distilled set", notes)
    if final is None:
        notes.append("No distill/distilled.safetensors: the distillation stage has not run here.")
    elif start is None or distill.get("init", "random") != "random" or start.images.shape != final.images.shape:
        notes.append("No before/after view: it needs baselines/random.safetensors (the real images KRR-ST started "
                     "from, with distill.init=random) of the distilled set's shape.")
    else:
        change = image_change(start, final)
        grid, top = _change_grid_png(start, final)
        teacher = _run_teacher(run_dir, config, notes)
        facts = [f"Distillation moved the {len(final)} images by {change['mean']:.1f} grey levels on average (of 255; "
                 f"99th percentile {change['p99']:.1f}, max {change['max']:.0f}), over all pixels and channels."]
        if teacher is not None:
            drift = target_drift(final.targets, teacher_representations(teacher, final), start.targets)
            facts.append(f"The set's targets are at relative MSE {drift['drift']:.3f} from the teacher's "
                         f"representations of the final images (0: the teacher's own; 1: as far as their mean), "
                         f"and the images' representations moved by {drift['moved']:.3f} on the same scale "
                         f"(distill.final_targets={distill.get('final_targets', 'learned')}).")
        parts += [_p("lead", " ".join(facts)),
                  _img(grid, "real start images, distilled images and their difference", "preview"),
                  _p("method", "Top: the real images the set started from (the random baseline holds exactly these); "
                     "middle: the same images after distillation; bottom: |distilled − real| averaged over channels, "
                     f"colour scale 0 to {top:.0f} grey levels (the shown differences 99th percentile), so the change "
                     f"is amplified about {255 / top:.0f}x.")]
    preview = run_dir / "distill" / "preview.png"
    if preview.is_file():
        data = preview.read_bytes()
        if data.startswith(_PNG_SIGNATURE):
            parts.append("<details><summary>All distilled images (distill/preview.png)</summary>"
                         + _img(data, "grid of distilled images", "preview") + "</details>")
        else:
            notes.append("distill/preview.png is not a PNG file; left out.")
    return "\n".join(parts + [_note(text) for text in notes])


def _teacher_html(run_dir: Path) -> str:
    parts = ['<h2 id="teacher">Teacher</h2>']
    notes: list[str] = []
    health = _load_optional(run_dir / "teacher" / "health.json", "teacher health", notes)
    if isinstance(health, dict):
        def percent(key: str) -> str:
            return f"{100 * health[key]:.1f}%" if _numeric(health.get(key)) is not None else "missing"

        body = []
        if "knn_accuracy" in health:
            body.append((f"{health.get('knn_k', 20)}-NN accuracy ({health.get('knn_sets', 'labelled target')})",
                         percent("knn_accuracy"), percent("random_knn_accuracy")))
        if _numeric(health.get("effective_rank")) is not None:
            rank = f"{health['effective_rank']:.1f} of {health.get('feature_dim')}"
            body.append(("effective rank of the features", rank, ""))
        if _numeric(health.get("std_median")) is not None:
            body.append(("per-dimension feature std: median (relative to the features' RMS)",
                         f"{health['std_median']:.3g} ({health.get('relative_median_std', float('nan')):.3g})", ""))
        if _numeric(health.get("dead_fraction")) is not None:
            body.append(("dead dimensions", f"{100 * health['dead_fraction']:.1f}%", ""))
        parts.append(_html_table(("health check", "teacher", "random network, same architecture"), body,
                                 caption=f"Features of the {health.get('images', 'check images')}."))
        if "knn_accuracy" in health and "random_knn_accuracy" not in health:
            notes.append("health.json has no random-network k-NN accuracy (a run of an older krrst; re-running "
                         "`krrst run` on this folder adds it).")
    elif health is None and not notes:
        notes.append("No teacher/health.json: the teacher was not trained in this run (run.teacher_path).")
    loss = run_dir / "teacher" / "loss.csv"
    if loss.is_file():
        try:
            parts.append(_img(_loss_curve_png(loss, title="teacher SSL loss"), "teacher loss curve", "half"))
        except Exception as exc:  # a corrupt or empty log is reported, not fatal
            notes.append(f"teacher/loss.csv could not be plotted: {exc}")
    else:
        notes.append("No teacher/loss.csv: the teacher stage has not run (or logged no loss).")
    return "\n".join(parts + [_note(text) for text in notes])


def _distill_html(run_dir: Path) -> str:
    title = '<h2 id="distillation">Distillation</h2>'
    path = run_dir / "distill" / "loss.csv"
    if not path.is_file():
        return title + "\n" + _note("No distill/loss.csv: the distill stage has not run (or logged no loss).")
    try:
        rows, _ = _read_loss_rows(path)
        if not rows:
            raise KrrstError("it holds no rows")
        png = _distill_curves_png(rows)
    except Exception as exc:  # a corrupt or empty log is reported, not fatal
        return title + "\n" + _note(f"distill/loss.csv could not be plotted: {exc}")
    held_out = [(row["step"], _numeric(row.get("val_loss")), _numeric(row.get("val_reference"))) for row in rows
                if _numeric(row.get("val_loss")) is not None]
    facts = []
    if held_out:
        (first_step, first, reference), (last_step, last, _) = held_out[0], held_out[-1]
        facts.append(f"Held-out KRR loss {first:.4g} at step {first_step} → {last:.4g} at step {last_step}"
                     + (f" (mean predictor {reference:.4g})." if reference is not None else "."))
    per_step = seconds_per_step(rows)
    if per_step:
        median = statistics.median(value for _, value in per_step)
        facts.append(f"{median:.3g} s per outer step (median over log intervals).")
    lead = [_p("lead", " ".join(facts))] if facts else []
    return "\n".join([title, *lead, _img(png, "distillation loss, learning rate and time per step")])


def storage_verdict(sets: dict) -> str:
    """One sentence: whether the pre-training sets take the same storage (their `storage_bytes` in `sets.json`)."""
    sizes = {method: entry["storage_bytes"] for method, entry in sets.items()}
    if not sizes:
        return "No pre-training sets recorded."
    low, high = min(sizes.values()), max(sizes.values())
    if low == high:
        return f"All {len(sizes)} sets take the same storage ({format_bytes(low)}): compared at equal storage."
    listing = ", ".join(f"{method} {format_bytes(sizes[method])}" for method in sorted(sizes, key=_method_sort_key))
    return f"Not compared at equal storage: {listing} (the largest is {high / low:.2f}x the smallest)."


def _storage_parts(run_dir: Path, rows: Sequence[dict], notes: list[str]) -> list[str]:
    """The storage section's verdict and table of each set (below its title)."""
    if not (run_dir / SETS_NAME).is_file():
        return [_note(f"No {SETS_NAME}: the sets were not recorded in this folder.")]
    try:
        sets = read_json(run_dir / SETS_NAME, SETS_NAME)
        sets_table(sets)  # validates
    except KrrstError as exc:
        notes.append(f"{SETS_NAME} left out: {exc}")
        return [_note(f"{SETS_NAME} left out: {exc}")]
    provenance = method_provenance(rows)
    reference = sets.get("krr-st", {}).get("storage_bytes")
    body = [(method, sets[method]["images"], (sets[method].get("parameterization", "pixels"), "l"),
             format_bytes(sets[method]["storage_bytes"]),
             f"{sets[method]['storage_bytes'] / reference:.2f}x" if reference else "–",
             (provenance.get(method, _MISSING_CELL), "l")) for method in sorted(sets, key=_method_sort_key)]
    return [_p("lead", storage_verdict(sets)),
            _html_table(("set", "images", ("parameterisation", "l"), "storage", "vs krr-st", ("provenance", "l")), body,
                        caption="Float32 values as stored: bases, coefficients and view predictors included.")]


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_diff(config: dict, baseline: dict) -> list[tuple[str, Any, Any]]:
    """`(stage.field, baseline value, config value)` for every field of `config` whose value differs, sorted.

    A field `config` lacks is left out (a config written by an older krrst
    has no entry for a field added since); one `baseline` lacks shows None.
    """
    ours, theirs = (_flatten(json.loads(json.dumps(value, default=str))) for value in (config, baseline))
    return [(key, theirs.get(key), ours[key]) for key in sorted(ours) if ours[key] != theirs.get(key)]


def _value_text(value: Any) -> str:
    return "(absent)" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _full_config(summary: str, config: Any) -> str:
    """The config as JSON, folded under `summary`."""
    text = html.escape(json.dumps(config, indent=2, default=str))
    return f"<details><summary>{html.escape(summary)}</summary><pre>{text}</pre></details>"


def _diff_table(config: dict, baseline: dict, headers: tuple[str, str], caption: str) -> str | None:
    """The settings of `config` that differ from `baseline` as a table, None when none does."""
    changes = config_diff(config, baseline)
    rows = [(key, _value_text(old), _value_text(new)) for key, old, new in changes]
    return _html_table(("setting", *headers), rows, caption=caption) if changes else None


def _config_html(config: Any, preset_config: Callable[[str], dict] | None) -> str:
    parts = ['<h2 id="config">Config</h2>']
    if config is None:
        return "\n".join(parts + [_note("No config.json in this run directory.")])
    preset = config.get("preset") if isinstance(config, dict) else None
    try:
        baseline = preset_config(preset) if isinstance(preset, str) and preset_config is not None else None
    except KrrstError as exc:
        parts.append(_note(f"the preset {preset!r} of config.json is not known to this krrst ({exc})"))
        baseline = None
    if baseline is not None:
        ours = {key: value for key, value in config.items() if key != "preset"}
        parts.append(_diff_table(ours, baseline, (f"preset {preset}", "this run"),
                                 f"Settings that differ from the preset {preset} (--set, --config, --steps, ...).")
                     or _p("lead", f"The preset {preset} as it is: no setting changed."))
    elif preset is None:
        parts.append(_note("config.json names no preset, so no difference from one is shown."))
    return "\n".join(parts + [_full_config("The full resolved config (config.json)", config)])


def _env_html(run_dir: Path, env: Any, timings: Any) -> str:
    parts = ['<h2 id="environment">Environment, timings and disk use</h2>']
    if env is None:
        parts.append(_note("No env.json in this run directory."))
    elif isinstance(env, dict):
        parts.append(_html_table((), [(key, (_env_value_text(str(key), value), "l")) for key, value in env.items()],
                                 caption="env.json: versions, git commit, device, command line."))
    else:
        parts.append(f"<pre>{html.escape(json.dumps(env, indent=2, default=str))}</pre>")
    if isinstance(timings, dict) and all(_numeric(value) is not None for value in timings.values()):
        seconds = [(stage, float(value)) for stage, value in timings.items()]
        seconds.append(("total", math.fsum(value for _, value in seconds)))
        body = [(stage, _format_duration(value), f"{value:.1f}") for stage, value in seconds]
        parts.append(_html_table(("stage", "h:mm:ss", "seconds"), body, caption="Wall time per stage (timings.json)."))
    elif timings is not None:
        parts.append(_note("timings.json is not a mapping of stage to seconds; left out."))
    return "\n".join(parts + [_p("provenance", disk_usage_text(run_dir).strip() + ".")])


def _run_note(config: Any) -> str:
    """The run's `run.note`: what it is for, or what it can and cannot show (empty when none)."""
    note = config.get("run", {}).get("note", "") if isinstance(config, dict) else ""
    return note if isinstance(note, str) else ""


def _summary_line(config: Any) -> str:
    if not isinstance(config, dict):
        return ""
    run, distill = config.get("run", {}), config.get("distill", {})
    bits = [f"preset {config['preset']}" if config.get("preset") else "",
            f"source {run['source']}" if run.get("source") else "",
            f"m = {distill['num_images']} images, {distill.get('steps')} outer steps"
            if distill.get("num_images") else "",
            f"{run['seeds']} paired seeds" if run.get("seeds") else ""]
    return "; ".join(bit for bit in bits if bit)


_NAV = (("headline", "Headline"), ("accuracy", "Accuracy"), ("images", "Images"), ("teacher", "Teacher"),
        ("distillation", "Distillation"), ("storage", "Storage"), ("config", "Config"), ("environment", "Environment"))


def _page(title: str, subtitle: str, sections: Sequence[str], nav: Sequence[tuple[str, str]]) -> str:
    links = "".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name in nav)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"provenance\">{html.escape(subtitle)}</p>\n<nav>{links}</nav>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body>\n</html>\n"
    )


def _run_dir(run_dir: str | os.PathLike) -> Path:
    if not Path(run_dir).is_dir():
        raise KrrstError(f"run directory not found: {run_dir}")
    return Path(run_dir)


def report_text(run_dir: str | os.PathLike, references: Sequence[str] = DEFAULT_REFERENCES) -> str:
    """What `krrst report RUN_DIR` prints: the Markdown results table(s) (or a note when there are none), the
    paired differences against `references`, then the folder's disk use (`disk_usage_text`)."""
    run_dir = _run_dir(run_dir)
    rows = read_results(run_dir)
    if not rows:
        return f"No results yet in {run_dir / 'results.csv'}.\n\n" + disk_usage_text(run_dir)
    return _results_markdown(rows, paired_comparisons(rows, references)) + "\n" + disk_usage_text(run_dir)


def write_report(run_dir: str | os.PathLike, references: Sequence[str] = DEFAULT_REFERENCES,
                 preset_config: Callable[[str], dict] | None = None) -> dict[str, Path]:
    """Write `results.md`, `results.png` and `report.html` for a run directory; returns the paths written.

    The page leads with the paired differences of every method against `references` (mean, 95% t-interval,
    wins), then the accuracy table, what distillation changed in the images, the teacher's health, the
    distillation's curves, storage per set, the config as a diff from its preset, and the environment. A missing
    or unreadable piece is left out with a note, never an error. `results.png` (the paired differences, else the
    accuracy bars) and `results.md` are written only when there are results. `report.html` is self-contained
    (images as data URIs, inline CSS, no script, every text escaped). `preset_config(name)` gives a preset's
    resolved config (`krrst.pipeline.preset_config`) for the config diff; None shows the config without one.
    """
    run_dir = _run_dir(run_dir)
    written: dict[str, Path] = {}
    notes: list[str] = []
    config = _load_optional(run_dir / "config.json", "config", notes)
    env = _load_optional(run_dir / "env.json", "env", notes)
    timings = _load_optional(run_dir / "timings.json", "timings", notes)
    run_note = _run_note(config)
    why = "No results yet (results.csv is absent or empty): the evaluation stage has not run."
    try:
        rows = read_results(run_dir)
    except KrrstError as exc:
        rows, why = [], f"results.csv could not be read: {exc}"
    sections = [] if rows else ['<h2 id="headline">Results</h2>' + _note(why)]
    if rows:
        comparisons = paired_comparisons(rows, references)
        headline, paired_png = _headline_html(comparisons)
        provenance = _provenance_line(rows, env)
        sections += [headline, _accuracy_html(rows, comparisons, references), _p("provenance", provenance)]
        markdown = _results_markdown(rows, comparisons)
        if (run_dir / SETS_NAME).is_file():
            try:
                markdown += "\n" + sets_table(read_json(run_dir / SETS_NAME, SETS_NAME), method_provenance(rows))
            except KrrstError:
                pass  # the page's storage section says why
        lead = f"{run_note}\n\n" if run_note else ""
        markdown = f"# Results: {run_dir.name}\n\n{lead}{markdown}\n{provenance}\n"
        written["results_md"] = _write(run_dir / "results.md", markdown)
        try:
            written["results_png"] = _write(run_dir / "results.png", paired_png or _bar_chart_png(rows))
        except Exception as exc:  # a plotting failure must not cost the user the rest of the report
            notes.append(f"results.png failed: {exc}")
    sections += [_images_html(run_dir, config), _teacher_html(run_dir), _distill_html(run_dir),
                 "\n".join(['<h2 id="storage">Storage per set</h2>', *_storage_parts(run_dir, rows, notes)]),
                 _config_html(config, preset_config), _env_html(run_dir, env, timings)]
    lead = ([_p("lead", run_note)] if run_note else []) + (["\n".join(map(_note, notes))] if notes else [])
    subtitle = "; ".join(bit for bit in (_summary_line(config), f"run directory {run_dir.resolve()}") if bit)
    page = _page(f"krrst run: {run_dir.resolve().name}", subtitle, lead + sections, _NAV)
    written["report_html"] = _write(run_dir / "report.html", page)
    return written


# --------------------------------------------------------------------------- several runs
def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """A short label per run folder: its name, or as much of its path as tells two equal names apart."""
    paths = [Path(run_dir).resolve() for run_dir in run_dirs]
    if len(set(paths)) < len(paths):
        twice = next(str(run_dir) for run_dir, path in zip(run_dirs, paths) if paths.count(path) > 1)
        raise KrrstError(f"run directory {twice} is given twice")
    for depth in range(1, max(len(path.parts) for path in paths) + 1):
        labels = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]


def merged_rows(run_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """The results rows of several run folders, each method named `<run label>:<method>` (`run_labels`)."""
    rows = []
    for label, run_dir in zip(run_labels(run_dirs), run_dirs):
        found = read_results(_run_dir(run_dir))
        if not found:
            raise KrrstError(f"{run_dir} holds no results (results.csv is absent or empty)")
        rows += [{**row, "method": f"{label}:{row['method']}"} for row in found]
    return rows


def resolve_references(rows: Iterable[dict], references: Sequence[str]) -> list[str]:
    """Each reference as a method of the merged rows: given as `<run label>:<method>`, or as a bare method
    (`random`): that method of the first run that has it. References found nowhere are dropped."""
    methods = _first_appearance(row["method"] for row in rows)
    resolved = []
    for reference in references:
        match = reference if reference in methods else next(
            (method for method in methods if method.rsplit(":", 1)[-1] == reference), None)
        if match is not None and match not in resolved:
            resolved.append(match)
    return resolved


def comparison_text(run_dirs: Sequence[str | os.PathLike], references: Sequence[str] = DEFAULT_REFERENCES) -> str:
    """What `krrst report RUN RUN2 ...` prints: the merged table and the paired differences."""
    rows = merged_rows(run_dirs)
    return _results_markdown(rows, paired_comparisons(rows, resolve_references(rows, references)))


def _configs_html(labels: Sequence[str], configs: Sequence[Any]) -> str:
    """Each run's config as a diff from the first run's, then each in full."""
    parts = ['<h2 id="config">Config</h2>']
    for label, config in zip(labels[1:], configs[1:]):
        if isinstance(config, dict) and isinstance(configs[0], dict):
            caption = f"{label} against {labels[0]}: settings that differ."
            parts.append(_diff_table(config, configs[0], (labels[0], label), caption)
                         or _p("lead", f"{label}: the same config as {labels[0]}."))
        else:
            parts.append(_note(f"{label} or {labels[0]} has no readable config.json."))
    parts += [_full_config(f"{label}: the full config", config) for label, config in zip(labels, configs)]
    return "\n".join(parts)


def write_comparison(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     references: Sequence[str] = DEFAULT_REFERENCES) -> dict[str, Path]:
    """Merge several run folders into `out_dir/report.html` and `out_dir/results.md`; returns the paths written.

    Methods are named `<run label>:<method>`; paired differences pair rows of any two runs by target, arch,
    protocol and seed (`references` as in `resolve_references`). The page shows the headline, the accuracy
    table, and each run's storage, config (as a diff from the first run's) and environment; each run's own
    report.html shows its images, teacher and distillation.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    rows = merged_rows(run_dirs)
    references = resolve_references(rows, references)
    comparisons = paired_comparisons(rows, references)
    labels = run_labels(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headline, paired_png = _headline_html(comparisons)
    notes: list[str] = []
    storage, configs, environments = ['<h2 id="storage">Storage per set</h2>'], [], []
    for label, run_dir in zip(labels, run_dirs):
        storage += [f"<h3>{html.escape(label)}</h3>", *_storage_parts(run_dir, read_results(run_dir), notes)]
        configs.append(_load_optional(run_dir / "config.json", "config", notes))
        env = _load_optional(run_dir / "env.json", "env", notes)
        known = isinstance(env, dict)
        env = env if known else {}
        environments.append((label, _env_value_text("versions", env.get("versions")) if known else "–",
                             env.get("git_commit", "–"), env.get("cuda_device") or env.get("device") or "–",
                             disk_usage_text(run_dir).strip()))
    sections = [headline, _accuracy_html(rows, comparisons, references), "\n".join(storage),
                _configs_html(labels, configs), '<h2 id="environment">Environment and disk use</h2>'
                + _html_table(("run", "versions", "git commit", "device", "disk use"), environments)]
    if notes:
        sections.insert(0, "\n".join(map(_note, notes)))
    written = {"results_md": _write(out_dir / "results.md",
                                    f"# Results: {', '.join(labels)}\n\n{_results_markdown(rows, comparisons)}")}
    subtitle = "Runs: " + "; ".join(f"{label} = {run_dir.resolve()}" for label, run_dir in zip(labels, run_dirs))
    nav = [item for item in _NAV if item[0] in ("headline", "accuracy", "storage", "config", "environment")]
    page = _page(f"krrst runs: {', '.join(labels)}", subtitle, sections, nav)
    written["report_html"] = _write(out_dir / "report.html", page)
    if paired_png:
        written["results_png"] = _write(out_dir / "results.png", paired_png)
    return written
