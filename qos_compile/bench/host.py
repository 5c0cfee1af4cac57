"""The machine a benchmark ran on, in one line: CPU model, core count and the ISA extensions
kernel selection cares about (``targets.X86_FEATURES``, NEON/dotprod on ARM).

Every benchmark prints it first and puts it in its JSON, so a number is never read without
the CPU it was measured on (AVX2-only and AVX-512 VNNI/VBMI hosts rank kernels differently).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from ..targets import X86_FEATURES, host_arch

_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"}


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", set()) where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags, ids = "", set(), {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key in ("cpu family", "model", "CPU part") and key not in ids:
            ids[key] = value.strip()
    if ids:   # a virtual machine's model name can be just "AMD EPYC": the family/model tell the core
        model += " (" + ", ".join(f"{k} {v}" for k, v in ids.items()) + ")"
    return model, flags


def host_info() -> dict[str, Any]:
    """The host as data: ``arch``, ``cpu`` (model name), ``cores`` and ``isa`` (sorted extensions)."""
    model, flags = _cpuinfo()
    isa = {f.replace("avx512_vnni", "avx512vnni") for f in flags if f in X86_FEATURES}
    isa |= {name for flag, name in _ARM_FLAGS.items() if flag in flags}
    return {"arch": host_arch(), "cpu": model or platform.processor() or "unknown CPU",
            "cores": os.cpu_count() or 1, "isa": sorted(isa)}


def host_line(h: dict[str, Any] | None = None) -> str:
    """``host: AMD EPYC ..., 2 cores, x86_64 (avx2 avx512f ... avx512vbmi)`` for ``h`` (a ``host_info()``
    record, e.g. from a benchmark's JSON; default: this machine)."""
    h = host_info() if h is None else h
    return f"host: {h['cpu']}, {h['cores']} cores, {h['arch']} ({' '.join(h['isa']) or 'baseline ISA'})"
