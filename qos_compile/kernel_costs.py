"""The kernel cost keys and their defaults: plain data below ``targets`` and ``tvm``.

A conv kernel variant's price is ``costs[cost_key] * units`` (time relative to the exact int8
conv, ``tvm.variants``); a target file's ``[kernel_costs]`` may override any of these keys.
The defaults were measured on an x86-64 host with AVX-512 VNNI (``python -m
qos_compile.bench.kernels``). ``tvm.variants`` checks that its table uses exactly these keys.
"""
from __future__ import annotations

__all__ = ["DEFAULT_COSTS", "COST_KEYS"]

DEFAULT_COSTS: dict[str, float] = {
    # dot: per G factor terms (one vpdpbusd/sdot chunk, two for vpmaddwd's pairs), fitted to the
    # avx512vnni-dot-t1/t3/t4/t5 rows measured on AMD Zen 4, 2026-12-03 (0.88-1.0 per unit)
    "masked": 1.12, "dot": 0.95, "lowrank": 1.05,
    # rows8, pshufb_*: measured on AMD Zen 4 (AVX-512 VBMI + VNNI), 2026-12-03; rows8 is the
    # residual part (its exact part is priced as its own kernel)
    "rows8": 1.5, "pshufb_rows8": 7.8, "rows": 1.35, "pshufb_rows": 14.0,
    "gather": 5.7}
#: What a target file's ``[kernel_costs]`` may state.
COST_KEYS: tuple[str, ...] = tuple(DEFAULT_COSTS)
