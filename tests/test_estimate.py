"""The machine-model cost estimate (``bench.estimate``): qemu log parsing, instruction
clean-up for llvm-mca, block pricing, writing a target file's costs, and one small conv
shape end to end under qemu."""
from __future__ import annotations

import shutil

import pytest

from qos_compile.bench import estimate as E
from qos_compile.targets import get_target

HAVE_MCA = shutil.which(E.LLVM_MCA) is not None and shutil.which(E.LLVM_OBJDUMP) is not None
HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None

#: A qemu 7.2 ``-d in_asm,exec,nochain`` log: a loop block run 3 times, a retranslation of
#: its start with fewer instructions run once, and a block outside the kernel's code.
LOG = """----------------
IN: k_compute
0x00401000:  b9401fe1  ldr      w1, [sp, #0x1c]
0x00401004:  0b010061  add      w1, w3, w1
0x00401008:  54ffffc1  b.ne     #0x401000

Trace 0: 0x7f0000000100 [0000000001009331/0000000000401000/00000001/00000200] k_compute
Trace 0: 0x7f0000000100 [0000000001009331/0000000000401000/00000001/00000200] k_compute
Trace 0: 0x7f0000000100 [0000000001009331/0000000000401000/00000001/00000200] k_compute
----------------
IN: printf
0x00500000:  d65f03c0  ret

Trace 0: 0x7f0000000200 [0000000001009331/0000000000500000/00000001/00000200] printf
----------------
IN:
0x00401000:  b9401fe1  ldr      w1, [sp, #0x1c]
0x00401004:  d65f03c0  ret

Trace 0: 0x7f0000000300 [0000000001009331/0000000000401000/00000001/00000200]
"""


def test_log_gives_executions_per_block_of_the_kernel_code():
    c = E.parse_log(LOG, [(0x401000, 0x402000)])
    assert dict(c.execs) == {(0x401000, 3): 3, (0x401000, 2): 1}          # retranslated: its own block
    assert c.blocks[(0x401000, 3)].pcs == (0x401000, 0x401004, 0x401008)
    assert (0x500000, 1) not in c.blocks                                    # libc: not the kernel's


def test_disassembly_becomes_llvm_mca_input():
    assert E._clean("b.ne\t0x4006e8 <main+0x14>", "aarch64") == "b.ne .Lq"
    assert E._clean("tbz\tw0, #0x3, 0x400710", "aarch64") == "tbz w0, #0x3, .Lq"
    assert E._clean("mov\tw1, #0x3e8 // =1000", "aarch64") == "mov w1, #0x3e8"
    assert E._clean("bl\t0x406b40 <printf>", "aarch64") == "nop"            # calls into the runtime
    assert E._clean("jne\t0x401530 <main+0x40>", "x86_64") == "jne .Lq"
    assert E._clean("movl\t0xa5d8b(%rip), %eax  # 0x4a72e4 <x>", "x86_64") == "movl 0xa5d8b(%rip), %eax"


@pytest.mark.skipif(not HAVE_MCA, reason="llvm-19 (llvm-mca-19) is not installed")
def test_blocks_are_priced_per_model():
    blocks = {(0x10, 3): E.Block((0x10, 0x14, 0x18), "k"), (0x20, 1): E.Block((0x20,), "k")}
    insns = {0x10: "ldr w1, [sp, #0x1c]", 0x14: "sdot v0.4s, v1.16b, v2.16b", 0x18: "b.ne .Lq",
             0x20: "add x0, x0, #1"}
    fast, _ = E.price_blocks(blocks, insns, "aarch64", "neoverse-n1", ["+dotprod"])
    slow, _ = E.price_blocks(blocks, insns, "aarch64", "cortex-a53", ["+dotprod"])
    assert 0 < fast[(0x20, 1)] <= 1.1 and fast[(0x10, 3)] < slow[(0x10, 3)]   # out-of-order vs in-order


def test_rows8_cost_is_its_residual_over_all_activations():
    """A rows8 kernel's cycles include its exact part; its cost key prices the residual alone,
    per 256 activations, as the lowering adds it to the exact part's price."""
    rows8, masked, gather = "s8-lutconv-neon-rows8", "s8-lutconv-masked", "s8-lutconv-gather"
    la = E.LayerEstimate("stem 3->16 @32", 1, 100.0, {rows8: ("general", 150.0), masked: ("exact", 100.0),
                                                     gather: ("exact", 300.0)},
                         parts={rows8: (masked, 0.5)})
    ratios, costs = E.fit_costs([la])
    assert ratios[rows8] == 1.5 and costs["masked"] == 1.0 and costs["gather"] == 3.0
    assert costs["rows8"] == pytest.approx(1.0)      # (1.5 - 1.0) / 0.5


def test_costs_are_written_with_their_method(tmp_path):
    src = get_target("aarch64-cortex-a72").source
    tgt = tmp_path / src.name
    tgt.write_text(src.read_text())

    class T:                        # the target file and name are all write_costs reads
        source, name = tgt, "aarch64-cortex-a72"

    layers = [E.LayerEstimate("stem 3->16 @32", 1, 100.0, {})]
    E.write_costs(T, {"masked": 1.0, "lowrank": 1.1, "rows": 7.0, "gather": 4.0}, "cortex-a72", layers)
    text = tgt.read_text()
    assert text.count("[kernel_costs]") == 1 and "ESTIMATED (llvm-mca cortex-a72, " in text
    assert "gather = 4\n" in text and "rows = 7\n" in text and text.count("# Conv kernel time") == 1
    from qos_compile.targets import _parse

    assert _parse(tgt, resolve_native=False).kernel_costs == {"masked": 1.0, "lowrank": 1.1, "rows": 7.0,
                                                              "gather": 4.0}


def test_avx512_targets_are_refused(tmp_path):
    t = get_target("x86_64")
    if "avx512f" not in t.features:
        pytest.skip("this host has no AVX-512")
    from qos_compile.errors import QosError

    with pytest.raises(QosError, match="does not emulate"):
        E.emulator(t, tmp_path)


@pytest.mark.skipif(not (HAVE_MCA and HAVE_ARM), reason="needs llvm-19 and the aarch64 toolchain + qemu")
def test_one_shape_end_to_end_under_qemu(tmp_path):
    """The stem shape on the A76 (N1) model: every variant of both datatypes counted, bit-exact,
    priced; the exact convs' cycles are plausible for their multiply-adds; udot (4 unsigned
    products per lane) runs the unsigned exact product, and rows8 knows its exact part."""
    t = get_target("aarch64-cortex-a76")
    la = E.estimate_layer(t, ("stem 3->16 @32", 3, 32, 16, 1, 3, 1), "neoverse-n1", tmp_path)
    assert {"s8-lutconv-masked", "s8-lutconv-lowrank-t3", "s8-lutconv-neon-rows", "s8-lutconv-gather",
            "u8-lutconv-neondot-dot-t1", "u8-lutconv-neon-rows8", "u8-lutconv-gather"} <= set(la.variants)
    macs = 16 * 32 * 32 * 3 * 9
    assert macs / 16 < la.exact_cycles < macs * 4 and macs / 16 < la.exact_u8_cycles < macs * 4
    assert la.skipped == 0
    ratios = {v: c / la.reference(v) for v, (_, c) in la.variants.items()}
    assert ratios["s8-lutconv-lowrank-t3"] > ratios["s8-lutconv-lowrank-t1"] > 0.5
    assert ratios["u8-lutconv-neondot-dot-t1"] < 0.5 < ratios["u8-lutconv-masked"]
    assert la.parts["u8-lutconv-neon-rows8"] == ("u8-lutconv-neondot-dot-t1", pytest.approx(1.5 / 4.5))
    assert ratios["u8-lutconv-neon-rows8"] > ratios["u8-lutconv-neondot-dot-t1"]
