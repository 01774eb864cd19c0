"""Paired differences over several distillations: one method against a reference in some `krrst run` folders.

    python scripts/paired_over_runs.py runs/seed0 runs/seed1 runs/seed2 [--method krr-st] [--ref random none]

Each folder is one distillation (e.g. `distill.seed` 0, 1, 2 with one teacher file); within a folder the methods are
paired by evaluation seed (same label subset, same initialisation), as `krrst report` pairs them. For each protocol
it prints, per folder, the paired mean with its 95% t-interval over evaluation seeds and the wins; then, over the
folders, the mean of the folders' means with its t-interval over folders (df = folders - 1: the spread between
distillations, which one folder cannot show) and the wins over all pairs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from krrst.report import paired_summary


def accuracies(run: Path) -> dict[tuple[str, str, str, int], float]:
    """(method, target, protocol, seed) -> accuracy in points, from the run's results.csv."""
    with open(run / "results.csv", newline="", encoding="utf-8") as handle:
        return {(row["method"], row["target"], row["protocol"], int(row["seed"])): 100 * float(row["accuracy"])
                for row in csv.DictReader(handle)}


def interval(summary: dict) -> str:
    if summary["low"] is None:
        return f"{summary['mean']:+.2f}"
    return f"{summary['mean']:+.2f} [{summary['low']:+.2f}, {summary['high']:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--method", default="krr-st")
    parser.add_argument("--ref", nargs="+", default=["random", "none"])
    args = parser.parse_args()
    missing = [str(run) for run in args.runs if not (run / "results.csv").is_file()]
    if missing:
        parser.error(f"no results.csv in {', '.join(missing)} (a krrst run folder whose evaluation has begun)")
    tables = {run: accuracies(run) for run in args.runs}
    keys = sorted({key[1:3] for table in tables.values() for key in table if key[0] == args.method})
    for reference in args.ref:
        for target, protocol in keys:
            print(f"\n{args.method} - {reference}, {target} {protocol} (points)")
            run_means, all_pairs = [], []
            for run, table in tables.items():
                seeds = sorted(seed for (method, t, p, seed) in table if (method, t, p) == (args.method, target, protocol)
                               and (reference, t, p, seed) in table)
                pairs = [table[(args.method, target, protocol, s)] - table[(reference, target, protocol, s)]
                         for s in seeds]
                if not pairs:
                    continue
                summary = paired_summary(pairs)
                run_means.append(summary["mean"])
                all_pairs += pairs
                method_mean = sum(table[(args.method, target, protocol, s)] for s in seeds) / len(seeds)
                reference_mean = sum(table[(reference, target, protocol, s)] for s in seeds) / len(seeds)
                print(f"  {run}: {method_mean:.2f} vs {reference_mean:.2f}: {interval(summary)} "
                      f"{summary['wins']}/{summary['n']}")
            if len(run_means) > 1:
                over_runs = paired_summary(run_means)
                pooled = paired_summary(all_pairs)
                print(f"  over {len(run_means)} runs: {interval(over_runs)}; "
                      f"{pooled['wins']}/{pooled['n']} pairs won")


if __name__ == "__main__":
    main()
