"""Run a child process as if this x86-64 CPU had AVX2 + FMA but no AVX-512 and no AVX-VNNI.

Baselines that choose their kernels by CPUID at run time (onnxruntime's MLAS) run their
AVX-512 VNNI code on an AVX-512 host, so our AVX2 build's ratio against them is against a
faster baseline than an AVX2-only CPU has. ``cpuid_mask.c``, preloaded into the child,
makes CPUID trap (Linux CPUID faulting, ``/proc/cpuinfo`` flag ``cpuid_fault``) and answers
it with those feature bits cleared, so the child takes its AVX2 code path on this same
core. The core stays what it is (its caches, ports and clocks are not an AVX2-only CPU's):
a benchmark labels such times "CPUID masked to AVX2".
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..errors import QosError

#: The one profile the preload knows: what an AVX2 + FMA CPU reports.
PROFILE = "avx2"
_SOURCE = Path(__file__).with_name("cpuid_mask.c")


def unavailable() -> str | None:
    """Why this host cannot mask CPUID (None: it can)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"CPUID masking is x86-64 only (this is {platform.machine()})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo"
    if " cpuid_fault" not in flags:
        return "this CPU or kernel offers no CPUID faulting (/proc/cpuinfo flag cpuid_fault)"
    return None


def build(out_dir: Path) -> Path:
    """Compile the preload library into ``out_dir`` and check that a child under it sees an AVX2
    CPU (``check``); QosError where the host cannot use it."""
    from ..cbuild import compile_c, find_compiler

    why = unavailable()
    if why:
        raise QosError(why)
    lib = compile_c(find_compiler(), [_SOURCE], Path(out_dir) / "qos_cpuid_mask.so",
                    flags=["-O2", "-shared", "-fPIC"], what="the CPUID mask preload")
    check(lib)
    return lib


def masked_env(lib: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the preload on."""
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = " ".join(p for p in (str(lib), out.get("LD_PRELOAD", "")) if p)
    out["QOS_CPUID_PROFILE"] = PROFILE
    return out


def run_python(lib: Path, code: str, args: Sequence[str] = (), timeout: float | None = None) -> str:
    """Run ``python -c code args`` with the mask; its stdout. QosError when it fails."""
    p = subprocess.run([sys.executable, "-c", code, *args], env=masked_env(lib), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        raise QosError(f"the CPUID-masked child failed: {tail[0]}")
    return p.stdout


#: What the child prints first: NumPy's view of the CPU, proof the mask took.
PROBE = ("import numpy as _np; _f = _np._core._multiarray_umath.__cpu_features__; "
         "print('cpuid', 'avx2' if _f['AVX2'] else '-', 'avx512f' if _f['AVX512F'] else '-')")


#: The child that times an ONNX model in onnxruntime: argv model, input .npy, threads, repeats.
_ORT_TIMER = ("import sys, json, numpy as np; from qos_compile.bench.baselines import ort_latency; "
              "t = ort_latency(sys.argv[1], np.load(sys.argv[2]), repeats=int(sys.argv[4]), threads=int(sys.argv[3])); "
              "print(json.dumps([t.median_ms, t.p25_ms, t.p75_ms, t.n, t.min_ms, t.max_ms]))")


def ort_latency_masked(lib: Path, model: Path, x_npy: Path, threads: int, repeats: int) -> "Timing":
    """onnxruntime's latency for ``model`` on the input saved in ``x_npy``, in a child that sees an
    AVX2 CPU (its own process: not interleaved with anything)."""
    import json

    from .timing import Timing

    out = run_python(lib, _ORT_TIMER, [str(model), str(x_npy), str(threads), str(repeats)])
    med, p25, p75, n, lo, hi = json.loads(out.strip().splitlines()[-1])
    return Timing(med, p25, p75, int(n), lo, hi)


def check(lib: Path) -> None:
    """QosError unless a masked child sees AVX2 and no AVX-512F."""
    seen = run_python(lib, PROBE).split()
    if seen[:3] != ["cpuid", "avx2", "-"]:
        raise QosError(f"the CPUID mask did not take (the child saw {' '.join(seen[1:3])})")
