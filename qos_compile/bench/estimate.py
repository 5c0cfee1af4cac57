"""Kernel costs from a machine model: basic-block counts under qemu, cycles from llvm-mca.

    python -m qos_compile.bench.estimate --target aarch64-cortex-a76 [--mcpu neoverse-n1]
                                         [--layers all|1,3,5] [--write] [--json F]

For a target without a board to measure on, this estimates what ``python -m
qos_compile.bench.kernels`` would measure there (kernel time / exact int8 conv time):

1. Every kernel variant of the registry (``tvm.variants``) the target runs is built for
   ResNet-20's six conv shapes (``bench.kernels.RESNET20_CONVS``; ``--layers`` picks a
   subset), on the first bundled circuit it fits (signed: ``bench.kernels.LAYER_CIRCUITS``;
   unsigned: ``TABLE_CIRCUITS``, then the unsigned exact product), next to TVM's exact int8
   conv of each datatype, into one statically linked kernel driver per shape.
2. Each kernel (every stage of a multi-stage one) runs ONCE, one thread, under qemu user
   mode with ``-d in_asm,exec,nochain``: ``in_asm`` logs every translation block (TB) once
   with the address of each guest instruction, ``exec`` logs every execution of a TB with
   its guest PC, and ``nochain`` makes qemu return to its main loop after every TB, so
   every execution is logged (chained TBs would not be). Counting the executions per TB
   gives the executions of each straight-line block of the kernel's own code (the TBs that
   start inside the kernel object's ``.text``, located in the executable through its
   global symbols: TVM's parallel lambdas have none; the C driver, the shim's thread pool
   and libc are left out). The result is checked bit-exact against the reference, too.
3. Each distinct TB's instructions (disassembled from the executable by ``llvm-objdump``,
   branch targets replaced by a local label) are priced by ``llvm-mca -mcpu=<model>`` as
   one code region: cycles per execution = total cycles / iterations of the region
   repeated (its steady-state throughput, with loop-carried dependencies). A kernel's
   cycles are sum(TB cycles x executions).
4. Ratios: kernel cycles / exact int8 conv cycles (of the variant's datatype) per layer and over the 19 convs
   (weighted by each shape's count in the network); per cost key (``Variant.cost_key``)
   the cost per unit (``Variant.units``: factor terms for lowrank, term groups for dot)
   is the least-squares fit through the origin of the variants' 19-conv ratios against
   their units.

``--write`` replaces the target file's ``[kernel_costs]`` (and its comment) with the
estimate, labelled ``ESTIMATED (llvm-mca <model>, <date>)``.

The machine model is llvm-mca's: out-of-order or in-order pipelines, ports and latencies
per instruction, no caches (every load hits L1), no branch mispredictions, each block in
its own steady state. It ranks kernels by the work they issue, which qemu's emulation
time does not (qemu runs vector instructions through helpers and plain loads fast).
x86-64 works the same way under ``qemu-x86_64-static -cpu max``; qemu 7.2 emulates AVX2
but not AVX-512, so x86 estimates are for AVX2 (or older) targets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from ..multipliers import get
from ..targets import Target, get_target
from .host import host_line
from .kernels import LAYER_CIRCUITS, RESNET20_CONVS, layer_case, variant_cases

#: llvm-mca scheduling model per LLVM -mcpu of a target (others: the mcpu itself).
MCA_MODELS = {"cortex-a76": "neoverse-n1", "native": "znver4"}
LLVM_MCA = "llvm-mca-19"
LLVM_OBJDUMP = "llvm-objdump-19"
LLVM_PACKAGE = "llvm-19"
QEMU_LOG = ("-d", "in_asm,exec,nochain")
_TRACE = re.compile(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")
_INSN = re.compile(r"^0x([0-9a-f]+):")
_LABELLED = re.compile(r"\b0x[0-9a-f]+ <[^>]*>")
_BRANCH_AARCH64 = re.compile(r"^(b|bl|b\.\w+|cbz|cbnz|tbz|tbnz|adr|adrp|ldr|ldrsw|prfm)$")


@dataclass
class Block:
    """One qemu translation block of kernel code: its guest instruction addresses."""

    pcs: tuple[int, ...]
    symbol: str                   # qemu's name for it ("" inside the kernels' unnamed parallel lambdas)


@dataclass
class Counts:
    """Executions per translation block (key: first PC and instruction count)."""

    blocks: dict[tuple[int, int], Block] = field(default_factory=dict)
    execs: Counter = field(default_factory=Counter)

    def add(self, other: "Counts") -> None:
        self.blocks.update(other.blocks)
        self.execs.update(other.execs)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QosError(f"{name} not found: install the Debian package {LLVM_PACKAGE} (apt-get install {LLVM_PACKAGE}; "
                       "scripts/setup.sh does)")
    return path


def mca_model(target: Target) -> str:
    """The llvm-mca ``-mcpu`` for a target: ``MCA_MODELS`` by its LLVM mcpu, else the mcpu."""
    mcpu = str(target.tvm.get("mcpu", "generic"))
    return MCA_MODELS.get(mcpu, mcpu)


def emulator(target: Target, log_dir: Path) -> list[str]:
    """The qemu command that runs the target's programs with TB logging into ``log_dir``
    (one file per process: qemu replaces ``%d`` by its pid)."""
    log = ["-D", str(log_dir / "qemu-%d.log")]
    if target.arch == "x86_64":
        if "avx512f" in target.features:
            raise QosError(f"{target.name} uses AVX-512, which qemu 7.2 does not emulate; estimate an AVX2 target "
                           "(x86_64-avx2) instead")
        return [_tool("qemu-x86_64-static"), "-cpu", "max", *QEMU_LOG, *log]
    if not target.emulator:
        raise QosError(f"target {target.name} declares no emulator")
    return [*target.run_prefix(), *QEMU_LOG, *log]


def parse_log(text: str, ranges: Sequence[tuple[int, int]]) -> Counts:
    """TB definitions (``in_asm``) and executions (``exec``) of the code in ``ranges`` (the
    kernel object's, ``kernel_ranges``) in one qemu log."""
    out = Counts()
    current: dict[int, tuple[int, int]] = {}        # TB start pc -> key of its latest translation
    lines = text.splitlines()
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if line.startswith("Trace "):
            m = _TRACE.match(line)
            if m:
                key = current.get(int(m.group(1), 16))
                if key is not None:
                    out.execs[key] += 1
            i += 1
        elif line.startswith("IN:"):
            symbol = line[3:].strip()
            pcs = []
            i += 1
            while i < n and (m := _INSN.match(lines[i])):
                pcs.append(int(m.group(1), 16))
                i += 1
            if pcs and any(lo <= pcs[0] < hi for lo, hi in ranges):
                key = (pcs[0], len(pcs))
                out.blocks[key] = Block(tuple(pcs), symbol)
                current[pcs[0]] = key
            elif pcs:
                current.pop(pcs[0], None)
        else:
            i += 1
    return out


def _symbols(path: Path) -> list[tuple[int, str, int, str, str]]:
    """(value, section, size, binding, name) of every function symbol of an ELF file."""
    p = subprocess.run([_tool(LLVM_OBJDUMP), "-t", str(path)], capture_output=True, text=True, check=True)
    out = []
    for ln in p.stdout.splitlines():
        m = re.match(r"^([0-9a-f]{8,16}) (.)(.{5})F (\S+)\s+([0-9a-f]+) (.+)$", ln)
        if m:
            out.append((int(m.group(1), 16), m.group(4), int(m.group(5), 16), m.group(2), m.group(6).strip()))
    return out


def kernel_ranges(obj: Path, exe: Path) -> list[tuple[int, int]]:
    """Address ranges of the kernel object's ``.text`` in the linked executable (its parallel
    lambdas have no symbols, so TBs are attributed by address): each located through a
    global function of the object."""
    p = subprocess.run([_tool(LLVM_OBJDUMP), "-h", str(obj)], capture_output=True, text=True, check=True)
    sizes = {parts[1]: int(parts[2], 16) for ln in p.stdout.splitlines()
             if len(parts := ln.split()) >= 5 and parts[0].isdigit() and parts[-1] == "TEXT"}
    in_exe = {name: value for value, _, _, bind, name in _symbols(exe) if bind == "g"}
    ranges = []
    for section, size in sizes.items():
        anchor = next(((v, n) for v, sec, _, bind, n in _symbols(obj) if sec == section and bind == "g"
                       and n in in_exe), None)
        if anchor is not None:
            base = in_exe[anchor[1]] - anchor[0]
            ranges.append((base, base + size))
    if not ranges:
        raise QosError(f"cannot locate the code of {obj.name} in {exe.name}")
    return ranges


def disassemble(exe: Path, arch: str) -> dict[int, str]:
    """Address -> instruction (LLVM assembly syntax, comments dropped) of a static executable."""
    p = subprocess.run([_tool(LLVM_OBJDUMP), "-d", "--no-show-raw-insn", str(exe)], capture_output=True, text=True,
                       check=True)
    out: dict[int, str] = {}
    for ln in p.stdout.splitlines():
        addr, sep, rest = ln.partition(":")
        if not sep or not addr.strip() or not rest.lstrip(" ").startswith("\t"):
            continue
        try:
            pc = int(addr.strip(), 16)
        except ValueError:
            continue
        out[pc] = _clean(rest.strip(), arch)
    return out


def _clean(insn: str, arch: str) -> str:
    """One disassembled instruction as llvm-mca input: comments dropped, addresses -> label ``.Lq``."""
    insn = insn.split("//")[0] if arch == "aarch64" else insn.split("#")[0]     # AT&T immediates are $n
    insn = _LABELLED.sub(".Lq", insn).strip()
    parts = insn.split(None, 1)
    if parts and parts[0] in ("bl", "blr", "call", "callq"):
        return "nop"           # a call into the runtime (workspace, thread pool): not the kernel's work
    if arch == "aarch64" and parts and _BRANCH_AARCH64.match(parts[0]) and len(parts) == 2:
        ops = parts[1].rsplit(",", 1)
        if re.fullmatch(r"\s*0x[0-9a-f]+\s*", ops[-1]):
            insn = parts[0] + " " + ",".join([*ops[:-1], " .Lq"] if len(ops) == 2 else [".Lq"])
    elif arch == "x86_64" and parts and parts[0].startswith(("j", "call", "loop")) and len(parts) == 2:
        if re.fullmatch(r"0x[0-9a-f]+", parts[1].strip()):
            insn = parts[0] + " .Lq"
    return insn.replace("\t", " ")


def price_blocks(blocks: dict[tuple[int, int], Block], insns: dict[int, str], arch: str, model: str,
                 mattr: Sequence[str] = ()) -> tuple[dict[tuple[int, int], float], int]:
    """Cycles per execution of every block by llvm-mca (one code region per block); also the
    number of instructions llvm-mca skipped as unsupported."""
    keys = sorted(blocks)
    text = []
    for r, key in enumerate(keys):
        body = [re.sub(r"\.Lq\b", f".Lq{r}", insns.get(pc, "nop")) for pc in blocks[key].pcs]
        text += [f"# LLVM-MCA-BEGIN b{r}", f".Lq{r}:", *body, "# LLVM-MCA-END"]
    triple = "aarch64-linux-gnu" if arch == "aarch64" else "x86_64-linux-gnu"
    cmd = [_tool(LLVM_MCA), f"-mtriple={triple}", f"-mcpu={model}", "-iterations=100", "-instruction-info=false",
           "-resource-pressure=false", "-skip-unsupported-instructions=any"]
    feats = [a for a in mattr if a.startswith(("+", "-"))]
    if feats:
        cmd.append("-mattr=" + ",".join(feats))
    p = subprocess.run(cmd, input="\n".join(text) + "\n", capture_output=True, text=True)
    if p.returncode != 0:
        raise QosError(f"llvm-mca failed: {p.stderr.strip()[-500:]}")
    cycles: dict[tuple[int, int], float] = {}
    region, iters = None, 100
    for ln in p.stdout.splitlines():
        if m := re.match(r"\[\d+\] Code Region - b(\d+)", ln):
            region = int(m.group(1))
        elif m := re.match(r"Iterations:\s+(\d+)", ln):
            iters = int(m.group(1))
        elif (m := re.match(r"Total Cycles:\s+(\d+)", ln)) and region is not None:
            cycles[keys[region]] = int(m.group(1)) / iters
    skipped = len(re.findall(r"(?im)^.*(?:skipp|unsupported).*$", p.stderr))
    if len(cycles) != len(keys):
        raise QosError(f"llvm-mca priced {len(cycles)} of {len(keys)} blocks")
    return cycles, skipped


@dataclass
class LayerEstimate:
    layer: str
    count: int
    exact_cycles: float                       # TVM's exact int8 conv, signed codes
    variants: dict[str, tuple[str, float]]    # registry name -> (circuit kind, cycles)
    blocks: int = 0                           # distinct translation blocks priced
    skipped: int = 0                          # instructions llvm-mca could not price (left out)
    #: rows8 variant -> (the variant of its exact part, its residual's ``lut_rows.lookup_share``)
    parts: dict[str, tuple[str, float]] = field(default_factory=dict)
    exact_u8_cycles: float = 0.0              # the exact int8 conv on unsigned codes (the u8 variants' reference)

    def reference(self, variant: str) -> float:
        """The exact conv cycles a variant's ratio divides by: that of its datatype."""
        return self.exact_u8_cycles if variant.startswith("u8-") else self.exact_cycles


def estimate_layer(target: Target, conv: tuple, model: str, work: Path) -> LayerEstimate:
    """Build every fitting variant for one conv shape (signed ones on ``LAYER_CIRCUITS``, unsigned
    ones on ``TABLE_CIRCUITS``, next to the exact int8 conv of each datatype), count its blocks
    under qemu, price them."""
    from ..reference import approx_conv2d_acc
    from ..tvm.build import build_kernels
    from ..tvm.lut_rows import lookup_share
    from .kernels import TABLE_CIRCUITS, _exact_lut, layer_funcs

    name, c, h, o, s, k, count = conv
    runs, funcs = [], {}
    for signed, circuits in ((True, LAYER_CIRCUITS), (False, TABLE_CIRCUITS)):
        dt = "s8" if signed else "u8"
        spec, x, w = layer_case(c, h, o, s, k, signed=signed)
        luts = {kind: get(cname).lut.astype(np.int32) for kind, cname in circuits.items()}
        luts.setdefault("exact", _exact_lut(signed))
        cases = variant_cases(target, luts, c * k * k, signed)
        funcs.update(layer_funcs(target, spec, w, cases, dt, f"{dt}_exact"))
        runs.append((dt, spec, x, w, luts, cases))
    built = build_kernels(funcs, target, system_lib=True)
    exe = built.executable()
    ranges = kernel_ranges(built.path, exe)
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    built.run_prefix = emulator(target, log_dir)

    def counted(run: Any) -> tuple[Any, Counts]:
        for f in log_dir.glob("qemu-*.log"):
            f.unlink()
        got = run()
        total = Counts()
        for f in sorted(log_dir.glob("qemu-*.log")):
            total.add(parse_log(f.read_text(errors="replace"), ranges))
            f.unlink()
        return got, total

    per: dict[str, tuple[str, Counts]] = {}
    parts: dict[str, tuple[str, float]] = {}
    exact: dict[str, Counts] = {}
    for dt, spec, x, w, luts, cases in runs:
        def want(lut: np.ndarray) -> np.ndarray:
            return approx_conv2d_acc(x, w, lut, stride=s, padding=k // 2, pad_code=0, signed=spec.signed)

        got, exact[dt] = counted(lambda: built.run(f"{dt}_exact", x, w, threads=1))
        if not np.array_equal(got, want(luts["exact"])):
            raise QosError(f"{name}: the {dt} exact conv is not bit-exact under qemu")
        if not exact[dt].execs:
            raise QosError(f"{name}: qemu logged no execution of the kernel's code (is -d exec supported?)")
        for i, (low, kind) in enumerate(cases):
            (acc, _), cnt = counted(lambda: low.variant.run(built, f"{dt}{i}_", spec, low, x, w, luts[kind], 0, 1))
            if not np.array_equal(acc, want(luts[kind])):
                raise QosError(f"{name}: {low.describe()} is not bit-exact under qemu")
            per[low.describe()] = (kind, cnt)
            if low.exact is not None:           # rows8: its residual is priced apart from its exact part
                parts[low.describe()] = (low.exact.describe(), lookup_share(low.isa, low.fit.classes))
    blocks: dict[tuple[int, int], Block] = {}
    for cnt in [*exact.values(), *(cnt for _, cnt in per.values())]:
        blocks.update(cnt.blocks)
    cycles, skipped = price_blocks(blocks, disassemble(exe, target.arch), target.arch, model,
                                   target.tvm.get("mattr", ()))

    def total(cnt: Counts) -> float:
        return float(sum(cycles[key] * n for key, n in cnt.execs.items()))

    return LayerEstimate(name, count, total(exact["s8"]), {v: (kind, total(cnt)) for v, (kind, cnt) in per.items()},
                         len(blocks), skipped, parts, total(exact["u8"]))


def fit_costs(layers: Sequence[LayerEstimate]) -> tuple[dict[str, float], dict[str, float]]:
    """(ratio over the layers per variant, cost per unit per cost key: least squares through the origin).

    A ``rows8`` variant's ratio is its whole kernel; its cost key prices the residual alone, over
    all 256 activations, as the lowering reads it (``lowering.variant_lowering``: the cost times
    the layer's ``lookup_share`` plus the exact part's own price): so its residual is the ratio
    less its exact part's, divided by the share of the circuit it ran on."""
    from ..tvm.variants import get_variant

    ratios = {v: sum(la.count * la.variants[v][1] for la in layers) / sum(la.count * la.reference(v) for la in layers)
              for v in layers[0].variants}
    num: Counter = Counter()
    den: Counter = Counter()
    for v, r in ratios.items():
        var = get_variant(v)
        if v in layers[0].parts:
            part, share = layers[0].parts[v]
            r = max(r - ratios[part], 0.0) / share
        num[var.cost_key] += r * var.units
        den[var.cost_key] += var.units ** 2
    return ratios, {key: num[key] / den[key] for key in num}


def write_costs(target: Target, costs: dict[str, float], model: str, layers: Sequence[LayerEstimate]) -> Path:
    """Replace the target file's ``[kernel_costs]`` table (and the comment block above it)."""
    from ..kernel_costs import COST_KEYS

    path = Path(target.source)
    text = path.read_text()
    date = datetime.date.today().isoformat()
    every = len(layers) == len(RESNET20_CONVS)
    over = "ResNet-20's 19 convs" if every else "ResNet-20's convs " + ", ".join(la.layer for la in layers)
    comment = (f"# Conv kernel time / exact int8 conv time per cost unit (tvm.variants),\n"
               f"# ESTIMATED (llvm-mca {model}, {date}): python -m qos_compile.bench.estimate --target {target.name}\n"
               f"# (every variant's basic-block counts under qemu -d in_asm,exec,nochain x llvm-mca cycles\n"
               f"# per block, over {over}). A model, not a measurement: replace these with a\n"
               f"# board's numbers (python -m qos_compile.bench.kernels --target {target.name} on it) where you can.\n")
    table = "[kernel_costs]\n" + "".join(f"{k} = {costs[k]:.3g}\n" for k in COST_KEYS if k in costs)
    m = re.search(r"(?:^#[^\n]*\n)*\[kernel_costs\]\n(?:[^\[\n][^\n]*\n|\n(?!\[))*", text, re.M)
    if m:
        text = text[:m.start()] + comment + table + "\n" + text[m.end():].lstrip("\n")
    else:
        i = text.index("[tvm]")
        text = text[:i] + comment + table + "\n" + text[i:]
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--mcpu", help="llvm-mca scheduling model (default: by the target's LLVM mcpu, MCA_MODELS)")
    ap.add_argument("--layers", default="all", help="comma-separated indices into RESNET20_CONVS (default: all "
                                                    "six shapes, about 2 minutes per aarch64 target)")
    ap.add_argument("--write", action="store_true", help="write the costs into the target file's [kernel_costs]")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    target = get_target(a.target)
    model = a.mcpu or mca_model(target)
    idx = range(len(RESNET20_CONVS)) if a.layers == "all" else [int(i) for i in a.layers.split(",")]
    convs = [RESNET20_CONVS[i] for i in idx]
    print(host_line() + " (the estimate models the target core, not this host)")
    print(f"# estimated conv kernel costs, {target.name}, llvm-mca -mcpu={model}, counts under qemu "
          f"({' '.join(QEMU_LOG)}), 1 thread")
    layers = []
    with tempfile.TemporaryDirectory(prefix="qos_estimate_") as d:
        for conv in convs:
            layers.append(estimate_layer(target, conv, model, Path(d)))
            la = layers[-1]
            print(f"{la.layer} (x{la.count}): {la.blocks} blocks, {la.skipped} instructions unpriced; exact int8 "
                  f"conv {la.exact_cycles:,.0f} cycles; " + ", ".join(
                f"{v} {cyc / la.reference(v):.2f}x" for v, (_, cyc) in la.variants.items()), flush=True)
    ratios, costs = fit_costs(layers)
    from ..tvm.variants import get_variant

    print("\n| variant (circuit) | " + " | ".join(f"{la.layer} (x{la.count})" for la in layers)
          + " | weighted | units | fitted cost x units |")
    print("| --- |" + " ---: |" * (len(layers) + 3))
    for v, r in ratios.items():
        var = get_variant(v)
        print(f"| `{v}` ({layers[0].variants[v][0]}) | "
              + " | ".join(f"{la.variants[v][1] / la.reference(v):.2f}x" for la in layers)
              + f" | {r:.2f}x | {var.units} | {costs[var.cost_key] * var.units:.2f}x |")
    print("\n[kernel_costs]  # ESTIMATED (llvm-mca " + model + ")\n"
          + "\n".join(f"{k} = {v:.3g}" for k, v in costs.items()))
    if a.write:
        print(f"wrote {write_costs(target, costs, model, layers)}")
    if a.json:
        a.json.write_text(json.dumps({"target": target.name, "model": model, "ratios": ratios, "costs": costs,
                                      "layers": [la.__dict__ for la in layers]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
