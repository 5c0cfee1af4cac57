"""`qos-compile MODEL.pt --target TARGET [-o OUT]`: compile a QoS checkpoint for a target CPU.

Flag names follow TVM's former ``tvmc compile`` where they overlap (``--target``,
``-o/--output``, ``--cross-compiler``). OUT receives ``model.onnx``, ``kernels.o``
(+ ``libqos_model.so`` when the target runs here), ``model.qosm``, ``qos-run`` and
``report.json`` (see ``qos_compile.compiler``). Errors: one line on stderr, exit 2,
OUT untouched.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import QosError
from ..runtime_env import configure_threads
from . import run_cli


def _lowering_choices() -> tuple[str, ...]:
    """What ``--lowering`` accepts: auto, a family, or a registry name (``tvm.variants``)."""
    from ..tvm.variants import LOWERING_CHOICES

    return LOWERING_CHOICES


def build_parser() -> argparse.ArgumentParser:
    """The `qos-compile` argument parser."""
    p = argparse.ArgumentParser(
        prog="qos-compile",
        description="Compile a QoS-Nets checkpoint (model.pt) for a target CPU: ONNX, TVM kernels, "
                    "the .qosm manifest, a static qos-run binary and report.json.")
    p.add_argument("model", nargs="?", help="QoS checkpoint written by 'qos-nets pipeline' (model.pt)")
    p.add_argument("--target", default="x86_64",
                   help="target name or alias, e.g. x86_64 or arm (default: x86_64; see --list-targets)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output folder (default: next to MODEL, named <model>-<target>); an existing one is "
                        "replaced only if it is empty or holds exactly a previous qos-compile output's files")
    p.add_argument("--cross-compiler", metavar="CC", help="C (cross) compiler to use instead of the target file's")
    p.add_argument("--threads", type=int, metavar="N",
                   help="default worker threads of the compiled runtime (QOS_NUM_THREADS overrides it at run time)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="batch size the model is compiled for (default 1)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the built qos-run against onnxruntime")
    p.add_argument("--keep-mismatch", action="store_true",
                   help="write OUT even when the built qos-run disagrees with onnxruntime beyond the tolerance "
                        "(otherwise that is an error and nothing is written); report.json records it")
    p.add_argument("--lowering", default="auto", choices=_lowering_choices(), metavar="KERNEL",
                   help="conv kernels: auto (per layer the cheapest kernel variant that fits, by the target's "
                        "kernel costs), or force a family where it fits (gather elsewhere): masked (exact conv "
                        "where every circuit of the layer masks port A), lowrank (exact conv over a few factor "
                        "terms, several per instruction with vpdpbusd / vpmaddwd / sdot where the target has "
                        "them), rows (byte-permute table rows), gather; or one variant by its registry name, "
                        "e.g. s8-lutconv-neondot-dot-t3 (python -m qos_compile.tvm.variants lists them)")
    p.add_argument("--list-targets", action="store_true", help="list the known targets and exit")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # this process's threads (torch, TVM) before anything imports tvm (docs/design.md, section
    # 6.5); --threads is the compiled runtime's
    configure_threads()
    from ..compiler import compile_model, list_targets_text

    if args.list_targets:
        print(list_targets_text())
        return 0
    if not args.model:
        raise QosError("no model given: qos-compile MODEL.pt --target TARGET [-o OUT] (or --list-targets)")
    if args.threads is not None and args.threads < 1:
        raise QosError(f"--threads must be at least 1, got {args.threads}")
    if args.batch < 1:
        raise QosError(f"--batch must be at least 1, got {args.batch}")
    res = compile_model(args.model, args.target, args.output, cross_compiler=args.cross_compiler,
                        threads=args.threads, batch=args.batch, verify=not args.no_verify,
                        progress=lambda line: print(line, flush=True), lowering=args.lowering,
                        keep_mismatch=args.keep_mismatch)
    total = res.report.get("times_s", {}).get("total")
    print(f"qos-compile: wrote {res.out_dir} ({res.report['target']['name']}"
          + (f", {total:.1f} s" if isinstance(total, (int, float)) else "") + ")", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run_cli(_main, argv, "qos-compile")


if __name__ == "__main__":
    sys.exit(main())
