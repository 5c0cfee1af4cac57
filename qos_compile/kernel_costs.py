"""The kernel cost keys and their defaults: plain data below ``targets`` and ``tvm``.

A conv kernel variant's price is ``costs[cost_key] * units`` (time relative to the exact int8
conv, ``tvm.variants``); a target file's ``[kernel_costs]`` may override any of these keys.
The defaults were measured on an x86-64 host with AVX-512 VNNI (``python -m
qos_compile.bench.kernels``). ``tvm.variants`` checks that its table uses exactly these keys.
"""
from __future__ import annotations

__all__ = ["DEFAULT_COSTS", "COST_KEYS"]

DEFAULT_COSTS: dict[str, float] = {
    # Measured on AMD Zen 4 (EPYC, family 25 model 17, AVX-512 VBMI + VNNI), 2026-12-08:
    # python -m qos_compile.bench.kernels --no-network, 1 thread, all 19 ResNet-20 convs.
    # dot: per G factor terms (one vpdpbusd/sdot chunk, two for vpmaddwd's pairs), fitted to the
    # avx512vnni-dot-t1/t3/t4/t5 rows (0.85-1.0 per unit); lowrank per term (t1-t5 1.15-1.22)
    "masked": 1.21, "dot": 0.92, "lowrank": 1.2,
    # rows8 and pshufb_rows8 are the residual plane over all 256 activations (the lowering
    # scales it by the layer's column classes and adds its exact part, priced as its own
    # kernel): u8-avx512vbmi-rows8 1.52x and u8-avx2-rows8 1.94x on mul8u_DG8 with their parts
    "rows8": 1.5, "pshufb_rows8": 9.0, "rows": 2.3, "pshufb_rows": 15.0,
    # gather in AVX-512 code (LLVM's 512-bit gathers: 15-25x); AVX2 and scalar code differ,
    # and their target files say so
    "gather": 20.0}
#: What a target file's ``[kernel_costs]`` may state.
COST_KEYS: tuple[str, ...] = tuple(DEFAULT_COSTS)
