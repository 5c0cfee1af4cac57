"""`qos-nets bench OUT`: per-OP accuracy, power, latency and switch cost of a qos-compile output,
with float / int8 / TVM-exact baselines in the same run (see qos_compile.bench.report)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .stages import log, one_line_errors, setup_threads


def _bench(args: argparse.Namespace) -> int:
    from ..bench.report import bench_markdown, check_writable, load_out, run_bench, write_plots

    load_out(args.out)                                   # bad OUT: one line, exit 2, before anything slow
    check_writable(args.json, "JSON")
    check_writable(args.markdown, "Markdown")
    check_writable(args.plot, "plots")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        from ..errors import QosError

        raise QosError("--rpc-tracker and --rpc-key go together")
    if args.threads is None:
        args.threads = 1     # same thread count for our runtime and every baseline (fair, quiet on shared cores)
    threads = setup_threads(args)
    res = run_bench(args.out, repeats=args.repeats, samples=args.samples, rpc_tracker=args.rpc_tracker,
                    rpc_key=args.rpc_key, dataset=args.dataset, data_dir=args.data_dir, threads=threads,
                    baselines=not args.no_baselines, ort_isa=args.ort_isa, log=log)
    if args.plot:
        res["plots"] = write_plots(res, args.plot)
        for p in res["plots"]:
            log(f"wrote {p}")
    md = bench_markdown(res)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
        log(f"wrote {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `bench`."""
    p = one_line_errors(sub.add_parser(
        "bench", help="accuracy, power, latency and switch cost of every OP of a qos-compile output",
        description="Benchmark a qos-compile output folder: per OP top-1/top-5 on the held-out test split "
                    "(through the compiled runtime), relative power and savings, circuits, latency (median and "
                    "spread; labelled emulated under qemu), qos_select cost, and float / int8 onnxruntime / "
                    "TVM exact baselines measured in the same run."))
    p.add_argument("out", metavar="OUT", help="a qos-compile output folder")
    p.add_argument("--json", metavar="F", help="write the results as JSON")
    p.add_argument("--plot", metavar="PREFIX", help="write PREFIX_accuracy.png and PREFIX_latency.png")
    p.add_argument("--markdown", metavar="F", help="write the Markdown table (it is printed too)")
    p.add_argument("--repeats", type=int, default=10, help="timing repeats (default 10)")
    p.add_argument("--samples", type=int, help="test samples for accuracy (default: all; 200 when emulated)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="also time the TVM exact kernels on a board via RPC")
    p.add_argument("--rpc-key", metavar="KEY", help="the board's RPC key")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the checkpoint's")
    p.add_argument("--data-dir", help="folder holding the dataset")
    p.add_argument("--no-baselines", action="store_true", help="skip the float/int8/TVM baselines")
    p.add_argument("--threads", type=int, help="CPU threads for our runtime and every baseline (default 1)")
    p.add_argument("--ort-isa", choices=("native", "avx2"), default="native",
                   help="avx2: also time onnxruntime's int8 model with its AVX2 code, in a child process whose "
                        "CPUID shows no AVX-512 or AVX-VNNI (for an x86_64-avx2 build on an AVX-512 host; "
                        "needs CPUID faulting)")
    p.set_defaults(func=_bench)
