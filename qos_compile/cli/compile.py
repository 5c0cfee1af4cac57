"""`qos-compile MODEL.pt --target TARGET`: lower a QoS checkpoint to ONNX and TVM kernels (not built yet)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import QosError
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The `qos-compile` argument parser."""
    p = argparse.ArgumentParser(prog="qos-compile", description="Compile a QoS-Nets checkpoint (model.pt) for a target CPU.")
    p.add_argument("model", nargs="?", help="QoS checkpoint written by 'qos-nets pipeline' (model.pt)")
    p.add_argument("--target", default="x86_64", help="target name, e.g. x86_64 or arm (default: x86_64)")
    p.add_argument("-o", "--output", help="output folder (default: next to MODEL, named after the target)")
    p.add_argument("--cross-compiler", help="C cross compiler to use instead of the target file's")
    p.add_argument("--threads", type=int, help="worker threads in the compiled runtime")
    p.add_argument("--list-targets", action="store_true", help="list the known targets and exit")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    raise QosError("compiling is not implemented yet in this version (planned: ONNX + TVM lowering)")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run_cli(_main, argv, "qos-compile")


if __name__ == "__main__":
    sys.exit(main())
