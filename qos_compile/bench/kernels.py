"""Approximate conv kernels vs the exact int8 conv, per ResNet-20 layer and whole network.

    python -m qos_compile.bench.kernels [--target x86_64|aarch64] [--repeats 20] [--threads 1]
                                        [--no-network | --no-layers] [--kinds exact,table]
                                        [--ort-isa native|avx2] [--json F]

Part 1, layers: every distinct conv shape of ResNet-20 (CIFAR, 32x32) is compiled for the
target as TVM's exact int8 conv (signed and unsigned) and as EVERY kernel variant of the
registry (``tvm.variants``) the target runs, each on the first bundled circuit it fits
(signed: ``LAYER_CIRCUITS``, exact, masked, 3, 4 and 5 factor terms; unsigned:
``TABLE_CIRCUITS``, tables that do not factor, with and without a residual that fits a byte),
built and run through the variant's own ``stages``/``run`` and timed against the exact conv
of its datatype. Every kernel is checked bit-exact against
``qos_compile.reference`` first; then all kernels of a layer are timed in the same run
(best of ``repeats``) and the table prints one row per variant, by its registry name:
time / exact int8 time per layer and over the 19 convs, next to the cost model's price
(``Variant.cost`` with the target's ``[kernel_costs]``), and which variant the lowering
picks per circuit. A multi-stage kernel's time is all of its per-call stages (rows: taps +
planes + microkernel, rows8 plus its exact part; dot: factor staging + weight packing +
microkernel; the per-OP constants the compiler computes ahead are not timed). The exact int8 conv is TVM's own
scheduled int8 conv (int32 multiply-adds; not hand-tensorized with VNNI or sdot).

Part 2, network: ResNet-20 (untrained, calibrated on random data: accuracy is irrelevant)
is compiled five times with one circuit in every layer (``CIRCUITS``: exact, masked,
low-rank, general and ``table``, an unsigned circuit whose table does not factor) and
``qos-run --bench`` times each whole inference; the ratios are against the exact-circuit
build and, on the host, against onnxruntime's exact int8 model (QLinearConv, same float
network) timed in the same run. The first line printed (and ``host`` in the JSON) names the
CPU and its ISA extensions. onnxruntime picks its kernels by CPUID, so on an AVX-512 host it
runs AVX-512 VNNI code; ``--ort-isa avx2`` times it in a child process whose CPUID reports no
AVX-512 and no AVX-VNNI (``cpuid_mask``: Linux CPUID faulting), onnxruntime's AVX2 code on
this same core, the baseline to hold an ``x86_64-avx2`` build against.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from ..multipliers import get
from ..targets import Target, get_target
from .host import host_info, host_line

#: One bundled circuit per kind of the whole-network part: signed exact, masked, low-rank and
#: general (error rank > the low-rank limit), and ``table``: an unsigned circuit whose table does
#: not factor at all (``mul8u_DG8``, which the main job's search picks), so it runs a table kernel.
CIRCUITS = {"exact": "master:mul8s_1KV8", "masked": "mul8s_1KTY", "lowrank": "master:mul8s_1KVA",
            "general": "mul8s_1KX2", "table": "mul8u_DG8"}

#: The distinct conv shapes of ResNet-20 on 32x32 inputs: (name, C, H, O, stride, kernel, count in the net).
RESNET20_CONVS = (
    ("stem 3->16 @32", 3, 32, 16, 1, 3, 1),
    ("stage1 16->16 @32", 16, 32, 16, 1, 3, 6),
    ("stage2 16->32 /2", 16, 32, 32, 2, 3, 1),
    ("stage2 32->32 @16", 32, 16, 32, 1, 3, 5),
    ("stage3 32->64 /2", 32, 16, 64, 2, 3, 1),
    ("stage3 64->64 @8", 64, 8, 64, 1, 3, 5),
)


#: The per-layer table's circuits: one per factor-term count of the bundled signed circuits
#: (1 exact, 1 masked, 3, 4, 5 int8 terms), so every variant of the registry meets one it fits.
LAYER_CIRCUITS = {"exact": "master:mul8s_1KV8", "masked": "mul8s_1KTY", "lowrank": "master:mul8s_1KVA",
                  "lowrank4": "mul8s_1KVB", "general": "mul8s_1KX2"}
#: The unsigned circuits of the per-layer table: tables that do not factor, one whose residual over
#: the exact product fits a byte per row (``table``: rows8 fits) and one that needs 16 bits
#: (``table16``: only rows and gather fit).
TABLE_CIRCUITS = {"table": "mul8u_DG8", "table16": "mul8u_2NDH"}


@dataclass
class LayerResult:
    layer: str
    exact_ms: float
    variants: dict[str, tuple[str, float]]   # registry name -> (circuit kind, ms)
    auto: dict[str, str]                     # circuit kind -> the registry name lowering picks
    exact_u8_ms: float = 0.0                 # the unsigned exact int8 conv (the u8 variants' reference)
    costs: dict[str, float] = field(default_factory=dict)   # registry name -> the cost model's price

    def reference_ms(self, variant: str) -> float:
        """The exact int8 conv time of the variant's datatype."""
        return self.exact_u8_ms if variant.startswith("u8-") else self.exact_ms


def _check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        raise QosError(f"{what} is not bit-exact against the reference")


def variant_cases(target: Target, luts: dict[str, np.ndarray], taps: int, signed: bool = True) -> list[tuple[Any, str]]:
    """Every registry variant of the datatype ``target`` runs, as (ConvLowering, circuit kind) with
    the first circuit of ``luts`` it fits (variants no circuit fits are left out)."""
    from ..tvm.lowering import variant_lowering
    from ..tvm.variants import VARIANTS, LayerTables

    tables = {kind: LayerTables([lut], signed, taps) for kind, lut in luts.items()}
    out = []
    for v in VARIANTS:
        if v.signed != signed or not v.available(target.features):
            continue
        for kind, t in tables.items():
            low = variant_lowering(v, t, target.features, target.kernel_costs)
            if low is not None:
                out.append((low, kind))
                break
    return out


def layer_case(c: int, h: int, o: int, stride: int, k: int, seed: int = 0,
               signed: bool = True) -> tuple[Any, np.ndarray, np.ndarray]:
    """(ConvSpec, x, w) of one ResNet-20 conv shape with random codes of the datatype."""
    from ..numerics import code_range
    from ..tvm import kernels as K

    rng = np.random.default_rng(seed)
    lo, hi = code_range(signed)
    spec = K.ConvSpec.make((1, c, h, h), (o, c, k, k), stride=stride, padding=k // 2, pad_code=0, signed=signed)
    dt = np.int8 if signed else np.uint8
    return spec, rng.integers(lo, hi + 1, spec.x_shape).astype(dt), rng.integers(lo, hi + 1, spec.w_shape).astype(dt)


def layer_funcs(target: Target, spec: Any, w: np.ndarray, cases: Sequence[tuple[Any, str]], prefix: str,
                exact: str) -> dict[str, Any]:
    """The exact int8 conv (named ``exact``) and every case's stages (``<prefix><i>_<stage>``)."""
    from ..tvm import kernels as K

    funcs: dict[str, Any] = {exact: K.exact_conv2d_func(spec, target)}
    for i, (low, _) in enumerate(cases):
        funcs.update({f"{prefix}{i}_{st}": f for st, f in low.variant.stages(spec, low, w, target).items()})
    return funcs


def bench_layer(target: Target, name: str, c: int, h: int, o: int, stride: int, k: int, repeats: int,
                threads: int | None, seed: int = 0) -> LayerResult:
    """Build, verify and time every variant on one conv shape (see the module docstring): the
    signed variants on ``LAYER_CIRCUITS``, the unsigned ones on ``TABLE_CIRCUITS``, each against
    the exact int8 conv of its datatype."""
    from ..reference import approx_conv2d_acc
    from ..tvm.build import build_kernels
    from ..tvm.lowering import choose_conv_lowering

    taps = c * k * k
    funcs: dict[str, Any] = {}
    runs = []
    for signed, circuits in ((True, LAYER_CIRCUITS), (False, TABLE_CIRCUITS)):
        dt = "s8" if signed else "u8"
        spec, x, w = layer_case(c, h, o, stride, k, seed, signed)
        luts = {kind: get(cname).lut.astype(np.int32) for kind, cname in circuits.items()}
        cases = variant_cases(target, luts, taps, signed)
        funcs.update(layer_funcs(target, spec, w, cases, dt, f"{dt}_exact"))
        runs.append((dt, spec, x, w, luts, cases, circuits))
    built = build_kernels(funcs, target, system_lib=True)
    res: dict[str, tuple[str, float]] = {}
    exact_ms: dict[str, float] = {}
    auto: dict[str, str] = {}
    costs: dict[str, float] = {}
    for dt, spec, x, w, luts, cases, circuits in runs:
        ref = {kind: approx_conv2d_acc(x, w, lut, stride=stride, padding=k // 2, pad_code=0, signed=spec.signed)
               for kind, lut in luts.items()}
        exact = approx_conv2d_acc(x, w, _exact_lut(spec.signed), stride=stride, padding=k // 2, pad_code=0,
                                  signed=spec.signed)
        _check(built.run(f"{dt}_exact", x, w, repeat=repeats, threads=threads), exact, f"{name}: {dt} exact conv")
        exact_ms[dt] = built.last_time_ns / 1e6
        for i, (low, kind) in enumerate(cases):
            got, ms = low.variant.run(built, f"{dt}{i}_", spec, low, x, w, luts[kind], repeats, threads)
            _check(got, ref[kind], f"{name}: {low.describe()} for {circuits[kind]}")
            res[low.describe()] = (kind, ms)
            costs[low.describe()] = low.cost
        auto.update({kind: choose_conv_lowering([lut], spec.signed, target.features, taps=taps,
                                                costs=target.kernel_costs).describe() for kind, lut in luts.items()})
    return LayerResult(name, exact_ms["s8"], res, auto, exact_ms["u8"], costs)


def _exact_lut(signed: bool) -> np.ndarray:
    from ..multipliers.table import exact_table

    return exact_table(signed).astype(np.int32)


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


def bench_network(target: Target, runs: int, threads: int | None, tmp: Path,
                  kinds: Sequence[str] = tuple(CIRCUITS), ort_isa: str = "native") -> dict[str, Any]:
    """Whole ResNet-20 per circuit kind (see the module docstring); ``ort_isa`` "avx2": time
    onnxruntime in a child whose CPUID shows no AVX-512 or AVX-VNNI (``cpuid_mask``)."""
    res: dict[str, Any] = {}
    for kind in kinds:
        circuit = CIRCUITS[kind]
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
        if ort_isa == "native":
            res["ort_int8"] = {"us": _ort_int8_us(tmp, runs), "isa": "native"}
        else:
            res["ort_int8"] = {"us": _ort_int8_us_masked(tmp, runs), "isa": f"{ort_isa}, CPUID masked"}
    return res


def _ort_int8_us_masked(tmp: Path, runs: int) -> float:
    """``_ort_int8_us`` in a child that sees an AVX2 CPU (``cpuid_mask``): onnxruntime's AVX2 code."""
    from . import cpuid_mask

    lib = cpuid_mask.build(tmp)
    model, x = _ort_int8_resnet20(tmp)
    np.save(tmp / "resnet20_in.npy", x)
    return cpuid_mask.ort_latency_masked(lib, model, tmp / "resnet20_in.npy", 1, runs).median_ms * 1e3


def _ort_int8_resnet20(tmp: Path) -> tuple[Path, np.ndarray]:
    """onnxruntime's int8 ResNet-20 (untrained, calibrated on random data) and its input."""
    import torch

    from ..models import build_model
    from .baselines import ort_int8_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    path = ort_int8_model(model, calib, tmp / "resnet20_int8.onnx")
    return Path(path), np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)


def _ort_int8_us(tmp: Path, runs: int) -> float:
    from .baselines import ort_latency

    path, x = _ort_int8_resnet20(tmp)
    return ort_latency(path, x, repeats=runs).median_ms * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (best of)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200, help="whole-network inferences per build (median)")
    ap.add_argument("--no-network", action="store_true", help="only the per-layer table")
    ap.add_argument("--no-layers", action="store_true", help="only the whole-network table")
    ap.add_argument("--kinds", default=",".join(CIRCUITS),
                    help=f"whole-network kinds, comma-separated (default {','.join(CIRCUITS)}; exact always runs)")
    ap.add_argument("--ort-isa", choices=("native", "avx2"), default="native",
                    help="onnxruntime's code path: native, or avx2 (a child process whose CPUID shows no "
                         "AVX-512 or AVX-VNNI, for a baseline as an AVX2-only CPU runs it; needs CPUID faulting)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    kinds = ["exact"] + [k for k in a.kinds.split(",") if k and k != "exact"]
    bad = [k for k in kinds if k not in CIRCUITS]
    if bad:
        ap.error(f"unknown kind {bad[0]!r} (one of {', '.join(CIRCUITS)})")
    try:
        target = get_target(a.target)
        target.run_prefix()            # the kernels run in this process or its emulator: can they?
        return _run(a, target, kinds)
    except QosError as e:
        print(f"kernels: error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace, target: Target, kinds: list[str]) -> int:
    """The benchmark of ``main``'s arguments on ``target``."""
    emu = "" if target.is_host else " EMULATED (qemu)"
    print(host_line())
    out: dict[str, Any] = {"host": host_info(), "target": target.name, "emulated": not target.is_host,
                           "threads": a.threads, "costs": target.costs_text(),
                           "circuits": {**LAYER_CIRCUITS, **TABLE_CIRCUITS}}
    if not a.no_layers:
        print(f"# conv kernel variants vs exact int8 conv, {target.name}, {a.threads} thread(s){emu}; "
              f"costs: {target.costs_text()}")
        print("circuits: " + ", ".join(f"{k} {v}" for k, v in {**LAYER_CIRCUITS, **TABLE_CIRCUITS}.items())
              + " (u8 variants against the unsigned exact int8 conv)")
        layers = [bench_layer(target, name, c, h, o, s, k, a.repeats, a.threads)
                  for name, c, h, o, s, k, _ in RESNET20_CONVS]
        counts = [conv[-1] for conv in RESNET20_CONVS]
        exact_tot = sum(n * r.exact_ms for n, r in zip(counts, layers))
        exact_u8_tot = sum(n * r.exact_u8_ms for n, r in zip(counts, layers))
        print(f"\nexact int8 conv, ms{emu}: " + ", ".join(f"{r.layer} {r.exact_ms:.4f}" for r in layers)
              + f"; all 19 convs {exact_tot:.4f}")
        print("\n| variant (circuit) | " + " | ".join(f"{r.layer} (x{n})" for r, n in zip(layers, counts))
              + " | all 19 convs | cost model |")
        print("| --- |" + " ---: |" * (len(layers) + 2))
        tot: dict[str, float] = {}
        for vname, (kind, _) in layers[0].variants.items():
            ms = [r.variants[vname][1] for r in layers]
            tot[vname] = sum(n * m for n, m in zip(counts, ms))
            model = layers[0].costs[vname]
            ref_tot = exact_u8_tot if vname.startswith("u8-") else exact_tot
            print(f"| `{vname}` ({kind}) | " + " | ".join(f"{m / r.reference_ms(vname):.2f}x" for m, r in zip(ms, layers))
                  + f" | {tot[vname] / ref_tot:.2f}x | {model:.2f}x |")
        print("\nauto picks (every layer): " + "; ".join(
            f"{kind} -> " + ", ".join(sorted({r.auto[kind] for r in layers})) for kind in {**LAYER_CIRCUITS,
                                                                                       **TABLE_CIRCUITS}))
        out.update(layers=[r.__dict__ for r in layers],
                   conv_totals_ms={"exact": exact_tot, "exact_u8": exact_u8_tot, **tot})
    if not a.no_network:
        with tempfile.TemporaryDirectory() as d:
            net = bench_network(target, a.runs, a.threads, Path(d), kinds, a.ort_isa)
        out["network_us"] = net
        base = net["exact"]["us"]
        ort = net.get("ort_int8", {}).get("us")
        vs_ort = " ratio vs onnxruntime int8 |" if ort else ""
        print(f"\n| whole ResNet-20 inference | circuit | conv kernels | median us{emu} | ratio vs exact circuit |"
              + vs_ort)
        print("| --- | --- | --- | ---: | ---: |" + (" ---: |" if ort else ""))
        for kind in kinds:
            r = net[kind]
            print(f"| {kind} | {r['circuit']} | {r['kernels']} | {r['us']:.1f} | {r['us'] / base:.2f}x |"
                  + (f" {r['us'] / ort:.2f}x |" if ort else ""))
        if ort:
            isa = net["ort_int8"]["isa"]
            label = "" if isa == "native" else f", {isa}"
            print(f"| onnxruntime int8 (QLinearConv{label}) | exact | - | {ort:.1f} | {ort / base:.2f}x | 1.00x |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
