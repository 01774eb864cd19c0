"""Compare methods across run directories: mean ± std over seeds and paired differences against a reference.

    python scripts/compare_runs.py --ref random=runs/e1:random krr-st=runs/e1:krr-st basis=runs/basis:krr-st

Each entry is `LABEL=RUN_DIR:METHOD`. Rows are matched by target, arch,
protocol and seed, so the differences are paired (same label subset,
initialisation and batch order per seed). Prints a Markdown table: one row
per entry, one column per protocol, `mean ± std` and, for entries other than
the reference, the paired differences per seed and their mean; with more
than 5 seeds, their mean ± standard error and on how many seeds the entry is
above the reference. `--seeds N` keeps seeds below N only, so runs with more
seeds than others are compared on the same ones.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from krrst.report import read_results


def load(entry: str, seeds: int) -> tuple[str, dict[tuple, float]]:
    label, _, location = entry.partition("=")
    run_dir, _, method = location.rpartition(":")
    rows = [row for row in read_results(run_dir) if row["method"] == method and int(row["seed"]) < seeds]
    if not rows:
        raise SystemExit(f"{entry}: no rows of method {method!r} with a seed below {seeds} in {run_dir}/results.csv")
    return label, {(row["target"], row["arch"], row["protocol"], int(row["seed"])): 100 * float(row["accuracy"])
                   for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="LABEL=RUN_DIR:METHOD the differences are taken against")
    parser.add_argument("entries", nargs="+", help="LABEL=RUN_DIR:METHOD")
    parser.add_argument("--seeds", type=int, default=10**9, help="use the seeds below N only (default: all)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    reference_label, reference = load(args.ref, args.seeds)
    entries = [(reference_label, reference)] + [load(entry, args.seeds) for entry in args.entries]
    protocols = sorted({key[2] for _, rows in entries for key in rows}, key=lambda p: (p.split("@")[0], len(p), p))
    print("| method | " + " | ".join(protocols) + " |")
    print("|---|" + "---|" * len(protocols))
    for label, rows in entries:
        cells = []
        for protocol in protocols:
            by_seed = {key: value for key, value in rows.items() if key[2] == protocol}
            if not by_seed:
                cells.append("-")
                continue
            values = list(by_seed.values())
            cell = f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"
            if label != reference_label:
                differences = [value - reference[key] for key, value in sorted(by_seed.items()) if key in reference]
                if len(differences) > 5:
                    error = statistics.stdev(differences) / len(differences) ** 0.5
                    above = sum(d > 0 for d in differences)
                    cell += f" ({statistics.mean(differences):+.1f} ± {error:.1f}; {above}/{len(differences)} above)"
                elif differences:
                    cell += (" (" + ", ".join(f"{d:+.1f}" for d in differences)
                             + f"; {statistics.mean(differences):+.1f})")
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nIn brackets: paired differences against {reference_label} per seed and their mean (more than 5 "
          "seeds: their mean ± standard error, and the seeds above the reference).")


if __name__ == "__main__":
    main()
