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
from pathlib import Path
from statistics import mean

from krrst.report import paired_comparisons, paired_summary
from krrst.results import read_results


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
    rows = {run: read_results(run) for run in args.runs}
    for reference in args.ref:
        # per folder: krrst report's pairing (same source, target, arch, protocol and seed)
        by_group: dict[tuple, list[tuple[Path, dict]]] = {}
        for run, run_rows in rows.items():
            for comparison in paired_comparisons(run_rows, [reference]):
                if comparison["method"] == args.method:
                    group = tuple(comparison[key] for key in ("source", "target", "arch", "protocol"))
                    by_group.setdefault(group, []).append((run, comparison))
        for (source, target, arch, protocol), found in by_group.items():
            print(f"\n{args.method} - {reference}, {target} {arch} {protocol} (points)")
            for run, comparison in found:
                def accuracy(method: str, sources: tuple[str, ...]) -> float:
                    return 100 * mean(row["accuracy"] for row in rows[run] if row["seed"] in comparison["seeds"]
                                      and (row["method"], row["target"], row["arch"], row["protocol"])
                                      == (method, target, arch, protocol) and row["source"] in sources)
                ours, theirs = accuracy(args.method, (source,)), accuracy(reference, (source, ""))
                print(f"  {run}: {ours:.2f} vs {theirs:.2f}: {interval(comparison)} "
                      f"{comparison['wins']}/{comparison['n']}")
            if len(found) > 1:
                over_runs = paired_summary([comparison["mean"] for _, comparison in found])
                pooled = paired_summary([d for _, comparison in found for d in comparison["differences"]])
                print(f"  over {len(found)} runs: {interval(over_runs)}; {pooled['wins']}/{pooled['n']} pairs won")


if __name__ == "__main__":
    main()
