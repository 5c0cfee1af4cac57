"""`qos-nets`: everything but compiling (multipliers, and later train/search/finetune/eval/bench)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import run_cli
from . import bench as bench_cmd
from . import evaluate as evaluate_cmd
from . import multipliers as multipliers_cmd
from . import pipeline as pipeline_cmd
from . import stages as stages_cmd


def build_parser() -> argparse.ArgumentParser:
    """The `qos-nets` argument parser with one subcommand per module."""
    parser = argparse.ArgumentParser(prog="qos-nets", description="QoS-Nets tools: multiplier library, training, search, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    multipliers_cmd.add_parser(sub)
    pipeline_cmd.add_parser(sub)
    stages_cmd.add_parser(sub)
    evaluate_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run_cli(_main, argv, "qos-nets")


if __name__ == "__main__":
    sys.exit(main())
