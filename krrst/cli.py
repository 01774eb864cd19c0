"""The `krrst` command: argparse sub-commands that parse, call one library function, and print.

User mistakes surface as a `KrrstError` and are printed as one line on stderr
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from krrst.errors import KrrstError


def _cmd_datasets(args: argparse.Namespace) -> None:
    from krrst.data import describe_datasets

    print(describe_datasets())


def _cmd_models(args: argparse.Namespace) -> None:
    from krrst.models import create_model, list_models

    print(f"{'name':<16} {'features':>8} {'params (no head)':>17}")
    for name in list_models():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<16} {model.feature_dim:>8} {params / 1e6:>16.2f}M")


def _not_yet(issue: str):
    def handler(args: argparse.Namespace) -> None:
        raise KrrstError(f"'krrst {args.command}' is not yet available ({issue}); see README.md for what works today")

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krrst",
        description="Self-supervised dataset distillation (KRR-ST, ICLR 2024): distil an unlabelled image dataset "
        "into a few synthetic images with learned target representations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    datasets = sub.add_parser("datasets", help="list the datasets krrst can load and the layout each expects")
    datasets.set_defaults(handler=_cmd_datasets)

    models = sub.add_parser("models", help="list the registered architectures with feature size and parameters")
    models.set_defaults(handler=_cmd_models)

    for name, help_text, issue in (
        ("teacher", "train a self-supervised teacher (Barlow Twins) or load your own", "issue 4"),
        ("distill", "distil a source dataset into a KRR-ST synthetic set", "issue 5"),
        ("evaluate", "pre-train on a distilled set or baseline, then fine-tune / linear-probe", "issue 6"),
        ("report", "print and write the results table and report.html of a run directory", "issue 6"),
        ("run", "run the whole pipeline of a preset: teacher, distil, baselines, evaluate, report", "issue 7"),
        ("demo", "run the offline demo on the CIFAR-10 sample shipped in the package (alias of run --preset demo)", "issue 7"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(handler=_not_yet(issue))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KrrstError as exc:
        print(f"krrst {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"krrst {args.command}: interrupted; finished checkpoints are kept, re-run to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
