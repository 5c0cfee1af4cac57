"""Approximate conv kernels vs the exact int8 conv, per ResNet-20 layer and whole network.

    python -m qos_compile.bench.kernels [--target x86_64|aarch64] [--repeats 20] [--threads 1]
                                        [--no-network] [--json F]

Part 1, layers: every distinct conv shape of ResNet-20 (CIFAR, 32x32) is compiled for the
target as TVM's exact int8 conv and as the kernel ``tvm.lowering`` picks for one bundled
circuit of each kind (masked, low-rank, general; signed circuits), plus the gather
fallback. Every approximate kernel is checked bit-exact against ``qos_compile.reference``
first; then all kernels of a layer are timed in the same run (best of ``repeats``) and the
table prints approx time / exact int8 time. A rows kernel's time is its three stages
(taps + planes + microkernel), a dot-product low-rank kernel's all of its stages (factor
staging + weight packing (+ bias) + microkernel). The exact int8 conv is TVM's own
scheduled int8 conv (int32 multiply-adds; not hand-tensorized with VNNI or sdot).

Part 2, network: ResNet-20 (untrained, calibrated on random data: accuracy is irrelevant)
is compiled four times with one circuit in every layer (exact, masked, low-rank, general)
and ``qos-run --bench`` times each whole inference; the ratio is against the exact-circuit
build. onnxruntime's exact int8 model (QLinearConv, same float network) is timed on the
host too.

On a non-host target everything runs under qemu: the times are EMULATED (qemu user-mode
translation of the guest instructions), and only their ratios mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from ..multipliers import get
from ..targets import Target, get_target

#: One bundled signed circuit per kind (``nn.emulation`` strategy of each, checked at run time).
CIRCUITS = {"exact": "master:mul8s_1KV8", "masked": "mul8s_1KTY", "lowrank": "master:mul8s_1KVA",
            "general": "mul8s_1KX2"}

#: The distinct conv shapes of ResNet-20 on 32x32 inputs: (name, C, H, O, stride, kernel, count in the net).
RESNET20_CONVS = (
    ("stem 3->16 @32", 3, 32, 16, 1, 3, 1),
    ("stage1 16->16 @32", 16, 32, 16, 1, 3, 6),
    ("stage2 16->32 /2", 16, 32, 32, 2, 3, 1),
    ("stage2 32->32 @16", 32, 16, 32, 1, 3, 5),
    ("stage3 32->64 /2", 32, 16, 64, 2, 3, 1),
    ("stage3 64->64 @8", 64, 8, 64, 1, 3, 5),
)


@dataclass
class LayerResult:
    layer: str
    exact_ms: float
    kinds: dict[str, tuple[str, float]]      # kind -> (lowering label, ms)
    gather_ms: float


def _check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        raise QosError(f"{what} is not bit-exact against the reference")


def bench_layer(target: Target, name: str, c: int, h: int, o: int, stride: int, k: int, repeats: int,
                threads: int | None, seed: int = 0) -> LayerResult:
    """Build, verify and time one conv shape (see the module docstring)."""
    from ..reference import approx_conv2d_acc
    from ..tvm import kernels as K
    from ..tvm import lut_dot, lut_factors, lut_rows
    from ..tvm.build import build_kernels
    from ..tvm.lowering import choose_conv_lowering

    rng = np.random.default_rng(seed)
    pad = k // 2
    spec = K.ConvSpec.make((1, c, h, h), (o, c, k, k), stride=stride, padding=pad, pad_code=0, signed=True)
    x = rng.integers(-128, 128, spec.x_shape).astype(np.int8)
    w = rng.integers(-128, 128, spec.w_shape).astype(np.int8)
    luts = {kind: get(cname).lut.astype(np.int32) for kind, cname in CIRCUITS.items()}
    funcs: dict[str, Any] = {"exact": K.exact_conv2d_func(spec, target), "gather": K.approx_conv2d_func(spec, target)}
    taps = c * k * k
    plans: dict[str, Any] = {}        # kind (or forced_<kind>) -> (lowering, circuit kind, rows layout)

    def add(key: str, low: Any, circuit: str) -> None:
        if low.kind == "masked":
            funcs[f"{key}_masked"] = K.masked_conv2d_func(spec, target)
        elif low.kind == "lowrank" and low.isa:
            _, stages = lut_dot.dot_stage_funcs(spec, low.terms, low.dtype, low.isa, target)
            funcs.update({f"{key}_{st}": f for st, f in stages.items()})
        elif low.kind == "lowrank":
            funcs[f"{key}_lowrank"] = lut_factors.factored_conv2d_func(spec, low.terms, low.dtype, target)
        elif low.kind == "rows":
            lay, stages = lut_rows.rows_stage_funcs(spec, w, low.isa, low.bias)
            funcs.update({f"{key}_{st}": f for st, f in stages.items()})
            plans[key] = (low, circuit, lay)
            return
        plans[key] = (low, circuit, None)

    for kind in ("masked", "lowrank", "general"):
        add(kind, choose_conv_lowering([luts[kind]], True, target.features, taps=taps, costs=target.kernel_costs), kind)
    # the other fast kernels where auto did not pick them: rows (general circuit), lowrank (low-rank one)
    for forced, circuit in (("rows", "general"), ("lowrank", "lowrank")):
        low = choose_conv_lowering([luts[circuit]], True, target.features, allow=(forced, "gather"), taps=taps,
                                   costs=target.kernel_costs)
        if low.kind == forced and plans[circuit][0].kind != forced:
            add(f"forced_{forced}", low, circuit)
    built = build_kernels(funcs, target, system_lib=True)     # the deployed runtime: C shim + its thread pool
    times: dict[str, float] = {}

    def run(nm: str, *args: Any) -> Any:     # one kernel, timed (best of repeats)
        out = built.run(nm, *args, repeat=repeats, threads=threads)
        times[nm] = built.last_time_ns / 1e6
        return out

    ref = {kind: approx_conv2d_acc(x, w, luts[kind], stride=stride, padding=pad, pad_code=0, signed=True)
           for kind in luts}
    _check(run("exact", x, w), ref["exact"], f"{name}: exact conv")
    _check(run("gather", x, w, luts["general"]), ref["general"], f"{name}: gather kernel")
    kinds: dict[str, tuple[str, float]] = {}
    for key, (low, circuit, lay) in plans.items():
        lut = luts[circuit]
        if low.kind == "rows":
            got, ms = lut_rows.run_rows_conv(built, f"{key}_", lay, x, lut, spec, repeats, threads)
        elif low.kind == "masked":
            got = run(f"{key}_masked", x, w, lut)
            ms = times[f"{key}_masked"]
        elif low.kind == "lowrank" and low.isa:
            wt, xt = lut_factors.layer_factors(lut, True, low.slot_terms, low.dtype)
            got, ms = lut_dot.run_dot_conv(built, f"{key}_", spec, x, w, wt, xt, repeats, threads)
        elif low.kind == "lowrank":
            wt, xt = lut_factors.layer_factors(lut, True, low.terms, low.dtype)
            got = run(f"{key}_lowrank", x, w, wt, xt)
            ms = times[f"{key}_lowrank"]
        else:
            got = run("gather", x, w, lut)
            ms = times["gather"]
        _check(got, ref[circuit], f"{name}: {low.describe()} kernel for {CIRCUITS[circuit]}")
        kinds[key] = (low.describe(), ms)
    return LayerResult(name, times["exact"], kinds, times["gather"])


def _network_checkpoint(circuit: str, path: Path) -> None:
    import torch

    from ..models import build_model
    from ..nn import Mode, wrap_model
    from ..qosmodel import save_qos_model

    torch.manual_seed(0)
    qnet = wrap_model(build_model("resnet20", 10, 3, 32), [get(circuit)], num_ops=1, input_shape=(3, 32, 32))
    qnet.set_assignment([[0] * len(qnet.approx_layers())])
    qnet.train()
    with torch.no_grad():
        qnet(torch.randn(32, 3, 32, 32))
    qnet.eval()
    qnet.set_mode(Mode.APPROX)
    save_qos_model(path, qnet, {"dataset": {"name": "random"}})


def _qos_run_median_us(target: Target, out: Path, runs: int, threads: int | None) -> float:
    env = dict(os.environ)
    if threads:
        env["QOS_NUM_THREADS"] = str(threads)
    p = subprocess.run([*target.run_prefix(), str(out / "qos-run"), str(out / "model.qosm"), "--bench", str(runs)],
                       check=True, capture_output=True, text=True, env=env)
    return float(re.search(r"median ([0-9.]+) us", p.stdout).group(1))


def bench_network(target: Target, runs: int, threads: int | None, tmp: Path) -> dict[str, Any]:
    """Whole ResNet-20 per circuit kind (see the module docstring)."""
    res: dict[str, Any] = {}
    for kind, circuit in CIRCUITS.items():
        ckpt, out = tmp / f"{kind}.pt", tmp / f"{kind}-{target.name}"
        _network_checkpoint(circuit, ckpt)
        p = subprocess.run([sys.executable, "-m", "qos_compile.cli.compile", str(ckpt), "--target", target.name,
                            "-o", str(out)], capture_output=True, text=True)
        if p.returncode != 0:
            raise QosError(f"compiling ResNet-20 with {circuit} failed: {(p.stderr or p.stdout).strip()[-500:]}")
        kernels = re.search(r"conv kernels: ([^(]*)\(", p.stdout)
        res[kind] = {"circuit": circuit, "us": _qos_run_median_us(target, out, runs, threads),
                     "kernels": kernels.group(1).strip().rstrip(";") if kernels else "?"}
    if target.is_host:
        res["ort_int8"] = {"us": _ort_int8_us(tmp, runs)}
    return res


def _ort_int8_us(tmp: Path, runs: int) -> float:
    import torch

    from ..models import build_model
    from .baselines import ort_int8_model, ort_latency

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    path = ort_int8_model(model, calib, tmp / "resnet20_int8.onnx")
    return ort_latency(path, np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32),
                       repeats=runs).median_ms * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (best of)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200, help="whole-network inferences per build (median)")
    ap.add_argument("--no-network", action="store_true", help="only the per-layer table")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    target = get_target(a.target)
    emu = "" if target.is_host else " EMULATED (qemu)"
    unit = "ms" + emu
    print(f"# approximate conv kernels vs exact int8 conv, {target.name}, {a.threads} thread(s){emu}")
    print("circuits: " + ", ".join(f"{k} {v}" for k, v in CIRCUITS.items()))
    print(f"\n| ResNet-20 layer (x count) | exact int8 {unit} | masked: kernel, ratio | low-rank: kernel, ratio "
          f"| general: kernel, ratio | gather fallback ratio; other kernels forced |")
    print("| --- | ---: | --- | --- | --- | ---: |")
    layers = []
    tot = {"exact": 0.0, "masked": 0.0, "lowrank": 0.0, "general": 0.0, "gather": 0.0}
    for name, c, h, o, s, k, count in RESNET20_CONVS:
        r = bench_layer(target, name, c, h, o, s, k, a.repeats, a.threads)
        layers.append(r)
        tot["exact"] += count * r.exact_ms
        tot["gather"] += count * r.gather_ms
        cells = []
        for kind in ("masked", "lowrank", "general"):
            label, ms = r.kinds[kind]
            tot[kind] += count * ms
            cells.append(f"{label}, {ms / r.exact_ms:.2f}x")
        extra = ""
        for key in ("forced_rows", "forced_lowrank"):
            if key in r.kinds:
                label, ms = r.kinds[key]
                tot[key] = tot.get(key, 0.0) + count * ms
                extra += f"; {label} if forced: {ms / r.exact_ms:.2f}x"
        print(f"| {name} (x{count}) | {r.exact_ms:.4f} | " + " | ".join(cells)
              + f" | {r.gather_ms / r.exact_ms:.2f}x{extra} |")
    forced_tot = "".join(f"; forced {k[7:]} {tot[k] / tot['exact']:.2f}x" for k in ("forced_rows", "forced_lowrank")
                         if k in tot)
    print(f"| all 19 convs (weighted) | {tot['exact']:.4f} | "
          + " | ".join(f"{tot[k] / tot['exact']:.2f}x" for k in ("masked", "lowrank", "general"))
          + f" | {tot['gather'] / tot['exact']:.2f}x{forced_tot} |")
    out: dict[str, Any] = {"target": target.name, "emulated": not target.is_host, "threads": a.threads,
                           "circuits": CIRCUITS, "layers": [r.__dict__ for r in layers], "conv_totals_ms": tot}
    if not a.no_network:
        with tempfile.TemporaryDirectory() as d:
            net = bench_network(target, a.runs, a.threads, Path(d))
        out["network_us"] = net
        base = net["exact"]["us"]
        print(f"\n| whole ResNet-20 inference | circuit | conv kernels | median us{emu} | ratio vs exact circuit |")
        print("| --- | --- | --- | ---: | ---: |")
        for kind in CIRCUITS:
            r = net[kind]
            print(f"| {kind} | {r['circuit']} | {r['kernels']} | {r['us']:.1f} | {r['us'] / base:.2f}x |")
        if "ort_int8" in net:
            ort = net["ort_int8"]["us"]
            print(f"| onnxruntime int8 (QLinearConv) | exact | - | {ort:.1f} | {ort / base:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
